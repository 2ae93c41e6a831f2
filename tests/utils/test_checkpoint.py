import errno
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from maskrcnn.engine.solver import LRSchedule, WarmupMultiStepLR, build_optimizer
from maskrcnn.utils.checkpoint import (CheckpointError, CheckpointMismatchError, Checkpointer, load_checkpoint,
                                       load_ckpt, save_checkpoint)
from maskrcnn.utils.env import get_rng_state, set_rng_state


class Outs(nn.Module):
    def __init__(self, dim, num_classes):
        super().__init__()
        self.cls_score = nn.Linear(dim, num_classes)
        self.bbox_pred = nn.Linear(dim, 4 * num_classes)


class MaskOuts(nn.Module):
    def __init__(self, dim, num_classes):
        super().__init__()
        self.mask_fcn_logits = nn.Conv2d(dim, num_classes, 1)


class TinyRCNN(nn.Module):
    """Module names as in Generalized_RCNN, so that the class-specific layer rule applies."""

    def __init__(self, num_classes=3, width=4):
        super().__init__()
        self.Conv_Body = nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width))
        self.Box_Outs = Outs(width, num_classes)
        self.Mask_Outs = MaskOuts(width, num_classes)


def _files(d):
    return sorted(os.listdir(d))


# --- atomic save --------------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_weights_only_loadable(tmp_path):
    model = TinyRCNN()
    opt = build_optimizer(model, 0.1)
    sched = WarmupMultiStepLR(opt, LRSchedule(0.1, steps=(0, 5)))
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
               "iteration": 7, "cfg": "MODEL:\n  NUM_CLASSES: 3\n", "rng": get_rng_state()}
    path = tmp_path / "ck.pth"
    save_checkpoint(str(path), payload)
    raw = torch.load(str(path), weights_only=True)  # the contract: a plain weights-only load works
    assert raw["iteration"] == 7 and raw["cfg"].startswith("MODEL")
    loaded = load_checkpoint(str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    assert _files(tmp_path) == ["ck.pth", "ck.pth.sha256"]


def _half_writing_save(exc):
    real_save = torch.save

    def fake_save(obj, f, *a, **kw):
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        raise exc

    return fake_save


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("killed mid-write"),
                                 KeyboardInterrupt()])
def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch, exc):
    path = str(tmp_path / "model_final.pth")
    old = {"model": {"w": torch.arange(4.0)}, "iteration": 1}
    save_checkpoint(path, old)
    monkeypatch.setattr(torch, "save", _half_writing_save(exc))
    expected = CheckpointError if isinstance(exc, OSError) else type(exc)
    with pytest.raises(expected) as info:
        save_checkpoint(path, {"model": {"w": torch.zeros(10000)}, "iteration": 2})
    if isinstance(exc, OSError):
        msg = str(info.value)
        assert path in msg and "No space left on device" in msg and "previous checkpoint" in msg and "intact" in msg
    monkeypatch.undo()
    assert _files(tmp_path) == ["model_final.pth", "model_final.pth.sha256"]  # no temporary file left behind
    again = load_checkpoint(path)
    assert again["iteration"] == 1 and torch.equal(again["model"]["w"], torch.arange(4.0))


def test_enospc_without_previous_file_says_nothing_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _half_writing_save(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointError, match="no checkpoint was written"):
        save_checkpoint(str(tmp_path / "a.pth"), {"iteration": 0})
    assert _files(tmp_path) == []


def test_saved_file_permissions_follow_umask(tmp_path):
    path = tmp_path / "p.pth"
    save_checkpoint(str(path), {"iteration": 0})
    mask = os.umask(0)
    os.umask(mask)
    assert (os.stat(path).st_mode & 0o777) == (0o666 & ~mask)


# --- load errors ------------------------------------------------------------------------------------------------
def test_load_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not found.*nope.pth"):
        load_checkpoint(missing)
    good = tmp_path / "good.pth"
    save_checkpoint(str(good), {"model": {"w": torch.randn(100)}, "iteration": 3})
    data = good.read_bytes()
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc\.pth is truncated or corrupt"):
        load_checkpoint(str(trunc))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth is empty"):
        load_checkpoint(str(empty))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"junk\.pth is truncated or corrupt"):
        load_checkpoint(str(junk))
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(str(tmp_path))


def test_load_refuses_pickled_objects_with_a_clear_message(tmp_path):
    import argparse
    path = tmp_path / "objs.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, str(path))
    with pytest.raises(CheckpointError, match=r"objs\.pth holds Python objects.*convert_weights"):
        load_checkpoint(str(path))


# --- load_ckpt ----------------------------------------------------------------------------------------------------
def test_load_ckpt_loads_our_format_and_strips_module_prefix(tmp_path):
    src, dst = TinyRCNN(), TinyRCNN()
    path = str(tmp_path / "m.pth")
    save_checkpoint(path, {"model": {f"module.{k}": v for k, v in src.state_dict().items()}})
    report = load_ckpt(dst, path)
    assert report["skipped"] == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    # A bare state dict (no "model" key) and a DDP-like wrapper are accepted too.
    wrapper = nn.Module()
    wrapper.module = TinyRCNN()
    load_ckpt(wrapper, src.state_dict())
    assert torch.equal(wrapper.module.Conv_Body[0].weight, src.Conv_Body[0].weight)


