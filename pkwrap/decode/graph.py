"""The decoding graph HCLG = min(det(H ∘ min(det(C ∘ min(det(L ∘ G)))))) with HMM self-loops.

Each factor is a weighted transducer (tropical semiring, weights -log p):

  G   words -> words: the grammar (an ARPA n-gram via ``kaldilm.arpa2fst``, or a word
      loop); back-off arcs carry ``#0`` on the input.
  L   phones -> words: the lexicon with disambiguation symbols (``L_disambig.fst``).
  C   context windows -> phones (``fstcomposecontext``; identity for a monophone tree).
      Input label j of C∘LG stands for the phone window ``ilabels[j]`` (``[]`` = eps,
      ``[-k]`` = disambiguation symbol k).
  H   transition-ids -> context windows, *without* self-loops ("Ha"): for each window a
      path through the phone's HMM whose arc into HMM state j' from j carries the
      transition-id of (phone, j, pdfs) with weight -log(p(j->j') / (1 - p(j->j))) *
      transition_scale; disambiguation windows become new input symbols
      ``num_transition_ids + 1, ...``.

Kaldi's ``utils/mkgraph.sh`` recipe, which this module follows step for step::

    LG    = push_special(minimize_encoded(determinize_star_log(L_disambig ∘ G)))
    CLG   = compose_context(LG)
    HCLGa = minimize_encoded(rm_disambig(determinize_star_log(Ha ∘ CLG)))
    HCLG  = add_self_loops(HCLGa, self_loop_scale, reorder=True)

``add_self_loops`` (Kaldi's ``AddSelfLoopsReorder``) first splits states so that all
arcs entering a state carry transition-ids of one transition-state t, then, for every
such state, multiplies its outgoing arcs and final weight by (1 - p_loop(t))^scale and
adds the self-loop (``SelfLoopOf(t)`` : eps) with weight -scale * log p_loop(t). Chain
models use ``self_loop_scale = transition_scale = 1.0``.

One optional Kaldi step is omitted because kaldifst does not offer it: ``fstrmepslocal``
on HCLGa (it removes some epsilon arcs, a size optimization). The graph accepts exactly
the same weighted paths as Kaldi's, but may differ from Kaldi's HCLG.fst in state
numbering and size. With transcripts as G and no pushing, :func:`compile_train_graph`
reproduces Kaldi's ``compile-train-graphs`` arc for arc.
"""
from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..kaldi.fst import Fst, FstFormatError, read_fst, read_fst_binary, validate_fst, write_fst
from ..kaldi.io import atomic_output, read_text
from .lexicon import (LexiconEntry, LexiconError, SymbolTable, add_disambig_symbols,
                      make_lexicon_fst, make_phone_table)

__all__ = ["DecodingGraph", "build_decoding_graph", "make_word_loop_grammar",
           "make_arpa_grammar", "compose_lg", "push_special", "make_h_transducer",
           "add_hmm_self_loops",
           "remove_disambig_symbols", "make_hclg", "compile_train_graph",
           "build_decoding_graph_from_lang", "write_lang_dir", "to_kaldifst", "from_kaldifst",
           "GraphError"]


class GraphError(ValueError):
    """A graph could not be built (empty composition, mismatched tree/model, ...)."""


# ---------------------------------------------------------------------------------------
# conversions between pkwrap's numpy Fst and kaldifst.StdVectorFst

_scratch = threading.local()


def _scratch_file() -> str:
    """A file path private to this thread and process for passing an FST to or from
    kaldifst (which reads and writes files only), in a directory made once per process
    and thread and removed at exit: one directory per conversion made the conversion of
    small graphs (training graphs, one per utterance) cost mostly mkdir and rmdir."""
    entry = getattr(_scratch, "entry", None)
    if entry is None or entry[0] != os.getpid():  # a forked child makes its own
        d = tempfile.mkdtemp(prefix="pkwrap-fst.")
        atexit.register(shutil.rmtree, d, True)
        entry = _scratch.entry = (os.getpid(), os.path.join(d, "g.fst"))
    return entry[1]


def to_kaldifst(fst: Fst):
    """pkwrap :class:`~pkwrap.kaldi.fst.Fst` -> ``kaldifst.StdVectorFst`` (via the binary form)."""
    import kaldifst
    if fst.arc_type != "standard":
        raise GraphError("only tropical ('standard') FSTs convert to StdVectorFst, got %r"
                         % fst.arc_type)
    p = _scratch_file()
    try:
        write_fst(fst, p)
        return kaldifst.StdVectorFst.read(p)
    finally:
        if os.path.exists(p):
            os.unlink(p)


def write_kaldifst(kfst, path) -> None:
    """Write a ``kaldifst`` FST to ``path``, complete or not at all
    (:func:`pkwrap.kaldi.io.atomic_output`)."""
    p = _scratch_file()
    try:
        if not kfst.write(p):
            raise GraphError("%s: OpenFst could not write the FST" % os.fspath(path))
        with open(p, "rb") as src, atomic_output(path) as f:
            while True:
                b = src.read(1 << 22)
                if not b:
                    break
                f.write(b)
    finally:
        if os.path.exists(p):
            os.unlink(p)


def from_kaldifst(kfst, name: Optional[str] = None) -> Fst:
    """``kaldifst.StdVectorFst`` -> pkwrap :class:`~pkwrap.kaldi.fst.Fst` (validated by
    :func:`pkwrap.kaldi.fst.validate_fst`; errors name ``name``)."""
    p = _scratch_file()
    try:
        if not kfst.write(p):
            raise GraphError("kaldifst could not write the FST to %s" % p)
        with open(p, "rb") as f:
            return read_fst_binary(f, name or "<kaldifst FST>")
    finally:
        if os.path.exists(p):
            os.unlink(p)


