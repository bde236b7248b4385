"""Viterbi beam search of nnet outputs over HCLG ("mapped" decoding, as ``latgen-faster-mapped``).

For an utterance with log-likelihoods ``X[t][p]`` (nnet output, ``[T][P]``, one row
per output frame) the decoder finds the path pi through HCLG minimizing

    cost(pi) = sum_arcs graph_cost(a) - acoustic_scale * sum_t X[t][pdf(tid_t)]

where tid_t is the input label (transition-id) consumed at frame t and
``pdf(tid)`` comes from the transition model (Kaldi's ``DecodableMatrixScaledMapped``).
We hand kaldi-decoder a matrix ``D[t][tid-1] = acoustic_scale * X[t][pdf(tid)]`` so that
its ``DecodableCtc`` (label i -> column i-1) computes exactly that.

``FasterDecoder`` gives the best path; ``LatticeSimpleDecoder`` also gives the raw
state-level lattice (``--determinize-lattice=false`` in Kaldi terms): arcs with
transition-id inputs, word outputs and weights (graph cost, acoustic cost). Like
Kaldi's decoders, the acoustic costs stored in the lattices we return are unscaled
(divided by ``acoustic_scale``). N-best word sequences come from the lattice: the
lattice is read as a word acceptor with total cost graph + acoustic_scale * acoustic and
the n best distinct word sequences are found by A* search with the exact cost-to-go
(no determinization of the word lattice, which can blow up exponentially: a digit loop
decoded at ``acoustic_scale=0.1`` has millions of word sequences within the lattice beam).

Difference from Kaldi's ``latgen-faster-mapped`` (``LatticeFasterDecoder``): kaldi-decoder
0.3.2 has no lattice decoder with ``max_active``/``min_active``; ``LatticeSimpleDecoder``
prunes by ``beam`` only. Both limits only apply to the best path (``FasterDecoder``).
When HCLG has at most ``max_active`` states (small task graphs) max-active can never
bind (a frame has at most one token per state), so the lattice search equals Kaldi's;
on larger graphs the lattice search may keep more tokens than Kaldi would.

Chain models decode with ``acoustic_scale=1.0`` (their graphs use
``self_loop_scale=1.0``); Kaldi's chain recipes pass ``--acwt 1.0 --post-decode-acwt 10.0``.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..kaldi.io import AtomicFile
from .graph import DecodingGraph

__all__ = ["DecodeResult", "decode", "decode_utterances", "write_loglikes_ark",
           "read_loglikes", "lattice_to_text", "write_lattice_ark", "write_int_vectors",
           "open_wspecifier", "DecodeError"]


class DecodeError(ValueError):
    """Bad decoder input (shape, NaN, pdf count) or no surviving path."""


@dataclass
class DecodeResult:
    """The decoder's answer for one utterance.

    Args:
      words: best word sequence (strings).
      word_ids: the same as ids of ``graph.word_table``.
      alignment: transition-id per frame ``[T]`` of the best path.
      cost: total cost of the best path = graph_cost + acoustic_scale * acoustic_cost
        (Kaldi logs ``-cost / T`` as "log-like per frame").
      graph_cost, acoustic_cost: the two parts (acoustic unscaled, = -sum X[t][pdf]).
      reached_final: False if no final state was active at the end (partial result).
      nbest: list of (words, cost) for the n best distinct word sequences, best first
        (only when decoding with ``nbest > 1`` or ``lattice=True``).
      lattice: the raw lattice (``kaldifst.Lattice``) when ``lattice=True``.
    """

    words: List[str]
    word_ids: List[int]
    alignment: List[int]
    cost: float
    graph_cost: float
    acoustic_cost: float
    reached_final: bool = True
    nbest: List[Tuple[List[str], float]] = field(default_factory=list)
    lattice: object = None

    @property
    def text(self) -> str:
        return " ".join(self.words)


def _as_matrix(loglikes, num_pdfs: int, name: str = "loglikes") -> np.ndarray:
    if hasattr(loglikes, "detach"):  # torch tensor
        loglikes = loglikes.detach().cpu().numpy()
    x = np.asarray(loglikes, dtype=np.float32)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise DecodeError("%s: expected a (frames, pdfs) matrix, got shape %s" % (name, x.shape))
    if x.shape[1] != num_pdfs:
        raise DecodeError("%s: %d columns but the transition model has %d pdfs"
                          % (name, x.shape[1], num_pdfs))
    if x.shape[0] == 0:
        raise DecodeError("%s: zero frames" % name)
    if not np.all(np.isfinite(x)):
        raise DecodeError("%s: contains NaN or inf" % name)
    return x


def _mapped_decodable(x: np.ndarray, graph: DecodingGraph, acoustic_scale: float):
    import kaldi_decoder
    d = np.ascontiguousarray(acoustic_scale * x[:, graph.tid2pdf[1:]], dtype=np.float32)
    return kaldi_decoder.DecodableCtc(d)


def _parse_lattice_text(text: str):
    """kaldifst Lattice text -> (start, arcs[(s, d, i, o, g, a)], finals{s: (g, a)})."""
    arcs, finals, start = [], {}, None
    for line in text.splitlines():
        a = line.split()
        if not a:
            continue
        if start is None:
            start = int(a[0])
        if len(a) == 5:
            g, ac = a[4].split(",")
            arcs.append((int(a[0]), int(a[1]), int(a[2]), int(a[3]), float(g), float(ac)))
        elif len(a) == 4:
            arcs.append((int(a[0]), int(a[1]), int(a[2]), int(a[3]), 0.0, 0.0))
        elif len(a) == 2:
            g, ac = a[1].split(",")
            finals[int(a[0])] = (float(g), float(ac))
        elif len(a) == 1:
            finals[int(a[0])] = (0.0, 0.0)
    return start, arcs, finals


def _linear_path(lat) -> Tuple[List[int], List[int], float, float]:
    """Inputs (non-eps), outputs (non-eps), graph and acoustic cost of a linear lattice."""
    start, arcs, finals = _parse_lattice_text(str(lat))
    if start is None:
        return [], [], math.inf, math.inf
    by_src = {}
    for a in arcs:
        if a[0] in by_src:
            raise DecodeError("best path is not linear")
        by_src[a[0]] = a
    ins, outs, g, ac, s = [], [], 0.0, 0.0, start
    seen = set()
    while s in by_src:
        if s in seen:
            raise DecodeError("best path has a cycle")
        seen.add(s)
        _, d, i, o, wg, wa = by_src[s]
        if i:
            ins.append(i)
        if o:
            outs.append(o)
        g, ac = g + wg, ac + wa
        s = d
    fg, fa = finals.get(s, (math.inf, math.inf))
    return ins, outs, g + fg, ac + fa


def _scale_lattice_acoustic(lat, scale: float):
    import kaldifst
    kaldifst.scale_lattice(kaldifst.lattice_scale(lmwt=1.0, acwt=scale), lat)


def _nbest_from_lattice(lat, word_table, acoustic_scale: float, n: int,
                        max_expansions: int = 2000000):
    """n best distinct word sequences of a (unscaled) raw lattice, best first.

    A* search over (lattice state, word prefix) pairs with the exact heuristic h(s) =
    the cheapest completion from s (backward shortest distance; the raw lattice is
    acyclic). With an exact heuristic the complete paths come out in increasing cost, and
    the first complete path with a given word sequence is that sequence's best path, so
    the first n distinct sequences are the n best. Unlike determinizing the word lattice
    (exponential in the worst case: a digit loop at ``acoustic_scale=0.1`` has millions
    of word sequences within the lattice beam), the work is bounded by the pairs whose
    best completion costs at most the n-th cost. ``max_expansions`` caps it anyway: when
    reached, the sequences found so far (the best ones, in order) are returned.

    Args:
      lat: ``kaldifst.Lattice`` with unscaled acoustic costs.
      word_table: maps word ids to strings (``.symbol(i)``).
      acoustic_scale: total cost of an arc = graph + acoustic_scale * acoustic.
      n: number of distinct word sequences wanted.
      max_expansions: bound on the (state, prefix) pairs expanded.
    Returns:
      list of ``(words, cost)``, at most n, cost ascending.
    """
    import heapq
    start, arcs, finals = _parse_lattice_text(str(lat))
    if start is None or n < 1:
        return []
    out_arcs: Dict[int, List[Tuple[int, int, float]]] = {}
    indeg: Dict[int, int] = {start: 0}
    for s, d, _, o, g, a in arcs:
        out_arcs.setdefault(s, []).append((d, o, g + acoustic_scale * a))
        indeg.setdefault(s, 0)
        indeg[d] = indeg.get(d, 0) + 1
    final = {s: g + acoustic_scale * a for s, (g, a) in finals.items()}
    # topological order (Kahn), then backward shortest distances
    order, stack = [], [s for s, k in indeg.items() if k == 0]
    while stack:
        s = stack.pop()
        order.append(s)
        for d, _, _ in out_arcs.get(s, ()):
            indeg[d] -= 1
            if indeg[d] == 0:
                stack.append(d)
    if len(order) != len(indeg):
        raise DecodeError("internal error: the raw lattice has a cycle")
    h: Dict[int, float] = {}
    for s in reversed(order):
        best = final.get(s, math.inf)
        for d, _, w in out_arcs.get(s, ()):
            c = w + h[d]
            if c < best:
                best = c
        h[s] = best
    if not math.isfinite(h[start]):
        return []
    # heap entries: (f = g + h, tie-break, g, state or -1 for "ended", prefix)
    heap = [(h[start], 0, 0.0, start, ())]
    seen = set()
    result, tick = [], 1
    while heap and len(result) < n and len(seen) < max_expansions:
        f, _, g, s, prefix = heapq.heappop(heap)
        if (s, prefix) in seen:
            continue
        seen.add((s, prefix))
        if s == -1:
            result.append(([word_table.symbol(i) for i in prefix], float(f)))
            continue
        if s in final and math.isfinite(final[s]):
            heapq.heappush(heap, (g + final[s], tick, g + final[s], -1, prefix))
            tick += 1
        for d, o, w in out_arcs.get(s, ()):
            if not math.isfinite(h[d]):
                continue
            p2 = prefix + (o,) if o else prefix
            if (d, p2) in seen:
                continue
            heapq.heappush(heap, (g + w + h[d], tick, g + w, d, p2))
            tick += 1
    return result


def decode(loglikes, graph: DecodingGraph, acoustic_scale: float = 1.0, beam: float = 15.0,
           lattice_beam: float = 8.0, max_active: int = 7000, min_active: int = 200,
           lattice: bool = False, nbest: int = 1, allow_partial: bool = True,
           prune_interval: int = 25) -> DecodeResult:
    """Decode one utterance's nnet output with the graph.

    Args:
      loglikes: ``[T][P]`` log-likelihoods (numpy array or torch tensor; a ``[1][T][P]``
        batch of one is accepted), P = ``graph.num_pdfs``. For a chain model this is the
        network's output as is (Kaldi's ``nnet3-compute`` output).
      graph: a :class:`DecodingGraph` (from :func:`build_decoding_graph`).
      acoustic_scale: scale on ``loglikes`` (1.0 for chain models, 0.1 for xent/GMM).
      beam: decoding beam (cost units).
      lattice_beam: lattice pruning beam (only with ``lattice`` or ``nbest > 1``).
      max_active, min_active: bounds on the active states per frame; only the
        ``FasterDecoder`` search (no lattice) applies them, see the module docstring.
      lattice: also return the raw lattice (``LatticeSimpleDecoder``).
      nbest: number of distinct word sequences to return in ``result.nbest``.
      allow_partial: if no final state is reached, return the best partial path
        (``reached_final=False``) instead of raising.
      prune_interval: frames between lattice token prunings (``LatticeSimpleDecoder``).
    Returns:
      a :class:`DecodeResult`.
    """
    import kaldi_decoder
    x = _as_matrix(loglikes, graph.num_pdfs)
    if not beam > 0 or not acoustic_scale > 0:
        raise DecodeError("beam and acoustic_scale must be > 0")
    dec_in = _mapped_decodable(x, graph, acoustic_scale)
    lat = None
    if lattice or nbest > 1:
        cfg = kaldi_decoder.LatticeSimpleDecoderConfig(beam=beam, lattice_beam=lattice_beam,
                                                       prune_interval=prune_interval,
                                                       determinize_lattice=False)
        dec = kaldi_decoder.LatticeSimpleDecoder(graph.hclg, cfg)
        dec.decode(dec_in)
        reached = math.isfinite(dec.final_relative_cost())
        # the decoder is finalized: Kaldi's use_final_probs=true, which treats every
        # surviving token as final when none reached a final state
        ok, best = dec.get_best_path(use_final_probs=True)
        if ok:
            ok_lat, lat = dec.get_raw_lattice(use_final_probs=True)
            if not ok_lat:
                lat = None
    else:
        opts = kaldi_decoder.FasterDecoderOptions(beam=beam, max_active=max_active,
                                                  min_active=min_active)
        dec = kaldi_decoder.FasterDecoder(graph.hclg, opts)
        dec.decode(dec_in)
        reached = bool(dec.reached_final())
        ok, best = dec.get_best_path(use_final_probs=reached)
    if not ok:
        raise DecodeError("decoding failed: no surviving path (try a larger beam)")
    if not reached and not allow_partial:
        raise DecodeError("no final state reached at the last frame (allow_partial=False)")
    tids, wids, g, ac = _linear_path(best)
    # Kaldi's decoders put acoustic_scale * acoustic on the arcs; undo the scale.
    ac_unscaled = ac / acoustic_scale
    res = DecodeResult(words=[graph.word_table.symbol(w) for w in wids], word_ids=wids,
                       alignment=tids, cost=g + ac, graph_cost=g,
                       acoustic_cost=ac_unscaled, reached_final=reached)
    if len(tids) != x.shape[0]:
        raise DecodeError("internal error: best path has %d frames, input has %d"
                          % (len(tids), x.shape[0]))
    if lat is not None:
        _scale_lattice_acoustic(lat, 1.0 / acoustic_scale)
        res.nbest = _nbest_from_lattice(lat, graph.word_table, acoustic_scale, max(1, nbest))
        if lattice:
            res.lattice = lat
    return res


def decode_utterances(loglikes: Union[Dict[str, np.ndarray], Iterable[Tuple[str, np.ndarray]]],
                      graph: DecodingGraph, **kwargs) -> Iterator[Tuple[str, DecodeResult]]:
    """Decode many utterances: yields ``(key, DecodeResult)``; kwargs as :func:`decode`.

    An utterance that fails (bad shape, NaN, no path) raises DecodeError naming its key.
    """
    items = loglikes.items() if isinstance(loglikes, dict) else loglikes
    for key, mat in items:
        try:
            yield key, decode(mat, graph, **kwargs)
        except DecodeError as e:
            raise DecodeError("utterance %s: %s" % (key, e)) from None


# ---------------------------------------------------------------------------------------
# Kaldi archives

def write_loglikes_ark(path: str, loglikes: Union[Dict[str, np.ndarray],
                                                  Iterable[Tuple[str, np.ndarray]]],
                       scp: Optional[str] = None) -> None:
    """Write ``{utt: [T][P] matrix}`` as a Kaldi binary float matrix archive (kaldiio).

    The file is what ``nnet3-compute`` writes and ``latgen-faster-mapped`` reads:
    ``latgen-faster-mapped --acoustic-scale=1.0 final.mdl HCLG.fst ark:PATH ark:lat.ark``.

    Args:
      path: output ``.ark`` path.
      loglikes: mapping (or iterable of pairs) utterance-id -> matrix (numpy or torch).
      scp: optional ``.scp`` index to write beside it.
    """
    import kaldiio
    items = loglikes.items() if isinstance(loglikes, dict) else loglikes
    spec = "ark:%s" % path if scp is None else "ark,scp:%s,%s" % (path, scp)
    with kaldiio.WriteHelper(spec) as w:
        for key, m in items:
            if hasattr(m, "detach"):
                m = m.detach().cpu().numpy()
            m = np.asarray(m, dtype=np.float32)
            if m.ndim != 2:
                raise DecodeError("utterance %s: expected a 2-D matrix, got shape %s"
                                  % (key, m.shape))
            if not key or any(c.isspace() for c in key):
                raise DecodeError("invalid utterance id %r" % key)
            w(key, m)


def read_loglikes(rspecifier: str) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield ``(utt, matrix)`` from a Kaldi rspecifier (``ark:f.ark``, ``scp:f.scp``, a path)."""
    from ..kaldi.table import SequentialTableReader
    reader = SequentialTableReader(rspecifier, "matrix")  # errors name file, key, offset
    for key, m in reader:
        yield key, np.asarray(m, dtype=np.float32)


