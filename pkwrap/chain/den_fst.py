"""Denominator and normalization FSTs of LF-MMI, as Kaldi's ``chain-make-den-fst``.

The denominator graph is the phone LM G expanded to pdfs: ``den = H o C o G`` with

  C  phonetic context (Kaldi's inverse context FST composed on demand with G): a phone
     ``a`` read in context state ``w`` (the last N-1 phones) becomes the context-dependent
     phone ``w a`` (N = context width; the central phone is at position P of ``w a``);
  H  each context-dependent phone becomes its HMM (``GetHmmAsFsa``): transitions out of an
     HMM state carry the transition-ids the tree and transition model give, with
     log-prob ``log p(tid) - log(1 - p(self-loop))``; self-loops are added afterwards
     "reordered" (after the forward transition), with the forward arcs out of the state
     scaled by ``1 - p(self-loop)`` (``AddSelfLoops``, scale 1).

Labels then become ``pdf + 1`` (an acceptor) and epsilons are removed. The weights are
made canonical by ``DenGraphMinimizeWrapper``: three passes of

    reverse, push_special, minimize (quantized to 10/1024), reverse, push_special, minimize

then epsilon removal and a last ``push_special``. ``push_special`` reweights
``w'(i->j) = w(i->j) - log v_j + log v_i`` with v the top eigenvector of the
transition matrix (final probabilities counted as transitions back to the start),
found by the power method on ``P + 0.1 I`` (Kaldi's ``PushSpecial``), so every state's
outgoing probabilities (and final) sum to the same lambda. States are finally renumbered
by decreasing number of arcs in + out (``SortOnTransitionCount``).

The normalization FST (what ``nnet3-chain-get-egs`` composes numerator graphs with) is
the den FST with a new start state that has an epsilon arc of weight ``-log init(s)`` to
every state s (init = ``DenominatorGraph`` initial probs), every state final with
weight 1, then epsilons removed and arcs sorted.

Everything that is plain OpenFst (reverse, encoded minimization, epsilon removal) runs in
``kaldifst``; context expansion, H, self-loops, ``push_special`` and the arc sort are
here, written to reproduce Kaldi's state numbering, arc order and float rounding (the
probabilities inside ``push_special`` are C ``expf`` values, as in Kaldi). On the
fixtures the den.fst and normalization.fst files are byte-identical to Kaldi's.

Supported: any tree (context width N, central position P, including right context),
topologies whose non-final states all emit (chain, classic 3-state HMMs); a phone LM
without epsilons, as ``chain-est-phone-lm`` writes.
"""
from __future__ import annotations

import os
import tempfile
from collections import deque
from typing import Dict, List, Sequence, Tuple

import numpy as np

from pkwrap.chain.phone_lm import fst_from_arrays
from pkwrap.kaldi.fst import Fst, read_fst, validate_fst, write_fst
from pkwrap.kaldi.hmm import ContextDependency, TransitionModel


def _named(fst: Fst) -> str:
    """``"<file>: "`` for an FST read from a file (errors about it name the file)."""
    return (fst.name + ": ") if getattr(fst, "name", "") else ""

__all__ = ["make_den_fst", "create_denominator_fst", "make_normalization_fst",
           "push_special", "context_expand_lm", "sort_on_transition_count"]

_K_DELTA = np.float32(1.0 / 1024.0)  # fst::kDelta


# ---------------------------------------------------------------------------------------
# kaldifst bridge


class _Bridge:
    """Moves FSTs between :class:`Fst` and ``kaldifst.StdVectorFst`` through a temp dir."""

    def __init__(self):
        import kaldifst  # imported lazily: optional dependency ([full] extra)

        self.kf = kaldifst
        self._dir = tempfile.TemporaryDirectory(prefix="pkwrap-den-")
        self._n = 0

    def _path(self):
        self._n += 1
        return os.path.join(self._dir.name, "%d.fst" % self._n)

    def to_kf(self, fst: Fst):
        p = self._path()
        write_fst(fst, p)
        out = self.kf.StdVectorFst.read(p)
        os.remove(p)
        return out

    def from_kf(self, kfst) -> Fst:
        p = self._path()
        if not kfst.write(p):
            raise RuntimeError("kaldifst could not write an FST to %s" % p)
        out = read_fst(p)
        os.remove(p)
        return out

    def close(self):
        self._dir.cleanup()


