"""Loading weight files without running code from them.

A weight file is untrusted input: a pickle can name any importable callable and have the unpickler call it
(``os.system``, ``builtins.exec``, ...). Nothing here uses a plain unpickler:

* ``.pkl`` files (Detectron / Caffe2, detectron2 model zoo) go through :class:`RestrictedUnpickler`, whose
  ``find_class`` resolves only an allow-list of globals needed to rebuild numpy arrays, numpy scalars and plain
  containers. Any other global stops the load with :class:`UnsafeWeightsError` *before* it is imported or called.
  Python-2 pickles (Detectron's files) are read with ``encoding="latin1"``, as numpy requires for their array data.
* torch files (zip or legacy format) go through ``torch.load(..., weights_only=True, map_location="cpu")``; its
  refusal is turned into :class:`UnsafeWeightsError` naming the file and the global.

:func:`load_weights_file` tells the two apart by content (a zip archive, or a legacy torch file whose first pickle is
torch's magic number), not by extension.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import zipfile
from typing import Any, Callable, Dict, Tuple

import numpy as np
import torch

__all__ = [
    "UnsafeWeightsError", "WeightsFileError", "RestrictedUnpickler", "ALLOWED_GLOBALS",
    "load_pkl", "loads_pkl", "load_torch", "load_weights_file",
]

# First object pickled in a legacy (pre-zip) torch.save file.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafeWeightsError(pickle.UnpicklingError):
    """A weight file asked for something other than plain data; nothing from it was executed."""


class WeightsFileError(ValueError):
    """A weight file could not be read (corrupt, truncated, or not a weight file)."""


def _numpy_attr(*paths: str) -> Callable[[], Any]:
    """Resolver for a numpy-internal function that moved between numpy 1.x (``numpy.core``) and 2.x (``numpy._core``).
    Only ``numpy`` itself is imported; the pickle's module string is never passed to ``import``."""
    def resolve():
        for path in paths:
            obj: Any = np
            try:
                for part in path.split(".")[1:]:
                    obj = getattr(obj, part)
                return obj
            except AttributeError:
                continue
        raise AttributeError(f"none of {paths} exists in numpy {np.__version__}")
    return resolve


