"""Weight files are untrusted: crafted pickles must be refused before anything in them runs."""
import argparse
import io
import os
import pickle
import struct
import subprocess
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

from maskrcnn.utils.weights.safe_pickle import (
    UnsafeWeightsError, WeightsFileError, load_pkl, load_torch, load_weights_file, loads_pkl,
)


class _Reduce:
    """Pickles as ``func(*args)``: what an attacker puts in a weight file."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _attacks(sentinel):
    code = f"open({str(sentinel)!r}, 'w').close()"
    return {
        "os.system": _Reduce(os.system, (f"touch '{sentinel}'",)),
        "builtins.exec": _Reduce(exec, (code,)),
        "builtins.eval": _Reduce(eval, (code,)),
        "subprocess.call": _Reduce(subprocess.call, (["touch", str(sentinel)],)),
        "numpy.load": _Reduce(np.load, (str(sentinel),)),
    }


ATTACKS = ["os.system", "builtins.exec", "builtins.eval", "subprocess.call", "numpy.load"]


def _py2_detectron_pickle(blobs):
    """The bytes Python 2's cPickle (protocol 2) writes for Detectron's ``{'blobs': {name: float32 array}}``:
    py2 ``str`` as SHORT_BINSTRING/BINSTRING, arrays via ``numpy.core.multiarray._reconstruct``."""
    def s(x: bytes) -> bytes:
        return (b"U" + bytes([len(x)]) + x) if len(x) < 256 else (b"T" + struct.pack("<i", len(x)) + x)

    def array(a: np.ndarray) -> bytes:
        a = np.ascontiguousarray(a, dtype="<f4")
        shape = b"(" + b"".join(b"J" + struct.pack("<i", d) for d in a.shape) + b"t"
        dtype = (b"cnumpy\ndtype\n" + s(b"f4") + b"K\x00K\x01\x87R"
                 + b"(K\x03" + s(b"<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
        return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + s(b"b") + b"\x87R"
                + b"(K\x01" + shape + dtype + b"\x89" + s(a.tobytes()) + b"tb")

    inner = b"}(" + b"".join(s(k.encode()) + array(v) for k, v in blobs.items()) + b"u"
    return b"\x80\x02}(" + s(b"blobs") + inner + s(b"cfg") + s(b"MODEL:\n  NUM_CLASSES: 81\n") + b"u."


# ---------------------------------------------------------------------------------------------------------------
def test_py2_detectron_pickle_loads_like_the_plain_unpickler(tmp_path):
    blobs = {"conv1_w": np.random.RandomState(0).randn(4, 3, 7, 7).astype(np.float32),
             "res_conv1_bn_s": np.arange(4, dtype=np.float32)}
    data = _py2_detectron_pickle(blobs)
    reference = pickle.loads(data, encoding="latin1")  # trusted here: we just built the bytes
    path = tmp_path / "model.pkl"
    path.write_bytes(data)
    for loaded in (load_pkl(path), load_weights_file(path), loads_pkl(data)):
        assert set(loaded) == {"blobs", "cfg"} and loaded["cfg"] == reference["cfg"]
        for k, v in blobs.items():
            assert loaded["blobs"][k].dtype == np.float32
            np.testing.assert_array_equal(loaded["blobs"][k], v)
            np.testing.assert_array_equal(loaded["blobs"][k], reference["blobs"][k])


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_python3_pickles_of_numpy_and_containers_load(protocol):
    obj = {"model": OrderedDict(a=np.ones((2, 3), np.float32), b=np.arange(3, dtype=np.int64)),
           "scalar": np.float32(2.5), "meta": [1, 2.0, "x", (3, None), {"k": b"bytes"}, {1, 2}],
           "__author__": "Detectron2 Model Zoo"}
    loaded = loads_pkl(pickle.dumps(obj, protocol=protocol))
    np.testing.assert_array_equal(loaded["model"]["a"], obj["model"]["a"])
    np.testing.assert_array_equal(loaded["model"]["b"], obj["model"]["b"])
    assert isinstance(loaded["model"], OrderedDict) and loaded["scalar"] == np.float32(2.5)
    assert loaded["meta"] == obj["meta"]


@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("attack", ATTACKS)
def test_malicious_pkl_is_refused_and_runs_nothing(tmp_path, attack, protocol):
    sentinel = tmp_path / "SENTINEL"
    payload = {"blobs": {"conv1_w": np.zeros((1, 3, 1, 1), np.float32), "x": _attacks(sentinel)[attack]}}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    for loader in (load_pkl, load_weights_file):
        with pytest.raises(UnsafeWeightsError) as info:
            loader(path)
        msg = str(info.value)
        assert "evil.pkl" in msg and "Nothing from the file was executed" in msg
        module, name = attack.rsplit(".", 1)
        assert name in msg
    assert not sentinel.exists()


def test_restricted_unpickler_refuses_persistent_ids_and_reports_corrupt_files(tmp_path):
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "storage" if isinstance(obj, str) and obj == "ref" else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"a": "ref"})
    with pytest.raises(UnsafeWeightsError, match="persistent ids"):
        loads_pkl(buf.getvalue())
    bad = tmp_path / "truncated.pkl"
    bad.write_bytes(pickle.dumps({"a": np.ones(3)}, protocol=2)[:-10])
    with pytest.raises(WeightsFileError, match="truncated.pkl"):
        load_pkl(bad)
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_weights_file(tmp_path / "nope.pkl")


@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("attack", ["os.system", "builtins.exec", "subprocess.call"])
def test_malicious_pth_is_refused_and_runs_nothing(tmp_path, attack, zip_format):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "extra": _attacks(sentinel)[attack]}, path,
               _use_new_zipfile_serialization=zip_format)
    for loader in (load_torch, load_weights_file):
        with pytest.raises(UnsafeWeightsError) as info:
            loader(path)
        msg = str(info.value)
        assert "evil.pth" in msg and "weights_only=True" in msg and "Nothing from the file was executed" in msg
    assert not sentinel.exists()


def test_zip_with_handcrafted_data_pkl_is_refused(tmp_path):
    """A torch zip archive whose data.pkl was written by hand (not by torch.save) to call builtins.exec."""
    sentinel = tmp_path / "SENTINEL"
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(2)}, good)
    evil = tmp_path / "crafted.pth"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = pickle.dumps(_attacks(sentinel)["builtins.exec"], protocol=2)
            dst.writestr(item, data)
    with pytest.raises(UnsafeWeightsError, match="crafted.pth"):
        load_weights_file(evil)
    assert not sentinel.exists()


def test_torch_files_load_in_both_serialisations(tmp_path):
    # torchvision's reference scripts store their argparse.Namespace: plain data, admitted.
    state = {"model": OrderedDict(w=torch.randn(2, 3)), "step": 7, "arr": np.arange(3, dtype=np.float32),
             "args": argparse.Namespace(lr=0.02, data_path="/coco")}
    for zip_format in (True, False):
        path = tmp_path / f"ok_{zip_format}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=zip_format)
        loaded = load_weights_file(path)
        assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], state["model"]["w"])
        assert loaded["args"].lr == 0.02 and loaded["args"].data_path == "/coco"
        np.testing.assert_array_equal(loaded["arr"], state["arr"])
