"""Chain topology, monophone and full left-biphone trees for flat-start training.

**Chain topology** (Kaldi's ``steps/nnet3/chain/gen_topo.py``): every phone is one
emitting HMM state 0 plus the final state 1,

    state 0: forward pdf-class 0, self-loop pdf-class 1,
             transitions 0 -> 0 (p = 0.5) and 0 -> 1 (p = 0.5)

so a phone lasts one or more frames: pdf-class 0 on its first frame, 1 on the others.

**Monophone tree** (Kaldi's ``MonophoneContextDependency``, as ``gmm-init-mono``
makes it): context width N = 1, and a table on the phone giving each phone (or each set
of phones that share pdfs) one pdf per pdf-class, numbered in phone order:

    pdf(phone p, pdf-class c) = sum_{q < p} num_pdf_classes(q) + c

**Full left-biphone tree** (Kaldi's ``gmm-init-biphone``, used by e2e/flat-start chain
recipes): N = 2, P = 1, event keys 1 = the phone and 0 = its left neighbour (0 at the
start of an utterance). Every (left, phone) pair gets its own pdfs

    TE 1 ( ... phone p: TE 0 ( left 0 or context-independent: TE -1 (a, a+1),
                                left q: TE -1 (b_q, b_q+1) ... ) ... )

with pdfs allocated phone by phone, the no-left-context pair first. Context-independent
phones (``ci_phones``, e.g. silence) get one pdf per pdf-class and are not split by left
context; as left context they share the "no left context" pdfs. With phone counts given,
pairs seen fewer than ``min_biphone_count`` times fall back to a monophone pdf of the
phone, or to one global pdf pair if the phone itself is rarer than ``min_mono_count``.

``make_transition_model(tree, topo)`` is Kaldi's ``TransitionModel(ctx_dep, topo)``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from pkwrap.kaldi.hmm import (PDF_CLASS_KEY, ConstantEventMap, ContextDependency, EventMap,
                              HmmState, HmmTopology, SplitEventMap, TableEventMap,
                              TransitionModel)

__all__ = ["chain_topology", "chain_topology_text", "monophone_tree", "full_biphone_tree",
           "make_transition_model", "read_phone_counts"]


def chain_topology(phones: Iterable[int]) -> HmmTopology:
    """The 1-state chain topology for all ``phones`` (one topology entry).

    Args:
      phones: phone ids (> 0), e.g. every phone of ``phones.txt`` except ``<eps>`` and
        disambiguation symbols.
    Returns:
      the :class:`~pkwrap.kaldi.hmm.HmmTopology`.
    """
    phones = sorted(set(int(p) for p in phones))
    if not phones or phones[0] <= 0:
        raise ValueError("chain_topology needs positive phone ids, got %r" % (phones,))
    entry = [HmmState(0, 1, [(0, 0.5), (1, 0.5)]), HmmState(-1, -1, [])]
    return HmmTopology([entry], {p: 0 for p in phones})


def chain_topology_text(nonsilence_phones: Sequence[int], silence_phones: Sequence[int]) -> str:
    """The ``topo`` file Kaldi's ``steps/nnet3/chain/gen_topo.py`` prints (silence phones
    listed first), readable by :func:`~pkwrap.kaldi.hmm.read_topology`.

    Args:
      nonsilence_phones: non-silence phone ids.
      silence_phones: silence phone ids.
    Returns:
      the text.
    """
    phones = [int(p) for p in silence_phones] + [int(p) for p in nonsilence_phones]
    if not phones or min(phones) <= 0 or len(set(phones)) != len(phones):
        raise ValueError("phones must be distinct positive ids, got %r" % (phones,))
    return ("<Topology>\n<TopologyEntry>\n<ForPhones>\n%s\n</ForPhones>\n"
            "<State> 0 <ForwardPdfClass> 0 <SelfLoopPdfClass> 1 <Transition> 0 0.5 "
            "<Transition> 1 0.5 </State>\n<State> 1 </State>\n</TopologyEntry>\n"
            "</Topology>\n" % " ".join(str(p) for p in phones))


def read_phone_counts(path) -> Tuple[Dict[Tuple[int, int], int], Dict[int, int]]:
    """Read ``gmm-init-biphone --phone-counts``: lines ``left right count`` (left 0 =
    utterance start) or ``phone count``.

    Returns:
      ``(biphone_counts, mono_counts)``.
    """
    bi: Dict[Tuple[int, int], int] = {}
    mono: Dict[int, int] = {}
    from ..kaldi.io import read_text  # errors (missing, not UTF-8) name the file
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            vals = [int(x) for x in parts]
        except ValueError:
            vals = []
        if len(vals) == 3 and vals[0] >= 0 and vals[1] > 0 and vals[2] >= 0:
            bi[(vals[0], vals[1])] = vals[2]
        elif len(vals) == 2 and vals[0] > 0 and vals[1] >= 0:
            mono[vals[0]] = vals[1]
        else:
            raise ValueError("%s:%d: bad line in phone counts: %r"
                             % (path, lineno, line.rstrip("\n")))
    return bi, mono


def _table(key: int, mapping: Dict[int, EventMap]) -> TableEventMap:
    """TableEventMap from a dict value -> map (gaps are NULL), as Kaldi's map constructor."""
    if not mapping:
        return TableEventMap(key, [])
    table: List[Optional[EventMap]] = [None] * (max(mapping) + 1)
    for v, m in mapping.items():
        if v < 0:
            raise ValueError("negative table value %d" % v)
        table[v] = m
    return TableEventMap(key, table)


