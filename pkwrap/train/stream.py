"""A Kaldi egs dir streamed as ``steps/nnet3/chain/train.py`` feeds ``nnet3-chain-train``.

Kaldi's train.py trains iteration i with W jobs; job j (1-based) reads one *archive
pass*, number ``k = i W + j - 1``, through::

    nnet3-chain-copy-egs --frame-shift=s ark:egs/cegs.a.ark ark:- |
    nnet3-chain-shuffle-egs --buffer-size=5000 --srand=<srand + i> ark:- ark:- |
    nnet3-chain-merge-egs --minibatch-size=<rule> ark:- ark:-

    a = (k mod N) + 1                      N = info/num_archives
    s = (a + floor(k / N)) mod f           f = frame subsampling factor

:class:`StreamingEgs` does the same for rank r of W (``k = i W + r``), one eg at a
time, so that memory stays bounded whatever the size of the egs dir:

* **read**: the archive (``cegs.a.ark``, or ``cegs.a.scp`` whose lines point into
  archives) is read entry by entry from a read-only map of the file; the pages read are
  handed back to the kernel after every eg (``madvise(MADV_DONTNEED)``), so resident
  memory holds only the egs that are waiting, never the archive.
* **frame shift**: the minibatch carries ``frame_shift = d`` with ``d`` the offset of
  features vs labels that ``--frame-shift=s`` gives (:func:`effective_frame_shift`);
  the training step cuts the input rows accordingly, as for :class:`PlannedEgs`.
* **shuffle** (``nnet3-chain-shuffle-egs --buffer-size=B``): B slots; each eg read
  goes to a random slot; if the slot was taken, its eg goes on to the merger first;
  when the archive ends, the slots are emptied in slot order. Kaldi draws the slot with
  C's ``rand()`` seeded by ``srand + i``; here it is numpy's PCG64 seeded by
  ``(seed, i)``: the same algorithm and the same seeding rule (every job of an iteration
  shares the seed), not the same numbers.
* **merge**: :class:`pkwrap.kaldi.chain_egs.ChainExampleMerger`, the code of
  ``nnet3-chain-merge-egs``: egs of one structure are merged when there are as many as
  the rule's largest size; at the end of the pass the leftovers are cut into the largest
  allowed sizes, and a remainder that fits none is dropped (logged, as Kaldi warns).

**Epochs.** Kaldi processes ``num_epochs * N * f`` archive passes in
``num_iters = num_epochs * N * f // W`` iterations (each archive once per frame shift
per epoch). Epoch e is iterations ``[e P // W, (e+1) P // W)`` with ``P = N f`` (``N``
when frame shifts are off), so the iterations of all epochs are Kaldi's.

**Equal steps on every rank.** DDP needs every rank to take the same number of steps,
but archives hold different numbers of egs (Kaldi's jobs are independent processes and
need not). Rule: in each iteration, every rank reads its archive; as soon as one rank's
archive has no minibatch left, the iteration ends on all ranks (one all-reduce of a
flag per step when W > 1), and what the other ranks had left of their archives in that
iteration is not used; each rank logs how many minibatches it had made when stopped.
Kaldi's archives are equal in size to within a few egs, so this is a handful of
minibatches per iteration. With W = 1 nothing is left out.

**Exact resume.** :meth:`StreamingEgs.state_dict` holds the iteration, and for the
archive pass in progress: the byte offset of the next entry to read, the offsets of the
egs sitting in the shuffle buffer (by slot) and in the merger (by group), the shuffle
RNG's state and counters. :meth:`load_state_dict` re-reads those few egs at their
offsets, so a resumed run yields exactly the minibatches the uninterrupted run would
have. A checkpoint holds this for every rank. Restarting with another number of workers
cannot continue the interrupted iteration (its archives were split by rank); it
continues at the first iteration of the new numbering that begins after every pass
already begun, ``ceil((i + 1) W_old / W_new)`` (logged).

Kaldi's train.py halves the minibatch sizes in iteration 0
(``first_iteration_minibatch_size=halve_minibatch_size(rule)`` does the same).
"""
from __future__ import annotations

