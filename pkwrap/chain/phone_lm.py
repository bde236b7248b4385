"""Unsmoothed phone n-gram LM with "hard" backoff, as Kaldi's ``chain-est-phone-lm``.

Counts. Every phone sequence ``a_1 .. a_K`` (phones > 0) is read with a left context of
0 (BOS): for k = 1..K+1 the count ``c(h_k, a_k)`` is incremented, where ``a_{K+1} = 0``
stands for end-of-sentence and ``h_k`` is the last ``min(k, n-1)`` symbols of
``0 a_1 .. a_{k-1}`` (n = ``ngram_order``). A history ``h`` is an *LM state*; each state
with ``|h| >= m`` (m = ``no_prune_ngram_order``) has the backoff state ``h[1:]``.

Pruning. States with ``|h| = m - 1`` are never pruned ("basic" states); the target is
``#basic + num_extra_lm_states`` states with non-zero count. Backing off a state moves
all its counts into its backoff state, at the log-likelihood change

    delta(h) = L(c_h + c_b) - L(c_h) - L(c_b),      L(c) = sum_a c(a) log(c(a) / sum c)

(``-1e-15 * count(h)`` if the backoff state has no count yet). A state may be backed off
only if ``|h| >= m``, no state it is the backoff of still has counts (its count equals
its count including descendants), and, unless ``|h| = n - 1``, no history ``h a`` it
leads to holds counts. States are backed off greedily, largest (least negative)
``delta`` first (ties: the higher state index), in four stages towards the target with
the queue rebuilt between stages; a stale queue entry (``delta`` changed by more than
Kaldi's ``ApproxEqual`` tolerance) is re-queued instead. Likelihood changes are float32,
as in Kaldi, so the pruning order is the same.

FST. Each LM state with a non-zero count becomes an FST state, numbered in the order the
histories were first seen. ``c(h, a) / c(h)`` becomes an arc ``a:a`` (weight -log) to
the longest non-empty-count suffix state of ``h a``; ``a = 0`` becomes the final weight.
The start state is that of history ``[0]``. The result is an epsilon-free deterministic
acceptor with arcs sorted by label: the same states, arcs and weights as Kaldi's.
"""
from __future__ import annotations

import heapq
from collections import Counter
import math
import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from pkwrap.kaldi.fst import Fst

__all__ = ["PhoneLmOptions", "estimate_phone_lm", "read_int_vector_archive",
           "PhoneLmEstimator", "fst_from_arrays"]


@dataclass
class PhoneLmOptions:
    """Kaldi's ``LanguageModelOptions`` (flags of ``chain-est-phone-lm``).

    Args:
      ngram_order: n of the n-gram (``--ngram-order``, Kaldi default 4; at least 2).
      no_prune_ngram_order: histories shorter than this minus one are never pruned
        (``--no-prune-ngram-order``, default 3; usually the tree's context width).
      num_extra_lm_states: LM states kept on top of the unpruned ones
        (``--num-extra-lm-states``, default 1000).
    """

    ngram_order: int = 4
    no_prune_ngram_order: int = 3
    num_extra_lm_states: int = 1000

    def __post_init__(self):
        if self.ngram_order < 2:
            raise ValueError("--ngram-order must be >= 2, got %d" % self.ngram_order)
        if not 1 <= self.no_prune_ngram_order <= self.ngram_order:
            raise ValueError("--no-prune-ngram-order must be in [1, ngram-order=%d], got %d"
                             % (self.ngram_order, self.no_prune_ngram_order))
        if self.num_extra_lm_states < 0:
            raise ValueError("--num-extra-lm-states must be >= 0")


class _LmState:
    __slots__ = ("history", "counts", "tot", "tot_with_parents", "backoff", "fst_state",
                 "backoff_allowed", "_ll")

    def __init__(self, history: Tuple[int, ...]):
        self.history = history
        self.counts: Dict[int, int] = {}
        self.tot = 0
        self.tot_with_parents = 0
        self.backoff = -1
        self.fst_state = -1
        self.backoff_allowed = False
        self._ll = None  # cached LogLike(), None when stale

    def add(self, phone: int, count: int):
        self.counts[phone] = self.counts.get(phone, 0) + count
        self.tot += count
        self._ll = None

    def loglike(self) -> float:
        if self._ll is None:
            self._ll = _loglike(self.counts, self.tot)
        return self._ll