# ---------------------------------------------------------------------------------------
# push_special


_LIBM_EXPF = None


def _expf(x: np.ndarray) -> np.ndarray:
    """float32 exp as C's ``expf`` computes it (Kaldi's ``kaldi::Exp(float)``), returned as
    float64. Uses the C library's expf when it can be loaded (so pushed weights round
    like Kaldi's), else exp in double rounded to float32 (differs in rare last bits)."""
    global _LIBM_EXPF
    x = np.asarray(x, dtype=np.float32)
    if _LIBM_EXPF is None:
        try:
            import ctypes
            import ctypes.util
            lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
            f = lib.expf
            f.restype = ctypes.c_float
            f.argtypes = [ctypes.c_float]
            _LIBM_EXPF = f
        except (OSError, AttributeError):
            _LIBM_EXPF = False
    if _LIBM_EXPF is False:
        return np.exp(x.astype(np.float64)).astype(np.float32).astype(np.float64)
    out = np.zeros(x.shape, dtype=np.float64)
    fin = np.isfinite(x)
    f = _LIBM_EXPF
    out[fin] = [f(v) for v in x[fin].tolist()]
    return out


def push_special(fst: Fst, delta: float = float(_K_DELTA * np.float32(0.01))) -> Fst:
    """Kaldi's ``PushSpecial``: reweight so every state sums to the same probability.

    Args:
      fst: a tropical FST (weights -log prob); not modified.
      delta: stop when ``log(max_s sum_s / min_s sum_s) <= delta`` (checked every 5
        iterations, at most 200 iterations), where ``sum_s`` is the pushed outgoing
        probability of state s including its final probability.
    Returns:
      the pushed FST (same states and arcs).
    """
    N = fst.num_states
    if N == 0:
        return fst
    init = fst.start
    src = fst.src.astype(np.int64)
    dst = fst.nextstate.astype(np.int64)
    # Kaldi takes kaldi::Exp of the float weights, i.e. expf: float32 probabilities.
    p_arc = _expf(-fst.weight)
    p_fin = _expf(-fst.final)
    # Kaldi's "pred" lists: for each arc s->t an entry (t: s, p), for each final state s
    # an entry (start: s, final prob) right after s's arcs. The power step visits the
    # lists in order of t and accumulates into new_occ[s]; we add in the same order so
    # the sums round the same way.
    fin_states = np.nonzero(p_fin != 0.0)[0]
    e_i = np.concatenate([dst, np.full(len(fin_states), init, dtype=np.int64)])
    e_j = np.concatenate([src, fin_states])
    e_p = np.concatenate([p_arc, p_fin[fin_states]])
    e_pos = np.concatenate([np.arange(len(src)) + src,
                            fst.state_offsets[fin_states + 1] + fin_states])
    order = np.lexsort((e_pos, e_i))
    e_i, e_j, e_p = e_i[order], e_j[order], e_p[order]
    idx = np.concatenate([np.arange(N), e_j])

    def sums(occ):
        # TestAccuracy: sum over arcs of p * occ[t] / occ[s], plus the final term
        tot = np.bincount(src, weights=p_arc * occ[dst] / occ[src], minlength=N)
        return tot + p_fin * occ[init] / occ

    occ = np.full(N, 1.0 / np.sqrt(N))
    delta = float(np.float32(delta))
    for it in range(200):
        new = np.bincount(idx, weights=np.concatenate([0.1 * occ, occ[e_i] * e_p]),
                          minlength=N)
        lam = np.sqrt(np.cumsum(new * new)[-1])
        occ = new * (1.0 / lam)
        if it % 5 == 0 and it > 0:
            tot = sums(occ)
            lo = tot.min()
            if lo > 0 and np.log(tot.max() / lo) <= delta:
                break
    pot = -np.log(occ)
    w = (fst.weight.astype(np.float64) + pot[dst]) - pot[src]
    fin = fst.final.astype(np.float32) + (pot[init] - pot).astype(np.float32)
    fin = np.where(np.isinf(fst.final), np.float32(np.inf), fin).astype(np.float32)
    return Fst(num_states=N, start=fst.start, final=fin, state_offsets=fst.state_offsets.copy(),
               ilabel=fst.ilabel.copy(), olabel=fst.olabel.copy(),
               weight=w.astype(np.float32), nextstate=fst.nextstate.copy(),
               arc_type=fst.arc_type)