_reconstruct = _numpy_attr("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
_scalar = _numpy_attr("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
_frombuffer = _numpy_attr("numpy._core.numeric._frombuffer", "numpy.core.numeric._frombuffer")


def _const(obj: Any) -> Callable[[], Any]:
    return lambda: obj


def _codecs_encode() -> Callable:
    import codecs
    return codecs.encode


#: (module, name) as written in the pickle -> resolver. Python-2 module names (``__builtin__``, ``copy_reg``) are
#: listed as well because a subclassed ``find_class`` sees them before the 2->3 name mapping.
ALLOWED_GLOBALS: Dict[Tuple[str, str], Callable[[], Any]] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    ALLOWED_GLOBALS[(_mod, "_reconstruct")] = _reconstruct  # ndarray.__reduce__ (protocols 0-4)
    ALLOWED_GLOBALS[(_mod, "scalar")] = _scalar  # numpy scalars, e.g. np.float32(1.0)
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    ALLOWED_GLOBALS[(_mod, "_frombuffer")] = _frombuffer  # ndarray.__reduce_ex__ with protocol 5
ALLOWED_GLOBALS[("numpy", "ndarray")] = _const(np.ndarray)
ALLOWED_GLOBALS[("numpy", "dtype")] = _const(np.dtype)
# Python 3 writes ``bytes`` as ``_codecs.encode(str, 'latin1')`` under protocol 2 (numpy array data included).
ALLOWED_GLOBALS[("_codecs", "encode")] = _codecs_encode
ALLOWED_GLOBALS[("collections", "OrderedDict")] = _const(__import__("collections").OrderedDict)
for _mod in ("builtins", "__builtin__"):
    for _name, _obj in (("set", set), ("frozenset", frozenset), ("bytearray", bytearray), ("complex", complex),
                        ("list", list), ("dict", dict), ("tuple", tuple), ("bytes", bytes), ("str", str),
                        ("unicode", str), ("int", int), ("long", int), ("float", float), ("bool", bool)):
        ALLOWED_GLOBALS[(_mod, _name)] = _const(_obj)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only numpy arrays/scalars/dtypes, ``OrderedDict`` and builtin containers and
    numbers. ``find_class`` of anything else raises :class:`UnsafeWeightsError`; persistent ids are refused too."""

    def __init__(self, file, *, source: str = "<bytes>", encoding: str = "latin1"):
        super().__init__(file, encoding=encoding, fix_imports=True)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        resolver = ALLOWED_GLOBALS.get((module, name))
        if resolver is None:
            raise UnsafeWeightsError(
                f"refusing to load weight file {self.source!r}: its pickle asks for the global '{module}.{name}', "
                "which is not plain data (only numpy arrays, dicts, lists, strings and numbers are accepted). "
                "Nothing from the file was executed.")
        return resolver()

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeWeightsError(
            f"refusing to load weight file {self.source!r}: its pickle uses persistent ids ({str(pid)[:80]!r}); "
            "a torch file must be loaded with torch.load(weights_only=True) (load_weights_file does that).")


def loads_pkl(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``encoding='latin1'`` for Python-2 pickles)."""
    return _restricted_load(io.BytesIO(data), source)


def load_pkl(path: str) -> Any:
    """Read a ``.pkl`` weight file (Detectron/Caffe2, detectron2 model zoo) with :class:`RestrictedUnpickler`.

    Raises:
        UnsafeWeightsError: the pickle names a global outside :data:`ALLOWED_GLOBALS` (nothing was executed).
        WeightsFileError: the file is not a readable pickle.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        return _restricted_load(f, path)


def _restricted_load(f, source: str) -> Any:
    try:
        return RestrictedUnpickler(f, source=source).load()
    except UnsafeWeightsError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError) as e:
        raise WeightsFileError(f"cannot read weight file {source!r} as a pickle: {type(e).__name__}: {e}") from e


def _torch_safe_globals() -> list:
    """Globals admitted on top of torch's weights-only defaults: numpy arrays (some checkpoints keep numpy values)
    and ``argparse.Namespace`` (torchvision's reference scripts store their arguments in checkpoints). None of them
    runs code when rebuilt."""
    out = [_reconstruct(), np.ndarray, np.dtype, _scalar(), argparse.Namespace]
    for dt in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_):
        out.append(type(np.dtype(dt)))
    return out


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def load_torch(path: str) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)`` with a clear error when the file holds code.

    Raises:
        UnsafeWeightsError: torch's weights-only unpickler refused a global (named in the message).
        WeightsFileError: the file is not a readable torch file.
    """
    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals(_torch_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = _GLOBAL_RE.search(msg)
        what = f"the global '{found.group(1)}'" if found else "an object that is not plain data"
        if found or "weights only" in msg.lower():
            raise UnsafeWeightsError(
                f"refusing to load weight file {path!r}: torch.load(weights_only=True) rejected {what}; only "
                "tensors, numpy arrays, dicts, lists, strings and numbers are accepted. Nothing from the file was "
                "executed.") from None
        raise WeightsFileError(f"cannot read torch file {path!r}: {msg}") from e
    except (RuntimeError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise WeightsFileError(f"cannot read torch file {path!r}: {type(e).__name__}: {e}") from e


def load_weights_file(path: str) -> Any:
    """Load any supported weight file safely, choosing the reader by content.

    A zip archive is a torch file; otherwise the file is read as a restricted pickle and, if its first object is
    torch's legacy magic number, re-read with :func:`load_torch`. Tensors are on the CPU; ``.pkl`` contents stay
    numpy arrays.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path!r}")
    if zipfile.is_zipfile(path):
        return load_torch(path)
    obj = load_pkl(path)
    if isinstance(obj, int) and not isinstance(obj, bool) and obj == _TORCH_LEGACY_MAGIC:
        return load_torch(path)
    return obj
