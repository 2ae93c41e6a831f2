"""Choice between the pure-PyTorch ("native") and torchvision's compiled implementation of the ops.

Three backend names are accepted:

* ``"native"``: always the pure-PyTorch implementations in ``maskrcnn/ops`` (work on any device
  PyTorch supports, need no compiled extension).
* ``"torchvision"``: always ``torch.ops.torchvision.*``; an op raises ``RuntimeError`` when those
  compiled kernels cannot be loaded.
* ``"auto"`` (default): per op, the implementation named in :data:`AUTO_PREFERENCE`, falling back
  to ``"native"`` when torchvision's kernels do not load.

The active backend is, in order of precedence:

1. the one given to :func:`set_backend` / :func:`use_backend` (process-wide, set by code);
2. the innermost :func:`scoped_backend` of the current thread: a model built from a config whose
   ``OPS_BACKEND`` is not ``"auto"`` runs its modules inside one (see
   :func:`maskrcnn.modeling.ops_backend.apply_ops_backend`), so two models with different configs each
   run their own backend;
3. the environment variable ``MASKRCNN_OPS_BACKEND`` (read at each call, so it can be changed at run
   time);
4. ``"auto"``.

Under ``"auto"`` only ``nms`` runs torchvision's compiled kernel (when it loads); ``roi_align`` and
``roi_pool`` run the pure-PyTorch code. Only ``"native"`` is pure PyTorch for every op.
"""

import contextlib
import os
import threading
from typing import Iterator, List, Optional

import torch

BACKENDS = ("native", "torchvision", "auto")
ENV_VAR = "MASKRCNN_OPS_BACKEND"

# Fixed rule for "auto": which implementation each op uses when torchvision's kernels load.
# nms: torchvision. Its CPU kernel is the reference the native one reproduces index for index, it
#      is several times faster below ~300 boxes (per-class NMS in box inference) and for many-class
#      batched_nms, and on CUDA it is a single bitmask kernel while the native loop syncs per block.
#      (The native CPU version is faster from ~1k boxes up: ~0.25x torchvision's time at 12k.)
# roi_align / roi_pool: owned by their own modules, whose authors may change these entries after
#      measuring (the native versions are fully differentiable and device-agnostic).
AUTO_PREFERENCE = {"nms": "torchvision", "roi_align": "native", "roi_pool": "native"}

_explicit_backend: Optional[str] = None
_torchvision_ok: Optional[bool] = None
# Per-thread stack of scoped backends (innermost last): a model's forward in one thread must not
# change what another thread's model runs.
_scopes = threading.local()


def _validate(name: object, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(
            f"invalid maskrcnn ops backend {name!r} (from {source}); expected one of {', '.join(BACKENDS)}"
        )
    return name.strip().lower()


def get_backend() -> str:
    """The active backend name: ``"native"``, ``"torchvision"`` or ``"auto"``.

    Raises ``ValueError`` naming the bad value when ``MASKRCNN_OPS_BACKEND`` holds an unknown name.
    """
    if _explicit_backend is not None:
        return _explicit_backend
    stack = _scope_stack()
    if stack:
        return stack[-1]
    value = os.environ.get(ENV_VAR)
    if value is None or value == "":
        return "auto"
    return _validate(value, f"environment variable {ENV_VAR}")


def set_backend(name: Optional[str]) -> None:
    """Select the backend for all ops; ``None`` returns control to ``MASKRCNN_OPS_BACKEND``."""
    global _explicit_backend
    _explicit_backend = None if name is None else _validate(name, "set_backend(name)")


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[str]:
    """Context manager selecting ``name`` (as :func:`set_backend`) and restoring the previous choice."""
    global _explicit_backend
    previous = _explicit_backend
    set_backend(name)
    try:
        yield get_backend()
    finally:
        _explicit_backend = previous


def _scope_stack() -> List[str]:
    stack = getattr(_scopes, "stack", None)
    if stack is None:
        stack = _scopes.stack = []
    return stack


def push_scope(name: str) -> None:
    """Enter a scoped backend on this thread (below :func:`set_backend`, above the environment variable).

    Every call must be paired with :func:`pop_scope`; prefer :func:`scoped_backend`. Raises ``ValueError``
    for an unknown name.
    """
    _scope_stack().append(_validate(name, "scoped backend"))


def pop_scope() -> None:
    """Leave the innermost scoped backend of this thread (``RuntimeError`` when none is active)."""
    stack = _scope_stack()
    if not stack:
        raise RuntimeError("pop_scope() without a matching push_scope()")
    stack.pop()


@contextlib.contextmanager
def scoped_backend(name: str) -> Iterator[str]:
    """Context manager running its body with backend ``name`` on this thread unless :func:`set_backend`
    chose one; yields the backend then active."""
    push_scope(name)
    try:
        yield get_backend()
    finally:
        pop_scope()


def torchvision_ops_available() -> bool:
    """Whether torchvision's compiled ops load and run (probed once with a tiny CPU ``nms``; never raises)."""
    global _torchvision_ok
    if _torchvision_ok is None:
        # The probe must not run under torch.jit.trace: importing torchvision there fails (its
        # import-time version check returns an int the tracer cannot record) and the probe's ops
        # would be recorded into the user's graph.
        tracing_state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            import torchvision  # noqa: F401  (registers torch.ops.torchvision)

            boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
            keep = torch.ops.torchvision.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
            _torchvision_ok = keep.tolist() == [0]
        except Exception:  # a missing/ABI-mismatched extension surfaces as many exception types
            _torchvision_ok = False
        finally:
            torch._C._set_tracing_state(tracing_state)
    return _torchvision_ok


def resolve(op_name: str) -> str:
    """The implementation (``"native"`` or ``"torchvision"``) that ``op_name`` must use now.

    ``op_name`` is a key of :data:`AUTO_PREFERENCE`. Raises ``ValueError`` for an unknown op and
    ``RuntimeError`` when the backend is ``"torchvision"`` but its compiled ops are unavailable.
    """
    if op_name not in AUTO_PREFERENCE:
        raise ValueError(f"unknown op_name {op_name!r}; expected one of {sorted(AUTO_PREFERENCE)}")
    backend = get_backend()
    if backend == "native":
        return "native"
    if backend == "torchvision":
        if not torchvision_ops_available():
            raise RuntimeError(
                f"ops backend 'torchvision' was requested for {op_name!r} but torchvision's compiled ops "
                f"could not be loaded; use backend 'native' or 'auto'"
            )
        return "torchvision"
    preferred = AUTO_PREFERENCE[op_name]
    if preferred == "torchvision" and not torchvision_ops_available():
        return "native"
    return preferred