def _stub_map(P: int, phone_sets: List[List[int]], num_classes: Dict[int, int],
              share_roots: List[bool], counter: List[int]) -> EventMap:
    """Kaldi's ``GetStubMap``: one leaf per (phone set, pdf-class), leaves numbered in order."""
    if len(phone_sets) == 1:
        if share_roots[0]:
            counter[0] += 1
            return ConstantEventMap(counter[0] - 1)
        max_len = max(num_classes[p] for p in phone_sets[0])
        leaves = {}
        for c in range(max_len):
            leaves[c] = ConstantEventMap(counter[0])
            counter[0] += 1
        return _table(PDF_CLASS_KEY, leaves)
    highest = max(max(s) for s in phone_sets)
    if max(len(s) for s in phone_sets) == 1 and len(phone_sets) <= 2 * highest:
        m = {}
        for s, share in zip(phone_sets, share_roots):
            m[s[0]] = _stub_map(P, [s], num_classes, [share], counter)
        return _table(P, m)
    half = len(phone_sets) // 2
    m1 = _stub_map(P, phone_sets[:half], num_classes, share_roots[:half], counter)
    m2 = _stub_map(P, phone_sets[half:], num_classes, share_roots[half:], counter)
    first = sorted(p for s in phone_sets[:half] for p in s)
    return SplitEventMap(P, tuple(first), m1, m2)


def _check_sets(sets: List[List[int]], topo: HmmTopology) -> List[List[int]]:
    seen = set()
    out = []
    for s in sets:
        s = sorted(int(p) for p in s)
        if not s:
            raise ValueError("empty phone set")
        for p in s:
            if p in seen:
                raise ValueError("phone %d is in more than one phone set" % p)
            if p not in topo.phone_to_entry:
                raise ValueError("phone %d is not in the topology" % p)
            seen.add(p)
        out.append(s)
    return out


def monophone_tree(topo: HmmTopology,
                   shared_phones: Optional[Sequence[Sequence[int]]] = None) -> ContextDependency:
    """The monophone tree ``gmm-init-mono`` creates.

    Args:
      topo: the topology (gives the phones and their number of pdf-classes).
      shared_phones: optional sets of phones that share pdfs (``--shared-phones``);
        default: each phone its own set.
    Returns:
      a :class:`~pkwrap.kaldi.hmm.ContextDependency` with N = 1, P = 0.
    """
    sets = ([[p] for p in topo.phones] if shared_phones is None
            else _check_sets([list(s) for s in shared_phones], topo))
    num_classes = {p: topo.num_pdf_classes(p) for p in topo.phones}
    to_pdf = _stub_map(0, sets, num_classes, [False] * len(sets), [0])
    return ContextDependency(1, 0, to_pdf)