def lattice_to_text(lat) -> str:
    """A raw lattice in Kaldi's text form (as ``lattice-copy --write-compact=false ark,t:``):
    ``src dst tid word graph_cost,acoustic_cost`` lines, ``state g,a`` finals."""
    start, arcs, finals = _parse_lattice_text(str(lat))
    lines = []
    for s, d, i, o, g, a in arcs:
        lines.append("%d\t%d\t%d\t%d\t%s,%s" % (s, d, i, o, _num(g), _num(a)))
    for s, (g, a) in finals.items():
        lines.append("%d\t%s,%s" % (s, _num(g), _num(a)))
    return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return "%.7g" % v if v != int(v) else "%d" % int(v)


def write_lattice_ark(path_or_file, lattices: Iterable[Tuple[str, object]],
                      binary: bool = True) -> None:
    """Write raw lattices as a Kaldi ``Lattice`` archive (``LatticeWriter``).

    Binary entries are ``utt \\0B<OpenFst lattice4 vector FST>`` (written by OpenFst via
    kaldifst); text entries are ``utt\\n<lines>\\n\\n``. Kaldi's lattice tools read both,
    and read them as CompactLattice too (converting).
    """
    own = isinstance(path_or_file, (str, os.PathLike))
    f = AtomicFile(path_or_file) if own else path_or_file
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = os.path.join(d, "lat")
            for key, lat in lattices:
                if binary:
                    from .graph import _stderr_to
                    log = os.path.join(d, "openfst.log")
                    with _stderr_to(log):  # OpenFst reports its failures on fd 2
                        written = lat.write(tmp)
                    if not written:
                        why = " ".join(open(log, errors="replace").read().split())
                        raise DecodeError("%s: could not write the lattice of %s%s"
                                          % (tmp, key, (" (%s)" % why) if why else ""))
                    with open(tmp, "rb") as t:
                        f.write(key.encode() + b" \0B" + t.read())
                else:
                    f.write(key.encode() + b" \n" + lattice_to_text(lat).encode() + b"\n")
    except BaseException:
        if own:
            f.discard()
        raise
    if own:
        f.commit()