# ---------------------------------------------------------------------------------------
# C o G


def context_expand_lm(phone_lm: Fst, phones: Sequence[int], context_width: int,
                      central_position: int):
    """Compose the phone LM with Kaldi's inverse context FST (``ComposeContext``'s core).

    Args:
      phone_lm: the phone LM acceptor (labels = phones).
      phones: all phone ids (sorted).
      context_width, central_position: N and P of the tree.
    Returns:
      ``(num_states, start, final[S], arcs, ilabel_info)`` where arcs are
      ``(src, cd_label, phone, weight, dst)`` in Kaldi's order and ``ilabel_info[k]`` is
      the phone window of context-dependent label k (``ilabel_info[0] = ()``).
    """
    N, P = context_width, central_position
    phone_set = set(int(p) for p in phones)
    subseq = max(phone_set) + 1
    lm = phone_lm
    if P != N - 1:
        lm = _add_subsequential_loop(lm, subseq)
    ctx_states: Dict[Tuple[int, ...], int] = {}
    ctx_seqs: List[Tuple[int, ...]] = []
    labels: Dict[Tuple[int, ...], int] = {(): 0}
    ilabel_info: List[Tuple[int, ...]] = [()]

    def find_state(seq):
        i = ctx_states.get(seq)
        if i is None:
            i = len(ctx_seqs)
            ctx_states[seq] = i
            ctx_seqs.append(seq)
        return i

    def find_label(seq):
        i = labels.get(seq)
        if i is None:
            i = len(ilabel_info)
            labels[seq] = i
            ilabel_info.append(seq)
        return i

    find_state((0,) * (N - 1))

    def get_arc(s, label):
        seq = ctx_seqs[s]
        if label in phone_set:
            if seq and seq[-1] == subseq:
                return None
        elif label == subseq:
            if P + 1 == N or seq[P] == subseq:
                return None
        else:
            raise ValueError("%sphone LM has label %d, which is not a phone of the transition "
                             "model (phones %d..%d)" % (_named(phone_lm), label, min(phone_set),
                                                        max(phone_set)))
        full = list(seq) + [label]
        for i in range(P + 1, N):
            if full[i] == subseq:
                full[i] = 0
        nxt = seq[1:] + (label,) if seq else seq
        cd = 0 if full[P] == 0 else find_label(tuple(full))
        return cd, find_state(nxt)

    def ctx_final(s):
        seq = ctx_seqs[s]
        return True if P >= N - 1 else seq[P] == subseq

    pair_ids: Dict[Tuple[int, int], int] = {}
    start_pair = (0, lm.start)
    pair_ids[start_pair] = 0
    queue = deque([start_pair])
    finals: Dict[int, float] = {}
    arcs = []
    while queue:
        q = queue.popleft()
        qc, ql = q
        qid = pair_ids[q]
        if ctx_final(qc) and np.isfinite(lm.final[ql]):
            finals[qid] = float(lm.final[ql])
        b, e = lm.state_offsets[ql], lm.state_offsets[ql + 1]
        for k in range(b, e):
            lab = int(lm.ilabel[k])
            if lab == 0:
                nc, cd = qc, 0
            else:
                r = get_arc(qc, lab)
                if r is None:
                    continue
                cd, nc = r
            nxt = (nc, int(lm.nextstate[k]))
            nid = pair_ids.get(nxt)
            if nid is None:
                nid = len(pair_ids)
                pair_ids[nxt] = nid
                queue.append(nxt)
            arcs.append((qid, cd, int(lm.olabel[k]), float(lm.weight[k]), nid))
    final = np.full(len(pair_ids), np.inf, dtype=np.float32)
    for s, w in finals.items():
        final[s] = w
    return len(pair_ids), 0, final, arcs, ilabel_info


