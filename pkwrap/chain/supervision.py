"""Numerator supervision for chain training, as Kaldi's ``chain-get-supervision`` makes it.

For an utterance with a phone alignment ``(p_1, d_1) ... (p_N, d_N)`` (phones and their
lengths in input frames, ``T = sum d_i``) and frame-subsampling factor f, the output has
``T' = ceil(T / f)`` frames. Phone i starts at input frame ``b_i = d_1 + ... + d_{i-1}``;
with tolerances l, r it may appear on the output frames

    ceil(max(0, b_i - l) / f)  <=  t  <  ceil(min(T, b_i + d_i + r) / f)

(Kaldi's ``AlignmentToProtoSupervision``: ``allowed_phones[t]`` is the sorted set of
phones allowed on output frame t). The supervision FST is the set of HMM state
sequences of the phone sequence, restricted to those times:

    S = Proj_out( (H o C o P)^selfloops  o  TimeEnforcer )

* P is the linear acceptor of p_1..p_N, C maps it to context-dependent phones
  (windows ``(p_{i-P} .. p_{i+N-1-P})``, 0 outside the utterance), H expands each into
  its HMM (transition-ids, no self-loops) and self-loops are added "reordered": the
  self-loop of an HMM state follows the transition that *leaves* it, so a phone of
  the chain topology lasting k frames reads ``forward, loop x (k-1)``.
* The TimeEnforcer has states 0..T' and an arc t -> t+1 for every transition-id whose
  phone is in ``allowed_phones[t]``; its output labels are pdf-id + 1.
* The result is trimmed (``Connect``) and its states renumbered in breadth-first order
  from the start (``SortBreadthFirstSearch``), so state numbers increase with time. All
  weights are 0 (``--transition-scale=0``); the weights come later from the
  normalization FST.

This module reproduces those FSTs state for state and arc for arc (tested against
``chain-get-supervision`` output of the fixtures). Splitting into chunks
(``SupervisionSplitter``) and the normalization of a chunk (``AddWeightToSupervisionFst``:
``RmEpsilon``, determinize, minimize, compose with normalization.fst, determinize,
minimize, breadth-first sort; tropical semiring, OpenFst's algorithms through kaldifst)
are also here, as is the conversion of a ``compile-train-graphs`` graph into
end-to-end supervision (``TrainingGraphToSupervisionE2e`` + ``AddWeightToSupervisionFstE2e``).

Problems of single utterances (unknown phone, empty alignment or transcript, too many
phones for the frames, an empty numerator after normalization) raise
:class:`SupervisionError` naming the utterance and a reason code; batch helpers collect
them in an :class:`ErrorReport` (counts per reason, every key listed) instead of
dropping utterances silently.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..kaldi.chain_egs import Supervision
from ..kaldi.fst import Fst, read_fst, write_fst
from ..kaldi.io import KaldiFormatError, KaldiReader, KaldiWriter

__all__ = [
    "SupervisionOptions", "ProtoSupervision", "SupervisionError", "ErrorReport",
    "phone_lattice_to_proto_supervision", "lattice_to_supervision",
    "alignment_to_proto_supervision", "proto_supervision_to_supervision",
    "alignment_to_supervision", "get_supervisions", "sort_breadth_first",
    "fst_state_times", "SupervisionSplitter", "add_weight_to_supervision",
    "training_graph_to_supervision_e2e", "min_path_length", "read_phones_with_lengths",
    "read_int_vectors", "read_supervisions", "write_supervisions", "SUPERVISION_HOLDER",
    "PHONE_LENGTHS_HOLDER", "INT_VECTOR_HOLDER",
]

logger = logging.getLogger(__name__)

# Kaldi's kSupervisionMaxStates: determinization of a supervision FST gives up past this.
SUPERVISION_MAX_STATES = 200000


# ======================================================================= errors
class SupervisionError(ValueError):
    """A problem with one utterance's supervision.

    Args:
      key: the utterance (or chunk) id.
      reason: a short code: ``unknown_phone``, ``empty_alignment``, ``empty_transcript``,
        ``too_short`` (too many phones for the frames), ``empty_numerator`` (no path
        left after composing with the normalization FST, e.g. an unseen phone n-gram),
        ``bad_length`` (features and supervision lengths disagree), ``bad_input``.
      message: what is wrong, for a human.
    """

    def __init__(self, key: str, reason: str, message: str):
        super().__init__("utterance %s: %s" % (key, message))
        self.key = key
        self.reason = reason
        self.message = message


class ErrorReport:
    """Per-utterance problems met by a batch job, counted by reason.

    ``report.add(err)`` records a :class:`SupervisionError` (and logs a warning);
    ``report.counts`` is ``{reason: count}``, ``report.errors`` the list of
    ``(key, reason, message)`` and :meth:`summary` a one-line account such as
    ``"2 of 10 utterances failed: too_short=1 (utt3), unknown_phone=1 (utt7)"``.
    """

    def __init__(self):
        self.errors: List[Tuple[str, str, str]] = []
        self.num_ok = 0

    def add(self, err: SupervisionError, log: bool = True) -> None:
        self.errors.append((err.key, err.reason, err.message))
        if log:
            logger.warning("%s", err)

    @property
    def counts(self) -> Dict[str, int]:
        c: Dict[str, int] = OrderedDict()
        for _, reason, _ in self.errors:
            c[reason] = c.get(reason, 0) + 1
        return c

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def keys(self, reason: Optional[str] = None) -> List[str]:
        return [k for k, r, _ in self.errors if reason is None or r == reason]

    def summary(self, what: str = "utterances", max_keys: int = 5) -> str:
        total = self.num_ok + self.num_errors
        if not self.errors:
            return "%d of %d %s done, no errors" % (self.num_ok, total, what)
        parts = []
        for reason, n in self.counts.items():
            ks = self.keys(reason)
            shown = ", ".join(ks[:max_keys]) + (", ..." if len(ks) > max_keys else "")
            parts.append("%s=%d (%s)" % (reason, n, shown))
        return "%d of %d %s failed: %s" % (self.num_errors, total, what, "; ".join(parts))

    def __repr__(self):
        return "ErrorReport(ok=%d, errors=%s)" % (self.num_ok, dict(self.counts))


# ======================================================================= options
@dataclass
class SupervisionOptions:
    """Kaldi's ``chain::SupervisionOptions`` (flags of ``chain-get-supervision``).

    Args:
      left_tolerance: ``--left-tolerance``: a phone may start this many input frames
        before its aligned start (default 5).
      right_tolerance: ``--right-tolerance``: ... and end this many after its end (5).
      frame_subsampling_factor: ``--frame-subsampling-factor``: output frame rate is
        the input rate divided by this (3 for chain models); applied after the
        tolerances. Requires ``left + right + 1 >= factor``.
      weight: ``--weight``. Kaldi registers it but its ``ProtoSupervisionToSupervision``
        always sets weight 1.0; pkwrap applies it (so the default 1.0 gives Kaldi's
        output). Use ``scale_supervision_weight`` on egs to mimic Kaldi exactly.
      convert_to_pdfs: ``--convert-to-pdfs``: labels pdf-id + 1 (True) or
        transition-ids (False, for "unconstrained" egs).
    """

    left_tolerance: int = 5
    right_tolerance: int = 5
    frame_subsampling_factor: int = 1
    weight: float = 1.0
    convert_to_pdfs: bool = True

    def check(self) -> None:
        if self.left_tolerance < 0 or self.right_tolerance < 0:
            raise ValueError("tolerances must be >= 0 (got --left-tolerance=%d "
                             "--right-tolerance=%d)" % (self.left_tolerance,
                                                         self.right_tolerance))
        if self.frame_subsampling_factor < 1:
            raise ValueError("--frame-subsampling-factor must be >= 1, got %d"
                             % self.frame_subsampling_factor)
        if self.left_tolerance + self.right_tolerance + 1 < self.frame_subsampling_factor:
            raise ValueError("left_tolerance + right_tolerance + 1 must be >= "
                             "frame_subsampling_factor (%d + %d + 1 < %d): some output "
                             "frames would allow no phone" % (
                                 self.left_tolerance, self.right_tolerance,
                                 self.frame_subsampling_factor))
        if not self.weight > 0:
            raise ValueError("--weight must be > 0, got %r" % self.weight)


@dataclass
class ProtoSupervision:
    """Kaldi's ``ProtoSupervision``: the phones and the frames each may appear on.

    Args:
      phones: the phone sequence ``[N]`` of an alignment (a linear acceptor).
      allowed_phones: ``[T']`` sorted lists: the phones allowed on each output frame.
      phone_fst: instead of ``phones``, a phone acceptor (from a phone-aligned
        lattice): ``(start, arcs, finals)`` with ``arcs[state] = [(phone, next), ...]``
        and ``finals`` the set of final states (unweighted: Kaldi's default
        ``--lm-scale=0`` gives every arc weight 0).
    """

    phones: List[int]
    allowed_phones: List[List[int]]
    phone_fst: Optional[Tuple[int, List[List[Tuple[int, int]]], set]] = None

    @property
    def num_frames(self) -> int:
        return len(self.allowed_phones)


def alignment_to_proto_supervision(phones: Sequence[int], durations: Sequence[int],
                                   opts: SupervisionOptions,
                                   key: str = "<utt>") -> ProtoSupervision:
    """Kaldi's ``AlignmentToProtoSupervision``: allowed phones per output frame.

    Args:
      phones: phone ids ``[N]`` (> 0).
      durations: their lengths in input frames ``[N]`` (> 0).
      opts: tolerances and frame subsampling.
      key: utterance id for error messages.
    Returns:
      the :class:`ProtoSupervision`.
    """
    opts.check()
    phones = [int(p) for p in phones]
    durations = [int(d) for d in durations]
    if len(phones) != len(durations):
        raise SupervisionError(key, "bad_input", "%d phones but %d durations"
                               % (len(phones), len(durations)))
    if not phones:
        raise SupervisionError(key, "empty_alignment", "the alignment is empty")
    for p, d in zip(phones, durations):
        if p <= 0 or d <= 0:
            raise SupervisionError(key, "bad_input", "phone %d with duration %d (both must "
                                   "be > 0)" % (p, d))
    f = opts.frame_subsampling_factor
    T = sum(durations)
    Ts = (T + f - 1) // f
    allowed: List[set] = [set() for _ in range(Ts)]
    cur = 0
    for p, d in zip(phones, durations):
        t0 = max(0, cur - opts.left_tolerance)
        t1 = min(T, cur + d + opts.right_tolerance)
        for t in range((t0 + f - 1) // f, (t1 + f - 1) // f):
            allowed[t].add(p)
        cur += d
    return ProtoSupervision(phones=phones, allowed_phones=[sorted(a) for a in allowed])


# ======================================================================= HMM tables
class _ModelTables:
    """Per-transition-id arrays of a TransitionModel (built once per model)."""

    def __init__(self, trans_model):
        n = trans_model.num_transition_ids
        self.num_tids = n
        self.pdf = np.asarray(trans_model.transition_id_to_pdf_array, dtype=np.int64)
        self.tstate = trans_model.transition_id_to_transition_state_array.astype(np.int64)
        self.self_loop = trans_model.is_self_loop_array
        state_phone = np.array([0] + [t[0] for t in trans_model.tuples], dtype=np.int64)
        self.phone = state_phone[self.tstate]  # entry 0: state 0, phone 0
        self.loop_of = np.zeros(trans_model.num_transition_states + 1, np.int64)
        self.loop_of[self.tstate[self.self_loop]] = np.nonzero(self.self_loop)[0]
        self.phones = set(int(p) for p in trans_model.phones)


_TABLES: Dict[int, Tuple[object, _ModelTables]] = {}


def _tables(trans_model) -> _ModelTables:
    ent = _TABLES.get(id(trans_model))
    if ent is None or ent[0] is not trans_model:
        ent = (trans_model, _ModelTables(trans_model))
        _TABLES[id(trans_model)] = ent
    return ent[1]


def _hmm_arcs(window: Sequence[int], ctx_dep, trans_model, key: str):
    """The phone's HMM without self-loops: (num_states, [(src, tid, dst)]) with
    topology state numbering (Kaldi's ``GetHmmAsFsaSimple``)."""
    phone = window[ctx_dep.central_position]
    entry = trans_model.topology.topology_for_phone(phone)
    arcs = []
    for j, st in enumerate(entry):
        if st.forward_pdf_class < 0:
            if any(dst != j for dst, _ in st.transitions):
                raise SupervisionError(key, "bad_input", "non-emitting HMM states with "
                                       "transitions are not supported (phone %d)" % phone)
            continue
        fpdf = ctx_dep.compute(list(window), st.forward_pdf_class)
        spdf = ctx_dep.compute(list(window), st.self_loop_pdf_class)
        if fpdf is None or spdf is None:
            raise SupervisionError(key, "bad_input", "the tree has no pdf for phone window "
                                   "%r: tree and transition model do not match"
                                   % (list(window),))
        try:
            ts = trans_model.tuple_to_transition_state(phone, j, fpdf, spdf)
        except ValueError as e:
            raise SupervisionError(key, "bad_input", str(e)) from None
        for k, (dst, _) in enumerate(st.transitions):
            if dst != j:
                arcs.append((j, trans_model.pair_to_transition_id(ts, k), dst))
    return len(entry), arcs


def _phone_windows(phones: Sequence[int], N: int, P: int) -> List[Tuple[int, ...]]:
    """Context windows of a linear phone sequence (0 beyond the utterance ends)."""
    padded = [0] * P + list(phones) + [0] * (N - 1 - P)
    return [tuple(padded[i:i + N]) for i in range(len(phones))]


def _linear_transition_fsa(phones: Sequence[int], ctx_dep, trans_model, key: str):
    """H o C o P for a linear phone sequence, with Kaldi's reordered self-loops.

    Returns ``(num_states, arcs[state] = [(tid, next)], final_state)``; state 0 is the
    start. Each state's arcs are in the order Kaldi's graph has them: the HMM arcs in
    topology order, then the self-loop that ``AddSelfLoops(reorder=true)`` appends.
    """
    tabs = _tables(trans_model)
    arcs: List[List[Tuple[int, int]]] = [[]]
    cur = 0
    for win in _phone_windows(phones, ctx_dep.context_width, ctx_dep.central_position):
        n, hmm = _hmm_arcs(win, ctx_dep, trans_model, key)
        smap = [cur] + [-1] * (n - 1)
        for j in range(1, n):
            smap[j] = len(arcs)
            arcs.append([])
        for src, tid, dst in hmm:
            arcs[smap[src]].append((tid, smap[dst]))
        cur = smap[n - 1]
    num_states = len(arcs)
    # MakePrecedingInputSymbolsSameClass: a state entered from several
    # transition-states is split (one copy per class, reached through epsilon in
    # Kaldi; here the copy gets the original's out-arcs directly).
    incoming: Dict[int, List[int]] = {}
    for s in range(num_states):
        for tid, d in arcs[s]:
            c = int(tabs.tstate[tid])
            lst = incoming.setdefault(d, [])
            if c not in lst:
                lst.append(c)
    state_in = [0] * num_states
    for d, cls in incoming.items():
        state_in[d] = cls[0]
        if len(cls) > 1:
            copies = {cls[0]: d}
            for c in cls[1:]:
                copies[c] = len(arcs)
                arcs.append(list(arcs[d]))
                state_in.append(c)
            for s in range(len(arcs)):
                arcs[s] = [(tid, copies[int(tabs.tstate[tid])] if nx == d else nx)
                           for tid, nx in arcs[s]]
            if cur == d:
                raise SupervisionError(key, "bad_input", "topologies whose final state is "
                                       "entered from several HMM states are not supported")
    for s in range(len(arcs)):
        loop = int(tabs.loop_of[state_in[s]]) if state_in[s] > 0 else 0
        if loop:
            arcs[s].append((loop, s))
    return len(arcs), arcs, cur


class _AcceptorTransitionFsa:
    """H o C o A for a phone acceptor A (a phone-aligned lattice), with Kaldi's reordered
    self-loops, built lazily: ``fsa[q]`` is the list of ``(transition-id, next)`` of
    state q (state 0 is the start), ``fsa.finals`` the final states seen so far.

    States are ``("g", c, k)`` at a phone boundary (c a state of the context-dependent
    phone graph, k the transition-state of the transition just taken, 0 at the start)
    and ``("h", a, j, k)`` inside the HMM of context-dependent arc a, at topology state
    j. The self-loop of transition-state k follows that transition (``reorder=true``).
    The language (the set of transition-id sequences) is the one Kaldi's
    ``ProtoSupervisionToSupervision`` builds with ContextFst, H and ``AddSelfLoops``;
    the states differ, which does not matter once the chunks are determinized.
    """

    def __init__(self, phone_fst, ctx_dep, trans_model, key: str):
        self.tabs = _tables(trans_model)
        self.ctx_dep, self.trans_model, self.key = ctx_dep, trans_model, key
        self._cd_graph(phone_fst)
        self._hmms: Dict[Tuple[int, ...], Tuple[int, List[List[Tuple[int, int]]]]] = {}
        self.ids: Dict[tuple, int] = {}
        self.keys: List[tuple] = []
        self.arcs: List[Optional[List[Tuple[int, int]]]] = []
        self.finals: set = set()
        self._id(("g", self.cd_start, 0))

    def _cd_graph(self, phone_fst) -> None:
        """Context expansion of the acceptor: nodes (state, history, flushed), arcs
        labelled with phone windows (epsilon-free: the first phones of a right-context
        tree only fill the window)."""
        start, arcs, finals = phone_fst
        N, P = self.ctx_dep.context_width, self.ctx_dep.central_position
        R = N - 1 - P
        ids: Dict[tuple, int] = {}
        keys: List[tuple] = []

        def nid(k):
            i = ids.get(k)
            if i is None:
                i = ids[k] = len(keys)
                keys.append(k)
            return i

        eps: Dict[int, List[int]] = {}
        out: Dict[int, List[Tuple[Tuple[int, ...], int]]] = {}
        fin = set()
        nid((start, (0,) * (N - 1), 0))
        head = 0
        while head < len(keys):
            a, hist, fl = keys[head]
            i = head
            head += 1
            steps = []
            if fl == 0:
                steps = [(p, (a2, None)) for p, a2 in arcs[a]]
            final_here = (fl == R) and (fl > 0 or a in finals)
            if final_here:
                fin.add(i)
            if (a in finals or fl > 0) and fl < R:
                steps.append((0, (a, fl + 1)))
            for p, (a2, nfl) in steps:
                win = hist + (p,)
                nk = (a2, win[1:], 0) if nfl is None else (a2, win[1:], nfl)
                d = nid(nk)
                if win[P] == 0:
                    eps.setdefault(i, []).append(d)
                else:
                    out.setdefault(i, []).append((win, d))
        # remove the epsilons (only at the start, while the window fills)
        n = len(keys)
        cd_out: List[List[Tuple[Tuple[int, ...], int]]] = [[] for _ in range(n)]
        cd_fin = set()
        for i in range(n):
            stack, seen = [i], {i}
            while stack:
                j = stack.pop()
                cd_out[i].extend(out.get(j, []))
                if j in fin:
                    cd_fin.add(i)
                for d in eps.get(j, []):
                    if d not in seen:
                        seen.add(d)
                        stack.append(d)
        self.cd_start, self.cd_out, self.cd_finals = 0, cd_out, cd_fin

    def _hmm(self, win):
        h = self._hmms.get(win)
        if h is None:
            n, hmm_arcs = _hmm_arcs(win, self.ctx_dep, self.trans_model, self.key)
            by_src: List[List[Tuple[int, int]]] = [[] for _ in range(n)]
            for src, tid, dst in hmm_arcs:
                by_src[src].append((tid, dst))
            h = self._hmms[win] = (n, by_src)
        return h

    def _id(self, k) -> int:
        i = self.ids.get(k)
        if i is None:
            i = self.ids[k] = len(self.keys)
            self.keys.append(k)
            self.arcs.append(None)
            if k[0] == "g" and k[1] in self.cd_finals:
                self.finals.add(i)
        return i

    def __getitem__(self, q: int) -> List[Tuple[int, int]]:
        lst = self.arcs[q]
        if lst is not None:
            return lst
        k = self.keys[q]
        tabs = self.tabs
        lst = []
        if k[0] == "g":
            c = k[1]
            moves = []
            for a, (win, d) in enumerate(self.cd_out[c]):
                n, by_src = self._hmm(win)
                moves.extend((tid, (c, a, win, d), dst, n) for tid, dst in by_src[0])
            loop_ts = k[2]
        else:
            _, c, a, j, loop_ts = k
            win, d = self.cd_out[c][a]
            n, by_src = self._hmm(win)
            moves = [(tid, (c, a, win, d), dst, n) for tid, dst in by_src[j]]
        for tid, (c, a, win, d), dst, n in moves:
            ts = int(tabs.tstate[tid])
            nk = ("g", d, ts) if dst == n - 1 else ("h", c, a, dst, ts)
            lst.append((int(tid), self._id(nk)))
        if loop_ts:
            loop = int(tabs.loop_of[loop_ts])
            if loop:
                lst.append((loop, q))
        self.arcs[q] = lst
        return lst


def phone_lattice_to_proto_supervision(lat, opts: SupervisionOptions,
                                       key: str = "<utt>") -> ProtoSupervision:
    """Kaldi's ``PhoneLatticeToProtoSupervision`` (``chain-get-supervision
    --lattice-input=true``): a phone-aligned lattice (one phone per arc, see
    :func:`pkwrap.kaldi.lattice.phone_align_lattice`) gives the phone acceptor and, for
    every arc, its phone is allowed on the output frames

        ceil(max(0, b - l) / f)  <=  t  <  ceil(min(T, e + r) / f)

    (b, e the arc's first and past-the-end input frame, T the lattice's frames, l, r
    the tolerances, f the frame-subsampling factor). Weights are dropped (Kaldi's
    ``--lm-scale=0``).

    Args:
      lat: :class:`pkwrap.kaldi.lattice.CompactLattice` with phone labels.
      opts: tolerances and the (alignment) frame-subsampling factor.
      key: utterance id for error messages.
    Raises:
      SupervisionError: an empty lattice, an epsilon arc (not phone-aligned), a final
        state before the last frame, or a frame no phone may take.
    """
    opts.check()
    if lat.start < 0 or lat.num_states == 0:
        raise SupervisionError(key, "empty_alignment", "the lattice is empty")
    try:
        times, T = lat.state_times()
    except ValueError as e:
        raise SupervisionError(key, "bad_input", "lattice: %s" % e) from None
    f = opts.frame_subsampling_factor
    Ts = (T + f - 1) // f
    allowed: List[set] = [set() for _ in range(Ts)]
    arcs: List[List[Tuple[int, int]]] = []
    finals = set()
    for s in range(lat.num_states):
        st = []
        t0s = times[s]
        for lab, _, _, tids, d in lat.arcs[s]:
            if lab == 0:
                raise SupervisionError(key, "bad_input", "the lattice has an epsilon arc: is it "
                                       "phone-aligned (lattice-align-phones "
                                       "--replace-output-symbols=true)?")
            st.append((int(lab), int(d)))
            b = max(0, t0s - opts.left_tolerance)
            e = min(T, t0s + len(tids) + opts.right_tolerance)
            for t in range((b + f - 1) // f, (e + f - 1) // f):
                allowed[t].add(int(lab))
        arcs.append(st)
        if lat.final[s] is not None:
            if t0s != T:
                raise SupervisionError(key, "bad_input", "final state %d at frame %d of %d: the "
                                       "lattice is not phone-aligned" % (s, t0s, T))
            finals.add(s)
    for t, a in enumerate(allowed):
        if not a:
            raise SupervisionError(key, "bad_input", "no phone is allowed on output frame %d"
                                   % t)
    return ProtoSupervision(phones=[], allowed_phones=[sorted(a) for a in allowed],
                            phone_fst=(lat.start, arcs, finals))


def lattice_to_supervision(lat, ctx_dep, trans_model, opts: Optional[SupervisionOptions] = None,
                           key: str = "<utt>") -> Supervision:
    """One utterance's supervision from a phone-aligned lattice
    (``chain-get-supervision --lattice-input=true``).

    Args:
      lat: phone-aligned :class:`pkwrap.kaldi.lattice.CompactLattice`.
      ctx_dep, trans_model: the chain tree and transition model (``0.trans_mdl``).
      opts: :class:`SupervisionOptions` (``frame_subsampling_factor`` is the alignment
        subsampling factor).
      key: utterance id for error messages.
    """
    opts = opts or SupervisionOptions()
    proto = phone_lattice_to_proto_supervision(lat, opts, key)
    return proto_supervision_to_supervision(proto, ctx_dep, trans_model,
                                            opts.convert_to_pdfs, opts.weight, key)


def proto_supervision_to_supervision(proto: ProtoSupervision, ctx_dep, trans_model,
                                     convert_to_pdfs: bool = True, weight: float = 1.0,
                                     key: str = "<utt>") -> Supervision:
    """Kaldi's ``ProtoSupervisionToSupervision`` (see the module docstring).

    Args:
      proto: allowed phones per output frame and the phone sequence.
      ctx_dep: :class:`pkwrap.kaldi.hmm.ContextDependency` (the tree).
      trans_model: :class:`pkwrap.kaldi.hmm.TransitionModel`.
      convert_to_pdfs: labels pdf-id + 1 (else transition-ids).
      weight: the supervision weight (Kaldi always writes 1.0).
      key: utterance id for error messages.
    Returns:
      a one-sequence :class:`Supervision` whose FST is sorted breadth-first.
    Raises:
      SupervisionError: unknown phone, or no path fits the frames (``too_short``).
    """
    tabs = _tables(trans_model)
    if proto.phone_fst is not None:
        phones_used = {p for arcs in proto.phone_fst[1] for p, _ in arcs}
    else:
        phones_used = proto.phones
    for p in phones_used:
        if p not in tabs.phones:
            raise SupervisionError(key, "unknown_phone", "phone %d is not in the transition "
                                   "model (phones %d..%d)" % (p, min(tabs.phones),
                                                               max(tabs.phones)))
    if proto.phone_fst is None:
        _, qarcs, qfinal = _linear_transition_fsa(proto.phones, ctx_dep, trans_model, key)
        qfinals = {qfinal}
        what = "%d phones" % len(proto.phones)
    else:
        qarcs = _AcceptorTransitionFsa(proto.phone_fst, ctx_dep, trans_model, key)
        qfinals = qarcs.finals
        what = "the phone lattice's phones"
    T = proto.num_frames
    allowed = [set(a) for a in proto.allowed_phones]
    # forward: reachable (q, t)
    levels: List[List[int]] = [[0]]
    for t in range(T):
        seen = set()
        nxt = []
        for q in levels[t]:
            for tid, q2 in qarcs[q]:
                if tabs.phone[tid] in allowed[t] and q2 not in seen:
                    seen.add(q2)
                    nxt.append(q2)
        levels.append(nxt)
    # backward: keep co-accessible states (Connect)
    keep: List[set] = [set() for _ in range(T + 1)]
    keep[T].update(q for q in levels[T] if q in qfinals)
    for t in range(T - 1, -1, -1):
        for q in levels[t]:
            for tid, q2 in qarcs[q]:
                if q2 in keep[t + 1] and tabs.phone[tid] in allowed[t]:
                    keep[t].add(q)
                    break
    if 0 not in keep[0]:
        raise SupervisionError(key, "too_short", "supervision FST is empty: %s do not "
                               "fit in %d output frames with these tolerances" % (what, T))
    # breadth-first numbering (SortBreadthFirstSearch), arcs in graph order
    ids: Dict[Tuple[int, int], int] = {(0, 0): 0}
    order = [(0, 0)]
    out_arcs = []
    head = 0
    while head < len(order):
        q, t = order[head]
        s = head
        head += 1
        if t == T:
            continue
        for tid, q2 in qarcs[q]:
            if q2 in keep[t + 1] and tabs.phone[tid] in allowed[t]:
                k = (q2, t + 1)
                d = ids.get(k)
                if d is None:
                    d = ids[k] = len(order)
                    order.append(k)
                lab = int(tabs.pdf[tid]) + 1 if convert_to_pdfs else int(tid)
                out_arcs.append((s, lab, lab, 0.0, d))
    fst = Fst.from_arcs(len(order), 0, out_arcs,
                        {ids[(q, T)]: 0.0 for q in keep[T] if (q, T) in ids})
    return Supervision(weight=float(weight), num_sequences=1, frames_per_sequence=T,
                       label_dim=(trans_model.num_pdfs if convert_to_pdfs
                                  else trans_model.num_transition_ids), fst=fst)


def alignment_to_supervision(phones_and_lengths: Sequence[Tuple[int, int]], ctx_dep,
                             trans_model, opts: Optional[SupervisionOptions] = None,
                             key: str = "<utt>") -> Supervision:
    """One utterance's supervision from ``(phone, length)`` pairs (``chain-get-supervision``).

    Args:
      phones_and_lengths: ``ali-to-phones --write-lengths`` pairs.
      ctx_dep, trans_model: the tree and transition model.
      opts: :class:`SupervisionOptions` (default: Kaldi's defaults, factor 1).
      key: utterance id for error messages.
    Returns:
      the :class:`Supervision`.
    """
    opts = opts or SupervisionOptions()
    pl = list(phones_and_lengths)
    proto = alignment_to_proto_supervision([p for p, _ in pl], [d for _, d in pl], opts, key)
    return proto_supervision_to_supervision(proto, ctx_dep, trans_model,
                                            opts.convert_to_pdfs, opts.weight, key)


def get_supervisions(alignments: Iterable[Tuple[str, Sequence[Tuple[int, int]]]], ctx_dep,
                     trans_model, opts: Optional[SupervisionOptions] = None,
                     report: Optional[ErrorReport] = None
                     ) -> Iterator[Tuple[str, Supervision]]:
    """Supervision for many utterances; failures go to ``report`` (never dropped silently).

    Args:
      alignments: ``(key, [(phone, length), ...])`` pairs, e.g. from
        :func:`read_phones_with_lengths`.
      ctx_dep, trans_model, opts: as in :func:`alignment_to_supervision`.
      report: an :class:`ErrorReport` to fill (one is made if None; read it after
        the iterator is exhausted).
    Yields:
      ``(key, Supervision)`` for the utterances that worked.
    """
    report = report if report is not None else ErrorReport()
    for key, pl in alignments:
        try:
            sup = alignment_to_supervision(pl, ctx_dep, trans_model, opts, key)
        except SupervisionError as e:
            report.add(e)
            continue
        report.num_ok += 1
        yield key, sup


# ======================================================================= FST helpers
def sort_breadth_first(fst: Fst) -> Fst:
    """Kaldi's ``SortBreadthFirstSearch``: renumber states in BFS order from the start,
    keeping each state's arc order. The FST must be connected (every state reachable)."""
    if fst.start < 0:
        raise ValueError("sort_breadth_first: empty FST")
    S = fst.num_states
    off = fst.state_offsets.tolist()
    nxt = fst.nextstate.tolist()
    order = [-1] * S
    order[fst.start] = 0
    visit = [fst.start]
    n = 1
    head = 0
    while head < len(visit):
        s = visit[head]
        head += 1
        for d in nxt[off[s]:off[s + 1]]:
            if order[d] < 0:
                order[d] = n
                n += 1
                visit.append(d)
    if n != S:
        raise ValueError("sort_breadth_first: input must be connected (%d of %d states "
                         "reachable)" % (n, S))
    so = np.asarray(fst.state_offsets, np.int64)
    visit_a = np.asarray(visit, np.int64)
    counts = so[visit_a + 1] - so[visit_a]
    offsets = np.zeros(S + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    # arc k of the output is arc (so[visit[s]] + k - offsets[s]) of the input
    state_of = np.repeat(np.arange(S), counts)
    idx = so[visit_a][state_of] + np.arange(int(offsets[-1])) - offsets[state_of]
    order_a = np.asarray(order, np.int64)
    final = np.empty(S, np.float32)
    final[order_a] = fst.final
    return Fst(num_states=S, start=0, final=final, state_offsets=offsets,
               ilabel=fst.ilabel[idx], olabel=fst.olabel[idx], weight=fst.weight[idx],
               nextstate=order_a[fst.nextstate[idx]].astype(np.int32), arc_type=fst.arc_type)


def fst_state_times(fst: Fst) -> Tuple[np.ndarray, int]:
    """Kaldi's ``ComputeFstStateTimes``: the frame of every state of an epsilon-free,
    breadth-first-sorted FST whose paths all have the same length.

    Returns:
      ``(times [S], num_frames)``.
    Raises:
      ValueError: if the FST does not have these properties.
    """
    S = fst.num_states
    if fst.start != 0:
        raise ValueError("expected the FST's start state to be 0 (breadth-first sorted)")
    if fst.num_arcs and np.any(fst.ilabel == 0):
        s = int(np.searchsorted(fst.state_offsets, int(np.argmax(fst.ilabel == 0)), "right")) - 1
        raise ValueError("FST has epsilon arcs (state %d)" % s)
    src = np.repeat(np.arange(S), np.diff(fst.state_offsets))
    dst = np.asarray(fst.nextstate, np.int64)
    if np.any(dst <= src):
        s = int(src[np.argmax(dst <= src)])
        raise ValueError("state %d has an arc to an earlier state: FST not sorted by time" % s)
    # breadth-first sorted with forward arcs: the time of a state is one more than that of
    # any of its predecessors; take the first arc into each state, then check all
    times = np.full(S, -1, np.int64)
    times[0] = 0
    first_in = np.full(S, -1, np.int64)
    order = np.argsort(dst, kind="stable")
    d_sorted = dst[order]
    uniq, idx = np.unique(d_sorted, return_index=True)
    first_in[uniq] = src[order[idx]]
    for s in range(1, S):  # predecessors come first: a single pass
        p = first_in[s]
        if p < 0:
            raise ValueError("state %d is not reached by earlier states: FST not sorted by time"
                             % s)
        times[s] = times[p] + 1
    if fst.num_arcs:
        bad = times[dst] != times[src] + 1
        if np.any(bad):
            raise ValueError("state %d is reached at two different times"
                             % int(dst[np.argmax(bad)]))
    fin = np.isfinite(fst.final)
    if not np.any(fin):
        raise ValueError("FST has no final state")
    ft = np.unique(times[fin])
    if len(ft) > 1:
        raise ValueError("final states at different times (%d and %d)" % (ft[0], ft[1]))
    if S and np.any(np.diff(times) < 0):
        raise ValueError("state times are not monotonic: FST not sorted breadth-first")
    return times, int(ft[0])


_TMP = {"dir": None}


def _tmp_path() -> str:
    """A per-process scratch file for exchanging FSTs with kaldifst (binary OpenFst form
    is the fastest bridge; the directory is made once, in /dev/shm when available)."""
    d = _TMP["dir"]
    if d is None or _TMP.get("pid") != os.getpid() or not os.path.isdir(d):
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
            else None
        d = tempfile.mkdtemp(prefix="pkwrap-sup-", dir=base)
        _TMP["dir"], _TMP["pid"] = d, os.getpid()
        import atexit
        import shutil
        atexit.register(shutil.rmtree, d, True)
    return os.path.join(d, "f%d.fst" % threading.get_ident())


def _to_kaldifst(fst: Fst):
    import kaldifst
    p = _tmp_path()
    try:
        write_fst(Fst(fst.num_states, fst.start, fst.final, fst.state_offsets, fst.ilabel,
                      fst.olabel, fst.weight, fst.nextstate, "standard"), p)
        return kaldifst.StdVectorFst.read(p)
    finally:
        if os.path.exists(p):
            os.unlink(p)


_ARC_DTYPE = np.dtype([("ilabel", "<i4"), ("olabel", "<i4"), ("weight", "<f4"),
                       ("nextstate", "<i4")])


def _parse_vector_fst(data: bytes, name: str) -> Fst:
    """Parse a binary OpenFst vector FST (as kaldifst writes it) in one pass: the state
    headers are walked with ``struct``, the arcs of all states decoded in one go."""
    import struct
    from ..kaldi.fst import OPENFST_MAGIC
    if len(data) < 4 or struct.unpack_from("<i", data, 0)[0] != OPENFST_MAGIC:
        raise RuntimeError("%s: kaldifst wrote something that is not an OpenFst FST" % name)
    pos = 4
    strs = []
    for _ in range(2):
        (n,) = struct.unpack_from("<i", data, pos)
        strs.append(data[pos + 4:pos + 4 + n].decode("latin-1"))
        pos += 4 + n
    if strs[0] != "vector" or strs[1] != "standard":
        raise RuntimeError("%s: expected a standard vector FST, got %r" % (name, strs))
    _, flags, _, start, num_states, _ = struct.unpack_from("<iiQqqq", data, pos)
    pos += 40
    if flags & 3:
        raise RuntimeError("%s: unexpected symbol tables" % name)
    final = np.empty(num_states, np.float32)
    counts = np.empty(num_states, np.int64)
    blocks = []
    unpack = struct.Struct("<fq").unpack_from
    for st in range(num_states):
        fw, na = unpack(data, pos)
        final[st] = fw
        counts[st] = na
        pos += 12
        blocks.append(data[pos:pos + 16 * na])
        pos += 16 * na
    arcs = np.frombuffer(b"".join(blocks), dtype=_ARC_DTYPE)
    offsets = np.zeros(num_states + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Fst(num_states=int(num_states), start=int(start), final=final,
               state_offsets=offsets, ilabel=arcs["ilabel"].astype(np.int32),
               olabel=arcs["olabel"].astype(np.int32), weight=arcs["weight"].astype(np.float32),
               nextstate=arcs["nextstate"].astype(np.int32))


def _from_kaldifst(kfst) -> Fst:
    p = _tmp_path()
    try:
        if not kfst.write(p):
            raise RuntimeError("kaldifst could not write an FST to %s" % p)
        with open(p, "rb") as fh:
            data = fh.read()
    finally:
        if os.path.exists(p):
            os.unlink(p)
    return _parse_vector_fst(data, p)


def _determinize_minimize(kfst, key: str):
    """Kaldi's ``TryDeterminizeMinimize`` (tropical ``Determinize`` + ``Minimize``)."""
    import kaldifst
    if kfst.num_states >= SUPERVISION_MAX_STATES:
        raise SupervisionError(key, "bad_input", "supervision FST has %d states, too many to "
                               "determinize" % kfst.num_states)
    out = kaldifst.determinize(kfst, nstate=SUPERVISION_MAX_STATES)
    if out.num_states >= SUPERVISION_MAX_STATES - 1:
        raise SupervisionError(key, "bad_input", "determinization stopped after %d states "
                               "(a very strange transcription?)" % out.num_states)
    kaldifst.minimize(out)
    return out


class _Normalizer:
    """normalization.fst converted once to kaldifst (ilabel-sorted for composition)."""

    def __init__(self, fst: Fst):
        import kaldifst
        where = (fst.name + ": ") if fst.name else ""
        if fst.num_states == 0 or fst.start < 0:
            raise ValueError(where + "normalization FST is empty")
        if not fst.is_acceptor() or fst.has_epsilons():
            raise ValueError(where + "normalization FST must be an epsilon-free acceptor")
        self.fst = fst
        self.where = where
        self.max_label = int(fst.ilabel.max()) if fst.num_arcs else 0
        self.k = _to_kaldifst(fst)
        kaldifst.arcsort(self.k, sort_type="ilabel")

    def check_labels(self, label_dim: int) -> None:
        """Its labels (pdf-id + 1) must be pdfs of the supervision (``label_dim``): a
        normalization FST of another tree would silently drop or reweight paths."""
        if self.max_label > label_dim:
            raise ValueError("%snormalization FST has label %d but the supervision has %d "
                             "pdfs (labels are pdf-id + 1: made for another tree or model?)"
                             % (self.where, self.max_label, label_dim))


_NORMALIZERS: Dict[int, Tuple[Fst, _Normalizer]] = {}


_NORMALIZERS_BY_PATH: Dict[str, Fst] = {}


def _normalizer(fst: Union[Fst, str, "os.PathLike"]) -> _Normalizer:
    if not isinstance(fst, Fst):
        path = os.path.abspath(os.fspath(fst))
        if path not in _NORMALIZERS_BY_PATH:
            _NORMALIZERS_BY_PATH[path] = read_fst(path)
        fst = _NORMALIZERS_BY_PATH[path]
    ent = _NORMALIZERS.get(id(fst))
    if ent is None or ent[0] is not fst:
        ent = (fst, _Normalizer(fst))
        _NORMALIZERS[id(fst)] = ent
    return ent[1]


def add_weight_to_supervision(supervision: Supervision, normalization_fst,
                              key: str = "<chunk>") -> Supervision:
    """Kaldi's ``AddWeightToSupervisionFst`` (what ``nnet3-chain-get-egs`` does to each chunk).

    Regular: ``RmEpsilon``, determinize + minimize, compose with the normalization FST,
    determinize + minimize (tropical semiring), breadth-first sort. End-to-end:
    ``RmEpsilon`` and compose only (the graph keeps its self-loops).

    Args:
      supervision: a one-sequence supervision (e.g. from :class:`SupervisionSplitter`).
      normalization_fst: normalization.fst (:class:`Fst` or path; labels pdf-id + 1).
      key: chunk id for error messages.
    Returns:
      a new :class:`Supervision` with the weighted FST.
    Raises:
      SupervisionError: ``empty_numerator`` if no path survives the composition (a phone
        n-gram the phone LM never saw). Kaldi warns and writes the chunk unnormalized;
        pkwrap refuses it, so the caller can count and skip it.
    """
    import kaldifst
    norm = _normalizer(normalization_fst)
    if supervision.num_sequences != 1:
        raise ValueError("add_weight_to_supervision needs a one-sequence supervision")
    norm.check_labels(supervision.label_dim)
    if supervision.e2e:
        if len(supervision.e2e_fsts) != 1:
            raise ValueError("e2e supervision must have exactly one FST")
        k = _to_kaldifst(supervision.e2e_fsts[0])
        kaldifst.rmepsilon(k)
        composed = kaldifst.compose(k, norm.k)
        if composed.num_states == 0:
            raise SupervisionError(key, "empty_numerator", "FST was empty after composing with "
                                   "the normalization FST (phone n-gram unseen by the phone LM?)")
        return Supervision(weight=supervision.weight, num_sequences=1,
                           frames_per_sequence=supervision.frames_per_sequence,
                           label_dim=supervision.label_dim, fst=None,
                           e2e_fsts=[_from_kaldifst(composed)])
    k = _to_kaldifst(supervision.fst)
    kaldifst.rmepsilon(k)
    k = _determinize_minimize(k, key)
    composed = kaldifst.compose(k, norm.k)
    if composed.num_states == 0:
        raise SupervisionError(key, "empty_numerator", "FST was empty after composing with the "
                               "normalization FST (phone n-gram unseen by the phone LM?)")
    composed = _determinize_minimize(composed, key)
    fst = sort_breadth_first(_from_kaldifst(composed))
    return Supervision(weight=supervision.weight, num_sequences=1,
                       frames_per_sequence=supervision.frames_per_sequence,
                       label_dim=supervision.label_dim, fst=fst)


class SupervisionSplitter:
    """Kaldi's ``SupervisionSplitter``: cut an utterance's supervision into chunks.

    The FST of frames ``[b, b + n)`` has a new start state with epsilon arcs to every
    state at time b, the states with times in ``[b, b + n)``, and a new final state that
    every arc leaving the range goes to. It still has epsilons: normalize it with
    :func:`add_weight_to_supervision` before training, as Kaldi does.

    Args:
      supervision: one-sequence regular supervision (breadth-first sorted).
    """

    def __init__(self, supervision: Supervision):
        if supervision.e2e or supervision.fst is None:
            raise ValueError("SupervisionSplitter needs regular (not e2e) supervision")
        self.supervision = supervision
        self.times, total = fst_state_times(supervision.fst)
        expected = supervision.frames_per_sequence * supervision.num_sequences
        if total != expected:
            raise ValueError("supervision FST has %d frames, frames_per_sequence says %d"
                             % (total, expected))

    def get_frame_range(self, begin_frame: int, num_frames: int) -> Supervision:
        """Supervision of output frames ``[begin_frame, begin_frame + num_frames)``."""
        sup, f, times = self.supervision, self.supervision.fst, self.times
        end_frame = begin_frame + num_frames
        if not (num_frames > 0 and begin_frame >= 0 and end_frame <= sup.frames_per_sequence
                * sup.num_sequences):
            raise ValueError("frame range [%d, %d) outside the supervision's %d frames"
                             % (begin_frame, end_frame, sup.frames_per_sequence))
        b_state = int(np.searchsorted(times, begin_frame, "left"))
        e_state = int(np.searchsorted(times, end_frame, "left"))
        n_in = e_state - b_state
        final_state = n_in + 1
        off = f.state_offsets
        arcs = []
        for s in range(b_state, e_state):
            o = s - b_state + 1
            if times[s] == begin_frame:
                arcs.append((0, 0, 0, 0.0, o))
            for i in range(off[s], off[s + 1]):
                d = int(f.nextstate[i])
                nd = final_state if d >= e_state else d - b_state + 1
                arcs.append((o, int(f.ilabel[i]), int(f.olabel[i]), float(f.weight[i]), nd))
        fst = Fst.from_arcs(n_in + 2, 0, arcs, {final_state: 0.0})
        return Supervision(weight=sup.weight, num_sequences=1, frames_per_sequence=num_frames,
                           label_dim=sup.label_dim, fst=fst)


# ======================================================================= end-to-end
def training_graph_to_supervision_e2e(graph: Fst, trans_model, num_frames: int,
                                      key: str = "<utt>") -> Supervision:
    """Kaldi's ``TrainingGraphToSupervisionE2e``: a ``compile-train-graphs`` graph
    (transition-ids in, words out) becomes an end-to-end supervision acceptor with
    labels pdf-id + 1 (epsilons removed, weights kept).

    Args:
      graph: the training graph (:class:`Fst`, tropical).
      trans_model: the :class:`pkwrap.kaldi.hmm.TransitionModel`.
      num_frames: output frames of the utterance (``ceil(feature frames / factor)``).
      key: utterance id for error messages.
    Returns:
      a one-sequence e2e :class:`Supervision` (not yet normalized).
    """
    import kaldifst
    tabs = _tables(trans_model)
    if graph.num_states == 0 or graph.start < 0:
        raise SupervisionError(key, "empty_transcript", "the training graph is empty")
    k = _to_kaldifst(graph)
    kaldifst.rmepsilon(k)
    f = _from_kaldifst(k)
    if f.num_states == 0:
        raise SupervisionError(key, "empty_transcript", "the training graph has no path")
    if np.any(f.ilabel == 0):
        raise SupervisionError(key, "bad_input", "utterance rejected due to epsilon on an "
                               "input label of the training graph")
    if f.num_arcs and (f.ilabel.max() > tabs.num_tids or f.ilabel.min() < 0):
        raise SupervisionError(key, "bad_input", "training graph has labels that are not "
                               "transition-ids (1..%d)" % tabs.num_tids)
    lab = (tabs.pdf[f.ilabel] + 1).astype(np.int32)
    fst = Fst(f.num_states, f.start, f.final, f.state_offsets, lab, lab.copy(), f.weight,
              f.nextstate)
    return Supervision(weight=1.0, num_sequences=1, frames_per_sequence=int(num_frames),
                       label_dim=trans_model.num_pdfs, fst=None, e2e_fsts=[fst])


def min_path_length(fst: Fst) -> int:
    """Fewest non-epsilon arcs on a path from the start to a final state (Kaldi's
    ``FindMinimumLengthPath`` in ``nnet3-chain-e2e-get-egs``); -1 if there is none."""
    if fst.start < 0:
        return -1
    S = fst.num_states
    dist = np.full(S, np.iinfo(np.int64).max, np.int64)
    dist[fst.start] = 0
    # 0/1 BFS: epsilon arcs cost 0, others 1
    dq = deque([fst.start])
    off = fst.state_offsets
    while dq:
        s = dq.popleft()
        for i in range(off[s], off[s + 1]):
            c = 0 if fst.olabel[i] == 0 else 1
            d = int(fst.nextstate[i])
            if dist[s] + c < dist[d]:
                dist[d] = dist[s] + c
                (dq.appendleft if c == 0 else dq.append)(d)
    fin = np.isfinite(fst.final)
    if not np.any(fin & (dist < np.iinfo(np.int64).max)):
        return -1
    return int(dist[fin].min())


# ======================================================================= tables
def _read_text_line(r: KaldiReader) -> str:
    """The rest of the current line of a text table entry; moves past its newline."""
    buf = r.buf
    e = r.pos
    while e < r.end and buf[e] != 10:
        e += 1
    line = bytes(buf[r.pos:e]).decode("utf-8", errors="replace")
    r.pos = min(e + 1, r.end)
    return line


def _read_pair_vector(r: KaldiReader) -> List[Tuple[int, int]]:
    """Kaldi's ``Int32PairVectorHolder`` (``ali-to-phones --write-lengths`` output)."""
    if r.binary:
        n = r.read_int32()
        if n < 0:
            raise r.error("negative pair-vector size %d" % n)
        return [(r.read_int32(), r.read_int32()) for _ in range(n)]
    line = _read_text_line(r)
    out = []
    if line.strip():
        for part in line.split(";"):
            f = part.split()
            if len(f) != 2:
                raise r.error("expected 'phone length' pairs separated by ';', got %r"
                              % part.strip())
            try:
                out.append((int(f[0]), int(f[1])))
            except ValueError:
                raise r.error("non-integer in pair %r" % part.strip()) from None
    return out


def _read_basic_int_vector(r: KaldiReader) -> List[int]:
    """Kaldi's ``Int32VectorHolder`` (e.g. ``text.int``): text ``1 2 3`` to the end of the
    line; binary int32 count then that many int32s."""
    if r.binary:
        n = r.read_int32()
        if n < 0:
            raise r.error("negative vector size %d" % n)
        return [r.read_int32() for _ in range(n)]
    line = _read_text_line(r)
    try:
        return [int(x) for x in line.split()]
    except ValueError:
        raise r.error("expected integers, got %r" % line.strip()[:60]) from None


def _write_basic_int_vector(w: KaldiWriter, v) -> None:
    if w.binary:
        w.write_int32(len(v))
        for a in v:
            w.write_int32(a)
    else:
        w.write((" ".join("%d" % a for a in v) + "\n").encode())


def _write_pair_vector(w: KaldiWriter, v) -> None:
    if w.binary:
        w.write_int32(len(v))
        for a, b in v:
            w.write_int32(a)
            w.write_int32(b)
    else:
        w.write((" ; ".join("%d %d" % (a, b) for a, b in v) + "\n").encode())


from ..kaldi.table import Holder as _Holder  # noqa: E402

from ..kaldi.chain_egs import read_supervision as _read_sup, write_supervision as _write_sup  # noqa: E402

SUPERVISION_HOLDER = _Holder(_read_sup, _write_sup)
"""Table holder for ``chain::Supervision`` archives (``chain-get-supervision`` output)."""
PHONE_LENGTHS_HOLDER = _Holder(_read_pair_vector, _write_pair_vector)
"""Table holder for int32-pair vectors (``ali-to-phones --write-lengths`` output)."""
INT_VECTOR_HOLDER = _Holder(_read_basic_int_vector, _write_basic_int_vector)
"""Table holder for Kaldi's ``Int32VectorHolder`` (e.g. ``text.int``)."""


def _holders():
    return SUPERVISION_HOLDER, PHONE_LENGTHS_HOLDER, INT_VECTOR_HOLDER


def read_supervisions(rspecifier: str) -> Iterator[Tuple[str, Supervision]]:
    """``(key, Supervision)`` from a ``chain-get-supervision`` archive (binary or text)."""
    from ..kaldi.table import SequentialTableReader
    return iter(SequentialTableReader(rspecifier, _holders()[0]))


def write_supervisions(wspecifier: str, items: Iterable[Tuple[str, Supervision]]) -> int:
    """Write ``(key, Supervision)`` pairs as Kaldi does; returns the count."""
    from ..kaldi.table import TableWriter
    n = 0
    with TableWriter(wspecifier, _holders()[0]) as w:
        for key, sup in items:
            w.write_item(key, sup)
            n += 1
    return n


def read_phones_with_lengths(rspecifier: str) -> Iterator[Tuple[str, List[Tuple[int, int]]]]:
    """``(key, [(phone, length), ...])`` from ``ali-to-phones --write-lengths`` output
    (text ``utt 1 15 ; 14 7 ; ...`` or binary)."""
    from ..kaldi.table import SequentialTableReader
    return iter(SequentialTableReader(rspecifier, _holders()[1]))


def read_int_vectors(rspecifier: str) -> Iterator[Tuple[str, List[int]]]:
    """``(key, [int, ...])`` from an int-vector archive such as ``text.int``."""
    from ..kaldi.table import SequentialTableReader
    return iter(SequentialTableReader(rspecifier, _holders()[2]))
