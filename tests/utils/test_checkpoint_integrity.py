"""maskrcnn.utils.checkpoint_integrity with save_checkpoint/load_checkpoint/Checkpointer: the SHA-256 stored at save
catches bytes flipped inside a tensor (which torch.load alone accepts) and truncation; resume falls back."""
import hashlib
import logging

import pytest
import torch

from maskrcnn.utils.checkpoint import CheckpointError, Checkpointer, load_checkpoint, save_checkpoint
from maskrcnn.utils.checkpoint_integrity import (ChecksumMismatch, HashingWriter, checksum_path, read_checksum,
                                                 verify_checksum)


def _flip_tensor_bytes(path, needle):
    """Flip bytes inside the stored data of a tensor whose values are ``needle`` (so the zip stays readable)."""
    data = bytearray(open(path, "rb").read())
    i = data.find(needle)
    assert i > 0
    data[i:i + 4] = bytes(b ^ 0xFF for b in data[i:i + 4])
    open(path, "wb").write(bytes(data))


def test_checksum_is_stored_in_sha256sum_format_and_verified(tmp_path):
    path = str(tmp_path / "model_0000002.pth")
    save_checkpoint(path, {"model": {"w": torch.full((64,), 3.25)}, "iteration": 2})
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert open(checksum_path(path)).read() == f"{digest}  model_0000002.pth\n"
    assert read_checksum(path) == digest and verify_checksum(path) is True


def test_flipped_bytes_in_a_tensor_are_caught(tmp_path):
    path = str(tmp_path / "ck.pth")
    save_checkpoint(path, {"model": {"w": torch.full((64,), 3.25)}, "iteration": 2})
    _flip_tensor_bytes(path, torch.full((1,), 3.25).numpy().tobytes())
    assert torch.load(path, weights_only=True)["iteration"] == 2  # torch alone does not notice
    with pytest.raises(ChecksumMismatch):
        verify_checksum(path)
    with pytest.raises(CheckpointError, match=r"ck.pth is truncated or corrupt: its SHA-256 is [0-9a-f]{16}\.\.\. "
                                              r"but .*ck.pth.sha256 recorded"):
        load_checkpoint(path)


def test_without_checksum_file_the_checkpoint_loads_unverified(tmp_path):
    path = str(tmp_path / "ck.pth")
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 1}, path)  # e.g. written by an older version
    assert verify_checksum(path) is None
    assert load_checkpoint(path)["iteration"] == 1
    (tmp_path / "ck.pth.sha256").write_text("not a digest\n")
    assert read_checksum(path) is None


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_resume_falls_back_to_the_previous_checkpoint_and_says_why(tmp_path, caplog, damage):
    model = torch.nn.Linear(3, 2)
    ck = Checkpointer(model, str(tmp_path))
    ck.save("model_0000002", iteration=2)
    with torch.no_grad():
        model.weight.fill_(7.5)
    ck.save("model_0000004", iteration=4)
    newest = str(tmp_path / "model_0000004.pth")
    if damage == "truncate":
        data = open(newest, "rb").read()
        open(newest, "wb").write(data[: len(data) // 2])
    else:
        _flip_tensor_bytes(newest, torch.full((1,), 7.5).numpy().tobytes())
    with caplog.at_level(logging.WARNING, logger="maskrcnn.checkpoint"):
        state = Checkpointer(torch.nn.Linear(3, 2), str(tmp_path)).resume()
    assert state["iteration"] == 2 and state["path"].endswith("model_0000002.pth")
    assert f"cannot resume from {newest}, trying an older checkpoint: checkpoint {newest} is truncated or corrupt" \
        in caplog.text


def test_hashing_writer_hashes_what_it_writes(tmp_path):
    with open(tmp_path / "f", "wb") as f:
        w = HashingWriter(f)
        w.write(b"abc")
        w.write(b"def")
        w.flush()
        assert w.fileno() == f.fileno()
    on_disk = hashlib.sha256(open(tmp_path / "f", "rb").read()).hexdigest()
    assert w.hexdigest() == hashlib.sha256(b"abcdef").hexdigest() == on_disk