def _add_subsequential_loop(fst: Fst, subseq: int) -> Fst:
    """Kaldi's ``AddSubsequentialLoop`` followed by projection on the input."""
    N = fst.num_states
    finals = np.nonzero(np.isfinite(fst.final))[0]
    src = list(fst.src) + [N] + list(finals)
    il = list(fst.ilabel) + [subseq] * (1 + len(finals))
    w = list(fst.weight) + [0.0] + [float(fst.final[s]) for s in finals]
    dst = list(fst.nextstate) + [N] * (1 + len(finals))
    final = np.concatenate([fst.final, np.zeros(1, dtype=np.float32)])
    return fst_from_arrays(N + 1, fst.start, final, np.array(src), np.array(il), np.array(il),
                           np.array(w, dtype=np.float32), np.array(dst))


# ---------------------------------------------------------------------------------------
# H o C o G with self-loops, as a pdf acceptor


def _pdf_acceptor(tree: ContextDependency, tm: TransitionModel, phone_lm: Fst) -> Fst:
    """Epsilon-free acceptor over ``pdf + 1`` equivalent to Kaldi's transition-id FST
    after ``AddSelfLoops`` (reorder), ``MapFstToPdfIdsPlusOne`` and epsilon removal."""
    topo = tm.topology
    nS, start, cfinal, carcs, ilabel_info = context_expand_lm(
        phone_lm, topo.phones, tree.context_width, tree.central_position)
    P = tree.central_position
    f32 = np.float32

    # Physical HMMs (phone, pdf per pdf-class), as GetHmmAsFsa's cache key.
    phys_of_label: Dict[int, Tuple[int, Tuple[int, ...]]] = {}
    for k in range(1, len(ilabel_info)):
        window = ilabel_info[k]
        phone = window[P]
        pdfs = []
        for pc in range(topo.num_pdf_classes(phone)):
            pdf = tree.compute(window, pc)
            if pdf is None:
                raise ValueError("the tree has no pdf for phone window %r, pdf-class %d "
                                 "(tree and topology do not match?)" % (window, pc))
            pdfs.append(pdf)
        phys_of_label[k] = (phone, tuple(pdfs))

    non_self = {}  # transition-state -> -log(1 - p(self-loop)), float32 as Kaldi

    def non_self_cost(ts):
        v = non_self.get(ts)
        if v is None:
            sl = tm.self_loop_of(ts)
            if sl == 0:
                v = f32(0.0)
            else:
                p = f32(1.0) - f32(np.exp(f32(tm.log_probs[sl])))
                if p <= 0:
                    p = f32(1e-10)
                v = -f32(np.log(p))
            non_self[ts] = v
        return v

    # HMM arcs (without self-loops) of each physical HMM: per state j a list of
    # (dest, label pdf+1, cost, transition-state of j); plus self-loop info per state.
    hmm_cache: Dict[Tuple[int, Tuple[int, ...]], list] = {}

    def hmm(phys):
        h = hmm_cache.get(phys)
        if h is not None:
            return h
        phone, pdfs = phys
        entry = topo.topology_for_phone(phone)
        states = []
        for j, st in enumerate(entry):
            out = []
            if st.forward_pdf_class == -1:
                if st.transitions:
                    raise NotImplementedError(
                        "non-emitting HMM states with transitions (phone %d) are not "
                        "supported in den-graph creation" % phone)
                states.append((out, None))
                continue
            fpdf, spdf = pdfs[st.forward_pdf_class], pdfs[st.self_loop_pdf_class]
            ts = tm.tuple_to_transition_state(phone, j, fpdf, spdf)
            for idx, (d, _) in enumerate(st.transitions):
                if d == j:
                    continue
                tid = tm.pair_to_transition_id(ts, idx)
                cost = -(f32(tm.log_probs[tid]) - (-non_self_cost(ts)))
                out.append((d, tm.transition_id_to_pdf(tid) + 1, f32(cost)))
            sl = tm.self_loop_of(ts)
            sl_info = None
            if sl:
                sl_info = (tm.transition_id_to_pdf(sl) + 1, -f32(tm.log_probs[sl]), ts)
            states.append((out, (ts, sl_info)))
        h = (len(entry), states)
        hmm_cache[phys] = h
        return h

    # CLM arcs grouped by source state
    by_src: List[List[tuple]] = [[] for _ in range(nS)]
    for (s, cd, ph, w, d) in carcs:
        by_src[s].append((cd, w, d))

    # States of the result: "L" = CLM state (only the start survives epsilon removal),
    # "X" = (phys, hmm state d, CLM dest q2, hmm state the arc came from).
    ids: Dict[tuple, int] = {}
    order: List[tuple] = []

    def sid(key):
        i = ids.get(key)
        if i is None:
            i = len(order)
            ids[key] = i
            order.append(key)
        return i

    sid(("L", start))
    A_src, A_lab, A_w, A_dst = [], [], [], []
    final: Dict[int, float] = {}

    def emit_clm_arcs(from_id, q, extra, depth=0):
        """Arcs and final weight of CLM state q, as leaving state ``from_id`` (CLM
        epsilons, which a context wider than the central position + 1 makes at the
        start of the LM, are followed: there is at most one epsilon path)."""
        if depth > len(by_src):
            raise ValueError("epsilon cycle in the context-expanded phone LM")
        if np.isfinite(cfinal[q]):
            w_fin = f32(f32(cfinal[q]) + extra)
            final[from_id] = float(min(w_fin, final.get(from_id, np.inf)))
        for cd, w, q2 in by_src[q]:
            if cd == 0:
                emit_clm_arcs(from_id, q2, f32(f32(w) + extra), depth + 1)
                continue
            phys = phys_of_label[cd]
            n, states = hmm(phys)
            for d, lab, cost in states[0][0]:
                A_src.append(from_id)
                A_lab.append(lab)
                A_w.append(f32(f32(f32(w) + cost) + extra))
                A_dst.append(sid(("X", phys, d, q2, 0)))

    i = 0
    while i < len(order):
        key = order[i]
        if key[0] == "L":
            emit_clm_arcs(i, key[1], f32(0.0))
        else:
            _, phys, d, q2, j_from = key
            n, states = hmm(phys)
            ts, sl_info = states[j_from][1]
            extra = non_self_cost(ts)  # reordered self-loop: scale what leaves
            if d == n - 1:
                # epsilon back to the CLM state q2, removed: take over its arcs and final
                emit_clm_arcs(i, q2, extra)
            else:
                for d2, lab, cost in states[d][0]:
                    A_src.append(i)
                    A_lab.append(lab)
                    A_w.append(f32(cost + extra))
                    A_dst.append(sid(("X", phys, d2, q2, d)))
            if sl_info is not None:  # AddSelfLoops appends the self-loop
                A_src.append(i)
                A_lab.append(sl_info[0])
                A_w.append(sl_info[1])
                A_dst.append(i)
        i += 1
    S = len(order)
    fin = np.full(S, np.inf, dtype=np.float32)
    for s, w in final.items():
        fin[s] = w
    lab = np.array(A_lab, dtype=np.int32)
    return fst_from_arrays(S, 0, fin, np.array(A_src, dtype=np.int64), lab, lab,
                           np.array(A_w, dtype=np.float32), np.array(A_dst, dtype=np.int64))


