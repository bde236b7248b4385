"""Chain egs: Kaldi's ``NnetChainExample`` and ``chain::Supervision``, read, written, merged.

Binary layout of one example (``src/nnet3/nnet-chain-example.cc``,
``nnet-example.cc``, ``nnet-common.cc``, ``src/chain/chain-supervision.cc``)::

    <Nnet3ChainEg> <NumInputs> int32 K
      K x  <NnetIo> name <I1V> int32 N  index-vector  GeneralMatrix  </NnetIo>
    <NumOutputs> int32 1
      <NnetChainSup> name <I1V> int32 N index-vector
        <Supervision> <Weight> float <NumSequences> int32 <FramesPerSeq> int32
          <LabelDim> int32 <End2End> bool
          regular: one FST            | e2e: <Fsts> S x FST </Fsts>
          [<AlignmentPdfs> int32-vector]
        </Supervision>
        <DW2> Vector (deriv weights, may be empty)
      </NnetChainSup>
    </Nnet3ChainEg>

*Index vector* (binary; ``WriteIndexVector``): one byte per Index (n, t, x) when it
differs from the previous one only by |Δt| < 125 (for the first, from (0, 0, 0)): the
signed byte Δt; otherwise byte 127 then n, t, x as int32 (each with its size byte).
Text mode writes ``<I1> n t x`` per Index.

*FST* (binary): OpenFst ``compact_acceptor`` (``StdCompactAcceptorFst``): the OpenFst
header (type "compact_acceptor", arc "standard", version 2, properties, start,
#states, #arcs), then uint32 ``states[S+1]`` offsets into the elements, then per state
its elements ``(int32 label, float weight, int32 nextstate)``, the final weight first
as ``(-1, w, -1)`` when the state is final. Text mode prints the FST (fstprint columns,
start state first) between a newline and an empty line.

Merging (``nnet3-chain-merge-egs``, ``MergeChainExamples``): inputs are appended
example by example with ``n`` renumbered (n += i * stride); output indexes are sorted
by (t, x, n), i.e. t-major; deriv weights follow that order; regular supervision FSTs
are joined with ``fst::Concat`` (last first), ``fst::RmEpsilon`` and a breadth-first
state renumbering, which this module reproduces state for state; e2e FST lists are
appended.

The batch drawn by dimension (S sequences, T output frames per sequence, P pdfs)::

    example.inputs["input"]        float32 [S * T_in][F]  sequence-major (n, then t)
    example.input_indexes["input"] int32   [S * T_in][3]  (n, t, x)
    example.output_indexes         int32   [T * S][3]     t-major: row t*S + s
    example.deriv_weights          float32 [T * S] or None
    example.supervision            Supervision(S, T, P, weight, fst | e2e_fsts)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .fst import (OPENFST_MAGIC, Fst, FstFormatError, check_text_state_ids, read_fst_binary,
                  validate_fst, write_fst_binary)
from .io import KaldiFormatError, KaldiReader, KaldiWriter, check_size, format_float
from .table import (Holder, RandomAccessTableReader, SequentialTableReader, TableWriter,
                    parse_wspecifier)
from .matrix import _native
from .matrix import (CompressedMatrix, GeneralMatrix, read_general_matrix,
                     read_vector, write_general_matrix, write_vector)

__all__ = ["Supervision", "NnetChainExample", "read_chain_egs", "write_chain_egs",
           "merge_chain_egs", "merge_supervision", "scale_supervision_weight",
           "shift_chain_example_times", "read_chain_example", "write_chain_example",
           "CHAIN_EG_HOLDER", "FST_HOLDER", "validate_supervision", "compact_fst_properties", "ChainEgsWriter",
           "merge_chain_egs_stream", "merge_chain_egs_table", "copy_chain_egs",
           "ChainExampleMerger",
           "MinibatchSizeRule", "merge_supervision_fsts", "read_supervision",
           "modify_chain_example_context",
           "write_supervision"]


@dataclass
class Supervision:
    """Kaldi's ``chain::Supervision`` for a minibatch of ``num_sequences`` sequences.

    Args:
      weight: supervision weight w (scales objf, l2 term and derivatives).
      num_sequences: S.
      frames_per_sequence: T (output frames per sequence).
      label_dim: number of pdfs P (labels of the FSTs are pdf+1).
      fst: regular supervision: ONE epsilon-free acceptor for all sequences
        concatenated (sequence 0 first; FST frame tau is sequence tau // T, frame
        tau % T); weights are -log probs read in the log semiring. None for e2e.
      e2e_fsts: end-to-end supervision: one FST per sequence (may have self-loops).
      alignment_pdfs: optional pdf alignment Kaldi may store (may be empty).
    """

    weight: float
    num_sequences: int
    frames_per_sequence: int
    label_dim: int
    fst: Optional[Fst] = None
    e2e_fsts: List[Fst] = field(default_factory=list)
    alignment_pdfs: Optional[np.ndarray] = None

    @property
    def e2e(self) -> bool:
        return len(self.e2e_fsts) > 0


# ============================================================================ FSTs
_PROP = {name: 1 << i for i, name in [
    (0, "Expanded"), (1, "Mutable"), (2, "Error"),
    (16, "Acceptor"), (17, "NotAcceptor"), (18, "IDeterministic"), (19, "NonIDeterministic"),
    (20, "ODeterministic"), (21, "NonODeterministic"), (22, "Epsilons"), (23, "NoEpsilons"),
    (24, "IEpsilons"), (25, "NoIEpsilons"), (26, "OEpsilons"), (27, "NoOEpsilons"),
    (28, "ILabelSorted"), (29, "NotILabelSorted"), (30, "OLabelSorted"),
    (31, "NotOLabelSorted"), (32, "Weighted"), (33, "Unweighted"), (34, "Cyclic"),
    (35, "Acyclic"), (36, "InitialCyclic"), (37, "InitialAcyclic"), (38, "TopSorted"),
    (39, "NotTopSorted"), (40, "Accessible"), (41, "NotAccessible"), (42, "CoAccessible"),
    (43, "NotCoAccessible"), (44, "String"), (45, "NotString"), (46, "WeightedCycles"),
    (47, "UnweightedCycles")]}


def _scc(num_states: int, src: np.ndarray, dst: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Strongly connected component id of every state (iterative Tarjan)."""
    index = np.full(num_states, -1, np.int64)
    low = np.zeros(num_states, np.int64)
    comp = np.full(num_states, -1, np.int64)
    on_stack = np.zeros(num_states, bool)
    stack: List[int] = []
    counter = 0
    ncomp = 0
    dst_l = dst.tolist()
    off = offsets.tolist()
    for root in range(num_states):
        if index[root] >= 0:
            continue
        work = [(root, off[root])]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack[root] = True
        while work:
            v, i = work[-1]
            if i < off[v + 1]:
                work[-1] = (v, i + 1)
                w = dst_l[i]
                if index[w] < 0:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack[w] = True
                    work.append((w, off[w]))
                elif on_stack[w]:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    u = work[-1][0]
                    low[u] = min(low[u], low[v])
                if low[v] == index[v]:
                    while True:
                        w = stack.pop()
                        on_stack[w] = False
                        comp[w] = ncomp
                        if w == v:
                            break
                    ncomp += 1
    return comp