def _loglike(counts: Dict[int, int], tot: int) -> float:
    """Kaldi's ``LmState::LogLike``: double accumulation, returned as float32."""
    ans = 0.0
    for phone in sorted(counts):  # std::map order
        c = counts[phone]
        ans += math.log(c * 1.0 / tot) * c
    return float(np.float32(ans))


_LM_PROPERTIES = (0x1 | 0x2 | 0x10000 | 0x800000 | 0x2000000 | 0x8000000 | 0x10000000
                  | 0x40000000 | 0x10000000000 | 0x40000000000)


def fst_from_arrays(num_states: int, start: int, final: np.ndarray, src: np.ndarray,
                    ilabel: np.ndarray, olabel: np.ndarray, weight: np.ndarray,
                    nextstate: np.ndarray) -> Fst:
    """Build an :class:`Fst` from flat arc arrays ``[A]`` (the order within a source
    state is kept) and final weights ``[S]`` (inf = not final)."""
    src = np.asarray(src, dtype=np.int64)
    order = np.argsort(src, kind="stable")
    counts = np.bincount(src, minlength=num_states)
    offsets = np.zeros(num_states + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Fst(num_states=int(num_states), start=int(start),
               final=np.asarray(final, dtype=np.float32).copy(), state_offsets=offsets,
               ilabel=np.asarray(ilabel, dtype=np.int32)[order],
               olabel=np.asarray(olabel, dtype=np.int32)[order],
               weight=np.asarray(weight, dtype=np.float32)[order],
               nextstate=np.asarray(nextstate, dtype=np.int32)[order])


def _f32(x: float) -> float:
    return float(np.float32(x))


def _approx_equal(a: float, b: float, tol: float = 0.001) -> bool:
    if a == b:
        return True
    diff = _f32(abs(_f32(a - b)))
    if math.isinf(diff) or diff != diff:
        return False
    return diff <= _f32(_f32(tol) * _f32(abs(a) + abs(b)))


class PhoneLmEstimator:
    """Kaldi's ``LanguageModelEstimator``: ``add_counts`` per sequence, then ``estimate``.

    Args:
      opts: the :class:`PhoneLmOptions`.
    """

    def __init__(self, opts: PhoneLmOptions):
        self.opts = opts
        self.states: List[_LmState] = []
        self.index: Dict[Tuple[int, ...], int] = {}
        self.num_active = 0
        self.num_basic = 0
        self.num_sentences = 0
        self._pending: Counter = Counter()  # (history, next phone) -> count, not yet added

    def _find_or_create(self, hist: Tuple[int, ...]) -> int:
        i = self.index.get(hist)
        if i is not None:
            return i
        i = len(self.states)
        self.states.append(_LmState(hist))
        self.index[hist] = i
        if len(hist) >= self.opts.no_prune_ngram_order:
            self.states[i].backoff = self._find_or_create(hist[1:])
        return i

    def add_counts(self, sentence: Sequence[int]) -> None:
        """Count one phone sequence (phones must be > 0)."""
        padded = [0]
        for p in sentence:
            p = int(p)
            if p <= 0:
                raise ValueError("phone sequence contains %d; phones must be positive ids" % p)
            padded.append(p)
        m = self.opts.ngram_order - 1
        # history before predicting padded[k+1] (or end-of-sentence 0 after the last)
        hists = [tuple(padded[max(0, k - m + 1):k + 1]) for k in range(len(padded))]
        # A Counter keeps keys in first-seen order, so flushing it creates the LM states
        # in the order Kaldi creates them (that order is the FST's state numbering).
        self._pending.update(zip(hists, padded[1:] + [0]))
        self.num_sentences += 1

    def _flush(self):
        for (hist, phone), c in self._pending.items():
            st = self.states[self._find_or_create(hist)]
            if st.tot == 0:
                self.num_active += 1
            st.add(phone, c)
        self._pending.clear()

    # -- pruning --
    def _set_parent_counts(self):
        for st in self.states:
            c = st.tot
            l = self.index[st.history]
            while l != -1:
                self.states[l].tot_with_parents += c
                l = self.states[l].backoff

    def _count_basic(self) -> int:
        m = self.opts.no_prune_ngram_order
        return sum(1 for st in self.states if len(st.history) == m - 1)

    def _backoff_allowed(self, l: int) -> bool:
        st = self.states[l]
        if len(st.history) < self.opts.no_prune_ngram_order:
            return False
        if st.tot != st.tot_with_parents or st.tot == 0:
            return False
        if len(st.history) == self.opts.ngram_order - 1:
            return True
        for phone in st.counts:
            if phone != 0:
                nxt = self.index.get(st.history + (phone,))
                if nxt is not None and self.states[nxt].tot_with_parents != 0:
                    return False
        return True

    def _like_change(self, l: int) -> float:
        st = self.states[l]
        b = self.states[st.backoff]
        if b.tot == 0:
            return _f32(-1.0e-15 * st.tot)
        merged = dict(b.counts)
        for k, v in st.counts.items():
            merged[k] = merged.get(k, 0) + v
        change = _f32(_f32(_loglike(merged, b.tot + st.tot) - st.loglike()) - b.loglike())
        return min(change, 0.0)

    def _back_off_state(self, l: int, queue: list):
        st = self.states[l]
        b = self.states[st.backoff]
        had_allowed = b.backoff_allowed
        if b.tot != 0:
            self.num_active -= 1
        for k, v in st.counts.items():
            b.add(k, v)
        st.counts = {}
        st._ll = None
        st.tot = 0
        st.tot_with_parents = 0
        st.backoff_allowed = False
        b.backoff_allowed = self._backoff_allowed(st.backoff)
        if not had_allowed and b.backoff_allowed:
            heapq.heappush(queue, (-self._like_change(st.backoff), -st.backoff))

    def _do_backoff(self):
        initial = self.num_active
        target = self.num_basic + self.opts.num_extra_lm_states
        num_targets = 4
        # C++ integer division truncates toward zero.
        targets = [initial + int((target - initial) * (t + 1) / num_targets)
                   for t in range(num_targets)]
        for this_target in targets:
            queue: list = []
            for l, st in enumerate(self.states):
                st.backoff_allowed = self._backoff_allowed(l)
                if st.backoff_allowed:
                    queue.append((-self._like_change(l), -l))
            heapq.heapify(queue)
            while self.num_active > this_target and queue:
                neg_change, neg_l = heapq.heappop(queue)
                l = -neg_l
                recomputed = self._like_change(l)
                if not _approx_equal(-neg_change, recomputed):
                    heapq.heappush(queue, (-recomputed, neg_l))
                else:
                    self._back_off_state(l, queue)

    def _find_nonzero(self, hist: Tuple[int, ...]) -> int:
        while True:
            l = self.index.get(hist)
            if l is not None and self.states[l].tot != 0:
                return l
            if not hist:
                raise RuntimeError("no LM state with counts for a history (empty input?)")
            hist = hist[1:]

    def estimate(self) -> Fst:
        """Prune and return the LM as an :class:`~pkwrap.kaldi.fst.Fst` acceptor."""
        if self.num_sentences == 0:
            raise ValueError("no phone sequences were given to the phone LM estimator")
        self._flush()
        self._set_parent_counts()
        self.num_basic = self._count_basic()
        self._do_backoff()
        n = 0
        for st in self.states:
            if st.tot != 0:
                st.fst_state = n
                n += 1
        assert n == self.num_active
        start = self.states[self._find_nonzero((0,))].fst_state
        final = np.full(n, np.inf, dtype=np.float32)
        src, lab, wt, dst = [], [], [], []
        for st in self.states:
            if st.fst_state < 0:
                continue
            for phone in sorted(st.counts):
                logprob = math.log(st.counts[phone] * 1.0 / st.tot)
                if phone == 0:
                    final[st.fst_state] = np.float32(-logprob)
                else:
                    d = self.states[self._find_nonzero(st.history + (phone,))].fst_state
                    src.append(st.fst_state)
                    lab.append(phone)
                    wt.append(-logprob)
                    dst.append(d)
        lab_a = np.array(lab, dtype=np.int32)
        fst = fst_from_arrays(n, start, final, np.array(src, dtype=np.int64), lab_a, lab_a,
                              np.array(wt, dtype=np.float32), np.array(dst, dtype=np.int32))
        # The OpenFst property bits Kaldi's file carries (all true by construction):
        # expanded, mutable, acceptor, no (i/o) epsilons, i/o label sorted, accessible,
        # coaccessible. With them the file is byte-identical to Kaldi's.
        fst.properties = _LM_PROPERTIES
        return fst


def estimate_phone_lm(phone_seqs: Iterable[Sequence[int]], ngram_order: int = 4,
                      no_prune_ngram_order: int = 3, num_extra_lm_states: int = 1000,
                      phones: Optional[Iterable[int]] = None) -> Fst:
    """Estimate the chain phone LM exactly as ``chain-est-phone-lm`` does.

    Args:
      phone_seqs: phone-id sequences (e.g. ``ali-to-phones`` output); a dict key -> seq
        or an iterable of sequences or of (key, seq) pairs.
      ngram_order, no_prune_ngram_order, num_extra_lm_states: see :class:`PhoneLmOptions`.
      phones: optional set of valid phone ids (e.g. the transition model's phones); a
        sequence with any other id is an error naming its key (Kaldi does not check).
    Returns:
      the LM as an epsilon-free deterministic acceptor (tropical weights = -log prob).
    """
    est = PhoneLmEstimator(PhoneLmOptions(ngram_order, no_prune_ngram_order,
                                          num_extra_lm_states))
    items = phone_seqs.items() if isinstance(phone_seqs, dict) else phone_seqs
    valid = None if phones is None else set(int(p) for p in phones)
    for i, item in enumerate(items):
        key = str(i)
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            key, item = item
        if valid is not None:
            bad = sorted(set(int(p) for p in item) - valid)
            if bad:
                raise ValueError("phone sequence %s: unknown phone id(s) %s" % (key, bad))
        try:
            est.add_counts(item)
        except ValueError as e:
            raise ValueError("phone sequence %s: %s" % (key, e)) from None
    return est.estimate()


def read_int_vector_archive(spec: Union[str, os.PathLike]) -> Iterator[Tuple[str, List[int]]]:
    """Read a Kaldi int32-vector archive (text ``key 1 2 3`` lines or binary).

    Args:
      spec: a path, optionally prefixed ``ark:`` / ``ark,t:`` (``-`` reads stdin).
    Yields:
      (key, list of ints), in file order.
    """
    from ..kaldi.table import parse_rspecifier
    rs = parse_rspecifier(os.fspath(spec))
    path = rs.path
    if rs.kind == "scp":
        raise ValueError("%s: scp: rspecifiers are not supported for phone sequences; "
                         "use an archive (ark:)" % spec)
    if path == "-":
        import sys
        data = sys.stdin.buffer.read()
        path = "<stdin>"
    else:
        with open(path, "rb") as f:
            data = f.read()
    pos, n = 0, len(data)
    lineno = 0
    while pos < n:
        # key
        while pos < n and data[pos] in b" \t\r\n":
            if data[pos] == 10:
                lineno += 1
            pos += 1
        if pos >= n:
            break
        end = pos
        while end < n and data[end] not in b" \t\r\n":
            end += 1
        key = data[pos:end].decode("utf-8", "replace")
        pos = end + 1 if end < n and data[end] == 32 else end
        if data[pos:pos + 2] == b"\0B":
            pos += 2
            if pos + 5 > n or data[pos] != 4:
                raise ValueError("%s: entry %r: bad binary int32 vector" % (path, key))
            size = struct.unpack_from("<i", data, pos + 1)[0]
            pos += 5
            if size < 0 or pos + 4 * size > n:
                raise ValueError("%s: entry %r: truncated binary int32 vector" % (path, key))
            vals = list(struct.unpack_from("<%di" % size, data, pos))
            pos += 4 * size
            yield key, vals
        else:
            end = data.find(b"\n", pos)
            if end < 0:
                end = n
            line = data[pos:end].decode("utf-8", "replace")
            lineno += 1
            try:
                vals = [int(x) for x in line.split()]
                if any(not -2 ** 31 <= v < 2 ** 31 for v in vals):
                    raise ValueError
            except ValueError:
                raise ValueError("%s:%d: entry %r: expected int32 integers, got %r"
                                 % (path, lineno, key, line[:80])) from None
            yield key, vals
            pos = end + 1