def full_biphone_tree(topo: HmmTopology, ci_phones: Sequence[int] = (),
                      shared_phones: Optional[Sequence[Sequence[int]]] = None,
                      biphone_counts: Optional[Dict[Tuple[int, int], int]] = None,
                      mono_counts: Optional[Dict[int, int]] = None,
                      min_biphone_count: int = 100,
                      min_mono_count: int = 20) -> ContextDependency:
    """The full left-biphone tree of ``gmm-init-biphone`` (flat-start chain training).

    Args:
      topo: the topology; every phone must have 1 or 2 pdf-classes (2 for chain).
      ci_phones: context-independent phones (``--ci-phones``), e.g. silence.
      shared_phones: optional sets of phones sharing pdfs (``--shared-phones``).
      biphone_counts: optional ``{(left, phone): count}`` (``--phone-counts``; left 0 =
        utterance start). Pairs with fewer than ``min_biphone_count`` fall back to a
        monophone pdf; None = every pair gets its own pdfs.
      mono_counts: optional ``{phone: count}``, used with ``biphone_counts``: phones with
        at most ``min_mono_count`` fall back to one shared "zerophone" pdf pair.
      min_biphone_count, min_mono_count: Kaldi's defaults 100 and 20.
    Returns:
      a :class:`~pkwrap.kaldi.hmm.ContextDependency` with N = 2, P = 1.
    """
    phones = topo.phones
    num_classes = {p: topo.num_pdf_classes(p) for p in phones}
    for p, n in num_classes.items():
        if n not in (1, 2):
            raise ValueError("full_biphone_tree supports 1 or 2 pdf-classes per phone; "
                             "phone %d has %d" % (p, n))
    ci = sorted(set(int(p) for p in ci_phones))
    for p in ci:
        if p not in num_classes:
            raise ValueError("ci phone %d is not in the topology" % p)
    sets = ([[p] for p in phones] if shared_phones is None
            else _check_sets([list(s) for s in shared_phones], topo))
    ci_set = set(ci)
    sets = [[p for p in s if p not in ci_set] for s in sets]
    sets = [s for s in sets if s]
    if not sets:
        raise ValueError("full_biphone_tree: every phone is context-independent")
    use_counts = biphone_counts is not None
    bi = dict(biphone_counts or {})
    mono = dict(mono_counts or {})

    n_per_phone = num_classes[phones[0]] if 1 not in num_classes else num_classes[1]
    cur = [0]

    def new_pdf():
        cur[0] += 1
        return cur[0] - 1

    level1: Dict[int, EventMap] = {}
    for p in ci:
        leaves = {0: ConstantEventMap(new_pdf())}
        if n_per_phone == 2:
            leaves[1] = ConstantEventMap(new_pdf())
        level1[p] = _table(PDF_CLASS_KEY, leaves)

    zerophone = [-1]
    for right_set in sets:
        if n_per_phone == 1:
            level2: Dict[int, EventMap] = {0: ConstantEventMap(new_pdf())}
            for left_set in sets:
                pdf = new_pdf()
                for q in left_set:
                    level2[q] = ConstantEventMap(pdf)
            for p in right_set:
                level1[p] = _table(0, dict(level2))
            continue
        mono_pdf = -1
        a, b = new_pdf(), new_pdf()
        shared = (a, b)
        level2_pairs: Dict[int, Tuple[int, int]] = {0: shared}
        for q in ci:
            level2_pairs[q] = shared
        for left_set in sets:
            if not use_counts or bi.get((left_set[0], right_set[0]), 0) >= min_biphone_count:
                pair = (new_pdf(), new_pdf())
            elif mono.get(right_set[0], 0) > min_mono_count:
                if mono_pdf == -1:
                    mono_pdf = new_pdf()
                    new_pdf()
                pair = (mono_pdf, mono_pdf + 1)
            else:
                if zerophone[0] == -1:
                    zerophone[0] = new_pdf()
                    new_pdf()
                pair = (zerophone[0], zerophone[0] + 1)
            for q in left_set:
                level2_pairs[q] = pair
        for p in right_set:
            level1[p] = _table(0, {q: _table(PDF_CLASS_KEY, {0: ConstantEventMap(x),
                                                             1: ConstantEventMap(y)})
                                   for q, (x, y) in level2_pairs.items()})
    return ContextDependency(2, 1, _table(1, level1))


def make_transition_model(tree: ContextDependency, topo: HmmTopology) -> TransitionModel:
    """Kaldi's ``TransitionModel(ctx_dep, topo)`` (what ``gmm-init-mono``/``-biphone``
    write before the GMMs).

    Args:
      tree: the context-dependency tree.
      topo: the HMM topology.
    Returns:
      the :class:`~pkwrap.kaldi.hmm.TransitionModel`.
    """
    return TransitionModel.from_tree(tree, topo)