def test_load_ckpt_lists_missing_unexpected_and_mismatched_keys_and_leaves_model_unchanged():
    src = TinyRCNN(width=4).state_dict()
    src["extra.weight"] = torch.zeros(1)
    del src["Conv_Body.1.bias"]
    src["Conv_Body.0.weight"] = torch.zeros(4, 3, 5, 5)
    dst = TinyRCNN(width=4)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_ckpt(dst, {"model": src})
    msg = str(info.value)
    assert "missing in the checkpoint (1): Conv_Body.1.bias" in msg
    assert "unexpected in the checkpoint (1): extra.weight" in msg
    assert "Conv_Body.0.weight checkpoint (4, 3, 5, 5) vs model (4, 3, 3, 3)" in msg
    assert info.value.missing == ["Conv_Body.1.bias"] and info.value.unexpected == ["extra.weight"]
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k])


def test_load_ckpt_fine_tune_skips_only_class_specific_layers(caplog):
    src = TinyRCNN(num_classes=81)
    dst = TinyRCNN(num_classes=3)
    fresh_cls = dst.Box_Outs.cls_score.weight.clone()
    with caplog.at_level("WARNING", logger="maskrcnn.checkpoint"):
        report = load_ckpt(dst, src.state_dict())
    assert sorted(report["skipped"]) == sorted([
        "Box_Outs.cls_score.weight", "Box_Outs.cls_score.bias", "Box_Outs.bbox_pred.weight",
        "Box_Outs.bbox_pred.bias", "Mask_Outs.mask_fcn_logits.weight", "Mask_Outs.mask_fcn_logits.bias"])
    assert "Box_Outs.cls_score.weight" in caplog.text and "fine-tuning" in caplog.text
    assert torch.equal(dst.Box_Outs.cls_score.weight, fresh_cls)
    assert torch.equal(dst.Conv_Body[0].weight, src.Conv_Body[0].weight)
    # Not allowed (resume/test): the same checkpoint is an error.
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        load_ckpt(TinyRCNN(num_classes=3), src.state_dict(), allow_class_mismatch=False)
    # A class-count mismatch together with a body mismatch is not fine-tuning: error.
    other = TinyRCNN(num_classes=81, width=8).state_dict()
    with pytest.raises(CheckpointMismatchError, match="Conv_Body.0.weight"):
        load_ckpt(TinyRCNN(num_classes=3), other)


def test_load_ckpt_rejects_unknown_formats():
    with pytest.raises(CheckpointError, match="not a maskrcnn checkpoint.*convert_weights"):
        load_ckpt(TinyRCNN(), {"blobs": {"conv1_w": 1}})


# --- RNG ------------------------------------------------------------------------------------------------------------
def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    state = get_rng_state()
    path = str(tmp_path / "rng.pth")
    save_checkpoint(path, {"rng": state})
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    set_rng_state(load_checkpoint(path)["rng"])
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), np.random.randn())
    assert again == expected


# --- Checkpointer -------------------------------------------------------------------------------------------------
def _trained(model, opt, sched, steps):
    for _ in range(steps):
        loss = model.Conv_Body(torch.randn(2, 3, 6, 6)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_checkpointer_save_find_and_resume(tmp_path):
    model = TinyRCNN()
    opt = build_optimizer(model, 0.1)
    sched = WarmupMultiStepLR(opt, LRSchedule(0.1, steps=(0, 2)))
    ck = Checkpointer(model, str(tmp_path), opt, sched)
    _trained(model, opt, sched, 3)
    ck.save("model_0000003", iteration=3, cfg_yaml="A: 1\n")
    weights3 = {k: v.clone() for k, v in model.state_dict().items()}
    momentum3 = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters() if p in opt.state]
    expected_next = torch.rand(2)  # what the uninterrupted run draws next
    _trained(model, opt, sched, 2)
    ck.save("model_final", iteration=5)
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert ck.find_last() == str(tmp_path / "model_final.pth")

    m2 = TinyRCNN()
    opt2 = build_optimizer(m2, 0.1)
    sched2 = WarmupMultiStepLR(opt2, LRSchedule(0.1, steps=(0, 2)))
    ck2 = Checkpointer(m2, str(tmp_path), opt2, sched2)
    state = ck2.resume(str(tmp_path / "model_0000003.pth"))
    assert state["iteration"] == 3 and state["cfg"] == "A: 1\n"
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == pytest.approx(0.01)
    Checkpointer.restore_rng(state)
    assert torch.equal(torch.rand(2), expected_next)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, weights3[k]), k
    momentum2 = [opt2.state[p]["momentum_buffer"] for p in m2.parameters() if p in opt2.state]
    assert len(momentum2) == len(momentum3) > 0
    assert all(torch.equal(a, b) for a, b in zip(momentum2, momentum3))


def test_resume_falls_back_to_an_older_checkpoint_when_newest_is_unreadable(tmp_path, caplog):
    model = TinyRCNN()
    ck = Checkpointer(model, str(tmp_path))
    ck.save("model_0000002", iteration=2)
    ck.save("model_0000004", iteration=4)
    (tmp_path / "model_0000004.pth").write_bytes(b"garbage")
    with caplog.at_level("WARNING", logger="maskrcnn.checkpoint"):
        state = Checkpointer(TinyRCNN(), str(tmp_path)).resume()
    assert state["iteration"] == 2 and state["path"].endswith("model_0000002.pth")
    assert "model_0000004.pth" in caplog.text and "truncated or corrupt" in caplog.text
    # last_checkpoint naming a deleted file: the scan still finds the others, newest first.
    (tmp_path / "model_0000004.pth").unlink()
    assert Checkpointer(model, str(tmp_path)).candidates() == [str(tmp_path / "model_0000002.pth")]


def test_resume_without_any_checkpoint_or_from_a_weights_file_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        Checkpointer(TinyRCNN(), str(tmp_path)).resume()
    weights = str(tmp_path / "w.pth")
    save_checkpoint(weights, {"model": TinyRCNN().state_dict()})
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        Checkpointer(TinyRCNN(), str(tmp_path)).resume(weights)
