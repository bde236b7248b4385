"""Atomic, verified training checkpoints with a retention policy.

File format (``<exp>/checkpoints/ckpt-<step:08d>.pt``)::

    b"PKWRAPCKPT1\\n"                 magic line
    b"<64 hex digits>\\n"             sha256 of the payload
    b"<decimal length>\\n"            payload length in bytes
    payload                           torch.save() of the checkpoint dict

Writing: the bytes go to ``<name>.tmp.<pid>`` in the same directory, which is fsync'ed,
``os.replace``'d onto the final name (atomic on POSIX), and the directory is fsync'ed.
A kill at any moment leaves either the old set of checkpoints or the new one, never a
torn file under a final name. Reading verifies magic, length and hash, so a file cut
short or damaged afterwards (disk full, copy interrupted) is detected;
:func:`find_latest_checkpoint` then warns and falls back to the previous one.

Retention: after each save, keep the last ``keep_last`` checkpoints plus the one with
the best validation objective (``meta["valid_objf"]``, higher is better), delete others.

The checkpoint dict written by :class:`pkwrap.train.Trainer` holds ``model``,
``optimizer`` (with natural-gradient state), ``scheduler``, ``sampler`` (the global data
position), ``rng`` (torch, numpy and python RNG states of every rank), ``step``,
``epoch`` and ``meta``.
"""
from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import random
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "find_latest_checkpoint",
    "apply_retention",
    "checkpoint_path",
    "get_rng_state",
    "set_rng_state",
]

_MAGIC = b"PKWRAPCKPT1\n"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
log = logging.getLogger("pkwrap.train")


class CheckpointError(RuntimeError):
    """A checkpoint file is truncated, corrupt or not a pkwrap checkpoint."""


def checkpoint_path(ckpt_dir: str, step: int) -> str:
    """``<ckpt_dir>/ckpt-<step:08d>.pt``."""
    return os.path.join(ckpt_dir, "ckpt-%08d.pt" % step)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str, state: Dict[str, Any]) -> str:
    """Write ``state`` to ``path`` atomically (tmp file, fsync, os.replace, fsync dir).

    Args:
      path: final file name.
      state: picklable dict (tensors, state_dicts, numbers).
    Returns:
      ``path``.
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "wb") as f:
        f.write(_MAGIC)
        f.write(digest + b"\n")
        f.write(b"%d\n" % len(payload))
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(d)
    return path


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises:
      CheckpointError: naming the file and what is wrong (truncated, hash mismatch,
        not a pkwrap checkpoint).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError("cannot read checkpoint %s: %s" % (path, e))
    if not data.startswith(_MAGIC):
        raise CheckpointError("%s is not a pkwrap checkpoint (bad magic %r)"
                              % (path, data[:len(_MAGIC)]))
    rest = data[len(_MAGIC):]
    parts = rest.split(b"\n", 2)
    if len(parts) != 3:
        raise CheckpointError("checkpoint %s is truncated in its header (%d bytes)"
                              % (path, len(data)))
    digest, length, payload = parts
    try:
        length = int(length)
    except ValueError:
        raise CheckpointError("checkpoint %s has a corrupt header" % path)
    if len(payload) != length:
        raise CheckpointError("checkpoint %s is truncated: payload has %d of %d bytes"
                              % (path, len(payload), length))
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError("checkpoint %s is corrupt: sha256 mismatch" % path)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as e:  # pragma: no cover - hash passed, so only version skew gets here
        raise CheckpointError("cannot unpickle checkpoint %s: %s" % (path, e))


def list_checkpoints(ckpt_dir: str) -> List[Tuple[int, str]]:
    """``[(step, path)]`` of the checkpoints in ``ckpt_dir``, oldest first."""
    out = []
    for p in glob.glob(os.path.join(ckpt_dir, "ckpt-*.pt")):
        m = _NAME.match(os.path.basename(p))
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest_checkpoint(ckpt_dir: str, map_location="cpu"
                           ) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """The newest checkpoint that verifies, skipping bad ones with a warning.

    Returns:
      ``(path, state)``, or ``(None, None)`` when there is none that loads.
    """
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s; trying the previous one", e)
            import warnings
            warnings.warn("skipping checkpoint: %s; trying the previous one" % e,
                          RuntimeWarning, stacklevel=2)
    return None, None


def apply_retention(ckpt_dir: str, keep_last: int = 3,
                    objf_of: Optional[Dict[int, float]] = None) -> List[str]:
    """Delete checkpoints except the last ``keep_last`` and the best by objective.

    Args:
      ckpt_dir: directory of ``ckpt-*.pt``.
      keep_last: how many of the newest to keep (>= 1).
      objf_of: step -> validation objective (higher is better) of those that have one.
    Returns:
      The deleted paths.
    """
    if keep_last < 1:
        raise ValueError("keep_last must be >= 1, got %d" % keep_last)
    ckpts = list_checkpoints(ckpt_dir)
    keep = {s for s, _ in ckpts[-keep_last:]}
    if objf_of:
        scored = [(v, s) for s, v in objf_of.items() if v == v and s in {c[0] for c in ckpts}]
        if scored:
            keep.add(max(scored)[1])
    deleted = []
    for s, p in ckpts:
        if s not in keep:
            try:
                os.remove(p)
                deleted.append(p)
            except OSError:
                pass
    for p in glob.glob(os.path.join(ckpt_dir, "*.tmp.*")):  # leftovers of killed writers
        try:
            os.remove(p)
        except OSError:
            pass
    return deleted


def get_rng_state() -> Dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states of this process."""
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
          "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