def validate_kaldifst(kfst, name: str, num_ilabels: Optional[int] = None,
                      num_olabels: Optional[int] = None, accepting: bool = False) -> Fst:
    """Check a ``kaldifst`` FST before it reaches a decoder (OpenFst does not: an arc to a
    missing state crashes the process): the checks of :func:`pkwrap.kaldi.fst.
    validate_fst`, input labels below ``num_ilabels``, output labels below
    ``num_olabels``. Returns it as a :class:`~pkwrap.kaldi.fst.Fst`. Raises
    :class:`GraphError`."""
    try:
        return validate_fst(from_kaldifst(kfst, name), name, num_ilabels=num_ilabels,
                            num_olabels=num_olabels, accepting=accepting)
    except FstFormatError as e:
        raise GraphError(str(e)) from None


# ---------------------------------------------------------------------------------------
# G

def make_word_loop_grammar(words: Sequence[str], word_table: SymbolTable,
                           probs: Optional[Sequence[float]] = None,
                           final_prob: Optional[float] = None):
    """A one-state grammar accepting any sequence of ``words`` (e.g. a digit loop).

    The state is start and final; each word w is a loop arc ``w:w`` with weight
    ``-log p(w)``. By default p(w) = 1/(N+1) for N words and the final (end of
    utterance) probability is 1/(N+1), so the grammar is stochastic.

    Args:
      words: the words the loop allows (each must be in ``word_table``).
      word_table: the words.txt symbol table.
      probs: optional ``[N]`` word probabilities (> 0).
      final_prob: optional end-of-utterance probability (> 0); default 1/(N+1).
    Returns:
      a ``kaldifst.StdVectorFst`` G, arcs sorted by input label.
    """
    import kaldifst
    words = list(words)
    if not words:
        raise GraphError("make_word_loop_grammar: no words given")
    if len(set(words)) != len(words):
        raise GraphError("make_word_loop_grammar: duplicate words in %r" % words)
    n = len(words)
    if probs is None:
        probs = [1.0 / (n + 1)] * n
    if len(probs) != n:
        raise GraphError("make_word_loop_grammar: %d probs for %d words" % (len(probs), n))
    if final_prob is None:
        final_prob = 1.0 / (n + 1)
    for p in list(probs) + [final_prob]:
        if not (p > 0.0 and math.isfinite(p)):
            raise GraphError("make_word_loop_grammar: probabilities must be > 0, got %r" % p)
    g = kaldifst.StdVectorFst()
    s = g.add_state()
    g.start = s
    g.set_final(s, -math.log(final_prob))
    for w, p in zip(words, probs):
        if w not in word_table:
            raise LexiconError("grammar word %r is not in %s" % (w, word_table.name))
        i = word_table[w]
        g.add_arc(s, kaldifst.StdArc(i, i, -math.log(p), s))
    kaldifst.arcsort(g, sort_type="ilabel")
    return g


def make_arpa_grammar(arpa_path, word_table: Union[SymbolTable, str],
                      disambig_symbol: str = "#0", max_order: int = -1):
    """G.fst from an ARPA language model, as ``arpa2fst --disambig-symbol=#0
    --read-symbol-table=words.txt`` (what Kaldi's ``format_lm.sh`` runs).

    Args:
      arpa_path: the ARPA file (plain text).
      word_table: words.txt (a :class:`SymbolTable` or its path); it must contain
        every word of the LM, ``disambig_symbol``, ``<s>`` and ``</s>``.
      disambig_symbol: input label of back-off arcs; ``<s>``/``</s>`` become eps.
      max_order: use n-grams up to this order (-1: all).
    Returns:
      a ``kaldifst.StdVectorFst``, arcs sorted by input label.
    """
    import kaldifst
    import kaldilm
    arpa_path = os.fspath(arpa_path)
    if not os.path.isfile(arpa_path):
        raise GraphError("ARPA file %s does not exist" % arpa_path)
    with tempfile.TemporaryDirectory() as d:
        if isinstance(word_table, SymbolTable):
            wpath = os.path.join(d, "words.txt")
            word_table.write(wpath)
            table = word_table
        else:
            wpath = os.fspath(word_table)
            table = SymbolTable.read(wpath)
        for s in (disambig_symbol, "<s>", "</s>"):
            if s not in table:
                raise LexiconError("%s lacks %r, needed to compile the ARPA LM"
                                   % (table.name, s))
        # kaldilm stops the process on an out-of-vocabulary word; check here for a clear error.
        _check_arpa_words(arpa_path, table)
        out = os.path.join(d, "G.fst")
        log = os.path.join(d, "arpa2fst.log")
        with _stderr_to(log):  # kaldilm logs every section it reads to fd 2
            kaldilm.arpa2fst(arpa_path, out, disambig_symbol=disambig_symbol,
                             read_symbol_table=wpath, max_order=max_order)
        if not os.path.isfile(out):
            raise GraphError("arpa2fst failed on %s:\n%s" % (arpa_path, open(log).read()))
        g = kaldifst.StdVectorFst.read(out)
    kaldifst.arcsort(g, sort_type="ilabel")
    return g