def sort_on_transition_count(fst: Fst) -> Fst:
    """Renumber states by decreasing (arcs in + arcs out), ties by old number
    (Kaldi's ``SortOnTransitionCount`` + ``StateSort``)."""
    N = fst.num_states
    cnt = np.bincount(fst.src, minlength=N) + np.bincount(fst.nextstate, minlength=N)
    old_in_new_order = np.lexsort((np.arange(N), -cnt))
    new_of_old = np.empty(N, dtype=np.int64)
    new_of_old[old_in_new_order] = np.arange(N)
    return _renumber(fst, new_of_old)


def _renumber(fst: Fst, new_of_old: np.ndarray) -> Fst:
    N = fst.num_states
    old_of_new = np.empty(N, dtype=np.int64)
    old_of_new[new_of_old] = np.arange(N)
    src_new = new_of_old[fst.src]
    final = fst.final[old_of_new]
    return fst_from_arrays(N, int(new_of_old[fst.start]), final, src_new, fst.ilabel,
                           fst.olabel, fst.weight, new_of_old[fst.nextstate])


def create_denominator_fst(tree: ContextDependency, trans_model: TransitionModel,
                           phone_lm: Fst) -> Fst:
    """Kaldi's ``CreateDenominatorFst``: the den.fst acceptor (labels pdf+1).

    Args:
      tree: the context-dependency tree.
      trans_model: the transition model (its phones and topology).
      phone_lm: the phone LM (e.g. from :func:`~pkwrap.chain.phone_lm.estimate_phone_lm`).
    Returns:
      den.fst as an :class:`Fst`.
    """
    if phone_lm.num_states == 0 or phone_lm.start < 0:
        raise ValueError("%sthe phone LM is empty" % _named(phone_lm))
    validate_fst(phone_lm, phone_lm.name or "the phone LM", accepting=True)
    fst = _pdf_acceptor(tree, trans_model, phone_lm)
    br = _Bridge()
    kf = br.kf
    qdelta = float(_K_DELTA * np.float32(10.0))
    try:
        for _ in range(3):
            rev = br.from_kf(kf.reverse(br.to_kf(fst)))
            rev = push_special(rev)
            k = br.to_kf(rev)
            kf.minimize_encoded(k, qdelta)
            fst = br.from_kf(kf.reverse(k))
            fst = push_special(fst)
            k = br.to_kf(fst)
            kf.minimize_encoded(k, qdelta)
            fst = br.from_kf(k)
        k = br.to_kf(fst)
        kf.rmepsilon(k)
        fst = push_special(br.from_kf(k))
    finally:
        br.close()
    fst = sort_on_transition_count(fst)
    # OpenFst property bits as in Kaldi's den.fst: expanded, mutable, no epsilons, weighted.
    fst.properties = 0x1 | 0x2 | 0x800000 | 0x100000000
    return fst


