"""Checkpoints: atomic saving, safe loading, resuming, and loading weights into a model with clear mismatch errors.

File format (``torch.save`` of plain containers and tensors, loadable with ``torch.load(weights_only=True)``)::

    {"model": state_dict, "optimizer": state_dict, "scheduler": state_dict, "iteration": int (iterations done),
     "cfg": str (YAML), "rng": {"python", "numpy", "torch", "cuda"} (rank 0), "rng_per_rank": [rng, ...],
     "scaler": GradScaler state (fp16 only), "world_size": int}

Only ``"model"`` is required by :func:`load_ckpt` (a bare state dict is accepted too).

Writes are atomic: the payload goes to a temporary file in the destination folder, is flushed and fsynced, then
renamed over the destination, and the folder is fsynced. A crash or a kill at any moment leaves either the old or
the new file, never a truncated one; a write error (a full disk) removes the temporary file and says that the
previous checkpoint is intact. The SHA-256 of each checkpoint is stored next to it (``<file>.sha256``) and verified
before it is loaded (:mod:`maskrcnn.utils.checkpoint_integrity`), so a file damaged later is refused by name and
``--resume`` falls back to the one before.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import zipfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .checkpoint_integrity import ChecksumMismatch, HashingWriter, checksum_line, checksum_path, verify_checksum
from .distributed import all_gather
from .env import get_rng_state, set_rng_state
from .weights.formats import WeightsConversionError, convert_to_ours, detect_format
from .weights.safe_pickle import UnsafeWeightsError, WeightsFileError, load_weights_file

__all__ = [
    "CheckpointError", "CheckpointMismatchError", "UnsafeCheckpointError", "CLASS_SPECIFIC_LAYERS", "save_checkpoint", "atomic_write",
    "load_checkpoint", "checkpoint_state_dict", "load_ckpt", "Checkpointer", "unwrap_model",
]

logger = logging.getLogger("maskrcnn.checkpoint")

#: Layers whose shapes depend on the number of classes; fine-tuning on another class count re-initialises them.
CLASS_SPECIFIC_LAYERS: Tuple[str, ...] = ("Box_Outs.cls_score.", "Box_Outs.bbox_pred.", "Mask_Outs.mask_fcn_logits.")

LAST_CHECKPOINT_FILE = "last_checkpoint"
# Read once at import: os.umask can only be read by setting it, which is not thread-safe later on.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_SNAPSHOT_RE = re.compile(r"^model_(\d+)\.pth$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, found or read; the message names the file."""


class UnsafeCheckpointError(CheckpointError, UnsafeWeightsError):
    """A weight file the restricted reader refused (a pickle naming a global such as ``os.system``), as
    :func:`load_ckpt` raises it: a :class:`CheckpointError` like every load failure, and the
    :class:`~maskrcnn.utils.weights.safe_pickle.UnsafeWeightsError` that the weight readers raise."""