class _stderr_to:
    """Send file descriptor 2 to a file for the duration of a with-block."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        import sys
        sys.stderr.flush()
        self.saved = os.dup(2)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        os.close(fd)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        return False


def _check_arpa_words(path: str, table: SymbolTable) -> None:
    """Validate an ARPA file before kaldilm sees it (kaldilm aborts the process on a
    malformed file): sections, number fields and that every word is in ``table``."""
    def err(n, msg):
        raise GraphError("%s:%d: %s" % (path, n, msg))

    def num(tok, n, what):
        try:
            return float(tok)
        except ValueError:
            err(n, "%s %r is not a number" % (what, tok))

    section, order, seen_data, seen_end, max_order = None, 0, False, False, 0
    for n, line in enumerate(read_text(path).split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        if seen_end:
            break
        if not seen_data:  # text before \\data\\ is ignored, as Kaldi's parser does
            if line != "\\data\\":
                continue
            seen_data = True
            section = "data"
            continue
        if line.startswith("\\"):
            if line == "\\end\\":
                seen_end = True
                continue
            if not (line.endswith("-grams:") and line[1:line.index("-")].isdigit()):
                err(n, "unknown section %r" % line)
            order = int(line[1:line.index("-")])
            if order < 1 or order > max_order:
                err(n, "section %r but the header declares orders 1..%d" % (line, max_order))
            section = "ngrams"
            continue
        if section == "data":
            if not line.startswith("ngram ") or "=" not in line:
                err(n, "expected 'ngram N=count' in the \\data\\ section, got %r" % line)
            k, c = line[6:].split("=", 1)
            if not (k.strip().isdigit() and c.strip().isdigit()):
                err(n, "bad header line %r" % line)
            max_order = max(max_order, int(k))
            continue
        a = line.split()
        if len(a) not in (order + 1, order + 2):
            err(n, "a %d-gram line needs a log-prob, %d words and an optional back-off "
                   "weight, got %r" % (order, order, line))
        num(a[0], n, "log-prob")
        if len(a) == order + 2:
            num(a[-1], n, "back-off weight")
        for w in a[1:1 + order]:
            if w not in table:
                raise LexiconError("%s:%d: word %r of the LM is not in %s"
                                   % (path, n, w, table.name))
    if not seen_data:
        raise GraphError("%s is not an ARPA file (no \\data\\ section)" % path)
    if not seen_end:
        raise GraphError("%s: no \\end\\ marker (truncated ARPA file?)" % path)


# ---------------------------------------------------------------------------------------
# LG, H, HCLG

def compose_lg(L_disambig, G, push: bool = True):
    """LG = push_special(min_encoded(det_star_log(L_disambig ∘ G))), as ``mkgraph.sh``.

    Args:
      L_disambig: the lexicon FST with disambiguation symbols (and #0 loops).
      G: the grammar.
      push: apply :func:`push_special` (``fstpushspecial``); ``compile-train-graphs``
        does not push, so :func:`compile_train_graph` passes False.
    """
    import kaldifst
    L = L_disambig.copy() if hasattr(L_disambig, "copy") else L_disambig
    kaldifst.arcsort(L, sort_type="olabel")
    LG = kaldifst.compose(L, G)
    if LG.num_states == 0:
        raise GraphError("L o G is empty: the grammar's words cannot be spelled by the "
                         "lexicon (check the word ids of G against words.txt)")
    kaldifst.determinize_star(LG, use_log=True)
    kaldifst.minimize_encoded(LG)
    return push_special(LG) if push else LG


def push_special(fst, delta: float = 1.0 / 1024, max_iter: int = 200):
    """Kaldi's ``fstpushspecial``: reweight so that every state "sums to" the same λ.

    With P[i][j] the summed probability of arcs i -> j, plus the final probability of i
    added to P[i][start], the power iteration ``v <- (P + 0.1 I) v / |.|`` finds the top
    eigenvector (v_s > 0, P v = λ v). Arcs i -> j get weight ``w - log v_j + log v_i`` and
    finals ``w_f - log v_start + log v_i``, which keeps every path's total weight and
    makes each state's outgoing probability (arcs + final) equal λ. It stops when
    ``log(max_sum / min_sum) <= delta`` (checked every 5 iterations).

    Returns:
      a new ``kaldifst.StdVectorFst``.
    """
    import warnings
    f = from_kaldifst(fst)
    S = f.num_states
    if S == 0:
        return fst
    src, dst = f.src.astype(np.int64), f.nextstate.astype(np.int64)
    p = np.exp(-f.weight.astype(np.float64))
    pf = np.exp(-f.final.astype(np.float64))
    start = f.start
    occ = np.full(S, 1.0 / math.sqrt(S))

    def sums(v):
        out = np.bincount(src, weights=p * v[dst], minlength=S) + pf * v[start]
        return out

    converged = False
    for it in range(max_iter):
        new = 0.1 * occ + sums(occ)
        occ = new / math.sqrt(float(new @ new))
        if it % 5 == 0 and it > 0:
            with np.errstate(divide="ignore", invalid="ignore"):
                r = sums(occ) / occ
            if np.all(np.isfinite(r)) and np.log(r.max() / r.min()) <= delta:
                converged = True
                break
    if not converged:
        warnings.warn("push_special: %d iterations without converging; the weights are "
                      "pushed inaccurately (paths keep their total weight)" % max_iter)
    with np.errstate(divide="ignore"):
        pot = -np.log(occ)
    if not np.all(np.isfinite(pot)):
        warnings.warn("push_special: some states have zero potential; not pushing")
        return fst
    w = f.weight.astype(np.float64) + pot[dst] - pot[src]
    fin = f.final.astype(np.float64) + pot[start] - pot
    f.weight = w.astype(np.float32)
    f.final = np.where(np.isfinite(f.final), fin, np.inf).astype(np.float32)
    return to_kaldifst(f)


def _non_self_loop_log_prob(trans_model, trans_state: int) -> float:
    loop = trans_model.self_loop_of(trans_state)
    if loop == 0:
        return 0.0
    p = float(np.exp(np.float32(trans_model.log_probs[loop])))
    return float(np.log(np.float32(1.0 - p))) if p < 1.0 else -np.inf


def _hmm_fsa(phone_window, tree, trans_model, transition_scale):
    """Arcs of the phone's HMM without self-loops: (states, start, finals, arcs)."""
    P = tree.central_position
    phone = phone_window[P]
    if phone == 0:
        raise GraphError("phone window %r has no central phone" % (phone_window,))
    topo = trans_model.topology
    entry = topo.topology_for_phone(phone)
    pdfs = []
    for pdf_class in range(topo.num_pdf_classes(phone)):
        pdf = tree.compute(list(phone_window), pdf_class)
        if pdf is None:
            raise GraphError("the tree gives no pdf for pdf-class %d of phone window %r: "
                             "tree and transition model do not match" % (pdf_class,
                                                                        list(phone_window)))
        pdfs.append(pdf)
    arcs = []
    for j, st in enumerate(entry):
        if st.forward_pdf_class < 0:
            fpdf = spdf = -1
        else:
            fpdf, spdf = pdfs[st.forward_pdf_class], pdfs[st.self_loop_pdf_class]
        for k, (dst, prob) in enumerate(st.transitions):
            if dst == j:
                continue
            if fpdf < 0:
                label, logp = 0, math.log(prob)
            else:
                try:
                    tstate = trans_model.tuple_to_transition_state(phone, j, fpdf, spdf)
                except ValueError as e:
                    raise GraphError("phone window %r: %s" % (list(phone_window), e)) from None
                label = trans_model.pair_to_transition_id(tstate, k)
                logp = float(trans_model.log_probs[label]) - _non_self_loop_log_prob(
                    trans_model, tstate)
            arcs.append((j, label, -logp * transition_scale, dst))
    return (phone, tuple(pdfs)), len(entry), arcs


def make_h_transducer(ilabels: Sequence[Sequence[int]], tree, trans_model,
                      transition_scale: float = 1.0) -> Tuple[object, List[int]]:
    """Ha: transition-ids -> C's input labels, without self-loops (``make-h-transducer``).

    Args:
      ilabels: C's input-label table from ``kaldifst.compose_context``; entry 0 is ``[]``.
      tree: :class:`pkwrap.kaldi.hmm.ContextDependency`.
      trans_model: :class:`pkwrap.kaldi.hmm.TransitionModel`.
      transition_scale: scale on the (self-loop-free) transition log-probs.
    Returns:
      ``(Ha, disambig_tids)``: a ``kaldifst.StdVectorFst`` (arcs sorted by output label)
      and the input symbols (> num_transition_ids) standing for disambiguation symbols.
    """
    import kaldifst
    if len(ilabels) == 0 or len(ilabels[0]) != 0:
        raise GraphError("ilabels[0] must be [] (epsilon)")
    N = tree.context_width
    H = kaldifst.StdVectorFst()
    loop = H.add_state()
    H.start = loop
    H.set_final(loop, 0.0)
    next_disambig = trans_model.num_transition_ids + 1
    disambig_tids: List[int] = []
    cache: Dict[tuple, Tuple[int, int, float, int]] = {}  # key -> first arc (from loop)
    Arc = kaldifst.StdArc
    for j in range(1, len(ilabels)):
        win = list(ilabels[j])
        if not win:
            raise GraphError("ilabels[%d] is empty" % j)
        if win[0] < 0 or (win[0] == 0 and len(win) == 1):
            if len(win) != 1:
                raise GraphError("ilabels[%d] = %r: grammar-FST symbols are not supported"
                                 % (j, win))
            d = H.add_state()
            H.add_arc(loop, Arc(next_disambig, j, 0.0, d))
            H.add_arc(d, Arc(0, 0, 0.0, loop))
            disambig_tids.append(next_disambig)
            next_disambig += 1
            continue
        if len(win) != N:
            raise GraphError("ilabels[%d] = %r has %d phones, the tree's context width is %d"
                             % (j, win, len(win), N))
        key, num_states, arcs = _hmm_fsa(win, tree, trans_model, transition_scale)
        if key in cache:
            ilab, w, dst = cache[key]
            H.add_arc(loop, Arc(ilab, j, w, dst))
            continue
        starts_shared = (sum(1 for a in arcs if a[0] == 0) == 1
                         and all(a[3] != 0 for a in arcs) and num_states > 1)
        smap = [loop if (s == 0 and starts_shared) else H.add_state()
                for s in range(num_states)]
        if not starts_shared:
            H.add_arc(loop, Arc(0, j, 0.0, smap[0]))
        for (src, lab, w, dst) in arcs:
            olab = j if (src == 0 and starts_shared) else 0
            H.add_arc(smap[src], Arc(lab, olab, w, smap[dst]))
            if src == 0 and starts_shared:
                cache[key] = (lab, w, smap[dst])
        if not starts_shared:
            cache[key] = (0, 0.0, smap[0])
        # the last HMM state is final: return to the loop state
        H.add_arc(smap[num_states - 1], Arc(0, 0, 0.0, loop))
    kaldifst.arcsort(H, sort_type="olabel")
    return H, disambig_tids


def remove_disambig_symbols(fst, symbols: Sequence[int], side: str = "input"):
    """Replace the given labels by epsilon (``fstrmsymbols``); returns a new StdVectorFst."""
    f = from_kaldifst(fst)
    syms = np.asarray(sorted(set(int(s) for s in symbols)), dtype=np.int64)
    lab = f.ilabel if side == "input" else f.olabel
    if syms.size:
        lab[np.isin(lab, syms)] = 0
    return to_kaldifst(f)


def add_hmm_self_loops(fst, trans_model, disambig_tids: Sequence[int] = (),
                       self_loop_scale: float = 1.0):
    """Kaldi's ``add-self-loops --reorder=true``: expand HCLGa to HCLG.

    Args:
      fst: HCLGa (transition-id inputs, no self-loops), ``kaldifst.StdVectorFst``.
      trans_model: the :class:`pkwrap.kaldi.hmm.TransitionModel`.
      disambig_tids: input labels that are disambiguation symbols (treated as eps).
      self_loop_scale: scale on the self-loop and "leave the state" log-probs.
    Returns:
      HCLG, a new ``kaldifst.StdVectorFst``.
    """
    f = from_kaldifst(fst)
    if f.start < 0:
        raise GraphError("add_hmm_self_loops: empty FST")
    ntid = trans_model.num_transition_ids
    id2state = trans_model.transition_id_to_transition_state_array.astype(np.int64)
    is_loop = trans_model.is_self_loop_array
    il = f.ilabel.astype(np.int64)
    in_range = (il >= 1) & (il <= ntid)
    if np.any(is_loop[il[in_range]]):
        raise GraphError("add_hmm_self_loops: the graph already has self-loops "
                         "(transition-id %d)" % il[in_range][is_loop[il[in_range]]][0])
    bad_label = (il < 0) | ((il > ntid) & ~np.isin(il, np.asarray(list(disambig_tids) or [0])))
    if np.any(bad_label):
        raise GraphError("add_hmm_self_loops: input label %d is neither a transition-id "
                         "(1..%d) nor a disambiguation symbol" % (il[bad_label][0], ntid))
    cls = np.where((il >= 1) & (il <= ntid), id2state[np.clip(il, 0, ntid)], 0)
    S = f.num_states
    src, dst = f.src.astype(np.int64), f.nextstate.astype(np.int64)
    # -- MakePrecedingInputSymbolsSameClass(start_is_epsilon=True) --
    pair_dst = np.concatenate([dst, [f.start]])
    pair_cls = np.concatenate([cls, [0]])
    pairs = np.unique(np.stack([pair_dst, pair_cls], 1), axis=0)
    n_cls = np.bincount(pairs[:, 0], minlength=S)
    bad = n_cls > 1
    new_src, new_il, new_ol = [src], [il], [f.olabel.astype(np.int64)]
    new_w, new_dst = [f.weight.astype(np.float64)], [dst.copy()]
    num_states = S
    change = (il != 0) & bad[dst]
    if np.any(change):
        keys = np.stack([dst[change], cls[change]], 1)
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        dummy = S + np.arange(len(uniq))
        new_dst[0][change] = dummy[inv.ravel()]
        new_src.append(dummy)
        new_il.append(np.zeros(len(uniq), np.int64))
        new_ol.append(np.zeros(len(uniq), np.int64))
        new_w.append(np.zeros(len(uniq)))
        new_dst.append(uniq[:, 0])
        num_states += len(uniq)
        cls_all = np.concatenate([cls, np.zeros(len(uniq), np.int64)])
    else:
        cls_all = cls
    src_a, il_a = np.concatenate(new_src), np.concatenate(new_il)
    ol_a, w_a, dst_a = np.concatenate(new_ol), np.concatenate(new_w), np.concatenate(new_dst)
    state_in = np.zeros(num_states, np.int64)
    state_in[dst_a] = cls_all
    final = np.concatenate([f.final.astype(np.float64), np.full(num_states - S, np.inf)])
    # -- scale leaving arcs by the non-self-loop prob and add the self-loops --
    ts = np.unique(state_in[state_in > 0])
    nsl = np.zeros(trans_model.num_transition_states + 1)
    loop_tid = np.zeros(trans_model.num_transition_states + 1, np.int64)
    loop_cost = np.zeros(trans_model.num_transition_states + 1)
    for t in ts:
        nsl[t] = -_non_self_loop_log_prob(trans_model, int(t)) * self_loop_scale
        loop_tid[t] = trans_model.self_loop_of(int(t))
        if loop_tid[t]:
            loop_cost[t] = -float(trans_model.log_probs[loop_tid[t]]) * self_loop_scale
    w_a = w_a + nsl[state_in[src_a]]
    final = final + nsl[state_in]
    states_with_loop = np.nonzero((state_in > 0) & (loop_tid[state_in] > 0))[0]
    t_of = state_in[states_with_loop]
    src_a = np.concatenate([src_a, states_with_loop])
    il_a = np.concatenate([il_a, loop_tid[t_of]])
    ol_a = np.concatenate([ol_a, np.zeros(len(t_of), np.int64)])
    w_a = np.concatenate([w_a, loop_cost[t_of]])
    dst_a = np.concatenate([dst_a, states_with_loop])
    return to_kaldifst(_fst_from_arrays(num_states, f.start, final, src_a, il_a, ol_a,
                                        w_a, dst_a))


def _fst_from_arrays(num_states, start, final, src, ilabel, olabel, weight, nextstate) -> Fst:
    """A pkwrap Fst from per-arc arrays in any order (kept within a source state)."""
    order = np.argsort(src, kind="stable")
    counts = np.bincount(src, minlength=num_states)
    offsets = np.zeros(num_states + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Fst(num_states=int(num_states), start=int(start),
               final=np.asarray(final, np.float32), state_offsets=offsets,
               ilabel=ilabel[order].astype(np.int32), olabel=olabel[order].astype(np.int32),
               weight=weight[order].astype(np.float32),
               nextstate=nextstate[order].astype(np.int32))


def make_hclg(LG, tree, trans_model, disambig_phone_ids: Sequence[int],
              transition_scale: float = 1.0, self_loop_scale: float = 1.0):
    """HCLG from LG (phones -> words) with the tree's context, as ``mkgraph.sh`` does.

    Args:
      LG: ``kaldifst.StdVectorFst`` from :func:`compose_lg`.
      tree: ContextDependency (context width N, central position P).
      trans_model: TransitionModel built from that tree.
      disambig_phone_ids: ids of ``#0, #1, ...`` in phones.txt.
      transition_scale, self_loop_scale: 1.0 for chain models.
    Returns:
      HCLG as a ``kaldifst.StdVectorFst`` (input: transition-ids, output: word ids).
    """
    import kaldifst
    CLG, ilabels = kaldifst.compose_context(list(disambig_phone_ids), tree.context_width,
                                            tree.central_position, LG)
    kaldifst.arcsort(CLG, sort_type="ilabel")
    Ha, disambig_tids = make_h_transducer(ilabels, tree, trans_model, transition_scale)
    HCLGa = kaldifst.compose(Ha, CLG)
    if HCLGa.num_states == 0:
        raise GraphError("H o CLG is empty: the tree/transition model do not cover the "
                         "phones of the lexicon")
    kaldifst.determinize_star(HCLGa, use_log=True)
    HCLGa = remove_disambig_symbols(HCLGa, disambig_tids)
    kaldifst.minimize_encoded(HCLGa)
    return add_hmm_self_loops(HCLGa, trans_model, (), self_loop_scale)


def compile_train_graph(L, word_ids: Sequence[int], tree, trans_model,
                        transition_scale: float = 0.0, self_loop_scale: float = 0.0,
                        disambig_phone_ids: Sequence[int] = ()):
    """The HCLG of one transcript, as Kaldi's ``compile-train-graphs`` makes it.

    G is the linear acceptor of ``word_ids``; the rest is :func:`make_hclg`. With the
    default scales 0 (what flat-start chain training uses) the result equals Kaldi's
    graphs arc for arc (tested on the e2e fixtures).

    Args:
      L: lexicon FST (phones -> words), e.g. from :func:`make_lexicon_fst`.
      word_ids: the transcript as word ids (non-empty).
      tree, trans_model: as in :func:`make_hclg`.
      transition_scale, self_loop_scale: Kaldi's ``--transition-scale``/``--self-loop-scale``.
      disambig_phone_ids: disambiguation symbols of L, if it has any.
    Returns:
      a ``kaldifst.StdVectorFst`` over transition-ids (input) and words (output).
    """
    import kaldifst
    word_ids = [int(w) for w in word_ids]
    if not word_ids:
        raise GraphError("compile_train_graph: empty transcript")
    if min(word_ids) <= 0:
        raise GraphError("compile_train_graph: word ids must be > 0, got %r" % word_ids)
    spelled = set(np.unique(from_kaldifst(L).olabel).tolist())
    for w in word_ids:
        if w not in spelled:
            raise LexiconError("compile_train_graph: word id %d of the transcript has no "
                               "pronunciation in L" % w)
    G = kaldifst.make_linear_acceptor(word_ids)
    return make_hclg(compose_lg(L, G, push=False), tree, trans_model, disambig_phone_ids,
                     transition_scale, self_loop_scale)


# ---------------------------------------------------------------------------------------
# the whole thing

@dataclass
class DecodingGraph:
    """Everything needed to decode with one HCLG.

    Args:
      hclg: ``kaldifst.StdVectorFst``; input labels transition-ids, output labels words.
      word_table: words.txt.
      phone_table: phones.txt (with disambiguation symbols).
      trans_model: the TransitionModel (maps transition-ids to pdfs).
      name: where the graph came from, for error messages.

    The graph is validated on construction (:func:`validate_kaldifst`).
    """

    hclg: object
    word_table: SymbolTable
    phone_table: SymbolTable
    trans_model: object
    name: str = "HCLG"
    tid2pdf: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.tid2pdf = np.asarray(self.trans_model.transition_id_to_pdf_array, np.int64)
        # every input label must be a transition-id of the model (0: epsilon)
        # (a graph that accepts nothing would fail every utterance inside the decoder)
        validate_kaldifst(self.hclg, self.name, num_ilabels=len(self.tid2pdf), accepting=True)

    @property
    def num_pdfs(self) -> int:
        return int(self.trans_model.num_pdfs)

    def write(self, graph_dir) -> None:
        """Write ``HCLG.fst``, ``words.txt``, ``phones.txt`` and ``num_pdfs`` (Kaldi layout)."""
        os.makedirs(graph_dir, exist_ok=True)
        write_kaldifst(self.hclg, os.path.join(graph_dir, "HCLG.fst"))
        self.word_table.write(os.path.join(graph_dir, "words.txt"))
        self.phone_table.write(os.path.join(graph_dir, "phones.txt"))
        with atomic_output(os.path.join(graph_dir, "num_pdfs"), "w") as f:
            f.write("%d\n" % self.num_pdfs)

    @classmethod
    def read(cls, graph_dir, trans_model) -> "DecodingGraph":
        """Read a graph directory (ours or Kaldi's ``exp/.../graph``)."""
        p = os.path.join(graph_dir, "HCLG.fst")
        if not os.path.isfile(p):
            raise GraphError("%s does not exist" % p)
        hclg = _read_any_fst(p)
        phones = os.path.join(graph_dir, "phones.txt")
        ptab = SymbolTable.read(phones) if os.path.isfile(phones) else SymbolTable(phones)
        return cls(hclg, SymbolTable.read(os.path.join(graph_dir, "words.txt")), ptab,
                   trans_model)


def _read_any_fst(path):
    """Read a vector or const OpenFst file (Kaldi writes HCLG.fst as const) as a
    ``kaldifst.StdVectorFst``."""
    import kaldifst
    from pkwrap.kaldi.fst import check_fst_file
    path = os.fspath(path)
    # OpenFst trusts the file: sizes and states are checked first (a flipped bit must
    # not become a huge allocation, a crash, or OpenFst's own multi-line errors)
    try:
        fst_type = check_fst_file(path)
    except OSError as e:
        raise GraphError("%s: %s" % (path, e.strerror or e)) from None
    except FstFormatError as e:
        raise GraphError(str(e)) from None
    if fst_type == "vector":
        fst = kaldifst.StdVectorFst.read(path)
    elif fst_type == "const":
        c = kaldifst.StdConstFst.read(path)
        fst = kaldifst.StdVectorFst(c) if c is not None else None
    else:
        raise GraphError("%s: FST type %r is not supported (vector or const)" % (path, fst_type))
    if fst is None:
        raise GraphError("%s: OpenFst could not read this %s FST (arc type must be "
                         "'standard')" % (path, fst_type))
    validate_kaldifst(fst, path)
    return fst


def build_decoding_graph(lexicon: Sequence[LexiconEntry], phone_table: SymbolTable,
                         tree, trans_model, grammar: Union[str, os.PathLike, Sequence[str], object],
                         word_table: Optional[SymbolTable] = None,
                         sil_phone: Optional[str] = None, sil_prob: float = 0.5,
                         transition_scale: float = 1.0, self_loop_scale: float = 1.0
                         ) -> DecodingGraph:
    """Build HCLG from a lexicon, a grammar, a tree and a transition model.

    Args:
      lexicon: ``(word, prob, phones)`` entries (:func:`read_lexicon`); no ``#k`` yet.
      phone_table: phones.txt of the acoustic model (the ids the tree uses);
        disambiguation symbols are added as needed.
      tree: :class:`pkwrap.kaldi.hmm.ContextDependency`.
      trans_model: :class:`pkwrap.kaldi.hmm.TransitionModel`.
      grammar: a path to an ARPA file, a list of words (word-loop grammar, e.g. digits),
        or a ready ``kaldifst.StdVectorFst`` G over ``word_table``.
      word_table: words.txt; default: the lexicon's words + ``#0 <s> </s>``.
      sil_phone, sil_prob: optional silence in L (see :func:`make_lexicon_fst`).
      transition_scale, self_loop_scale: 1.0 for chain models (``mkgraph.sh``).
    Returns:
      a :class:`DecodingGraph`.
    """
    import kaldifst
    from .lexicon import make_word_table
    if word_table is None:
        word_table = make_word_table(w for w, _, _ in lexicon)
    lex_disambig, ndis = add_disambig_symbols(lexicon)
    ndis += 1  # one more for the optional silence (prepare_lang.sh)
    ptab = make_phone_table(phone_table, ndis)
    for w, _, phones in lexicon:
        for p in phones:
            if p not in ptab:
                raise LexiconError("phone %r of word %r is not in %s" % (p, w, phone_table.name))
    L = make_lexicon_fst(lex_disambig, ptab, word_table, sil_phone=sil_phone,
                         sil_prob=sil_prob,
                         sil_disambig=("#%d" % ndis) if sil_phone and sil_prob > 0 else None,
                         word_disambig_loops="#0" in word_table)
    in_lexicon = {w for w, _, _ in lexicon}
    if isinstance(grammar, (str, os.PathLike)):
        G = make_arpa_grammar(grammar, word_table)
    elif isinstance(grammar, kaldifst.StdVectorFst):
        G = grammar
    else:
        grammar = list(grammar)
        missing = [w for w in grammar if w not in in_lexicon]
        if missing:
            raise LexiconError("grammar word(s) %s have no pronunciation in the lexicon"
                               % ", ".join(repr(w) for w in missing))
        G = make_word_loop_grammar(grammar, word_table)
    if not isinstance(grammar, list):
        special = {"<eps>", "#0", "<s>", "</s>"}
        g_words = {word_table.symbol(i) for i in np.unique(from_kaldifst(G).olabel).tolist()
                   if i != 0}
        missing = sorted(w for w in g_words if w not in in_lexicon and w not in special)
        if missing:
            import warnings
            warnings.warn("%d grammar word(s) have no pronunciation and can never be "
                          "recognized: %s" % (len(missing), " ".join(missing[:20])))
    phones_in_tree = set(trans_model.phones)
    for w, _, phones in lexicon:
        for p in phones:
            if ptab[p] not in phones_in_tree:
                raise LexiconError("phone %r of word %r has no HMM in the transition model"
                                   % (p, w))
    LG = compose_lg(L, G)
    hclg = make_hclg(LG, tree, trans_model, ptab.disambig_ids(), transition_scale,
                     self_loop_scale)
    return DecodingGraph(hclg, word_table, ptab, trans_model)


def build_decoding_graph_from_lang(lang_dir, tree, trans_model, transition_scale: float = 1.0,
                                   self_loop_scale: float = 1.0) -> DecodingGraph:
    """``utils/mkgraph.sh`` on a Kaldi lang directory.

    Reads ``L_disambig.fst``, ``G.fst``, ``phones.txt``, ``words.txt`` and
    ``phones/disambig.int`` (as written by ``prepare_lang.sh`` + ``format_lm.sh``, or by
    :func:`write_lang_dir`).
    """
    import kaldifst

    def need(*parts):
        p = os.path.join(lang_dir, *parts)
        if not os.path.isfile(p):
            raise GraphError("lang directory %s lacks %s" % (lang_dir, os.path.join(*parts)))
        return p

    L = _read_any_fst(need("L_disambig.fst"))
    G = _read_any_fst(need("G.fst"))
    kaldifst.arcsort(G, sort_type="ilabel")
    phones = SymbolTable.read(need("phones.txt"))
    words = SymbolTable.read(need("words.txt"))
    # labels within the symbol tables (a corrupt id would otherwise pass silently)
    validate_kaldifst(L, need("L_disambig.fst"), num_ilabels=phones.max_id() + 1,
                      num_olabels=words.max_id() + 1)
    validate_kaldifst(G, need("G.fst"), num_ilabels=words.max_id() + 1,
                      num_olabels=words.max_id() + 1)
    dis_path = need("phones", "disambig.int")
    try:
        disambig = [int(l.split()[0]) for l in read_text(dis_path).split("\n") if l.strip()]
    except ValueError:
        raise GraphError("%s: expected one integer per line" % dis_path) from None
    if sorted(disambig) != sorted(phones.disambig_ids()):
        raise GraphError("%s: lists %s, but the disambiguation symbols (#N) of %s are %s"
                         % (dis_path, sorted(disambig)[:8], need("phones.txt"),
                            sorted(phones.disambig_ids())[:8]))
    try:
        LG = compose_lg(L, G)
    except GraphError as e:  # name the files it concerns
        raise GraphError("%s and %s: %s" % (need("L_disambig.fst"), need("G.fst"), e)) from None
    hclg = make_hclg(LG, tree, trans_model, disambig, transition_scale, self_loop_scale)
    return DecodingGraph(hclg, words, phones, trans_model)


def write_lang_dir(lang_dir, lexicon: Sequence[LexiconEntry], phone_table: SymbolTable,
                   grammar=None, word_table: Optional[SymbolTable] = None,
                   sil_phone: Optional[str] = None, sil_prob: float = 0.5) -> None:
    """Write a Kaldi-style lang directory (what ``prepare_lang.sh`` + ``format_lm.sh`` give,
    without position-dependent phones): ``phones.txt``, ``words.txt``, ``L.fst``,
    ``L_disambig.fst``, ``phones/disambig.{int,txt}``, ``lexiconp.txt``, ``lexiconp_disambig.txt``
    and, if ``grammar`` is given (ARPA path, word list or G FST), ``G.fst``.
    """
    import kaldifst
    from .lexicon import make_word_table, write_lexiconp
    if word_table is None:
        word_table = make_word_table(w for w, _, _ in lexicon)
    lex_dis, ndis = add_disambig_symbols(lexicon)
    ndis += 1
    ptab = make_phone_table(phone_table, ndis)
    os.makedirs(os.path.join(lang_dir, "phones"), exist_ok=True)
    ptab.write(os.path.join(lang_dir, "phones.txt"))
    word_table.write(os.path.join(lang_dir, "words.txt"))
    write_lexiconp(lexicon, os.path.join(lang_dir, "lexiconp.txt"))
    write_lexiconp(lex_dis, os.path.join(lang_dir, "lexiconp_disambig.txt"))
    dis = [(s, i) for s, i in ptab if s.startswith("#")]
    with atomic_output(os.path.join(lang_dir, "phones", "disambig.int"), "w") as f:
        f.write("".join("%d\n" % i for _, i in dis))
    with atomic_output(os.path.join(lang_dir, "phones", "disambig.txt"), "w") as f:
        f.write("".join("%s\n" % s for s, _ in dis))
    use_sil = bool(sil_phone) and sil_prob > 0
    L = make_lexicon_fst(lexicon, ptab, word_table, sil_phone, sil_prob)
    Ld = make_lexicon_fst(lex_dis, ptab, word_table, sil_phone, sil_prob,
                          sil_disambig=("#%d" % ndis) if use_sil else None,
                          word_disambig_loops="#0" in word_table)
    write_kaldifst(L, os.path.join(lang_dir, "L.fst"))
    write_kaldifst(Ld, os.path.join(lang_dir, "L_disambig.fst"))
    if grammar is not None:
        if isinstance(grammar, (str, os.PathLike)):
            G = make_arpa_grammar(grammar, word_table)
        elif isinstance(grammar, kaldifst.StdVectorFst):
            G = grammar
        else:
            G = make_word_loop_grammar(list(grammar), word_table)
        write_kaldifst(G, os.path.join(lang_dir, "G.fst"))