def _std_sort(keys: List[int]) -> List[int]:
    """The permutation libstdc++'s ``std::sort`` (introsort + final insertion sort)
    produces when sorting ``keys`` with ``<``. It is not stable; OpenFst's ``ArcSort``
    uses it, so this reproduces the order of arcs with equal labels."""
    a = list(range(len(keys)))

    def lt(i, j):
        return keys[i] < keys[j]

    def insertion_sort(first, last):
        for i in range(first + 1, last):
            v = a[i]
            if lt(v, a[first]):
                a[first + 1:i + 1] = a[first:i]
                a[first] = v
            else:
                unguarded_linear_insert(i)

    def unguarded_linear_insert(last):
        v = a[last]
        nxt = last - 1
        while lt(v, a[nxt]):
            a[last] = a[nxt]
            last = nxt
            nxt -= 1
        a[last] = v

    def adjust_heap(first, hole, length, value):
        top = hole
        child = hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if lt(a[first + child], a[first + child - 1]):
                child -= 1
            a[first + hole] = a[first + child]
            hole = child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            a[first + hole] = a[first + child - 1]
            hole = child - 1
        parent = (hole - 1) // 2
        while hole > top and lt(a[first + parent], value):
            a[first + hole] = a[first + parent]
            hole = parent
            parent = (hole - 1) // 2
        a[first + hole] = value

    def heap_sort(first, last):
        length = last - first
        if length >= 2:
            parent = (length - 2) // 2
            while True:
                adjust_heap(first, parent, length, a[first + parent])
                if parent == 0:
                    break
                parent -= 1
        while last - first > 1:
            last -= 1
            v = a[last]
            a[last] = a[first]
            adjust_heap(first, 0, last - first, v)

    def introsort(first, last, depth):
        while last - first > 16:
            if depth == 0:
                heap_sort(first, last)
                return
            depth -= 1
            x, y, z = first + 1, first + (last - first) // 2, last - 1
            if lt(a[x], a[y]):
                m = y if lt(a[y], a[z]) else (z if lt(a[x], a[z]) else x)
            else:
                m = x if lt(a[x], a[z]) else (z if lt(a[y], a[z]) else y)
            a[first], a[m] = a[m], a[first]
            lo, hi = first + 1, last
            while True:
                while lt(a[lo], a[first]):
                    lo += 1
                hi -= 1
                while lt(a[first], a[hi]):
                    hi -= 1
                if not lo < hi:
                    break
                a[lo], a[hi] = a[hi], a[lo]
                lo += 1
            introsort(lo, last, depth)
            last = lo

    n = len(a)
    if n > 1:
        introsort(0, n, 2 * (n.bit_length() - 1))
        if n > 16:
            insertion_sort(0, 16)
            for i in range(16, n):
                unguarded_linear_insert(i)
        else:
            insertion_sort(0, n)
    return a


