"""Objective bookkeeping, per-rank text logs and rank-0 TensorBoard.

An :class:`ObjfTracker` is a dict of sums. Per-frame values divide by the summed
supervision weight ``w*S*T`` (Kaldi's "weight"), so the numbers printed equal Kaldi's::

    chain objf per frame = sum(num_logprob_weighted - den_logprob_weighted) / sum(weight)
    l2 term per frame    = sum(l2_term) / sum(weight)
    xent objf per frame  = sum(xent_objf) / sum(weight)

:meth:`ObjfTracker.reduce` sums over ranks (all_reduce), so rank 0's TensorBoard shows
the job's objective, not one worker's.

TensorBoard tags written by the trainer (rank 0, ``<exp>/tensorboard``)::

    train/objf  train/xent_objf  train/l2_term  train/objf_plus_l2          per frame
    valid/objf  valid/xent_objf  (and train_diag/* for the train subset)   compute-prob
    train/learning_rate  train/param_change  train/grad_norm  train/frames_per_second
    train/skipped_minibatches (failed, over all ranks)  train/skipped_steps
    train/ng_rho_mean  train/ng_floored  train/ng_reorthogonalized  natural-gradient state
    train/ng_scale_{mean,min,max}    (when the preconditioners record last_scale)
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Dict, Optional

import torch

__all__ = ["ObjfTracker", "setup_logger", "kaldi_objf_line", "make_summary_writer"]


class ObjfTracker(dict):
    """Sums of objective parts; ``per_frame(key)`` divides by the summed ``weight``."""

    def add_result(self, result, num_frames: Optional[float] = None,
                   xent: bool = True) -> None:
        """Accumulate a ChainLoss result (objf, l2_term, weight and, with ``xent``,
        xent_objf)."""
        for k in ("objf", "l2_term", "weight") + (("xent_objf",) if xent else ()):
            v = getattr(result, k, None)
            if v is not None:
                self[k] = self.get(k, 0.0) + float(v)
        self["frames"] = self.get("frames", 0.0) + float(
            num_frames if num_frames is not None else getattr(result, "weight", 0.0))
        self["minibatches"] = self.get("minibatches", 0.0) + 1

    def __iadd__(self, other: Dict[str, float]):
        for k, v in other.items():
            self[k] = self.get(k, 0.0) + v
        return self

    def per_frame(self, key: str) -> float:
        w = self.get("weight", 0.0)
        return self.get(key, 0.0) / w if w > 0 else float("nan")

    # Parts every rank reduces, in this order, whether or not it saw a minibatch:
    # a rank with no batch of its own (fewer minibatches than ranks) must still send a
    # vector of the same length, or the collective would hang.
    _PARTS = ("objf", "l2_term", "weight", "xent_objf", "frames", "minibatches")

    def reduce(self, device="cpu") -> "ObjfTracker":
        """Sum over ranks (identity with one process); returns a new tracker.

        A part absent on every rank stays absent (e.g. ``xent_objf`` for a model without
        an xent head). Parts outside ``_PARTS`` must be the same on all ranks."""
        from .dist import all_reduce_sum
        keys = list(self._PARTS) + sorted(k for k in self if k not in self._PARTS)
        vals = [float(self.get(k, 0.0)) for k in keys] + [float(k in self) for k in keys]
        t = torch.tensor(vals, dtype=torch.float64, device=device)
        all_reduce_sum(t)
        t = t.tolist()
        n = len(keys)
        return ObjfTracker({k: t[i] for i, k in enumerate(keys) if t[n + i] > 0})

    def write_summary(self, tb_writer, prefix: str, step: int) -> None:
        """Per-frame scalars ``<prefix>objf``, ``xent_objf``, ``l2_term``, ``objf_plus_l2``."""
        if tb_writer is None or self.get("weight", 0.0) <= 0:
            return
        tb_writer.add_scalar(prefix + "objf", self.per_frame("objf"), step)
        if "l2_term" in self:
            tb_writer.add_scalar(prefix + "l2_term", self.per_frame("l2_term"), step)
            tb_writer.add_scalar(prefix + "objf_plus_l2",
                                 (self["objf"] + self["l2_term"]) / self["weight"], step)
        if "xent_objf" in self:
            tb_writer.add_scalar(prefix + "xent_objf", self.per_frame("xent_objf"), step)

    def __str__(self):
        s = "objf %.6g/frame" % self.per_frame("objf")
        if self.get("l2_term"):
            s += ", l2 %.4g" % self.per_frame("l2_term")
        if "xent_objf" in self:
            s += ", xent %.6g" % self.per_frame("xent_objf")
        s += ", over %g frames" % self.get("weight", 0.0)
        return s


def kaldi_objf_line(output_name: str, objf_per_frame: float, num_frames: float) -> str:
    """Kaldi's compute-prob line, e.g. ``Overall log-probability for 'output' is
    -0.666522 per frame, over 400 frames.``"""
    return "Overall log-probability for '%s' is %g per frame, over %g frames." % (
        output_name, objf_per_frame, num_frames)


class LogFileHandler(logging.FileHandler):
    """A log file whose write errors (a full disk, a file-size limit) stop the program
    with one error naming the file (:class:`pkwrap.cli.FileError`), instead of logging's
    "--- Logging error ---" traceback on stderr and an unnamed OSError at close."""

    def handleError(self, record):
        e = sys.exc_info()[1]
        if isinstance(e, OSError):
            from pkwrap.cli import file_error
            raise file_error(self.baseFilename, e) from e
        super().handleError(record)

    def close(self):
        try:
            super().close()
        except OSError as e:
            from pkwrap.cli import file_error
            raise file_error(self.baseFilename, e) from e


def setup_logger(log_dir: Optional[str], rank: int = 0, name: str = "train",
                 level=logging.INFO, console: bool = True) -> logging.Logger:
    """Logger ``pkwrap.train`` writing ``<log_dir>/<name>.<rank>.log`` (appending, so a
    restarted job continues the same file) and, on rank 0, the console."""
    logger = logging.getLogger("pkwrap.train")
    logger.setLevel(level)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%%(asctime)s %%(levelname)s [rank %d] %%(message)s" % rank)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        fh = LogFileHandler(os.path.join(log_dir, "%s.%d.log" % (name, rank)))
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    if console and rank == 0:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        logger.addHandler(sh)
    return logger


def make_summary_writer(log_dir: str, purge_step: Optional[int] = None):
    """A ``torch.utils.tensorboard.SummaryWriter`` (None if tensorboard is missing).

    ``purge_step``: events of earlier runs at steps >= it are dropped (restarts)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is in the "full" extra
        logging.getLogger("pkwrap.train").warning(
            "tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)