class CheckpointMismatchError(CheckpointError):
    """A state dict does not fit a model; the message lists missing, unexpected and shape-mismatched keys."""

    def __init__(self, message: str, missing: Sequence[str], unexpected: Sequence[str],
                 mismatched: Sequence[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel``/``DataParallel`` wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------------
def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform/filesystem; the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[Any], None], what: str = "file") -> None:
    """Create or replace ``path`` atomically; ``write(f)`` fills the binary file object ``f``.

    On any failure the temporary file is removed and ``path`` is untouched; an ``OSError`` (e.g. ``ENOSPC``)
    becomes a :class:`CheckpointError` saying whether a previous version of ``path`` is intact.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise CheckpointError(f"could not write {what} {path}: {e}") from e
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would (0666 minus the umask).
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            previous = (f"the previous {what} at {path} is intact" if os.path.exists(path)
                        else f"no {what} was written")
            raise CheckpointError(f"could not write {what} {path}: {e.strerror or e}; {previous} "
                                  f"(the partial temporary file was removed)") from e
        raise
    _fsync_dir(directory)


def save_checkpoint(path: str, payload: Mapping[str, Any]) -> None:
    """``torch.save(payload)`` to ``path`` atomically (see :func:`atomic_write`)."""
    if not isinstance(payload, Mapping):
        raise TypeError(f"save_checkpoint: payload must be a dict, got {type(payload).__name__}")
    writers: List[HashingWriter] = []

    def write(f) -> None:
        writers.append(HashingWriter(f))
        try:
            torch.save(dict(payload), writers[-1])
        except RuntimeError as e:
            # A write that fails inside torch.save's zip writer (ENOSPC, EFBIG under `ulimit -f`) is then masked by
            # the writer's own "unexpected pos" RuntimeError on closing: report the OSError that caused it.
            cause = e.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None

    atomic_write(path, write, what="checkpoint")
    # The old checksum goes at once: should the new one fail to be written, the file loads unverified instead of
    # failing a checksum that belongs to the file it replaced.
    try:
        os.unlink(checksum_path(path))
    except OSError:
        pass
    atomic_write(checksum_path(path), lambda f: f.write(checksum_line(writers[-1].hexdigest(), path)),
                 what="checkpoint checksum")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say what is wrong with it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a folder, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): truncated or never written")
    try:
        verify_checksum(path)
    except ChecksumMismatch as e:
        raise CheckpointError(str(e)) from e
    is_zip = zipfile.is_zipfile(path)  # every torch.save since PyTorch 1.6 writes a zip archive
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:
        text = str(e)
        if is_zip and "Weights only load failed" in text:
            reason = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln
                           or "WeightsUnpickler error" in ln), "")
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that a safe (weights_only) load refuses"
                f"{' (' + reason + ')' if reason else ''}; if it is a model-zoo file, convert it with "
                f"tools/convert_weights.py") from e
        first = text.strip().splitlines()[0] if text.strip() else ""
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be read "
                              f"({type(e).__name__}: {first}){'' if is_zip else '; it is not a PyTorch zip archive'}"
                              f" (a Detectron .pkl is converted with tools/convert_weights.py)") from e


def checkpoint_state_dict(obj: Any, source: str = "<checkpoint>") -> Mapping[str, Tensor]:
    """The model state dict held by a loaded checkpoint (format detection for :func:`load_ckpt`).

    Accepted: our checkpoints (``{"model": state_dict, ...}``, also what ``tools/convert_weights.py`` writes) and a
    bare state dict (name -> tensor).
    """
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        return obj["model"]
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return obj
    if isinstance(obj, Mapping):
        what = f"a dict with keys {sorted(map(str, obj.keys()))[:10]}"
    else:
        what = f"a {type(obj).__name__}"
    raise CheckpointError(f"{source}: not a maskrcnn checkpoint or state dict (it holds {what}); model-zoo files "
                          f"are converted with tools/convert_weights.py")


def _read_weights(path: str) -> Any:
    """Our checkpoints (zip ``.pth``) through :func:`load_checkpoint`; anything else (Detectron/detectron2 ``.pkl``,
    legacy ``.pth``) through the restricted readers of :mod:`maskrcnn.utils.weights.safe_pickle`."""
    if not os.path.isfile(path) or zipfile.is_zipfile(path):
        return load_checkpoint(path)
    try:
        return load_weights_file(path)
    except UnsafeWeightsError as e:
        raise UnsafeCheckpointError(str(e)) from e
    except WeightsFileError as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be read ({e})") from e


def _state_dict_any_format(obj: Any, source: str, target: nn.Module) -> Mapping[str, Tensor]:
    """Our state dict, converting Detectron / Detectron.pytorch / torchvision / detectron2 files on the fly."""
    try:
        fmt = detect_format(obj, source)
    except WeightsConversionError:
        fmt = "ours"  # let checkpoint_state_dict explain what the file holds
    if fmt == "ours":
        return checkpoint_state_dict(obj, source)
    try:
        state, notes = convert_to_ours(obj, fmt, cfg=getattr(target, "cfg", None), model=target, path=source)
    except WeightsConversionError as e:
        raise CheckpointError(f"{source}: {e}") from e
    for note in notes:
        (logger.warning if note.startswith("WARNING") else logger.info)("%s (%s): %s", source, fmt, note)
    return state


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str = "module.") -> Dict[str, Tensor]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _is_class_specific(key: str) -> bool:
    return key.startswith(CLASS_SPECIFIC_LAYERS)


def _ignorable(key: str) -> bool:
    # BatchNorm's batch counter has no effect on the outputs and FrozenBN has none.
    return key.endswith("num_batches_tracked")


def load_ckpt(model: nn.Module, checkpoint: Any, allow_class_mismatch: bool = True) -> Dict[str, Any]:
    """Load weights into ``model`` (a plain or DDP-wrapped module).

    Args:
        model: the model.
        checkpoint: a path, a loaded checkpoint dict or a state dict (a ``module.`` prefix on every key is removed).
        allow_class_mismatch: when the only disagreements are shapes of the class-specific layers
            (:data:`CLASS_SPECIFIC_LAYERS`: another number of classes), keep the model's own (fresh) values for
            them and log a warning naming them — fine-tuning a checkpoint on a new dataset.

    Returns:
        ``{"skipped": [keys left at their initial values], "source": str}``.

    Raises:
        CheckpointError: unreadable file or unknown format.
        CheckpointMismatchError: missing, unexpected or shape-mismatched keys, all listed, and the model unchanged.
    """
    source = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "<in-memory checkpoint>"
    target = unwrap_model(model)
    obj = _read_weights(source) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    state = _strip_prefix(_state_dict_any_format(obj, source, target))
    own = target.state_dict()

    missing = [k for k in own if k not in state and not _ignorable(k)]
    unexpected = [k for k in state if k not in own and not _ignorable(k)]
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in state
                  if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    skipped: List[str] = []
    if mismatched and not missing and not unexpected and allow_class_mismatch and \
            all(_is_class_specific(k) for k, _, _ in mismatched):
        skipped = [k for k, _, _ in mismatched]
        logger.warning("%s: the class-specific layers do not match the model's number of classes and keep their "
                       "initial values (fine-tuning): %s", source,
                       ", ".join(f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched))
        mismatched = []
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not fit the model ({type(target).__name__}):"]
        if missing:
            lines.append(f"  missing in the checkpoint ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatch ({len(mismatched)}): " + ", ".join(
                f"{k} checkpoint {a} vs model {b}" for k, a, b in mismatched))
        lines.append("  check that the config (MODEL.CONV_BODY, MODEL.NUM_CLASSES, heads) is the one the checkpoint "
                     "was trained with")
        raise CheckpointMismatchError("\n".join(lines), missing, unexpected, mismatched)

    to_load = {k: v for k, v in state.items() if k in own and k not in skipped}
    result = target.load_state_dict(to_load, strict=False)
    left = [k for k in result.missing_keys if k not in skipped and not _ignorable(k)]
    if left or [k for k in result.unexpected_keys if not _ignorable(k)]:
        raise CheckpointMismatchError(f"checkpoint {source}: the model did not accept keys {left} / "
                                      f"{result.unexpected_keys}", left, result.unexpected_keys, [])
    return {"skipped": skipped, "source": source}


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints
# ---------------------------------------------------------------------------------------------------------------
class Checkpointer:
    """Saves and restores the full training state in ``output_dir``.

    Args:
        model: the (possibly DDP-wrapped) model.
        output_dir: folder of the checkpoints and of the ``last_checkpoint`` file naming the newest one.
        optimizer, scheduler, scaler: saved and restored with the model when given.
        ema: a :class:`~maskrcnn.engine.ema.ModelEMA` (``SOLVER.EMA_DECAY``), saved under ``"ema"`` and restored
            when given.
        save_to_disk: False on processes other than rank 0 (they take part in gathering RNG states only).
    """

    def __init__(self, model: nn.Module, output_dir: str, optimizer=None, scheduler=None, scaler=None,
                 save_to_disk: bool = True, ema=None):
        self.model = model
        self.output_dir = os.fspath(output_dir)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.ema = ema
        self.save_to_disk = bool(save_to_disk)

    def payload(self, iteration: int, cfg_yaml: Optional[str] = None, rng_per_rank: Optional[List[Any]] = None,
                **extra: Any) -> Dict[str, Any]:
        rng_per_rank = rng_per_rank if rng_per_rank is not None else [get_rng_state()]
        out: Dict[str, Any] = {"model": {k: v.detach().cpu() for k, v in unwrap_model(self.model).state_dict().items()},
                               "iteration": int(iteration), "cfg": cfg_yaml, "rng": rng_per_rank[0],
                               "rng_per_rank": list(rng_per_rank), "world_size": len(rng_per_rank)}
        if self.optimizer is not None:
            out["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            out["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None and self.scaler.is_enabled():
            out["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            out["ema"] = self.ema.state_dict()
        out.update(extra)
        return out

    def save(self, name: str, iteration: int, cfg_yaml: Optional[str] = None, **extra: Any) -> Optional[str]:
        """Write ``output_dir/name.pth`` and point ``last_checkpoint`` at it; returns the path (None off rank 0).

        Must be called on every process: the RNG states of all ranks are gathered so that a resumed multi-process
        run continues each rank's random stream.
        """
        rng_all = all_gather(get_rng_state())
        if not self.save_to_disk:
            return None
        path = os.path.join(self.output_dir, name if name.endswith(".pth") else f"{name}.pth")
        try:
            save_checkpoint(path, self.payload(iteration, cfg_yaml, rng_all, **extra))
        except CheckpointError as e:
            newest = self.find_last()
            kept = (f"the newest complete checkpoint, {newest}, is intact and --resume continues from it"
                    if newest else "no earlier checkpoint exists")
            raise CheckpointError(f"{e}. {kept}. Fix: free space on the disk holding {self.output_dir} (or raise "
                                  f"the file-size limit, `ulimit -f`), or point --output_dir elsewhere, then rerun "
                                  f"with --resume") from e
        atomic_write(os.path.join(self.output_dir, LAST_CHECKPOINT_FILE),
                     lambda f: f.write(os.path.basename(path).encode("utf-8")), what="last_checkpoint file")
        logger.info("saved checkpoint %s (iteration %d)", path, iteration)
        return path

    # --- finding ---------------------------------------------------------------------------------------------------
    def candidates(self) -> List[str]:
        """Checkpoints in ``output_dir``, newest first: the one ``last_checkpoint`` names, then ``model_final.pth``,
        then ``model_<iter>.pth`` by decreasing iteration."""
        if not os.path.isdir(self.output_dir):
            return []
        names = os.listdir(self.output_dir)
        ordered: List[str] = []
        last_file = os.path.join(self.output_dir, LAST_CHECKPOINT_FILE)
        if os.path.isfile(last_file):
            with open(last_file, "r", encoding="utf-8") as f:
                named = f.read().strip()
            if named and os.path.isfile(os.path.join(self.output_dir, named)):
                ordered.append(named)
        if "model_final.pth" in names:
            ordered.append("model_final.pth")
        snaps = sorted((int(m.group(1)), n) for n in names for m in [_SNAPSHOT_RE.match(n)] if m)
        ordered.extend(n for _, n in reversed(snaps))
        seen, out = set(), []
        for n in ordered:
            if n not in seen:
                seen.add(n)
                out.append(os.path.join(self.output_dir, n))
        return out

    def find_last(self) -> Optional[str]:
        """Path of the newest checkpoint in ``output_dir`` or None."""
        c = self.candidates()
        return c[0] if c else None

    # --- restoring -------------------------------------------------------------------------------------------------
    def resume(self, path: Optional[str] = None) -> Dict[str, Any]:
        """Restore model, optimizer, scheduler and scaler from ``path`` (default: the newest readable checkpoint of
        ``output_dir``; an unreadable newest one is reported and the next older one tried).

        Returns the loaded checkpoint dict (``iteration``: the first iteration still to run; ``rng``/``rng_per_rank``:
        to restore with :meth:`restore_rng` once everything that draws random numbers at start-up has run).
        """
        if path is not None:
            ckpt = load_checkpoint(path)
        else:
            ckpt, errors = None, []
            for cand in self.candidates():
                try:
                    ckpt, path = load_checkpoint(cand), cand
                    break
                except CheckpointError as e:
                    errors.append(str(e))
                    logger.warning("cannot resume from %s, trying an older checkpoint: %s", cand, e)
            if ckpt is None:
                detail = ("; ".join(errors)) if errors else "no checkpoint files"
                raise CheckpointError(f"--resume: no usable checkpoint in {self.output_dir} ({detail})")
        if "iteration" not in ckpt:
            raise CheckpointError(f"{path}: holds no 'iteration'; it is a weights file, not a training checkpoint "
                                  f"(load it with --load_ckpt instead of --resume)")
        load_ckpt(self.model, ckpt, allow_class_mismatch=False)
        for name, obj in (("optimizer", self.optimizer), ("scheduler", self.scheduler), ("scaler", self.scaler),
                          ("ema", self.ema)):
            if obj is None or (name == "scaler" and not obj.is_enabled()):
                continue
            if name == "ema" and name not in ckpt:
                # EMA turned on for the rest of a run: average from the resumed weights on.
                logger.warning("%s holds no EMA state (SOLVER.EMA_DECAY was 0); the EMA starts from its weights", path)
                obj.reset(self.model)
                continue
            if name not in ckpt:
                raise CheckpointError(f"{path}: has no {name} state to resume from")
            obj.load_state_dict(ckpt[name])
        ckpt["path"] = path
        logger.info("resuming from %s at iteration %d", path, int(ckpt["iteration"]))
        return ckpt

    @staticmethod
    def restore_rng(ckpt: Mapping[str, Any], rank: int = 0, world_size: int = 1) -> None:
        """Restore this rank's RNG states saved in ``ckpt`` (rank 0's when the world size changed)."""
        per_rank = ckpt.get("rng_per_rank") or []
        if len(per_rank) == world_size and rank < len(per_rank):
            set_rng_state(per_rank[rank])
        elif ckpt.get("rng") is not None:
            if per_rank and len(per_rank) != world_size:
                logger.warning("checkpoint was written by %d processes, this run has %d: every rank restores "
                               "rank 0's RNG state, so the run is not an exact continuation", len(per_rank), world_size)
            set_rng_state(ckpt["rng"])