def open_wspecifier(wspecifier: str):
    """Open a Kaldi archive wspecifier (``ark:f``, ``ark,t:f``, ``-`` = stdout).

    Returns:
      ``(file, binary_mode, close)``: the file is a :class:`~pkwrap.kaldi.io.AtomicFile`;
      call ``close()`` when done (the file gets its name), or ``file.discard()`` on
      failure (nothing is left).
    """
    from pkwrap.kaldi.table import parse_wspecifier
    try:
        spec = parse_wspecifier(wspecifier)  # the one parser: unknown options, no file name
    except ValueError as e:
        raise DecodeError(str(e)) from None
    if spec.scp is not None or spec.ark.lstrip().startswith("|"):
        raise DecodeError("unsupported wspecifier %r (only ark[,t]:FILE or ark:-)" % wspecifier)
    f = AtomicFile(spec.ark)
    return f, spec.binary, f.commit


def write_int_vectors(f, items: Iterable[Tuple[str, Sequence[int]]], binary: bool) -> None:
    """Kaldi ``Int32VectorWriter`` entries (words, alignments) to a binary stream.

    Binary: ``key \0B`` + size byte 4 + int32 count + (size byte 4 + int32) per value;
    text: ``key v1 v2 ... \n``.
    """
    import struct
    for key, vec in items:
        if binary:
            out = [key.encode(), b" \0B", struct.pack("<bi", 4, len(vec))]
            out += [struct.pack("<bi", 4, int(v)) for v in vec]
            f.write(b"".join(out))
        else:
            f.write((key + " " + "".join("%d " % int(v) for v in vec) + "\n").encode())
