"""Chain egs for training: Kaldi's minibatch-size rules, a resumable sharded sampler,
frame-shift rotation, and the minibatch the training step consumes.

**Minibatch-size rules** (``nnet3-chain-merge-egs --minibatch-size``). A rule string is
``eg_size1=spec1/eg_size2=spec2/...`` or just ``spec``; a spec is a comma list of sizes
and ``lo:hi`` ranges, e.g. ``128``, ``64,128``, ``16:32,64``,
``256=64/512=32``. The size of an eg is the number of input rows of its largest input
(one sequence: chunk frames plus context). An eg uses the spec whose eg_size is closest
to its own. Only egs with the same structure (input rows, output frames) are merged.
While input remains, minibatches take the largest size in the spec; when the input
ends, what is left of each structure is cut into the largest allowed sizes that fit,
and a remainder no allowed size fits is dropped (Kaldi warns about it too).

**Global data position.** One epoch is a *plan*: the list of minibatches (lists of eg
indices) made from a permutation of the egs drawn from ``(seed, epoch)``. Rank r of W
takes minibatches ``p + r`` for ``p = 0, W, 2W, ..``; the position p counts minibatches
consumed by the whole job, so it does not depend on W. A job restarted with a different
number of workers continues at the same global minibatch: no minibatch is trained twice
or skipped within the epoch (the minibatches are then grouped into different steps, so
the trajectory differs from the uninterrupted run only in how minibatches are averaged
together). The last ``(len(plan) - p) mod W`` minibatches of an epoch are not used, so
that every rank takes the same number of steps (DDP needs that).

**Frame shift.** Minibatch g of epoch e gets shift ``s = (g + e) mod f`` as
``steps/nnet3/chain/train.py`` rotates ``--frame-shift`` over archives; as in
``ShiftChainExampleTimes`` the input moves by s and the output by s rounded to the
nearest multiple of f, so the features move by ``d = round(s/f) f - s`` in
``-f//2 .. f//2`` relative to the labels (egs carry ``f//2`` extra context frames for it).

**What the Trainer trains on** is an :class:`EgsSource`: this rank's minibatches in
order, and a position that a checkpoint saves and a restart restores. There are two:

* :class:`PlannedEgs`: a map-style dataset (:class:`EgsDataset` in memory, or egs made
  on the fly) with :class:`ChainMinibatchSampler`'s plan per epoch (above). Any dataset
  handed to the Trainer is wrapped in one.
* :class:`pkwrap.train.stream.StreamingEgs`: a Kaldi egs dir read archive by archive as
  ``steps/nnet3/chain/train.py`` feeds ``nnet3-chain-train`` (copy-egs with a frame
  shift, shuffle-egs with a bounded buffer, merge-egs), never held in memory.

The batch (:class:`ChainBatch`), B = sequences, T = output frames per sequence,
T_in = input rows per sequence, F = feature dim::

    feats            [B][T_in][F]  float32, row 0 is t = -egs_left_context
    supervision      Supervision (B sequences of T frames, merged as nnet3-chain-merge-egs)
    deriv_weights    [T*B] (t-major, Kaldi's order) or None
    frame_shift      d
    index            global minibatch index in the epoch
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "MinibatchSizeRule",
    "ChainBatch",
    "ChainMinibatchSampler",
    "EgsDataset",
    "EgsSource",
    "PlannedEgs",
    "effective_frame_shift",
    "halve_minibatch_size",
    "example_layout",
    "load_egs",
    "collate_chain_egs",
    "dataset_structures",
    "make_loader",
]


class MinibatchSizeRule:
    """Kaldi's ``--minibatch-size`` rule string.

    Args:
      rule: e.g. ``"128"``, ``"64,128"``, ``"16:32,64"`` or ``"256=64/512=32"``.
    """

    def __init__(self, rule: str):
        self.rule = str(rule).strip()
        if not self.rule:
            raise ValueError("empty --minibatch-size rule")
        self._specs: List[Tuple[int, List[Tuple[int, int]]]] = []
        for part in self.rule.split("/"):
            if "=" in part:
                size_s, spec = part.split("=", 1)
                try:
                    eg_size = int(size_s)
                except ValueError:
                    raise ValueError("bad eg size %r in --minibatch-size=%r" % (size_s, self.rule))
            else:
                if len(self.rule.split("/")) > 1:
                    raise ValueError("--minibatch-size=%r: with '/' every part needs "
                                     "'eg_size=...'" % self.rule)
                eg_size, spec = 0, part
            ranges = []
            for item in spec.split(","):
                try:
                    if ":" in item:
                        lo, hi = (int(v) for v in item.split(":"))
                    else:
                        lo = hi = int(item)
                except ValueError:
                    raise ValueError("bad size %r in --minibatch-size=%r" % (item, self.rule))
                if lo < 1 or hi < lo:
                    raise ValueError("bad range %r in --minibatch-size=%r" % (item, self.rule))
                ranges.append((lo, hi))
            self._specs.append((eg_size, ranges))

    def _spec(self, eg_size: int) -> List[Tuple[int, int]]:
        return min(self._specs, key=lambda s: (abs(s[0] - eg_size), s[0]))[1]

    def largest(self, eg_size: int) -> int:
        """The minibatch size used while input remains."""
        return max(hi for _, hi in self._spec(eg_size))

    def size(self, eg_size: int, num_available: int, input_ended: bool) -> int:
        """Size of the next minibatch, or 0 to wait (or, at the end, to drop the rest).

        Args:
          eg_size: input rows of one eg.
          num_available: egs of that structure waiting.
          input_ended: no more egs will come.
        """
        spec = self._spec(eg_size)
        big = max(hi for _, hi in spec)
        if num_available >= big:
            return big
        if not input_ended:
            return 0
        best = 0
        for lo, hi in spec:
            if num_available >= lo:
                best = max(best, min(hi, num_available))
        return best

    def __repr__(self):
        return "MinibatchSizeRule(%r)" % self.rule


def halve_minibatch_size(rule: str) -> str:
    """train.py's minibatch rule for iteration 0 (``halve_minibatch_size_str``): every
    minibatch size halved (at least 1), eg sizes kept: ``"64,32"`` -> ``"32,16"``,
    ``"256=64:128/512=32"`` -> ``"256=32:64/512=16"``."""
    MinibatchSizeRule(rule)  # reject what Kaldi would reject

    def half(spec: str) -> str:
        return ",".join(":".join(str(max(1, int(x) // 2)) for x in r.split(":"))
                        for r in spec.split(","))

    parts = []
    for part in str(rule).strip().split("/"):
        if "=" in part:
            size, spec = part.split("=", 1)
            parts.append("%s=%s" % (size, half(spec)))
        else:
            parts.append(half(part))
    return "/".join(parts)


def effective_frame_shift(shift: int, frame_subsampling_factor: int) -> int:
    """Offset of features vs labels for nnet3-chain-copy-egs ``--frame-shift=shift``.

    The input indexes move by ``shift``, the output ones by ``shift`` rounded to the
    closest multiple of f; the features therefore move by ``d = that - shift``.
    """
    f = frame_subsampling_factor
    out = int(math.floor(shift / f + 0.5)) * f
    return out - shift


@dataclass
class ChainBatch:
    """One minibatch (see the module docstring for shapes)."""

    feats: torch.Tensor
    supervision: Any
    deriv_weights: Optional[torch.Tensor]
    egs_left_context: int
    frame_shift: int = 0
    index: int = -1
    keys: Tuple[str, ...] = ()
    #: ``[S][D_iv]``: the egs' ``ivector`` input (one row per sequence), or None
    ivector: Optional[torch.Tensor] = None

    @property
    def num_sequences(self) -> int:
        return int(self.supervision.num_sequences)

    @property
    def frames_per_sequence(self) -> int:
        return int(self.supervision.frames_per_sequence)

    @property
    def num_output_frames(self) -> int:
        return self.num_sequences * self.frames_per_sequence

    def to(self, device) -> "ChainBatch":
        dw = None if self.deriv_weights is None else self.deriv_weights.to(device)
        iv = None if self.ivector is None else self.ivector.to(device)
        return ChainBatch(self.feats.to(device), self.supervision, dw, self.egs_left_context,
                          self.frame_shift, self.index, self.keys, iv)


def _input_matrix(example, input_name: str):
    inputs = getattr(example, "inputs", None)
    if not isinstance(inputs, dict) or input_name not in inputs:
        raise ValueError("chain example has no input named %r (has %s)"
                         % (input_name, sorted(inputs) if isinstance(inputs, dict) else inputs))
    return inputs[input_name]


def _input_t_values(example, input_name: str) -> Optional[np.ndarray]:
    """t of every row of the input, if the example carries nnet3 indexes."""
    for attr in ("input_indexes", "indexes"):
        idx = getattr(example, attr, None)
        if isinstance(idx, dict) and input_name in idx:
            a = np.asarray(idx[input_name])
            return a[:, 1] if a.ndim == 2 else a
    ios = getattr(example, "input_ios", None) or getattr(example, "nnet_inputs", None)
    if isinstance(ios, (list, tuple)):
        for io in ios:
            if getattr(io, "name", None) == input_name and getattr(io, "indexes", None) is not None:
                a = np.asarray(io.indexes)
                return a[:, 1] if a.ndim == 2 else a
    return None


def example_layout(example, input_name: str = "input",
                   frame_subsampling_factor: int = 3,
                   egs_left_context: Optional[int] = None) -> Tuple[int, int]:
    """``(rows_per_sequence, egs_left_context)`` of a (possibly merged) chain example.

    The left context comes from the example's input indexes (``-min t``) when it has
    them, else from ``egs_left_context`` (a Kaldi egs dir's ``info/left_context``),
    else the chunk's extra rows are assumed to be split evenly (left gets the odd one).
    """
    sup = example.supervision
    s, t = int(sup.num_sequences), int(sup.frames_per_sequence)
    rows = int(_input_matrix(example, input_name).shape[0])
    if rows % s:
        raise ValueError("input %r has %d rows, not a multiple of the %d sequences"
                         % (input_name, rows, s))
    per_seq = rows // s
    tv = _input_t_values(example, input_name)
    if tv is not None and len(tv):
        left = int(-np.min(tv[:per_seq]))
    elif egs_left_context is not None:
        left = int(egs_left_context)
    else:
        extra = per_seq - ((t - 1) * frame_subsampling_factor + 1)
        if extra < 0:
            raise ValueError("input %r has %d rows per sequence, fewer than the %d frames "
                             "spanned by %d outputs" % (input_name, per_seq,
                                                       (t - 1) * frame_subsampling_factor + 1, t))
        left = (extra + 1) // 2
    return per_seq, left


def _structure(example, input_name: str) -> Tuple[int, int]:
    sup = example.supervision
    rows = int(_input_matrix(example, input_name).shape[0]) // int(sup.num_sequences)
    return rows, int(sup.frames_per_sequence)


class EgsDataset(torch.utils.data.Dataset):
    """Chain examples held in memory, from Kaldi archives or any list of examples.

    Every rank holds all egs (decoded to float32: about 27 kB per 170 x 40 chunk, so
    100k egs take about 2.7 GB); for bigger egs dirs, stream them
    (:class:`pkwrap.train.stream.StreamingEgs`, bounded memory) or make egs on the fly
    (``pkwrap.chain.egs.ChainEgsDataset``), which keeps only features and supervision.

    Args:
      examples: ``[(key, example)]``, example as ``pkwrap.kaldi.read_chain_egs`` yields it.
      input_name: the features input (Kaldi: ``"input"``).
    """

    def __init__(self, examples: Sequence[Tuple[str, Any]], input_name: str = "input"):
        self.keys = [k for k, _ in examples]
        self.examples = [e for _, e in examples]
        self.input_name = input_name
        if not self.examples:
            raise ValueError("no chain examples")
        self.structures = [_structure(e, input_name) for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.keys[i], self.examples[i]

    @classmethod
    def from_kaldi(cls, rspecifiers, input_name: str = "input") -> "EgsDataset":
        """Read every eg of ``rspecifiers`` (``ark:``/``scp:`` specs, or paths of .ark files,
        or a Kaldi egs dir whose ``cegs.*.ark`` are read) into memory."""
        from pkwrap.kaldi import read_chain_egs  # formats issue
        if isinstance(rspecifiers, (str, os.PathLike)):
            rspecifiers = [rspecifiers]
        specs = []
        for spec in rspecifiers:
            spec = str(spec)
            if os.path.isdir(spec):
                import glob
                arks = sorted(glob.glob(os.path.join(spec, "cegs.*.ark")),
                              key=lambda p: int(p.rsplit(".", 2)[-2]) if
                              p.rsplit(".", 2)[-2].isdigit() else 0)
                if not arks:
                    raise FileNotFoundError("egs dir %s has no cegs.*.ark" % spec)
                specs += ["ark:" + a for a in arks]
            elif ":" not in spec.split("/")[0]:
                specs.append("ark:" + spec)
            else:
                specs.append(spec)
        examples = []
        for spec in specs:
            examples.extend(read_chain_egs(spec))
        if not examples:
            raise ValueError("no chain examples in %s" % ", ".join(specs))
        return cls(examples, input_name=input_name)


def dataset_structures(dataset, input_name: str = "input",
                       frame_subsampling_factor: int = 3) -> List[Tuple[int, int]]:
    """``(input_rows_per_sequence, output_frames)`` of every item of a chain egs dataset.

    Taken from ``dataset.structures`` when it has them (:class:`EgsDataset`), from the
    chunk placement of an on-the-fly dataset whose ``items`` are ``(key, chunk)`` with
    ``chunk.num_frames``/``left_context``/``right_context`` (``pkwrap.chain.egs``
    ChainEgsDataset), else by fetching every item once (slow for big datasets).
    Items that are None (chunks without usable supervision) get the structure of their
    chunk, or (0, 0) when unknown; they are dropped when the minibatch is merged.
    """
    st = getattr(dataset, "structures", None)
    if st is not None:
        return list(st)
    items = getattr(dataset, "items", None)
    if isinstance(items, list) and items and isinstance(items[0], tuple) and \
            all(hasattr(items[0][1], a) for a in ("num_frames", "left_context", "right_context")):
        f = int(getattr(getattr(dataset, "config", None), "frame_subsampling_factor",
                        frame_subsampling_factor))
        return [(ch.left_context + ch.num_frames + ch.right_context, ch.num_frames // f)
                for _, ch in items]
    out = []
    for i in range(len(dataset)):
        it = dataset[i]
        out.append((0, 0) if it is None else _structure(it[1] if isinstance(it, tuple)
                                                        else it, input_name))
    return out


def check_egs_for_model(dataset, ctx, input_name: str = "input",
                        egs_left_context: Optional[int] = None, log=None,
                        what: str = "training") -> None:
    """Before training: every eg has the context the model needs (without frame shift:
    egs with no spare context are trained unshifted, see
    :func:`pkwrap.train.diagnostics.compute_chain_loss`); inputs of the egs that the model does not consume (e.g.
    ``ivector``) are reported once (``log.warning``), not ignored quietly.

    Works from what the dataset says without decoding features: an :class:`EgsDataset`'s
    examples, or the chunks of an on-the-fly dataset (``items`` of ``(key, chunk)``);
    other datasets are checked at their first minibatch.

    Raises:
      ValueError: naming the first eg (in dataset order, so the same on every rank) whose
        context is too small, and the --left-context/--right-context the egs need.
    """
    from .context import select_model_input
    f = int(ctx.frame_subsampling_factor)
    layouts = []  # (key, rows per sequence, left context, output frames)
    extra = set()
    if isinstance(dataset, EgsDataset):
        for key, eg in zip(dataset.keys, dataset.examples):
            per_seq, left = example_layout(eg, input_name, f, egs_left_context)
            layouts.append((key, per_seq, left, int(eg.supervision.frames_per_sequence)))
            extra.update(k for k in getattr(eg, "inputs", {}) if k != input_name and
                         not (k == "ivector" and getattr(ctx, "ivector_dim", 0) > 0))
    else:
        items = getattr(dataset, "items", None)
        if isinstance(items, list) and items and isinstance(items[0], tuple) and all(
                hasattr(items[0][1], a) for a in ("num_frames", "left_context", "right_context")):
            for key, ch in items:
                layouts.append((key, ch.left_context + ch.num_frames + ch.right_context,
                                ch.left_context, ch.num_frames // f))
    if extra and log is not None:
        log.warning("the %s egs have input(s) %s that the model does not consume (it reads "
                    "only %r); they are ignored", what, ", ".join(sorted(extra)), input_name)
    seen = set()
    for key, per_seq, left, t_out in layouts:
        if (per_seq, left, t_out) in seen:
            continue
        seen.add((per_seq, left, t_out))
        try:
            select_model_input(torch.empty(1, per_seq, 0), ctx, left, t_out, 0)
        except ValueError as e:
            raise ValueError("%s egs, eg %r: %s" % (what, key, e)) from None


def read_egs_left_context(egs_dir: str) -> Optional[int]:
    """``info/left_context`` of a Kaldi egs dir (None if absent)."""
    p = os.path.join(egs_dir, "info", "left_context")
    if os.path.isfile(p):
        from pkwrap.kaldi.io import read_number_file
        return read_number_file(p, int, minimum=0)
    return None


def load_egs(spec) -> EgsDataset:
    """:meth:`EgsDataset.from_kaldi` shorthand."""
    return EgsDataset.from_kaldi(spec)


class ChainMinibatchSampler(torch.utils.data.Sampler):
    """Resumable, rank-sharded minibatch sampler over chain egs (lhotse CutSampler shape).

    Yields, for this rank, lists ``[(eg_index, minibatch_index, frame_shift), ...]`` (one
    list per minibatch) for ``DataLoader(batch_sampler=...)`` with
    :func:`collate_chain_egs`.

    Args:
      structures: per eg ``(input_rows_per_sequence, output_frames)`` (EgsDataset.structures).
      minibatch_size: Kaldi rule string or :class:`MinibatchSizeRule`.
      frame_subsampling_factor: f, for the frame-shift rotation (1 turns it off).
      shuffle: draw a new permutation per epoch (else archive order).
      seed: base seed of the permutations.
      rank, world_size: default from torch.distributed, else RANK/WORLD_SIZE, else 0/1.
      frame_shift: rotate frame shifts as Kaldi's train.py does.
    """

    def __init__(self, structures: Sequence[Tuple[int, int]], minibatch_size="128",
                 frame_subsampling_factor: int = 3, shuffle: bool = True, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 frame_shift: bool = True):
        from . import dist as _d
        self.structures = [tuple(int(v) for v in s) for s in structures]
        self.rule = minibatch_size if isinstance(minibatch_size, MinibatchSizeRule) \
            else MinibatchSizeRule(minibatch_size)
        self.fsf = int(frame_subsampling_factor)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = _d.get_rank() if rank is None else int(rank)
        self.world_size = _d.get_world_size() if world_size is None else int(world_size)
        if not (0 <= self.rank < self.world_size):
            raise ValueError("rank %d not in world of size %d" % (self.rank, self.world_size))
        self.frame_shift = frame_shift
        self.epoch = 0
        self.position = 0  # global minibatches consumed in this epoch
        self._plan_cache: Dict[int, List[List[int]]] = {}

    def set_structures(self, structures: Sequence[Tuple[int, int]]) -> None:
        """New eg structures (egs made on the fly and redrawn for a new epoch)."""
        self.structures = [tuple(int(v) for v in s) for s in structures]
        self._plan_cache = {}

    # --- plan -----------------------------------------------------------------------
    def plan(self, epoch: int) -> List[List[int]]:
        """All minibatches (lists of eg indices) of ``epoch``, the same on every rank."""
        if epoch in self._plan_cache:
            return self._plan_cache[epoch]
        n = len(self.structures)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n).tolist()
        else:
            order = list(range(n))
        buckets: Dict[Tuple[int, int], List[int]] = {}
        out: List[List[int]] = []
        for i in order:
            key = self.structures[i]
            b = buckets.setdefault(key, [])
            b.append(i)
            m = self.rule.size(key[0], len(b), False)
            if m:
                out.append(b[:m])
                del b[:m]
        for key in sorted(buckets):
            b = buckets[key]
            while b:
                m = self.rule.size(key[0], len(b), True)
                if m == 0:
                    break
                out.append(b[:m])
                del b[:m]
        self._plan_cache = {epoch: out}
        return out

    def steps_per_epoch(self, epoch: Optional[int] = None) -> int:
        """Steps every rank takes in a whole epoch (``len(plan) // world_size``)."""
        return len(self.plan(self.epoch if epoch is None else epoch)) // self.world_size

    def frame_shift_of(self, epoch: int, index: int) -> int:
        if not self.frame_shift or self.fsf <= 1:
            return 0
        return effective_frame_shift((index + epoch) % self.fsf, self.fsf)

    # --- iteration --------------------------------------------------------------------
    def __iter__(self) -> Iterator[List[Tuple[int, int, int]]]:
        plan = self.plan(self.epoch)
        p0, n = self.position, len(self)  # step_done() moves position while we iterate
        for k in range(n):
            g = p0 + self.rank + k * self.world_size
            shift = self.frame_shift_of(self.epoch, g)
            yield [(i, g, shift) for i in plan[g]]

    def __len__(self) -> int:
        """Steps left in this epoch (the same on every rank)."""
        return max(0, len(self.plan(self.epoch)) - self.position) // self.world_size

    def step_done(self) -> None:
        """Record that one step (one minibatch on each rank) finished."""
        self.position += self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first minibatch."""
        self.epoch = int(epoch)
        self.position = 0

    def state_dict(self) -> Dict[str, int]:
        """Data position: global, independent of the number of workers."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "world_size": self.world_size}

    def load_state_dict(self, sd: Dict[str, int]) -> None:
        if int(sd.get("seed", self.seed)) != self.seed:
            raise ValueError("sampler state has seed %s, this sampler %d"
                             % (sd.get("seed"), self.seed))
        self.epoch = int(sd["epoch"])
        self.position = int(sd["position"])


def collate_chain_egs(items, input_name: str = "input", frame_subsampling_factor: int = 3,
                      egs_left_context: Optional[int] = None) -> ChainBatch:
    """Merge ``[(key, example, index, shift)]`` into a :class:`ChainBatch`.

    Examples are merged with ``pkwrap.kaldi.merge_chain_egs`` (nnet3-chain-merge-egs).
    """
    from pkwrap.kaldi import merge_chain_egs  # formats issue
    index, shift = items[0][2], items[0][3]
    good = [it for it in items if it[1] is not None]
    if len(good) < len(items):
        import logging
        logging.getLogger("pkwrap.train").warning(
            "minibatch %d: dropped %d of %d egs without usable supervision",
            index, len(items) - len(good), len(items))
    if not good:
        raise ValueError("minibatch %d has no usable chain example" % index)
    keys = tuple(it[0] for it in good)
    egs = [it[1] for it in good]
    merged = egs[0] if len(egs) == 1 else merge_chain_egs(egs)
    per_seq, left = example_layout(merged, input_name, frame_subsampling_factor,
                                   egs_left_context)
    x = _input_matrix(merged, input_name)
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x,
                        dtype=torch.float32)
    s = int(merged.supervision.num_sequences)
    feats = x.reshape(s, per_seq, x.shape[-1])
    dw = getattr(merged, "deriv_weights", None)
    if dw is not None and not isinstance(dw, torch.Tensor):
        dw = torch.as_tensor(np.asarray(dw), dtype=torch.float32)
    if isinstance(dw, torch.Tensor) and dw.numel() == 0:
        dw = None
    return ChainBatch(feats, merged.supervision, dw, left, shift, index, keys,
                      _ivector_rows(merged, s))


def _ivector_rows(merged, num_sequences: int) -> Optional[torch.Tensor]:
    """The merged example's ``ivector`` input as ``[S][D_iv]`` (Kaldi's chain egs carry
    one i-vector row per sequence, at t = 0), or None when it has none."""
    inputs = getattr(merged, "inputs", None)
    if not isinstance(inputs, dict) or "ivector" not in inputs:
        return None
    iv = inputs["ivector"]
    iv = torch.as_tensor(np.asarray(iv) if not isinstance(iv, torch.Tensor) else iv,
                         dtype=torch.float32)
    if iv.dim() != 2 or iv.shape[0] % num_sequences != 0:
        raise ValueError("chain example's ivector input has shape %s, expected one row per "
                         "sequence (%d sequences)" % (tuple(iv.shape), num_sequences))
    # several rows per sequence (i-vectors at several t): the model reads t = 0, the first
    return iv.reshape(num_sequences, -1, iv.shape[-1])[:, 0]


class _IndexedEgs(torch.utils.data.Dataset):
    """Adapter: the sampler's ``(eg_index, minibatch_index, shift)`` to dataset items."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        i, g, shift = item
        it = self.dataset[i]
        if it is None:  # on-the-fly chunk whose numerator came out empty
            return None, None, g, shift
        key, eg = it if isinstance(it, tuple) else ("", it)
        return key, eg, g, shift


def make_loader(dataset, sampler: ChainMinibatchSampler, input_name: str = "input",
                egs_left_context: Optional[int] = None, num_workers: int = 0):
    """``DataLoader`` giving this rank's :class:`ChainBatch` es in sampler order."""
    import functools
    collate = functools.partial(collate_chain_egs, input_name=input_name,
                                frame_subsampling_factor=sampler.fsf,
                                egs_left_context=egs_left_context)
    # a private generator: creating the iterator must not draw from the global torch RNG,
    # or a job resumed mid-epoch would see another random stream (dropout, spec-augment)
    gen = torch.Generator().manual_seed(sampler.seed * 7919 + sampler.epoch)
    return torch.utils.data.DataLoader(_IndexedEgs(dataset), batch_sampler=sampler,
                                       collate_fn=collate, num_workers=num_workers,
                                       generator=gen)


class EgsSource:
    """This rank's training minibatches, in order, with a resumable position.

    The Trainer drives it as::

        source.bind(rank, world_size, device)     # once
        source.set_epoch(0)                       # or load_state_dict(saved)
        for batch in source.batches():            # the rest of the current epoch
            ... one training step ...
            source.step_done()                    # then a checkpoint may save state_dict()
        if source.epoch_finished(): source.set_epoch(epoch + 1)

    Every rank yields the same number of minibatches per epoch (DDP steps in lockstep).
    ``state_dict()`` taken after ``step_done()`` describes exactly the minibatches
    consumed: a source restored from it yields the minibatches that would have come next.
    """

    frame_subsampling_factor: int = 3
    epoch: int = 0

    def bind(self, rank: int, world_size: int, device=None) -> None:
        """The worker this source feeds (called by the Trainer before anything else)."""
        raise NotImplementedError

    def feat_dim(self, input_name: str = "input") -> int:
        """Columns of the features input."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at its first minibatch."""
        raise NotImplementedError

    def batches(self) -> Iterator[ChainBatch]:
        """This rank's minibatches from the current position to the end of the epoch."""
        raise NotImplementedError

    def step_done(self) -> None:
        """The last minibatch yielded was trained on (on every rank)."""
        raise NotImplementedError

    def epoch_finished(self) -> bool:
        """No minibatch of the current epoch is left."""
        raise NotImplementedError

    def steps_left(self) -> Optional[int]:
        """Steps left in the current epoch (None: not known before reading)."""
        return None

    def steps_per_epoch(self, epoch: int) -> Optional[int]:
        """Steps of a whole epoch (None: not known before reading)."""
        return None

    def describe_position(self) -> str:
        """The position in words, for logs."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, sd: Dict[str, Any]) -> Optional[str]:
        """Restore a position; returns a note for the log when the position had to be
        moved (another number of workers), else None."""
        raise NotImplementedError


class PlannedEgs(EgsSource):
    """A map-style egs dataset with :class:`ChainMinibatchSampler`'s per-epoch plan.

    Args:
      dataset: :class:`EgsDataset` or a dataset of ``(key, chain_example)`` made on the
        fly (its ``set_epoch`` is called at every epoch and the plan follows the new
        chunks; see :func:`dataset_structures`).
      minibatch_size: Kaldi rule string.
      frame_subsampling_factor: f.
      shuffle, seed, frame_shift: as :class:`ChainMinibatchSampler`.
      input_name: the features input.
      egs_left_context: frames before t=0 (only for egs without indexes).
      num_workers: DataLoader workers.
    """

    def __init__(self, dataset, minibatch_size="128", frame_subsampling_factor: int = 3,
                 shuffle: bool = True, seed: int = 0, frame_shift: bool = True,
                 input_name: str = "input", egs_left_context: Optional[int] = None,
                 num_workers: int = 0):
        self.dataset = dataset
        self.minibatch_size = minibatch_size
        self.frame_subsampling_factor = int(frame_subsampling_factor)
        self.shuffle, self.seed, self.frame_shift = shuffle, int(seed), frame_shift
        self.input_name = input_name
        self.egs_left_context = egs_left_context
        self.num_workers = num_workers
        self.sampler: Optional[ChainMinibatchSampler] = None

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def bind(self, rank: int, world_size: int, device=None) -> None:
        self.sampler = ChainMinibatchSampler(
            dataset_structures(self.dataset, self.input_name, self.frame_subsampling_factor),
            self.minibatch_size, self.frame_subsampling_factor, shuffle=self.shuffle,
            seed=self.seed, rank=rank, world_size=world_size, frame_shift=self.frame_shift)
        if self.sampler.steps_per_epoch(0) == 0:
            raise ValueError("%d egs make %d minibatches of size %r: fewer than the %d "
                             "workers" % (len(self.dataset), len(self.sampler.plan(0)),
                                          self.minibatch_size, world_size))

    def feat_dim(self, input_name: str = "input") -> int:
        _, eg0 = next(it for it in (self.dataset[i] for i in range(len(self.dataset)))
                      if it is not None)
        return int(eg0.inputs[input_name].shape[-1])

    def _prepare(self) -> None:
        """Egs made on the fly may be redrawn per epoch: the plan follows."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.sampler.epoch)
            self.sampler.set_structures(dataset_structures(
                self.dataset, self.input_name, self.frame_subsampling_factor))

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self._prepare()

    def batches(self) -> Iterator[ChainBatch]:
        return iter(make_loader(self.dataset, self.sampler, self.input_name,
                                self.egs_left_context, self.num_workers))

    def step_done(self) -> None:
        self.sampler.step_done()

    def epoch_finished(self) -> bool:
        return len(self.sampler) == 0

    def steps_left(self) -> Optional[int]:
        return len(self.sampler)

    def steps_per_epoch(self, epoch: int) -> Optional[int]:
        return self.sampler.steps_per_epoch(epoch)

    def describe_position(self) -> str:
        return "minibatch %d of epoch %d" % (self.sampler.position, self.sampler.epoch)

    def state_dict(self) -> Dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, sd: Dict[str, Any]) -> Optional[str]:
        old = int(sd.get("world_size", self.sampler.world_size))
        self.sampler.load_state_dict(sd)
        self._prepare()
        if old != self.sampler.world_size:
            return ("data position is global: minibatch %d of epoch %d"
                    % (self.sampler.position, self.sampler.epoch))
        return None