import logging
import math
import mmap
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from pkwrap.kaldi.chain_egs import CHAIN_EG_HOLDER, ChainExampleMerger, _structure_key
from pkwrap.kaldi.io import KaldiFormatError
from pkwrap.kaldi.table import _split_offset, read_archive_entry

from .data import ChainBatch, EgsSource, collate_chain_egs, effective_frame_shift

__all__ = ["StreamingEgs", "KaldiEgsDir", "archive_pass"]

log = logging.getLogger("pkwrap.train")
_PAGE = mmap.PAGESIZE


def archive_pass(k: int, num_archives: int, frame_subsampling_factor: int,
                 frame_shift: bool = True) -> Tuple[int, int]:
    """Archive and ``--frame-shift`` of archive pass ``k`` (0-based), as train.py's
    ``train_new_models``.

    Args:
      k: ``num_archives_processed + job - 1``.
      num_archives: N.
      frame_subsampling_factor: f.
      frame_shift: False: always shift 0.
    Returns:
      ``(a, s)``: archive number ``a`` in 1..N (``cegs.a.ark``) and frame shift s.
    """
    a = k % num_archives + 1
    s = (a + k // num_archives) % frame_subsampling_factor if frame_shift else 0
    return a, s


class KaldiEgsDir:
    """What ``get_egs.sh`` wrote: ``cegs.{1..N}.ark`` (or ``.scp``), ``info/*``.

    Args:
      path: the egs dir.
    Attributes:
      num_archives: N (``info/num_archives``, else the count of ``cegs.<n>.ark``).
      archives: N paths, ``cegs.<a>.ark`` or, where only that exists, ``cegs.<a>.scp``.
      info: ``info/<name>`` -> its text (stripped) for every file in ``info/``.
      left_context, right_context, feat_dim: from ``info/`` (None if absent).
    Raises:
      FileNotFoundError / ValueError: one line naming the dir and what is missing or bad.
    """

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError("egs dir %s: not a directory" % self.path)
        self.info: Dict[str, str] = {}
        idir = os.path.join(self.path, "info")
        if os.path.isdir(idir):
            for name in sorted(os.listdir(idir)):
                p = os.path.join(idir, name)
                if os.path.isfile(p):
                    with open(p, errors="replace") as f:
                        self.info[name] = f.read().strip()
        if "num_archives" in self.info:
            try:
                n = int(self.info["num_archives"].split()[0])
            except (ValueError, IndexError):
                raise ValueError("egs dir %s: info/num_archives is not a number: %r"
                                 % (self.path, self.info["num_archives"][:40]))
        else:
            n = 0
            while self._archive(n + 1) is not None:
                n += 1
        if n < 1:
            raise FileNotFoundError("egs dir %s has no cegs.1.ark or cegs.1.scp" % self.path)
        self.num_archives = n
        self.archives: List[str] = []
        for a in range(1, n + 1):
            p = self._archive(a)
            if p is None:
                raise FileNotFoundError("egs dir %s: info/num_archives says %d, but "
                                        "cegs.%d.ark (or .scp) is missing" % (self.path, n, a))
            self.archives.append(p)

    def _archive(self, a: int) -> Optional[str]:
        for ext in ("ark", "scp"):
            p = os.path.join(self.path, "cegs.%d.%s" % (a, ext))
            if os.path.isfile(p):
                return p
        return None

    def _int(self, name: str) -> Optional[int]:
        v = self.info.get(name)
        if v is None:
            return None
        try:
            return int(v.split()[0])
        except (ValueError, IndexError):
            raise ValueError("egs dir %s: info/%s is not a number: %r" % (self.path, name,
                                                                         v[:40]))

    @property
    def left_context(self) -> Optional[int]:
        return self._int("left_context")

    @property
    def right_context(self) -> Optional[int]:
        return self._int("right_context")

    @property
    def feat_dim(self) -> Optional[int]:
        return self._int("feat_dim")


# ------------------------------------------------------------------------- reading
def _map(path: str):
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _release(buf, start: int, end: int) -> None:
    """Drop the whole pages of ``buf[start:end]`` from this process's resident memory
    (they are read again from the file if touched)."""
    if not isinstance(buf, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    a = start - start % _PAGE
    b = end - end % _PAGE
    if b > a:
        buf.madvise(mmap.MADV_DONTNEED, a, b - a)


def _own(eg):
    """An eg that holds no reference into the file map and no second (compressed)
    copy of its inputs."""
    for name, t in list(eg.inputs.items()):
        if name not in eg.stored_inputs:  # read uncompressed: may view the map
            eg.inputs[name] = t.clone()
    eg.stored_inputs = {}
    return eg


class _EntryReader:
    """Entries of one ``cegs.a.ark`` (position = byte offset of an entry) or
    ``cegs.a.scp`` (position = byte offset of a line), read one at a time."""

    def __init__(self, path: str):
        self.path = path
        self.is_scp = path.endswith(".scp")
        try:
            self.buf = _map(path)
        except OSError as e:
            raise OSError("%s: cannot read (%s)" % (path, e))
        self.size = len(self.buf)
        self._arks: Dict[str, Any] = {}

    def _ark(self, path: str):
        if path not in self._arks:
            if len(self._arks) > 16:
                self._arks.clear()
            try:  # a relative path is relative to the working directory, as in Kaldi
                self._arks[path] = _map(path)
            except OSError as e:
                raise OSError("%s: cannot read %s (%s)" % (self.path, path, e))
        return self._arks[path]

    def read(self, pos: int):
        """The entry at ``pos``: ``(key, eg, next_pos)``, or ``(None, None, pos)`` at the
        end."""
        if not self.is_scp:
            key, _, eg, end = read_archive_entry(self.buf, pos, self.path, CHAIN_EG_HOLDER)
            if key is None:
                return None, None, end
            _release(self.buf, pos, end)
            return key, _own(eg), end
        buf = self.buf
        while pos < self.size and buf[pos] in b" \t\r\n":
            pos += 1
        if pos >= self.size:
            return None, None, pos
        nl = buf.find(b"\n", pos)
        end = self.size if nl < 0 else nl + 1
        line = bytes(buf[pos:end]).decode("utf-8", errors="replace").strip()
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise KaldiFormatError("%s: bad script-file line at byte %d: %r (want 'key "
                                   "rxfilename')" % (self.path, pos, line[:80]))
        key, rx = parts
        ark, off = _split_offset(rx)
        if off is None or ark.endswith("|"):
            raise KaldiFormatError("%s: key %r: %r is not 'archive:offset'"
                                   % (self.path, key, rx))
        abuf = self._ark(ark)
        if off >= len(abuf):
            raise KaldiFormatError("%s: key %r: offset %d is past the end of %s (%d bytes)"
                                   % (self.path, key, off, ark, len(abuf)))
        from pkwrap.kaldi.table import _read_object
        eg, oend = _read_object(abuf, off, ark, key, CHAIN_EG_HOLDER)
        _release(abuf, off, oend)
        return key, _own(eg), end


class _ArchivePass:
    """One archive pass: read -> shuffle buffer -> merger, one minibatch at a time.

    Items are ``((position, key), eg)``; ``position`` finds the eg again on resume.
    """

    READ, DRAIN, FLUSH, DONE = range(4)

    def __init__(self, reader: _EntryReader, buffer_size: int, seed: Tuple[int, ...],
                 minibatch_size: str):
        self.reader = reader
        self.buffer_size = int(buffer_size)
        self.rng = np.random.default_rng(list(seed))
        self.merger = ChainExampleMerger(minibatch_size)
        self.slots: List[Optional[tuple]] = [None] * self.buffer_size
        self.pos = 0
        self.phase = self.READ
        self.drain = 0
        self.num_read = 0
        self.num_minibatches = 0

    def next_minibatch(self) -> Optional[List[tuple]]:
        """The next minibatch ``[((position, key), eg)]``, or None at the end."""
        while True:
            if self.phase == self.READ:
                start = self.pos
                key, eg, self.pos = self.reader.read(start)
                if key is None:
                    self.phase = self.DRAIN
                    continue
                self.num_read += 1
                j = int(self.rng.integers(self.buffer_size))
                out, self.slots[j] = self.slots[j], ((start, key), eg)
                if out is None:
                    continue
                vec = self.merger.add(*out)
            elif self.phase == self.DRAIN:
                while self.drain < self.buffer_size and self.slots[self.drain] is None:
                    self.drain += 1
                if self.drain == self.buffer_size:
                    self.phase = self.FLUSH
                    continue
                out, self.slots[self.drain] = self.slots[self.drain], None
                self.drain += 1
                vec = self.merger.add(*out)
            elif self.phase == self.FLUSH:
                vec = self.merger.flush_one()
                if vec is None:
                    self.phase = self.DONE
                    if self.merger.num_discarded:
                        log.warning("%s: %d egs left over that fit no minibatch size of %r "
                                    "were not used (as nnet3-chain-merge-egs)",
                                    self.reader.path, self.merger.num_discarded,
                                    self.merger.rule.spec)
                    return None
            else:
                return None
            if vec is not None:
                self.num_minibatches += 1
                return vec

    def state_dict(self) -> Dict[str, Any]:
        return {"pos": self.pos, "phase": self.phase, "drain": self.drain,
                "slots": [(j, it[0][0]) for j, it in enumerate(self.slots) if it is not None],
                "merger": self.merger.pending(),
                "merger_counts": (self.merger.num_read, self.merger.num_written,
                                  self.merger.num_discarded),
                "rng": self.rng.bit_generator.state, "num_read": self.num_read,
                "num_minibatches": self.num_minibatches, "buffer_size": self.buffer_size}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if int(sd["buffer_size"]) != self.buffer_size:
            raise ValueError("the saved archive pass used a shuffle buffer of %d, this one "
                             "%d" % (sd["buffer_size"], self.buffer_size))

        def at(pos):
            key, eg, _ = self.reader.read(int(pos))
            if key is None:
                raise ValueError("%s: no eg at byte %d, where the checkpoint says one is "
                                 "(the egs dir changed?)" % (self.reader.path, pos))
            return (int(pos), key), eg

        self.pos, self.phase, self.drain = int(sd["pos"]), int(sd["phase"]), int(sd["drain"])
        self.slots = [None] * self.buffer_size
        for j, pos in sd["slots"]:
            self.slots[int(j)] = at(pos)
        self.merger.groups = {}
        for group in sd["merger"]:
            items = [at(p) for p, _ in group]
            self.merger.groups[_structure_key(items[0][1])] = items
        (self.merger.num_read, self.merger.num_written,
         self.merger.num_discarded) = sd["merger_counts"]
        self.rng.bit_generator.state = sd["rng"]
        self.num_read, self.num_minibatches = int(sd["num_read"]), int(sd["num_minibatches"])


class StreamingEgs(EgsSource):
    """A Kaldi egs dir streamed (module docstring): bounded memory, exact resume.

    Args:
      egs_dir: the dir ``get_egs.sh`` wrote (``cegs.N.ark`` or ``cegs.N.scp``, ``info/``).
      minibatch_size: ``nnet3-chain-merge-egs --minibatch-size`` rule
        (``--trainer.num-chunk-per-minibatch``), e.g. ``"128"`` or ``"64,32"``.
      frame_subsampling_factor: f (must equal the model's).
      shuffle_buffer_size: B of ``nnet3-chain-shuffle-egs --buffer-size`` (train.py:
        5000). Memory is about B decoded egs (27 kB for 170 rows x 40 dims).
      seed: ``--srand``; iteration i shuffles with ``(seed, i)``.
      frame_shift: rotate frame shifts as train.py (False: shift 0, epoch = N passes).
      input_name: the features input.
      egs_left_context: frames before t=0, only for egs without indexes (default:
        ``info/left_context``).
      rank, world_size: default from torch.distributed/torchrun's environment; the
        Trainer sets them (:meth:`bind`).
      first_iteration_minibatch_size: the rule for iteration 0 (train.py:
        :func:`~pkwrap.train.data.halve_minibatch_size` of the rule); None: the same.
    """

    def __init__(self, egs_dir: str, minibatch_size: str = "128",
                 frame_subsampling_factor: int = 3, shuffle_buffer_size: int = 5000,
                 seed: int = 0, frame_shift: bool = True, input_name: str = "input",
                 egs_left_context: Optional[int] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None,
                 first_iteration_minibatch_size: Optional[str] = None):
        from . import dist as _d
        from .data import MinibatchSizeRule
        self.egs = KaldiEgsDir(egs_dir)
        MinibatchSizeRule(minibatch_size)  # check them now
        if first_iteration_minibatch_size is not None:
            MinibatchSizeRule(first_iteration_minibatch_size)
        self.first_iteration_minibatch_size = first_iteration_minibatch_size
        if int(shuffle_buffer_size) < 1:
            raise ValueError("shuffle_buffer_size must be >= 1 (streaming never holds a "
                             "whole archive), got %s" % shuffle_buffer_size)
        self.minibatch_size = str(minibatch_size)
        self.frame_subsampling_factor = int(frame_subsampling_factor)
        self.shuffle_buffer_size = int(shuffle_buffer_size)
        self.seed = int(seed)
        self.frame_shift = bool(frame_shift) and self.frame_subsampling_factor > 1
        self.input_name = input_name
        self.egs_left_context = (self.egs.left_context if egs_left_context is None
                                 else int(egs_left_context))
        self.device = None
        self.epoch = 0
        self.iteration = 0
        self._pass: Optional[_ArchivePass] = None
        self.bind(_d.get_rank() if rank is None else int(rank),
                  _d.get_world_size() if world_size is None else int(world_size))

    # --- layout ---------------------------------------------------------------------
    @property
    def num_archives(self) -> int:
        return self.egs.num_archives

    @property
    def passes_per_epoch(self) -> int:
        """P: ``N f`` archive passes per epoch (N without frame shifts)."""
        return self.num_archives * (self.frame_subsampling_factor if self.frame_shift else 1)

    def epoch_iterations(self, epoch: int) -> range:
        """The iterations of ``epoch``: ``[e P // W, (e+1) P // W)``."""
        p, w = self.passes_per_epoch, self.world_size
        return range(epoch * p // w, (epoch + 1) * p // w)

    def pass_of(self, iteration: int, rank: Optional[int] = None) -> Tuple[int, int, int]:
        """``(k, archive, frame_shift)`` that ``rank`` reads in ``iteration``."""
        k = iteration * self.world_size + (self.rank if rank is None else rank)
        a, s = archive_pass(k, self.num_archives, self.frame_subsampling_factor,
                            self.frame_shift)
        return k, a, s

    # --- EgsSource --------------------------------------------------------------------
    def bind(self, rank: int, world_size: int, device=None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError("rank %d not in world of size %d" % (rank, world_size))
        if self.passes_per_epoch < world_size:
            raise ValueError("egs dir %s: %d archive passes per epoch (%d archives) are "
                             "fewer than the %d workers" % (self.egs.path,
                                                            self.passes_per_epoch,
                                                            self.num_archives, world_size))
        self.rank, self.world_size = int(rank), int(world_size)
        if device is not None:
            self.device = torch.device(device)

    def feat_dim(self, input_name: str = "input") -> int:
        reader = _EntryReader(self.egs.archives[0])
        key, eg, _ = reader.read(0)
        if key is None:
            raise ValueError("%s has no egs" % self.egs.archives[0])
        if input_name not in eg.inputs:
            raise ValueError("%s: eg %s has no input %r (has %s)"
                             % (self.egs.archives[0], key, input_name, sorted(eg.inputs)))
        return int(eg.inputs[input_name].shape[-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.iteration = self.epoch_iterations(self.epoch).start
        self._pass = None

    def _open_pass(self) -> _ArchivePass:
        _, a, _ = self.pass_of(self.iteration)
        rule = self.minibatch_size
        if self.iteration == 0 and self.first_iteration_minibatch_size is not None:
            rule = self.first_iteration_minibatch_size
        return _ArchivePass(_EntryReader(self.egs.archives[a - 1]), self.shuffle_buffer_size,
                            (self.seed, self.iteration), rule)

    def _all_have(self, have: bool) -> bool:
        if self.world_size == 1:
            return have
        import torch.distributed as dist
        dev = self.device if self.device is not None and self.device.type == "cuda" \
            else torch.device("cpu")
        t = torch.tensor([1.0 if have else 0.0], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0.5)

    def batches(self) -> Iterator[ChainBatch]:
        end = self.epoch_iterations(self.epoch).stop
        while self.iteration < end:
            if self._pass is None:
                self._pass = self._open_pass()
            k, a, s = self.pass_of(self.iteration)
            d = effective_frame_shift(s, self.frame_subsampling_factor)
            while True:
                vec = self._pass.next_minibatch()
                if not self._all_have(vec is not None):
                    if vec is not None:
                        log.info("iteration %d: rank %d stopped archive %s (frame shift %d) "
                                 "after %d minibatches: another worker's archive ended",
                                 self.iteration, self.rank, self.egs.archives[a - 1], s,
                                 self._pass.num_minibatches - 1)
                    break
                items = [(key, eg, self._pass.num_minibatches - 1, d)
                         for (_, key), eg in vec]
                yield collate_chain_egs(items, self.input_name, self.frame_subsampling_factor,
                                        self.egs_left_context)
            self.iteration += 1
            self._pass = None

    def step_done(self) -> None:
        pass  # the position moves as minibatches are made; nothing is read ahead

    def restart_iteration(self) -> None:
        """Forget the archive pass in progress: the position goes back to the start of
        the current iteration (which yields the same minibatches again: the shuffle is
        seeded by the iteration). For a run that stops at an iteration's first
        minibatch without training on it (``Trainer(before_step=...)``)."""
        self._pass = None

    def epoch_finished(self) -> bool:
        return self._pass is None and self.iteration >= self.epoch_iterations(self.epoch).stop

    def steps_left(self) -> Optional[int]:
        return None

    def steps_per_epoch(self, epoch: int) -> Optional[int]:
        return None

    def describe_position(self) -> str:
        k, a, s = self.pass_of(self.iteration)
        where = "at its start" if self._pass is None else \
            "after %d minibatches, byte %d" % (self._pass.num_minibatches, self._pass.pos)
        return "epoch %d, iteration %d, archive %d (frame shift %d) %s" % (
            self.epoch, self.iteration, a, s, where)

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "stream", "epoch": self.epoch, "iteration": self.iteration,
                "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "minibatch_size": self.minibatch_size,
                "archive_sizes": [os.path.getsize(p) for p in self.egs.archives],
                "pass": None if self._pass is None else self._pass.state_dict()}

    def load_state_dict(self, sd: Dict[str, Any]) -> Optional[str]:
        if sd.get("kind") != "stream":
            raise ValueError("the saved data position is not that of a streamed egs dir")
        if int(sd["seed"]) != self.seed:
            raise ValueError("the saved data position has seed %s, this source %d"
                             % (sd["seed"], self.seed))
        sizes = [os.path.getsize(p) for p in self.egs.archives]
        if list(sd["archive_sizes"]) != sizes:
            raise ValueError("egs dir %s changed since the checkpoint (archive sizes %s, "
                             "now %s)" % (self.egs.path, sd["archive_sizes"], sizes))
        self.epoch = int(sd["epoch"])
        self._pass = None
        old_w = int(sd["world_size"])
        if old_w == self.world_size and int(sd["rank"]) == self.rank:
            self.iteration = int(sd["iteration"])
            if sd["pass"] is not None:
                self._pass = self._open_pass()
                self._pass.load_state_dict(sd["pass"])
            return None
        begun = int(sd["iteration"]) + (1 if sd["pass"] is not None else 0)
        self.iteration = -(-begun * old_w // self.world_size)
        return ("iteration %d of %d workers -> iteration %d of %d (archive passes already "
                "begun are not resumed)" % (int(sd["iteration"]), old_w, self.iteration,
                                            self.world_size))