def _reach(num_states: int, seeds: Iterable[int], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """States reachable from ``seeds`` following edges a[i] -> b[i]."""
    order = np.argsort(a, kind="stable")
    a_s, b_s = a[order], b[order]
    starts = np.searchsorted(a_s, np.arange(num_states + 1))
    seen = np.zeros(num_states, bool)
    todo = [s for s in seeds]
    for s in todo:
        seen[s] = True
    while todo:
        s = todo.pop()
        for t in b_s[starts[s]:starts[s + 1]].tolist():
            if not seen[t]:
                seen[t] = True
                todo.append(t)
    return seen


def compact_fst_properties(fst: Fst) -> int:
    """The OpenFst property bits Kaldi writes in a compact-acceptor header:
    ``ComputeProperties(fst, kCopyProperties) | kExpanded`` (OpenFst 1.7)."""
    P = _PROP
    S = fst.num_states
    src = fst.src.astype(np.int64)
    il, ol = fst.ilabel, fst.olabel
    dst = fst.nextstate.astype(np.int64)
    w = fst.weight
    final = fst.final
    props = P["Expanded"]
    # DFS-based properties.
    props |= P["Acyclic"] | P["InitialAcyclic"] | P["Accessible"] | P["CoAccessible"]
    comp = _scc(S, src, dst, fst.state_offsets) if S else np.zeros(0, np.int64)
    if S:
        sizes = np.bincount(comp, minlength=int(comp.max()) + 1)
        in_cycle = (sizes[comp] > 1)
        in_cycle[src[src == dst]] = True
        if in_cycle.any():
            props = (props | P["Cyclic"]) & ~P["Acyclic"]
            if fst.start >= 0 and in_cycle[fst.start]:
                props = (props | P["InitialCyclic"]) & ~P["InitialAcyclic"]
        acc = _reach(S, [fst.start] if fst.start >= 0 else [], src, dst)
        if not acc.all():
            props = (props | P["NotAccessible"]) & ~P["Accessible"]
        coacc = _reach(S, np.nonzero(np.isfinite(final))[0].tolist(), dst, src)
        if not coacc.all():
            props = (props | P["NotCoAccessible"]) & ~P["CoAccessible"]
    # Arc-iteration properties.
    props |= (P["Acceptor"] | P["NoEpsilons"] | P["NoIEpsilons"] | P["NoOEpsilons"]
              | P["ILabelSorted"] | P["OLabelSorted"] | P["Unweighted"] | P["TopSorted"]
              | P["String"] | P["IDeterministic"] | P["ODeterministic"]
              | P["UnweightedCycles"])

    def flip(on: str, off: str):
        nonlocal props
        props = (props | P[on]) & ~P[off]

    A = len(il)
    if A:
        if (il != ol).any():
            flip("NotAcceptor", "Acceptor")
        if ((il == 0) & (ol == 0)).any():
            flip("Epsilons", "NoEpsilons")
        if (il == 0).any():
            flip("IEpsilons", "NoIEpsilons")
        if (ol == 0).any():
            flip("OEpsilons", "NoOEpsilons")
        same_state = src[1:] == src[:-1]
        if (same_state & (il[1:] < il[:-1])).any():
            flip("NotILabelSorted", "ILabelSorted")
        if (same_state & (ol[1:] < ol[:-1])).any():
            flip("NotOLabelSorted", "OLabelSorted")
        if np.unique(np.stack([src, il.astype(np.int64)]), axis=1).shape[1] != A:
            flip("NonIDeterministic", "IDeterministic")
        if np.unique(np.stack([src, ol.astype(np.int64)]), axis=1).shape[1] != A:
            flip("NonODeterministic", "ODeterministic")
        weighted = (w != 0) & np.isfinite(w)
        if weighted.any():
            flip("Weighted", "Unweighted")
            if (comp[src[weighted]] == comp[dst[weighted]]).any():
                flip("WeightedCycles", "UnweightedCycles")
        if (dst <= src).any():
            flip("NotTopSorted", "TopSorted")
        if (dst != src + 1).any():
            flip("NotString", "String")
    is_final = np.isfinite(final)
    if (is_final & (final != 0)).any():
        flip("Weighted", "Unweighted")
    nfinal_before = np.cumsum(is_final) - is_final
    if (nfinal_before > 0).any():
        flip("NotString", "String")
    narcs = np.diff(fst.state_offsets)
    if ((~is_final) & (narcs != 1)).any():
        flip("NotString", "String")
    if fst.start not in (-1, 0):
        flip("NotString", "String")
    return int(props)


_CA_ELEM = np.dtype([("label", "<i4"), ("weight", "<f4"), ("nextstate", "<i4")])


def _read_string(r: KaldiReader, what: str) -> str:
    (n,) = struct.unpack("<i", r.take(4, what + " length"))
    if not 0 <= n <= 256:
        raise r.error("bad %s length %d in FST header" % (what, n))
    return r.take(n, what).decode("latin-1")


def _read_table_fst(r: KaldiReader) -> Fst:
    """An FST archive entry (``VectorFstWriter``: binary OpenFst bytes without Kaldi's
    ``\\0B`` header, or the text form)."""
    r.binary = r.pos + 4 <= r.end and bytes(r.buf[r.pos:r.pos + 4]) == struct.pack(
        "<i", OPENFST_MAGIC)
    return _read_fst(r)


def _write_table_fst(w: KaldiWriter, fst: Fst) -> None:
    if w.binary:
        write_fst_binary(fst, w)
    else:
        _write_fst(w, fst)


def _read_fst(r: KaldiReader) -> Fst:
    """One supervision FST: a binary compact acceptor (or vector FST), or Kaldi's text
    form (``ReadFstKaldi``)."""
    if not r.binary:
        return _read_fst_text(r)
    start_pos = r.pos
    (magic,) = struct.unpack("<i", r.take(4, "FST magic number"))
    if magic != OPENFST_MAGIC:
        raise r.error("not an OpenFst FST (magic %d)" % magic, start_pos)
    fst_type = _read_string(r, "FST type")
    if fst_type == "vector":
        r.pos = start_pos
        return _read_vector_fst(r)
    if fst_type != "compact_acceptor":
        raise r.error("FST type %r is not supported (compact_acceptor or vector)" % fst_type,
                      start_pos)
    arc_type = _read_string(r, "arc type")
    if arc_type not in ("standard", "log"):
        raise r.error("arc type %r is not supported" % arc_type, start_pos)
    version, flags, props, start, nstates, narcs = struct.unpack(
        "<iiQqqq", r.take(40, "FST header"))
    if flags & 3:
        raise r.error("FSTs with symbol tables are not supported", start_pos)
    if flags & 4 or version == 1:
        raise r.error("aligned compact FSTs are not supported", start_pos)
    if nstates < 0 or nstates > 1 << 30 or (start != -1 and not 0 <= start < nstates):
        raise r.error("bad FST header (start %d, %d states)" % (start, nstates), start_pos)
    if (nstates + 1) * 4 > r.end - r.pos:
        raise r.error("FST header declares %d states, more than the %d bytes left can hold"
                      % (nstates, r.end - r.pos), start_pos)
    states = r.take_array("<u4", nstates + 1, "FST state offsets").astype(np.int64)
    if nstates and (states[0] != 0 or (np.diff(states) < 0).any()):
        raise r.error("corrupt compact FST state offsets", start_pos)
    ncomp = int(states[-1]) if nstates else 0
    elems = r.take_array(_CA_ELEM, ncomp, "FST arcs")
    state_of = np.repeat(np.arange(nstates, dtype=np.int64), np.diff(states))
    is_final = elems["label"] == -1
    final = np.full(nstates, np.inf, np.float32)
    final[state_of[is_final]] = elems["weight"][is_final]
    arcs = elems[~is_final]
    arc_state = state_of[~is_final]
    if len(arcs) != narcs:
        raise r.error("compact FST header says %d arcs, data holds %d" % (narcs, len(arcs)),
                      start_pos)
    nxt = arcs["nextstate"]
    if len(nxt) and (nxt.min() < 0 or nxt.max() >= nstates):
        raise r.error("FST arc points to a state outside [0, %d)" % nstates, start_pos)
    offsets = np.zeros(nstates + 1, np.int64)
    np.cumsum(np.bincount(arc_state, minlength=nstates), out=offsets[1:])
    label = arcs["label"].astype(np.int32)
    fst = Fst(num_states=int(nstates), start=int(start), final=final, state_offsets=offsets,
              ilabel=label, olabel=label.copy(), weight=arcs["weight"].astype(np.float32),
              nextstate=nxt.astype(np.int32), arc_type=arc_type, properties=int(props))
    try:
        return validate_fst(fst, "%s%s (FST at byte %d)" % (
            r.name, "" if r.key is None else ", key %r" % r.key, start_pos))
    except FstFormatError as e:
        raise KaldiFormatError(str(e)) from None


class _BufStream:
    """A file-like view of a KaldiReader for fst.read_fst_binary."""

    def __init__(self, r: KaldiReader):
        self.r = r

    def remaining(self) -> int:
        return self.r.end - self.r.pos

    def read(self, n: int) -> bytes:
        r = self.r
        b = bytes(r.buf[r.pos:min(r.pos + n, r.end)])
        r.pos += len(b)
        return b


def _read_vector_fst(r: KaldiReader) -> Fst:
    try:
        return read_fst_binary(_BufStream(r), "%s%s" % (r.name, "" if r.key is None
                                                        else ", key %r" % r.key))
    except FstFormatError as e:
        raise KaldiFormatError(str(e))


def _find(buf, sub: bytes, start: int, end: int) -> int:
    """buf.find for bytes/mmap, also for other buffers."""
    if hasattr(buf, "find"):
        return buf.find(sub, start, end)
    i = bytes(buf[start:end]).find(sub)
    return -1 if i < 0 else start + i


def _read_fst_text(r: KaldiReader) -> Fst:
    buf = r.buf
    while r.pos < r.end and buf[r.pos] in b" \t\r\v\f":
        r.pos += 1
    if r.pos >= r.end or buf[r.pos] != 10:
        raise r.error("text FST: expected a newline before the FST")
    r.pos += 1
    arcs, finals = [], {}
    start, ids, nlines = -1, [], 0
    text_pos = r.pos
    while True:
        if r.pos >= r.end:
            raise r.error("text FST: no empty line at the end of the FST")
        nl = _find(buf, b"\n", r.pos, r.end)
        nl = (r.end if nl < 0 else nl) - r.pos
        line = bytes(buf[r.pos:r.pos + nl]).decode("ascii", errors="replace")
        line_pos = r.pos
        r.pos = min(r.end, r.pos + nl + 1)
        col = line.split()
        if not col:
            break
        nlines += 1
        try:
            s = int(col[0])
            if start < 0:
                start = s
            ids.append(s)
            if len(col) == 1:
                finals[s] = 0.0
            elif len(col) == 2:
                finals[s] = float(col[1])
            elif len(col) in (4, 5):
                d = int(col[1])
                wt = float(col[4]) if len(col) == 5 else 0.0
                if len(col) == 5 and wt == float("inf"):
                    raise ValueError("arc weight is Zero")
                arcs.append((s, int(col[2]), int(col[3]), wt, d))
                ids.append(d)
            else:
                raise ValueError("%d columns" % len(col))
        except ValueError as e:
            raise r.error("text FST: bad line %r (%s)" % (line[:80], e), line_pos)
    if not ids:
        return Fst.from_arcs(0, -1, [])
    where = "%s%s (text FST at byte %d)" % (r.name, "" if r.key is None else ", key %r" % r.key,
                                            text_pos)
    try:
        nstates = check_text_state_ids(ids, nlines, where)
        return validate_fst(Fst.from_arcs(nstates, start, arcs, finals), where)
    except FstFormatError as e:
        raise KaldiFormatError(str(e)) from None


def _write_fst(w: KaldiWriter, fst: Fst) -> None:
    if not w.binary:
        w.write(b"\n" + _fst_text(fst).encode() + b"\n")
        return
    if fst.start < 0 and fst.num_states:
        raise ValueError("cannot write an FST without a start state")
    if fst.num_arcs and not np.array_equal(fst.ilabel, fst.olabel):
        raise ValueError("supervision FST is not an acceptor (ilabel != olabel); Kaldi "
                         "writes supervision as a compact acceptor")
    out = []
    for s in ("compact_acceptor", fst.arc_type):
        b = s.encode("latin-1")
        out.append(struct.pack("<i", len(b)) + b)
    S = fst.num_states
    props = compact_fst_properties(fst)
    header = struct.pack("<i", OPENFST_MAGIC) + b"".join(out) + struct.pack(
        "<iiQqqq", 2, 0, props, fst.start, S, fst.num_arcs)
    is_final = np.isfinite(fst.final)
    counts = np.diff(fst.state_offsets) + is_final
    states = np.zeros(S + 1, np.int64)
    np.cumsum(counts, out=states[1:])
    elems = np.empty(int(states[-1]) if S else 0, dtype=_CA_ELEM)
    # element position of each arc: its state's block, after the final element
    arc_state = fst.src.astype(np.int64)
    arc_pos = (states[:-1][arc_state] + is_final[arc_state]
               + (np.arange(fst.num_arcs) - fst.state_offsets[:-1][arc_state]))
    fpos = states[:-1][is_final]
    elems["label"][fpos] = -1
    elems["weight"][fpos] = fst.final[is_final]
    elems["nextstate"][fpos] = -1
    elems["label"][arc_pos] = fst.ilabel
    elems["weight"][arc_pos] = fst.weight
    elems["nextstate"][arc_pos] = fst.nextstate
    w.write(header + states.astype("<u4").tobytes() + elems.tobytes())


def _fst_text(fst: Fst) -> str:
    """FstPrinter layout as Kaldi writes it in text egs (7 significant digits)."""
    lines = []
    order = ([fst.start] if fst.start >= 0 else []) + [s for s in range(fst.num_states)
                                                       if s != fst.start]
    for s in order:
        b, e = int(fst.state_offsets[s]), int(fst.state_offsets[s + 1])
        for i in range(b, e):
            f = "%d\t%d\t%d\t%d" % (s, fst.nextstate[i], fst.ilabel[i], fst.olabel[i])
            wt = float(fst.weight[i])
            lines.append(f if wt == 0.0 else f + "\t" + format_float(wt))
        fw = float(fst.final[s])
        if np.isfinite(fw):
            lines.append(str(s) if fw == 0.0 else "%d\t%s" % (s, format_float(fw)))
    return "".join(x + "\n" for x in lines)


# ============================================================================ indexes
_I32 = struct.Struct("<i")


def _read_index_vector(r: KaldiReader) -> np.ndarray:
    """ReadIndexVector -> int32 ``[N][3]`` (n, t, x)."""
    r.expect_token("<I1V>")
    n = r.read_int32()
    # each entry takes at least one byte (binary) or a "<I1> " token (text)
    check_size(n, 1 if r.binary else 5, r.end - r.pos, "Index-vector size", r.error("").args[0][:-2])
    out = np.zeros((n, 3), np.int64)
    if not r.binary:
        for i in range(n):
            r.expect_token("<I1>")
            out[i] = (r.read_int32(), r.read_int32(), r.read_int32())
        return out.astype(np.int32)
    buf, p, end = r.buf, r.pos, r.end
    if p + n > end:
        raise r.error("truncated Index vector (%d entries, %d bytes left)" % (n, end - p))
    # Common case: every entry is a one-byte delta (no 127 escapes).
    chunk = np.frombuffer(buf, dtype=np.int8, count=n, offset=p)
    if n and not (chunk == 127).any() and (np.abs(chunk.astype(np.int16)) < 125).all():
        out[:, 1] = np.cumsum(chunk, dtype=np.int64)
        r.pos = p + n
        return out.astype(np.int32)
    pn = pt = px = 0
    for i in range(n):
        if p >= end:
            r.pos = p
            raise r.error("truncated Index vector (entry %d of %d)" % (i, n))
        c = buf[p]
        c = c - 256 if c > 127 else c
        p += 1
        if -125 < c < 125:
            if i == 0:
                pn, pt, px = 0, c, 0
            else:
                pt += c
        elif c == 127:
            if p + 15 > end:
                r.pos = p
                raise r.error("truncated Index vector (entry %d of %d)" % (i, n))
            if buf[p] != 4 or buf[p + 5] != 4 or buf[p + 10] != 4:
                r.pos = p
                raise r.error("corrupt Index vector entry %d (expected int32s)" % i)
            pn = _I32.unpack_from(buf, p + 1)[0]
            pt = _I32.unpack_from(buf, p + 6)[0]
            px = _I32.unpack_from(buf, p + 11)[0]
            p += 15
        else:
            r.pos = p - 1
            raise r.error("unexpected byte %d in Index vector (entry %d)" % (c, i))
        out[i, 0], out[i, 1], out[i, 2] = pn, pt, px
    r.pos = p
    return out.astype(np.int32)


def _write_index_vector(w: KaldiWriter, idx: np.ndarray) -> None:
    idx = np.asarray(idx, dtype=np.int64).reshape(-1, 3)
    w.write_token("<I1V>")
    w.write_int32(len(idx))
    if not w.binary:
        w.write("".join("<I1> %d %d %d " % (a, b, c) for a, b, c in idx.tolist()).encode())
        return
    n = len(idx)
    if n == 0:
        return
    prev = np.vstack([np.zeros((1, 3), np.int64), idx[:-1]])
    dt = idx[:, 1] - prev[:, 1]
    small = (idx[:, 0] == prev[:, 0]) & (idx[:, 2] == prev[:, 2]) & (dt > -125) & (dt < 125)
    if small.all():
        w.write(dt.astype(np.int8).tobytes())
        return
    parts = []
    for i in range(n):
        if small[i]:
            parts.append(struct.pack("<b", int(dt[i])))
        else:
            a, b, c = (int(v) for v in idx[i])
            parts.append(b"\x7f\x04" + _I32.pack(a) + b"\x04" + _I32.pack(b) + b"\x04"
                         + _I32.pack(c))
    w.write(b"".join(parts))


# ============================================================================ example
def _torch():
    import torch
    return torch


@dataclass
class NnetChainExample:
    """One Kaldi chain example (or a merged minibatch of them).

    Args:
      inputs: name -> float32 tensor ``[N][F]`` with Kaldi's rows (decompressed).
      input_indexes: name -> int32 ``[N][3]`` (n, t, x) of those rows.
      output_name: the chain output's name (normally "output").
      output_indexes: int32 ``[T*S][3]``, t-major (row t*S + s).
      supervision: the :class:`Supervision` (``fst`` or ``e2e_fsts``).
      deriv_weights: float32 ``[T*S]`` (same order as output_indexes), or None.

    Inputs read from a compressed matrix keep its bytes (``stored_inputs``), and are
    written back byte-identical while the tensor still holds the decoded values.
    """

    inputs: Dict[str, "object"]
    input_indexes: Dict[str, np.ndarray]
    output_name: str
    output_indexes: np.ndarray
    supervision: Supervision
    deriv_weights: Optional["object"] = None
    stored_inputs: Dict[str, GeneralMatrix] = field(default_factory=dict, repr=False)

    @property
    def num_sequences(self) -> int:
        return self.supervision.num_sequences

    @property
    def frames_per_sequence(self) -> int:
        return self.supervision.frames_per_sequence

    def copy(self) -> "NnetChainExample":
        import copy as _copy
        return _copy.deepcopy(self)


def _read_nnet_io(r: KaldiReader):
    r.expect_token("<NnetIo>")
    name = r.read_token()
    idx = _read_index_vector(r)
    mat = read_general_matrix(r)
    r.expect_token("</NnetIo>")
    rows = mat.shape[0]
    if rows != len(idx):
        raise r.error("input %r has %d rows but %d indexes" % (name, rows, len(idx)))
    return name, idx, mat


def _check_output_indexes(r: KaldiReader, idx: np.ndarray, sup: Supervision) -> None:
    """NnetChainSupervision::CheckDim."""
    S, T = sup.num_sequences, sup.frames_per_sequence
    if len(idx) != S * T or T <= 1:
        raise r.error("output has %d indexes, supervision says %d sequences x %d frames"
                      % (len(idx), S, T))
    first = int(idx[0, 1])
    skip = int(idx[S, 1]) - first
    want = np.zeros((T * S, 3), np.int64)
    want[:, 0] = np.tile(np.arange(S), T)
    want[:, 1] = first + skip * np.repeat(np.arange(T), S)
    if not np.array_equal(idx, want):
        raise r.error("output indexes are not in Kaldi's t-major (t, n) order")


def validate_supervision(sup: Supervision, where: str) -> Supervision:
    """Kaldi's ``Supervision::Check``, done on every read: a finite weight; FSTs that are
    epsilon-free acceptors with labels in ``[1, label_dim]`` (pdf-id + 1) and finite
    weights; a regular FST is time-synchronous (states in topological order, every
    path from the start has exactly ``num_sequences * frames_per_sequence`` arcs; final
    states only there); e2e FSTs have no self-loop of negative cost (probability > 1).

    Raises:
      FstFormatError: naming ``where`` and the problem.
    """
    if not np.isfinite(sup.weight):
        raise FstFormatError("%s: supervision weight %r is not finite" % (where, sup.weight))
    fsts = sup.e2e_fsts if sup.e2e else [sup.fst]
    for i, f in enumerate(fsts):
        name = "%s: supervision FST%s" % (where, " %d" % i if sup.e2e else "")
        validate_fst(f, name, num_ilabels=sup.label_dim + 1, epsilon_free=True)
        if not np.array_equal(f.ilabel, f.olabel):
            raise FstFormatError("%s is not an acceptor" % name)
        if not np.isfinite(f.weight).all():
            raise FstFormatError("%s has an infinite arc weight" % name)
        if f.num_states == 0:
            raise FstFormatError("%s is empty" % name)
        if sup.e2e:
            loops = (f.nextstate == f.src) & (f.weight < 0)
            if loops.any():
                s = int(f.src[np.flatnonzero(loops)[0]])
                raise FstFormatError("%s: state %d has a self-loop of negative cost %g "
                                     "(probability > 1)" % (name, s, f.weight[loops][0]))
        else:
            _check_time_synchronous(f, sup.num_sequences * sup.frames_per_sequence, name)
    return sup


def _check_time_synchronous(f: Fst, num_frames: int, name: str) -> None:
    src = f.src
    if len(src) and (f.nextstate <= src).any():
        raise FstFormatError("%s: states are not in topological order (an arc goes back or "
                             "loops)" % name)
    time = [-1] * f.num_states
    time[f.start] = 0
    off = f.state_offsets.tolist()
    nxt = f.nextstate.tolist()
    for s in range(f.num_states):
        t = time[s]
        if t < 0:
            continue  # unreachable
        for d in nxt[off[s]:off[s + 1]]:
            if time[d] < 0:
                time[d] = t + 1
            elif time[d] != t + 1:
                raise FstFormatError("%s: not time-synchronous (state %d is reached at "
                                     "frames %d and %d)" % (name, d, time[d], t + 1))
    final_t = {time[s] for s in np.flatnonzero(np.isfinite(f.final)).tolist() if time[s] >= 0}
    if final_t != {num_frames}:
        raise FstFormatError("%s: paths have %s frames, the supervision %d"
                             % (name, sorted(final_t) or "no final state / 0", num_frames))


def read_supervision(r: KaldiReader) -> Supervision:
    """``chain::Supervision::Read`` at the reader's position (binary or text), as in
    egs and in ``chain-get-supervision`` archives."""
    r.expect_token("<Supervision>")
    r.expect_token("<Weight>")
    weight = r.read_float()
    r.expect_token("<NumSequences>")
    S = r.read_int32()
    r.expect_token("<FramesPerSeq>")
    T = r.read_int32()
    r.expect_token("<LabelDim>")
    P = r.read_int32()
    r.expect_token("<End2End>")
    e2e = r.read_bool()
    if S <= 0 or T <= 0 or P <= 0:
        raise r.error("bad supervision sizes (%d sequences, %d frames, label dim %d)" % (S, T, P))
    fst, e2e_fsts = None, []
    if not e2e:
        fst = _read_fst(r)
    else:
        r.expect_token("<Fsts>")
        e2e_fsts = [_read_fst(r) for _ in range(S)]
        r.expect_token("</Fsts>")
    ali = None
    if r.peek_token() == ord("A"):
        r.expect_token("<AlignmentPdfs>")
        ali = r.read_int_vector()
    r.expect_token("</Supervision>")
    sup = Supervision(weight=float(np.float32(weight)), num_sequences=S, frames_per_sequence=T,
                      label_dim=P, fst=fst, e2e_fsts=e2e_fsts, alignment_pdfs=ali)
    try:
        return validate_supervision(sup, r.name + ("" if r.key is None else ", key %r" % r.key))
    except FstFormatError as e:
        raise KaldiFormatError(str(e)) from None


def read_chain_example(r: KaldiReader) -> NnetChainExample:
    """``NnetChainExample::Read`` at the reader's position (mode from ``r.binary``)."""
    torch = _torch()
    r.expect_token("<Nnet3ChainEg>")
    r.expect_token("<NumInputs>")
    k = r.read_int32()
    if not 1 <= k <= 1000000:
        raise r.error("invalid number of inputs %d" % k)
    inputs, input_indexes, stored = {}, {}, {}
    for _ in range(k):
        name, idx, mat = _read_nnet_io(r)
        if isinstance(mat, np.ndarray):
            arr = mat
        else:
            arr = mat.to_numpy()
            stored[name] = mat
        if not np.isfinite(arr).all():  # as get-egs refuses such features
            raise r.error("input %r has NaN or infinite values" % name)
        inputs[name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        input_indexes[name] = idx
    r.expect_token("<NumOutputs>")
    m = r.read_int32()
    if m != 1:
        raise r.error("examples with %d outputs are not supported (need exactly 1)" % m)
    r.expect_token("<NnetChainSup>")
    out_name = r.read_token()
    out_idx = _read_index_vector(r)
    sup = read_supervision(r)
    tok = r.read_token()
    dw = None
    if tok != "</NnetChainSup>":
        if tok == "<DW>":
            raise r.error("old-style <DW> deriv weights are not supported")
        if tok != "<DW2>":
            raise r.error("expected <DW2> or </NnetChainSup>, got %r" % tok[:40])
        v = read_vector(r)
        if len(v):
            if len(v) != len(out_idx):
                raise r.error("deriv_weights has %d entries, output has %d indexes"
                              % (len(v), len(out_idx)))
            if not (np.isfinite(v).all() and (v >= 0).all()):
                raise r.error("deriv_weights has negative, NaN or infinite entries")
            dw = torch.from_numpy(v.astype(np.float32))
        r.expect_token("</NnetChainSup>")
    _check_output_indexes(r, out_idx, sup)
    r.expect_token("</Nnet3ChainEg>")
    return NnetChainExample(inputs=inputs, input_indexes=input_indexes, output_name=out_name,
                            output_indexes=out_idx, supervision=sup, deriv_weights=dw,
                            stored_inputs=stored)


def _input_matrix(eg: NnetChainExample, name: str, compress: bool) -> GeneralMatrix:
    t = eg.inputs[name]
    arr = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    arr = np.asarray(arr, dtype=np.float32)
    stored = eg.stored_inputs.get(name)
    if stored is not None and tuple(stored.shape) == arr.shape:
        if np.array_equal(stored.to_numpy(), arr):
            return stored  # unchanged: re-emit Kaldi's bytes
    if compress:
        return CompressedMatrix.from_matrix(arr)
    return arr


def write_supervision(w: KaldiWriter, sup: Supervision) -> None:
    """``chain::Supervision::Write`` (binary: compact-acceptor FSTs; text: fstprint)."""
    w.write_token("<Supervision>")
    w.write_token("<Weight>")
    w.write_float(sup.weight)
    w.write_token("<NumSequences>")
    w.write_int32(sup.num_sequences)
    w.write_token("<FramesPerSeq>")
    w.write_int32(sup.frames_per_sequence)
    w.write_token("<LabelDim>")
    w.write_int32(sup.label_dim)
    w.write_token("<End2End>")
    w.write_bool(sup.e2e)
    if not sup.e2e:
        if sup.fst is None:
            raise ValueError("regular supervision without an FST")
        _write_fst(w, sup.fst)
    else:
        if len(sup.e2e_fsts) != sup.num_sequences:
            raise ValueError("e2e supervision has %d FSTs for %d sequences"
                             % (len(sup.e2e_fsts), sup.num_sequences))
        w.write_token("<Fsts>")
        for f in sup.e2e_fsts:
            _write_fst(w, f)
        w.write_token("</Fsts>")
    if sup.alignment_pdfs is not None and len(sup.alignment_pdfs):
        w.write_token("<AlignmentPdfs>")
        w.write_int_vector(sup.alignment_pdfs)
    w.write_token("</Supervision>")


_read_supervision = read_supervision  # older private name, still imported elsewhere


def write_chain_example(w: KaldiWriter, eg: NnetChainExample, compress: bool = False) -> None:
    """``NnetChainExample::Write``.

    Args:
      w: writer (binary or text).
      eg: the example.
      compress: compress inputs that are not already stored compressed (Kaldi's
        ``--compress``; speech-feature format when > 8 rows).
    """
    sup = eg.supervision
    w.write_token("<Nnet3ChainEg>")
    w.write_token("<NumInputs>")
    w.write_int32(len(eg.inputs))
    if not eg.inputs:
        raise ValueError("cannot write an NnetChainExample without inputs")
    if not w.binary:
        w.write(b"\n")
    for name in eg.inputs:
        mat = _input_matrix(eg, name, compress)
        idx = eg.input_indexes[name]
        if mat.shape[0] != len(idx):
            raise ValueError("input %r: %d rows but %d indexes" % (name, mat.shape[0], len(idx)))
        w.write_token("<NnetIo>")
        w.write_token(name)
        _write_index_vector(w, idx)
        write_general_matrix(w, mat)
        w.write_token("</NnetIo>")
        if not w.binary:
            w.write(b"\n")
    w.write_token("<NumOutputs>")
    w.write_int32(1)
    if not w.binary:
        w.write(b"\n")
    w.write_token("<NnetChainSup>")
    w.write_token(eg.output_name)
    _write_index_vector(w, eg.output_indexes)
    write_supervision(w, sup)
    w.write_token("<DW2>")
    dw = eg.deriv_weights
    dwv = np.zeros(0, np.float32) if dw is None else np.asarray(
        dw.detach().cpu().numpy() if hasattr(dw, "detach") else dw, dtype=np.float32)
    write_vector(w, dwv)
    w.write_token("</NnetChainSup>")
    if not w.binary:
        w.write(b"\n")
    w.write_token("</Nnet3ChainEg>")


# ============================================================================ tables
CHAIN_EG_HOLDER = Holder(read_chain_example, write_chain_example)
#: FST archives as Kaldi's ``VectorFstWriter`` writes them (``compile-train-graphs``);
#: every FST read is validated (:func:`pkwrap.kaldi.fst.validate_fst`).
FST_HOLDER = Holder(_read_table_fst, _write_table_fst, binary_header=False)
"""Table holder for ``NnetChainExample`` (binary or text)."""


def read_chain_egs(spec: str) -> Iterator[Tuple[str, NnetChainExample]]:
    """Yield ``(key, NnetChainExample)`` from an rspecifier (``ark:``, ``scp:``,
    ``ark,t:``, ``-``, a plain path).

    Example::

        for key, eg in read_chain_egs("ark:exp/chain/egs/cegs.1.ark"):
            x = eg.inputs["input"]          # float32 [S*T_in][F]
            sup = eg.supervision            # Supervision
    """
    return iter(SequentialTableReader(spec, CHAIN_EG_HOLDER))


class ChainEgsWriter:
    """Write chain egs to a wspecifier; a context manager.

    Args:
      wspec: ``ark:f``, ``ark,t:f``, ``ark,scp:a.ark,a.scp``, ``ark:-``.
      binary: False forces text mode (as ``ark,t:``).
      compress: compress inputs not already compressed.
    """

    def __init__(self, wspec: str, binary: bool = True, compress: bool = False):
        spec = parse_wspecifier(wspec)
        if not binary and spec.binary:
            head, _, rest = wspec.partition(":")
            wspec = head + ",t:" + rest
        self._w = TableWriter(wspec, Holder(read_chain_example,
                                            lambda w, eg: write_chain_example(w, eg, compress)))

    def write(self, key: str, eg: NnetChainExample) -> None:
        self._w.write_item(key, eg)

    def close(self) -> None:
        self._w.close()

    def abort(self) -> None:
        """Give up: nothing is left under the output names."""
        self._w.abort()

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            self.close()
        else:
            self.abort()
        return False


def write_chain_egs(wspec: str, items: Iterable[Tuple[str, NnetChainExample]],
                    binary: bool = True, compress: bool = False) -> int:
    """Write ``(key, example)`` pairs; returns how many were written.

    Args:
      wspec: a wspecifier (``ark:``, ``ark,t:``, ``ark,scp:a.ark,a.scp``, ``ark:-``).
      items: the pairs.
      binary: False writes text (same as ``ark,t:``).
      compress: compress inputs that are not already compressed.
    """
    n = 0
    with ChainEgsWriter(wspec, binary=binary, compress=compress) as w:
        for key, eg in items:
            w.write(key, eg)
            n += 1
    return n


# ============================================================================ merging
def _fst_concat(fsts: Sequence[Fst]) -> Tuple[int, List[List[list]], List[float]]:
    """Kaldi's loop of ``fst::Concat(input[i], &out)`` for i = n-2 .. 0 (out starts as
    input[n-1]): returns (start, arcs per state [il, ol, w, next], finals)."""
    arcs: List[List[list]] = []
    finals: List[float] = []

    def append(f: Fst) -> int:
        off = len(arcs)
        for s in range(f.num_states):
            b, e = int(f.state_offsets[s]), int(f.state_offsets[s + 1])
            arcs.append([[int(f.ilabel[i]), int(f.olabel[i]), np.float32(f.weight[i]),
                          int(f.nextstate[i]) + off] for i in range(b, e)])
            finals.append(np.float32(f.final[s]))
        return off

    last = fsts[-1]
    append(last)
    start = last.start
    for f in reversed(fsts[:-1]):
        if f.start < 0:
            raise ValueError("merge: a supervision FST has no start state")
        start2 = start
        off = len(arcs)
        for s in range(f.num_states):
            b, e = int(f.state_offsets[s]), int(f.state_offsets[s + 1])
            sa = []
            if np.isfinite(f.final[s]):
                sa.append([0, 0, np.float32(f.final[s]), start2])
            sa.extend([int(f.ilabel[i]), int(f.olabel[i]), np.float32(f.weight[i]),
                       int(f.nextstate[i]) + off] for i in range(b, e))
            arcs.append(sa)
            finals.append(np.float32(np.inf))
        start = f.start + off
    return start, arcs, finals


def _rm_epsilon_connect(start: int, arcs: List[List[list]], finals: List[float]):
    """``fst::RmEpsilon`` (tropical, connect=true) followed by its ``Connect``."""
    S = len(arcs)
    noneps_in = [False] * S
    noneps_in[start] = True
    for sa in arcs:
        for a in sa:
            if a[0] != 0 or a[1] != 0:
                noneps_in[a[3]] = True
    inf = np.float32(np.inf)
    new_arcs: List[Optional[List[list]]] = [None] * S
    new_finals = list(finals)
    for s in range(S):
        if not noneps_in[s]:
            continue
        # epsilon closure with tropical shortest distances (Dijkstra-like relaxation)
        dist = {s: np.float32(0.0)}
        todo = [s]
        while todo:
            q = todo.pop()
            for a in arcs[q]:
                if a[0] == 0 and a[1] == 0:
                    nd = np.float32(dist[q] + a[2])
                    if a[3] not in dist or nd < dist[a[3]]:
                        dist[a[3]] = nd
                        todo.append(a[3])
        # RmEpsilonState::Expand: visit the closure depth-first from s (a stack).
        out: List[list] = []
        where: Dict[Tuple[int, int, int], int] = {}
        fin = inf
        visited = set()
        stack = [s]
        while stack:
            q = stack.pop()
            if q in visited:
                continue
            visited.add(q)
            for a in arcs[q]:
                wt = np.float32(dist[q] + a[2])
                if a[0] == 0 and a[1] == 0:
                    if a[3] not in visited:
                        stack.append(a[3])
                else:
                    key = (a[0], a[1], a[3])
                    if key in where:
                        j = where[key]
                        out[j][2] = min(out[j][2], wt)
                    else:
                        where[key] = len(out)
                        out.append([a[0], a[1], wt, a[3]])
            fin = min(fin, np.float32(dist[q] + finals[q]))
        new_finals[s] = fin
        new_arcs[s] = out[::-1]  # RmEpsilon adds arcs_.back() first
    for s in range(S):
        if new_arcs[s] is None:
            new_arcs[s] = []
    # Connect: keep states that are accessible and coaccessible.
    acc = [False] * S
    acc[start] = True
    todo = [start]
    while todo:
        q = todo.pop()
        for a in new_arcs[q]:
            if not acc[a[3]]:
                acc[a[3]] = True
                todo.append(a[3])
    rev: List[List[int]] = [[] for _ in range(S)]
    for q in range(S):
        for a in new_arcs[q]:
            rev[a[3]].append(q)
    coacc = [bool(np.isfinite(new_finals[q])) for q in range(S)]
    todo = [q for q in range(S) if coacc[q]]
    while todo:
        q = todo.pop()
        for p in rev[q]:
            if not coacc[p]:
                coacc[p] = True
                todo.append(p)
    keep = [acc[q] and coacc[q] for q in range(S)]
    newid, n = [-1] * S, 0
    for q in range(S):
        if keep[q]:
            newid[q] = n
            n += 1
    out_arcs = [[[a[0], a[1], a[2], newid[a[3]]] for a in new_arcs[q] if keep[a[3]]]
                for q in range(S) if keep[q]]
    out_finals = [new_finals[q] for q in range(S) if keep[q]]
    return (newid[start] if keep[start] else -1), out_arcs, out_finals


def _sort_bfs(start: int, arcs: List[List[list]], finals: List[float]) -> Fst:
    """Kaldi's ``SortBreadthFirstSearch`` + ``fst::StateSort`` -> Fst."""
    S = len(arcs)
    order = [-1] * S
    seen = [False] * S
    from collections import deque
    dq = deque([start])
    seen[start] = True
    k = 0
    while dq:
        q = dq.popleft()
        order[q] = k
        k += 1
        for a in arcs[q]:
            if not seen[a[3]]:
                seen[a[3]] = True
                dq.append(a[3])
    if k != S:
        raise ValueError("merge: supervision FST is not connected")
    inv = [0] * S
    for q in range(S):
        inv[order[q]] = q
    tuples = []
    fin = {}
    for new in range(S):
        q = inv[new]
        for a in arcs[q]:
            tuples.append((new, a[0], a[1], float(a[2]), order[a[3]]))
        if np.isfinite(finals[q]):
            fin[new] = float(finals[q])
    return Fst.from_arcs(S, 0, tuples, fin)


def merge_supervision_fsts(fsts: Sequence[Fst], native: Optional[bool] = None) -> Fst:
    """The FST part of Kaldi's ``MergeSupervision``: ``fst::Concat`` of ``fsts`` (last
    first), ``fst::RmEpsilon`` + ``Connect``, breadth-first state order.

    Args:
      fsts: the sequences' supervision FSTs, in minibatch order.
      native: use the C++ implementation (None: when built); False runs the pure
        Python reference (same algorithm, used to test the C++ one).
    """
    if native is None:
        native = _native is not None
    if native:
        if _native is None:
            raise RuntimeError("pkwrap._pkwrap is not built: run `make build`")
        try:
            start, final, off, il, ol, w, nx = _native.merge_supervision_fsts(
                [(f.start, f.final, f.state_offsets, f.ilabel, f.olabel, f.weight,
                  f.nextstate) for f in fsts])
        except ValueError as e:
            raise ValueError(str(e))
        return Fst(num_states=len(final), start=int(start), final=final, state_offsets=off,
                   ilabel=il, olabel=ol, weight=w, nextstate=nx)
    start, arcs, finals = _fst_concat(fsts)
    start, arcs, finals = _rm_epsilon_connect(start, arcs, finals)
    if start < 0:
        raise ValueError("merge: the merged FST is empty")
    return _sort_bfs(start, arcs, finals)


def merge_supervision(sups: Sequence[Supervision], native: Optional[bool] = None) -> Supervision:
    """Kaldi's ``chain::MergeSupervision`` (see the module docstring).

    Args:
      sups: supervisions of single sequences (or e2e ones), in minibatch order.
      native: see :func:`merge_supervision_fsts`.
    """
    if not sups:
        raise ValueError("merge_supervision: nothing to merge")
    first = sups[0]
    if len(sups) == 1:
        import copy as _copy
        return _copy.deepcopy(first)
    for i, s in enumerate(sups):
        if s.weight != first.weight:
            raise ValueError("merge: supervision weights differ (%g for input 0, %g for "
                             "input %d)" % (first.weight, s.weight, i))
        if s.frames_per_sequence != first.frames_per_sequence:
            raise ValueError("merge: frames_per_sequence differ (%d for input 0, %d for "
                             "input %d)" % (first.frames_per_sequence, s.frames_per_sequence, i))
        if s.label_dim != first.label_dim:
            raise ValueError("merge: label_dim differs (%d vs %d for input %d)"
                             % (first.label_dim, s.label_dim, i))
        if s.e2e != first.e2e:
            raise ValueError("merge: cannot merge e2e with regular supervision (input %d)" % i)
    if first.e2e:
        for i, s in enumerate(sups):
            if len(s.e2e_fsts) != 1:
                raise ValueError("merge: e2e input %d already holds %d sequences"
                                 % (i, len(s.e2e_fsts)))
        return Supervision(weight=first.weight, num_sequences=len(sups),
                           frames_per_sequence=first.frames_per_sequence,
                           label_dim=first.label_dim, fst=None,
                           e2e_fsts=[s.e2e_fsts[0] for s in sups], alignment_pdfs=None)
    for i, s in enumerate(sups):
        if s.alignment_pdfs is not None and len(s.alignment_pdfs):
            raise ValueError("merge: input %d has alignment_pdfs (Kaldi cannot merge those)" % i)
        if s.fst is None:
            raise ValueError("merge: regular input %d has no FST" % i)
    fst = merge_supervision_fsts([s.fst for s in sups], native=native)
    last = sups[-1]
    return Supervision(weight=last.weight, num_sequences=last.num_sequences + len(sups) - 1,
                       frames_per_sequence=last.frames_per_sequence, label_dim=last.label_dim,
                       fst=fst, e2e_fsts=[], alignment_pdfs=None)


def merge_chain_egs(egs: Sequence[NnetChainExample], compress: bool = False) -> NnetChainExample:
    """Merge single examples into a minibatch exactly as ``nnet3-chain-merge-egs``.

    Args:
      egs: the examples, in minibatch order (sequence i of the result is egs[i]).
      compress: compress the merged inputs (Kaldi's ``--compress``; default false).
    Returns:
      the merged :class:`NnetChainExample` (inputs sorted by name, as Kaldi does).
    """
    torch = _torch()
    if not egs:
        raise ValueError("merge_chain_egs: no examples")
    n_egs = len(egs)
    names = sorted(set(n for eg in egs for n in eg.inputs))
    first_name = next(iter(egs[0].inputs))
    stride = int(np.asarray(egs[0].input_indexes[first_name])[:, 0].max()) + 1
    inputs, input_indexes, stored = {}, {}, {}
    for name in names:
        mats, idxs, dims = [], [], set()
        for i, eg in enumerate(egs):
            if name not in eg.inputs:
                continue
            x = eg.inputs[name]
            mats.append(x.detach().cpu().float() if hasattr(x, "detach")
                        else torch.as_tensor(np.asarray(x, np.float32)))
            dims.add(mats[-1].shape[1])
            idx = np.array(eg.input_indexes[name], dtype=np.int64)
            if (idx[:, 0] >= stride).any():
                raise ValueError("merge: example %d input %r has n >= %d (inconsistent "
                                 "merged egs)" % (i, name, stride))
            idx[:, 0] += i * stride
            idxs.append(idx)
        if len(dims) != 1:
            raise ValueError("merge: inconsistent feature dims for %r: %s" % (name, sorted(dims)))
        inputs[name] = torch.cat(mats, 0).contiguous()
        input_indexes[name] = np.concatenate(idxs).astype(np.int32)
        if compress:
            cm = CompressedMatrix.from_matrix(inputs[name].numpy())
            stored[name] = cm
            inputs[name] = torch.from_numpy(cm.to_numpy())
    out_names = {eg.output_name for eg in egs}
    if len(out_names) != 1:
        raise ValueError("merge: examples have different output names %s" % sorted(out_names))
    out_idx = []
    for i, eg in enumerate(egs):
        idx = np.array(eg.output_indexes, dtype=np.int64)
        if (idx[:, 0] != 0).any():
            raise ValueError("merge: example %d is already merged (output n != 0)" % i)
        idx[:, 0] = i
        out_idx.append(idx)
    oi = np.concatenate(out_idx)
    order = np.lexsort((oi[:, 0], oi[:, 2], oi[:, 1]))  # Index::operator<: t, then x, n
    oi = oi[order]
    sup = merge_supervision([eg.supervision for eg in egs])
    dw = None
    if egs[0].deriv_weights is not None:
        T = len(egs[0].deriv_weights)
        d = torch.empty(T * n_egs, dtype=torch.float32)
        for i, eg in enumerate(egs):
            if eg.deriv_weights is None or len(eg.deriv_weights) != T:
                raise ValueError("merge: example %d deriv_weights missing or of another size" % i)
            d[i::n_egs] = torch.as_tensor(eg.deriv_weights, dtype=torch.float32)
        dw = d
    return NnetChainExample(inputs=inputs, input_indexes=input_indexes,
                            output_name=egs[0].output_name, output_indexes=oi.astype(np.int32),
                            supervision=sup, deriv_weights=dw, stored_inputs=stored)


# ============================================================================ editing
def scale_supervision_weight(eg: NnetChainExample, weight: float) -> NnetChainExample:
    """``nnet3-chain-copy-egs --weights``: multiply the weight of the output named
    "output" (in float, as Kaldi). Modifies and returns ``eg``."""
    if weight == 1.0:
        return eg
    if eg.output_name != "output":
        raise ValueError("no supervision named 'output' in the example (have %r)"
                         % eg.output_name)
    eg.supervision.weight = float(np.float32(eg.supervision.weight) * np.float32(weight))
    return eg


def shift_chain_example_times(eg: NnetChainExample, frame_shift: int,
                              exclude_names: Sequence[str] = ("ivector",)) -> NnetChainExample:
    """``ShiftChainExampleTimes`` (``nnet3-chain-copy-egs --frame-shift``): inputs'
    t += frame_shift (except ``exclude_names``); output t += the nearest multiple of the
    frame subsampling factor. Modifies and returns ``eg``."""
    if frame_shift == 0:
        return eg
    for name, idx in eg.input_indexes.items():
        if name not in exclude_names:
            idx = np.array(idx)
            idx[:, 1] += frame_shift
            eg.input_indexes[name] = idx
    oi = np.array(eg.output_indexes)
    S = eg.supervision.num_sequences
    fsf = int(oi[S, 1] - oi[0, 1]) if len(oi) > S else 1
    shift = fsf * int(np.floor(0.5 + frame_shift * 1.0 / fsf))
    if shift:
        oi[:, 1] += shift
    eg.output_indexes = oi
    return eg


def modify_chain_example_context(eg: NnetChainExample, left_context: int = -1,
                                 right_context: int = -1) -> NnetChainExample:
    """``nnet3-chain-copy-egs --left-context/--right-context``
    (``ModifyChainExampleContext``): drop rows of the input named "input" whose t lies
    more than ``left_context`` before the first output frame or ``right_context`` after
    the last one (-1: keep that side). Works on single (unmerged) examples only. Rows
    of a compressed input come out decoded, as a full matrix (Kaldi's
    ``FilterGeneralMatrixRows``); an input that keeps all rows stays compressed.
    Modifies and returns ``eg``."""
    if left_context == -1 and right_context == -1:
        return eg
    if "input" not in eg.inputs:
        raise ValueError("example has no input named 'input'")
    if eg.output_name != "output":
        raise ValueError("example has no output named 'output'")
    for name, idx in eg.input_indexes.items():
        if (np.asarray(idx)[:, 0] != 0).any():
            raise ValueError("too late to reduce context: the example is already merged")
    if (np.asarray(eg.output_indexes)[:, 0] != 0).any():
        raise ValueError("too late to reduce context: the example is already merged")
    t_in = np.asarray(eg.input_indexes["input"])[:, 1]
    t_out = np.asarray(eg.output_indexes)[:, 1]
    min_t, max_t = int(t_in.min()), int(t_in.max())
    if left_context != -1:
        min_t = max(min_t, int(t_out.min()) - left_context)
    if right_context != -1:
        max_t = min(max_t, int(t_out.max()) + right_context)
    keep = (t_in >= min_t) & (t_in <= max_t)
    if not keep.any():
        raise ValueError("reducing the context removed all rows of 'input'")
    if keep.all():
        return eg
    x = eg.inputs["input"]
    eg.inputs["input"] = x[_torch().from_numpy(np.nonzero(keep)[0])].contiguous()
    eg.input_indexes["input"] = np.asarray(eg.input_indexes["input"])[keep]
    eg.stored_inputs.pop("input", None)
    return eg


# ============================================================================ programs
def _parse_int_set(s: str, full: str) -> List[Tuple[int, int]]:
    ranges = []
    for part in s.split(","):
        try:
            ab = [int(x) for x in part.split(":")]
        except ValueError:
            ab = []
        if not 1 <= len(ab) <= 2 or ab[0] > ab[-1] or ab[0] <= 0:
            raise ValueError("could not parse --minibatch-size=%s" % full)
        ranges.append((ab[0], ab[-1]))
    return ranges


class MinibatchSizeRule:
    """Kaldi's ``ExampleMergingConfig`` ``--minibatch-size`` rules: ``"64"``,
    ``"128,64"``, ``"100:128"`` or per eg size ``"150=64/300=32"``; the rule whose
    eg size is closest to an eg's size (its largest number of indexes) applies.
    Before the input ends only the largest size of the rule is emitted; at the end
    the largest allowed size not above what is left."""

    def __init__(self, spec: str = "64"):
        self.spec = spec
        rules = []
        parts = str(spec).split("/")
        for part in parts:
            if "=" in part:
                a, _, b = part.partition("=")
                try:
                    size = int(a)
                except ValueError:
                    raise ValueError("could not parse --minibatch-size=%s" % spec)
                rules.append((size, _parse_int_set(b, spec)))
            else:
                if len(parts) != 1:
                    raise ValueError("--minibatch-size=%s: all rules need 'eg-size=' when "
                                     "there is more than one" % spec)
                rules.append((0, _parse_int_set(part, spec)))
        sizes = [r[0] for r in rules]
        if len(set(sizes)) != len(sizes):
            raise ValueError("--minibatch-size=%s: repeated example sizes" % spec)
        self.rules = rules

    def minibatch_size(self, eg_size: int, num_available: int, input_ended: bool) -> int:
        best = min(range(len(self.rules)), key=lambda i: abs(eg_size - self.rules[i][0]))
        ranges = self.rules[best][1]
        largest = max(b for _, b in ranges)
        if not input_ended:
            return largest if largest <= num_available else 0
        ans = 0
        for a, b in ranges:
            if num_available >= a:
                ans = max(ans, min(b, num_available))
        return ans


def _structure_key(eg: NnetChainExample):
    parts = []
    for name, x in eg.inputs.items():
        parts.append((name, np.asarray(eg.input_indexes[name]).tobytes(), int(x.shape[1])))
    parts.append((eg.output_name, np.asarray(eg.output_indexes).tobytes(), 0))
    return tuple(parts)


def _eg_size(eg: NnetChainExample) -> int:
    return max([len(v) for v in eg.input_indexes.values()] + [len(eg.output_indexes)])


class ChainExampleMerger:
    """Kaldi's ``ChainExampleMerger`` (``nnet3-chain-merge-egs``), one eg at a time.

    Egs of identical structure (same input and output indexes, same input dims) are
    grouped; when a group reaches the largest size its rule allows, it is emitted as one
    minibatch. When the input ends, :meth:`flush_one` cuts what is left of each group
    (groups in first-seen order; Kaldi's order there follows its hash table) into the
    largest allowed sizes; a remainder no allowed size fits is discarded (counted in
    ``num_discarded``, as Kaldi warns about it).

    Items are ``(handle, eg)``: the merger looks only at ``eg``; ``handle`` is whatever
    the caller needs to find the eg again (a key, an archive offset), so that
    :meth:`pending` can describe the merger's state without the egs.

    Args:
      minibatch_size: Kaldi's ``--minibatch-size`` rule string (see
        :class:`MinibatchSizeRule`).
    """

    def __init__(self, minibatch_size: str = "64"):
        self.rule = MinibatchSizeRule(minibatch_size)
        self.groups: Dict[tuple, List[tuple]] = {}
        self.num_read = 0
        self.num_written = 0
        self.num_discarded = 0

    def add(self, handle, eg: NnetChainExample) -> Optional[List[tuple]]:
        """Add one (unmerged) eg; returns the ``[(handle, eg)]`` of a full minibatch
        that it completes, else None."""
        self.num_read += 1
        key = _structure_key(eg)
        vec = self.groups.setdefault(key, [])
        vec.append((handle, eg))
        if self.rule.minibatch_size(_eg_size(eg), len(vec), False):
            del self.groups[key]
            self.num_written += 1
            return vec
        return None

    def flush_one(self) -> Optional[List[tuple]]:
        """After the input ended: the next leftover minibatch, or None when none is left."""
        while self.groups:
            key = next(iter(self.groups))
            vec = self.groups[key]
            mb = self.rule.minibatch_size(_eg_size(vec[0][1]), len(vec), True)
            if not mb:
                self.num_discarded += len(vec)
                del self.groups[key]
                continue
            out, rest = vec[:mb], vec[mb:]
            if rest:
                self.groups[key] = rest
            else:
                del self.groups[key]
            self.num_written += 1
            return out
        return None

    def pending(self) -> List[List]:
        """The handles waiting in each group, groups in first-seen order."""
        return [[h for h, _ in vec] for vec in self.groups.values()]


def merge_chain_egs_stream(items: Iterable[Tuple[str, NnetChainExample]],
                           minibatch_size: str = "64", compress: bool = False,
                           stats: Optional[dict] = None
                           ) -> Iterator[Tuple[str, NnetChainExample]]:
    """``nnet3-chain-merge-egs`` over a stream (:class:`ChainExampleMerger`); keys are
    ``merged-<k>-<size>``.

    Args:
      items: ``(key, example)`` pairs (single, unmerged examples).
      minibatch_size: Kaldi's ``--minibatch-size`` rule string (see
        :class:`MinibatchSizeRule`).
      compress: compress merged inputs.
      stats: optional dict that receives ``num_read``, ``num_written`` (minibatches)
        and ``num_discarded`` (examples left over that fit no allowed size).
    Yields:
      ``(key, merged_example)``.
    """
    merger = ChainExampleMerger(minibatch_size)
    n = 0
    for key, eg in items:
        vec = merger.add(key, eg)
        if vec is not None:
            yield "merged-%d-%d" % (n, len(vec)), merge_chain_egs([e for _, e in vec], compress)
            n += 1
    while True:
        vec = merger.flush_one()
        if vec is None:
            break
        yield "merged-%d-%d" % (n, len(vec)), merge_chain_egs([e for _, e in vec], compress)
        n += 1
    if stats is not None:
        stats.update(num_read=merger.num_read, num_written=merger.num_written,
                     num_discarded=merger.num_discarded)


def merge_chain_egs_table(rspec: str, wspec: str, minibatch_size: str = "64",
                          compress: bool = False) -> dict:
    """``nnet3-chain-merge-egs``: read egs from ``rspec``, write merged minibatches
    to ``wspec``; returns the counts (see :func:`merge_chain_egs_stream`)."""
    stats: dict = {}
    write_chain_egs(wspec, merge_chain_egs_stream(read_chain_egs(rspec), minibatch_size,
                                                  compress, stats))
    return stats


def copy_chain_egs(rspec: str, wspecs: Sequence[str], weights: Optional[str] = None,
                   outputs: Optional[str] = None, frame_shift: int = 0,
                   left_context: int = -1, right_context: int = -1) -> dict:
    """``nnet3-chain-copy-egs``: copy egs, round-robin over several outputs.

    Args:
      rspec: egs rspecifier.
      wspecs: one or more wspecifiers (egs are distributed round-robin).
      weights: rspecifier of per-key float weights; the supervision weight of output
        "output" is multiplied by it; egs without a weight are skipped with a warning.
      outputs: rspecifier of per-key new names for the output "output".
      frame_shift: shift times as :func:`shift_chain_example_times`.
      left_context, right_context: trim the input context as
        :func:`modify_chain_example_context` (-1: keep).
    Returns:
      ``{"num_read", "num_written", "num_skipped"}``.
    """
    import warnings
    wreader = RandomAccessTableReader(weights, "float") if weights else None
    oreader = RandomAccessTableReader(outputs, "token") if outputs else None
    if not wspecs:
        raise ValueError("copy_chain_egs: at least one wspecifier is needed")
    writers: List[ChainEgsWriter] = []
    n_read = n_written = n_skipped = 0
    try:
        for w in wspecs:
            writers.append(ChainEgsWriter(w))
        for key, eg in read_chain_egs(rspec):
            n_read += 1
            if wreader is not None:
                if key not in wreader:
                    warnings.warn("No weight for example key %s" % key)
                    n_skipped += 1
                    continue
                scale_supervision_weight(eg, float(wreader[key]))
            if oreader is not None:
                if key not in oreader:
                    warnings.warn("No new output-name for example key %s" % key)
                    n_skipped += 1
                    continue
                if eg.output_name != "output":
                    raise ValueError("%s: no supervision named 'output' in example %s"
                                     % (rspec, key))
                eg.output_name = oreader[key]
            if frame_shift:
                shift_chain_example_times(eg, frame_shift)
            if left_context != -1 or right_context != -1:
                modify_chain_example_context(eg, left_context, right_context)
            writers[n_written % len(writers)].write(key, eg)
            n_written += 1
    except BaseException:
        for w in writers:  # all outputs or none
            w.abort()
        raise
    for w in writers:
        w.close()
    return {"num_read": n_read, "num_written": n_written, "num_skipped": n_skipped}
