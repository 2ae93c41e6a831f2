"""Process environment: seeding, capturing and restoring every RNG, device choice, memory use, CPU flags, version
report.

RNG states are captured as plain types and tensors only (no numpy arrays, no pickled objects) so that a checkpoint
holding them loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import platform
import random
import resource
import sys
from typing import Any, Dict, FrozenSet, Optional

import numpy as np
import torch

__all__ = [
    "seed_all", "get_rng_state", "set_rng_state", "resolve_device", "memory_mb", "cpu_flags", "collect_env_info",
]


def seed_all(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and PyTorch (CPU and every CUDA device)."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def get_rng_state() -> Dict[str, Any]:
    """Every global RNG state of this process as ``{"python", "numpy", "torch", "cuda"}``.

    ``python``: ``{"version": int, "state": int64 tensor (625,), "gauss": float or None}``;
    ``numpy``: ``{"name": str, "keys": int64 tensor (624,), "pos": int, "has_gauss": int, "gauss": float}``;
    ``torch``: uint8 tensor; ``cuda``: list of uint8 tensors (empty without CUDA).
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(cached)},
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore states captured by :func:`get_rng_state` (missing entries are left alone).

    A checkpoint written on a machine with more CUDA devices than this one restores the first ones only.
    """
    if not isinstance(state, dict):
        raise TypeError(f"set_rng_state: expected the dict from get_rng_state(), got {type(state).__name__}")
    py = state.get("python")
    if py is not None:
        internal = tuple(int(v) for v in py["state"].tolist())
        random.setstate((int(py["version"]), internal, py["gauss"]))
    npy = state.get("numpy")
    if npy is not None:
        keys = npy["keys"].numpy().astype(np.uint32)
        np.random.set_state((npy["name"], keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["gauss"])))
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i].cpu(), device=i)


def resolve_device(preference: str = "auto", no_cuda: bool = False, local_rank: int = 0) -> torch.device:
    """The device to run on: ``preference`` is cfg ``MODEL.DEVICE`` (``auto``, ``cpu`` or ``cuda``).

    ``auto`` picks CUDA when available (device ``local_rank``); ``no_cuda`` forces the CPU. Asking for ``cuda``
    where there is none raises a clear error instead of failing on the first tensor moved.
    """
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device preference must be 'auto', 'cpu' or 'cuda', got {preference!r}")
    if no_cuda or preference == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if preference == "cuda":
            raise RuntimeError("MODEL.DEVICE = 'cuda' but CUDA is not available here; use MODEL.DEVICE auto/cpu "
                               "or --no_cuda")
        return torch.device("cpu")
    return torch.device("cuda", int(local_rank) % max(torch.cuda.device_count(), 1))


def memory_mb(device: Optional[torch.device] = None) -> float:
    """Memory in MiB: the peak allocated by PyTorch on a CUDA ``device``, else this process's resident set size."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/statm", "r") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        # Not Linux: the peak RSS is the best portable figure (KiB on Linux, bytes on macOS).
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def cpu_flags() -> FrozenSet[str]:
    """The CPU's feature flags as Linux lists them (``/proc/cpuinfo``: ``avx512_vnni``, ``amx_bf16``, ...); empty
    where they cannot be read (another OS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def collect_env_info() -> str:
    """A few lines naming the Python, PyTorch, torchvision and CUDA versions and the CPU/GPU in use."""
    lines = [f"python: {sys.version.split()[0]} ({platform.platform()})", f"torch: {torch.__version__}"]
    try:
        import torchvision

        lines.append(f"torchvision: {torchvision.__version__}")
    except ImportError:
        lines.append("torchvision: not installed")
    lines.append(f"numpy: {np.__version__}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"cuda: {torch.version.cuda}, devices: {names}")
    else:
        lines.append(f"cuda: not available; CPU threads: {torch.get_num_threads()}")
    return "\n".join(lines)