def arcsort_ilabel(fst: Fst) -> Fst:
    """OpenFst ``ArcSort(fst, ILabelCompare)`` with the arc order of equal labels that
    Kaldi's build gives (libstdc++ ``std::sort``)."""
    perm = np.empty(fst.num_arcs, dtype=np.int64)
    for s in range(fst.num_states):
        b, e = int(fst.state_offsets[s]), int(fst.state_offsets[s + 1])
        if e - b > 1:
            keys = fst.ilabel[b:e].tolist()
            perm[b:e] = b + np.asarray(_std_sort(keys), dtype=np.int64)
        else:
            perm[b:e] = np.arange(b, e)
    return Fst(num_states=fst.num_states, start=fst.start, final=fst.final.copy(),
               state_offsets=fst.state_offsets.copy(), ilabel=fst.ilabel[perm],
               olabel=fst.olabel[perm], weight=fst.weight[perm], nextstate=fst.nextstate[perm],
               arc_type=fst.arc_type)


def make_normalization_fst(den_fst: Fst, initial_probs: np.ndarray) -> Fst:
    """Kaldi's ``DenominatorGraph::GetNormalizationFst``.

    Args:
      den_fst: the den.fst.
      initial_probs: float32 ``[S]`` initial state probabilities (Kaldi's InitialProbs).
    Returns:
      normalization.fst.
    """
    S = den_fst.num_states
    init = np.asarray(initial_probs, dtype=np.float32)
    if init.shape != (S,) or not np.all(init > 0):
        raise ValueError("initial probs must be positive, one per den.fst state")
    new = S
    src = np.concatenate([den_fst.src.astype(np.int64), np.full(S, new)])
    il = np.concatenate([den_fst.ilabel, np.zeros(S, dtype=np.int32)])
    w = np.concatenate([den_fst.weight, (-np.log(init.astype(np.float64))).astype(np.float32)])
    dst = np.concatenate([den_fst.nextstate.astype(np.int64), np.arange(S)])
    final = np.concatenate([np.zeros(S, dtype=np.float32), np.full(1, np.inf, np.float32)])
    fst = fst_from_arrays(S + 1, new, final, src, il, il, w, dst)
    br = _Bridge()
    try:
        k = br.to_kf(fst)
        br.kf.rmepsilon(k)
        out = arcsort_ilabel(br.from_kf(k))
    finally:
        br.close()
    # OpenFst property bits as in Kaldi's normalization.fst.
    out.properties = 0x1 | 0x2 | 0x800000 | 0x10000000 | 0x10000000000 | 0x40000000000
    return out


def make_den_fst(tree: ContextDependency, trans_model: TransitionModel,
                 phone_lm: Fst) -> Tuple[Fst, Fst]:
    """``chain-make-den-fst``: den.fst and normalization.fst.

    Args:
      tree: the context-dependency tree (:func:`pkwrap.kaldi.hmm.read_tree`).
      trans_model: the transition model (:func:`pkwrap.kaldi.hmm.read_transition_model`).
      phone_lm: the phone LM FST.
    Returns:
      ``(den_fst, normalization_fst)``.
    """
    from pkwrap.chain.den_graph import DenominatorGraph

    den = create_denominator_fst(tree, trans_model, phone_lm)
    init = DenominatorGraph.from_fst(den, trans_model.num_pdfs).initial_probs
    return den, make_normalization_fst(den, init)
