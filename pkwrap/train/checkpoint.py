"""Atomic, verified training checkpoints with a retention policy.

File format (``<exp>/checkpoints/ckpt-<step:08d>.pt``, ``final.pt``): what ``torch.save``
writes (a zip container), with the zip file comment set to
``pkwrap-sha256:<64 hex digits>``, the sha256 of the file as torch wrote it (comment
empty). Plain ``torch.load(path, weights_only=False)`` reads it; :func:`load_checkpoint`
also verifies the digest, so a file cut short or damaged afterwards (disk full, copy
interrupted) is detected and :func:`find_latest_checkpoint` warns and falls back to the
previous one. Files of the earlier format (a ``PKWRAPCKPT1`` header line, the digest and
length, then the torch payload) are still read.

Writing goes through :class:`pkwrap.kaldi.io.AtomicFile`: ``<name>.tmp.<pid>`` in the same
directory, fsync'ed, ``os.replace``'d onto the final name, directory fsync'ed. A kill at
any moment leaves either the old set of checkpoints or the new one, never a torn file
under a final name; an error while writing (a full disk) removes the temporary file.

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
import struct
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..cli import file_error
from ..kaldi.io import atomic_output

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

_MAGIC = b"PKWRAPCKPT1\n"  # the earlier format's header
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory record
_COMMENT = b"pkwrap-sha256:"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
log = logging.getLogger("pkwrap.train")


class CheckpointError(RuntimeError):
    """A checkpoint file is truncated, corrupt or not a pkwrap checkpoint."""


def checkpoint_path(ckpt_dir: str, step: int) -> str:
    """``<ckpt_dir>/ckpt-<step:08d>.pt``."""
    return os.path.join(ckpt_dir, "ckpt-%08d.pt" % step)


def _with_digest(payload: bytes) -> bytes:
    """torch's zip bytes with the digest as the zip file comment."""
    if payload[-22:-18] != _EOCD or payload[-2:] != b"\0\0":
        raise CheckpointError("torch.save wrote no zip container (comment field not found)")
    comment = _COMMENT + hashlib.sha256(payload).hexdigest().encode()
    return payload[:-2] + struct.pack("<H", len(comment)) + comment


def save_checkpoint(path: str, state: Dict[str, Any]) -> str:
    """Write ``state`` to ``path`` atomically (tmp file, fsync, os.replace, fsync dir),
    in torch's format with a digest (see the module docstring).

    Args:
      path: final file name.
      state: picklable dict (tensors, state_dicts, numbers).
    Returns:
      ``path``.
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    data = _with_digest(buf.getvalue())
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise file_error(d, e) from e
    with atomic_output(path, fsync=True) as f:
        f.write(data)
    return path


def _verified_payload(path: str, data: bytes) -> bytes:
    """The torch bytes of a checkpoint file after checking its digest."""
    if data.startswith(_MAGIC):  # the earlier format
        parts = data[len(_MAGIC):].split(b"\n", 2)
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
    else:
        n = len(_COMMENT) + 64
        tail = data[-(22 + n):]
        if (len(data) < 22 + n or tail[:4] != _EOCD or tail[22:22 + len(_COMMENT)] != _COMMENT
                or struct.unpack("<H", tail[20:22])[0] != n):
            if not data.startswith(b"PK\x03\x04"):
                raise CheckpointError("%s is not a pkwrap checkpoint (not a torch zip file)"
                                      % path)
            raise CheckpointError("checkpoint %s is truncated or not written by pkwrap "
                                  "(no pkwrap-sha256 digest at its end)" % path)
        digest = tail[22 + len(_COMMENT):]
        payload = data[:-(n + 2)] + b"\0\0"
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError("checkpoint %s is corrupt: sha256 mismatch" % path)
    return payload


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
        raise CheckpointError("cannot read checkpoint %s: %s" % (path, e.strerror or e))
    payload = _verified_payload(path, data)
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
