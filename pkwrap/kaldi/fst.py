"""OpenFst vector FSTs over the tropical (or log) semiring, as Kaldi writes them.

Binary layout of a ``StdVectorFst`` (OpenFst "vector" type, file version 2), all
little-endian::

    int32  magic = 2125659606
    string fst_type        (int32 length + bytes, "vector")
    string arc_type        ("standard" = tropical float, "log" = log float)
    int32  version         (2)
    int32  flags           (bit 0: input symbols follow, bit 1: output symbols, bit 2: aligned)
    uint64 properties
    int64  start           (-1 for an empty FST)
    int64  num_states
    int64  num_arcs
    per state:  float32 final weight (+inf = not final), int64 num_arcs,
                then num_arcs x (int32 ilabel, int32 olabel, float32 weight, int32 nextstate)

Weights are -log probabilities. Kaldi stores chain graphs (den.fst, normalization.fst,
the supervision FST of an NnetChainExample) in this format; inside an egs archive the
same bytes appear inline (``fst::WriteFstKaldi``).

The in-memory form :class:`Fst` keeps the arcs as flat numpy arrays grouped by source
state (``state_offsets[s]:state_offsets[s+1]`` are the arcs leaving ``s``, in file
order), which is what the chain kernels consume.
"""
from __future__ import annotations

import gzip
import io
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, List, Optional, Tuple, Union

import numpy as np

__all__ = ["Fst", "read_fst", "read_fst_binary", "write_fst", "write_fst_binary",
           "read_fst_text", "write_fst_text", "FstFormatError", "OPENFST_MAGIC",
           "validate_fst", "check_text_state_ids"]

OPENFST_MAGIC = 2125659606
_FLAG_HAS_ISYMBOLS = 1
_FLAG_HAS_OSYMBOLS = 2
# Property bits that OpenFst uses; we recompute the ones we can cheaply know.
_kExpanded = 0x1
_kMutable = 0x2
_kAcceptor = 0x10000
_kNotAcceptor = 0x20000
_kIEpsilons = 0x400000
_kNoIEpsilons = 0x800000


class FstFormatError(ValueError):
    """Raised when bytes are not a readable OpenFst vector FST. The message names the source."""


@dataclass
class Fst:
    """A weighted FST with arcs in flat arrays.

    Args:
      num_states: number of states S.
      start: start state, or -1 for an empty FST.
      final: float32 ``[S]``, final weight (-log prob), ``inf`` where not final.
      state_offsets: int64 ``[S+1]``; the arcs of state s are rows
        ``state_offsets[s]:state_offsets[s+1]`` of the arc arrays.
      ilabel, olabel, nextstate: int32 ``[A]``.
      weight: float32 ``[A]``, -log prob.
      arc_type: "standard" (tropical) or "log"; kept so a round trip writes the same.
    """

    num_states: int
    start: int
    final: np.ndarray
    state_offsets: np.ndarray
    ilabel: np.ndarray
    olabel: np.ndarray
    weight: np.ndarray
    nextstate: np.ndarray
    arc_type: str = "standard"
    properties: int = field(default=0, repr=False)
    name: str = field(default="", repr=False, compare=False)  # the file it was read from

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_arcs(cls, num_states: int, start: int,
                  arcs: Iterable[Tuple[int, int, int, float, int]],
                  finals: Union[dict, Iterable[Tuple[int, float]]] = (),
                  arc_type: str = "standard") -> "Fst":
        """Build from ``(src, ilabel, olabel, weight, dst)`` tuples (any order; the order
        within a source state is kept) and ``{state: final_weight}``."""
        arcs = list(arcs)
        final = np.full(num_states, np.inf, dtype=np.float32)
        for s, w in (finals.items() if isinstance(finals, dict) else finals):
            final[int(s)] = w
        if arcs:
            a = np.array([(x[0], x[1], x[2], x[4]) for x in arcs], dtype=np.int64)
            w = np.array([x[3] for x in arcs], dtype=np.float32)
            order = np.argsort(a[:, 0], kind="stable")
            a, w = a[order], w[order]
        else:
            a = np.zeros((0, 4), dtype=np.int64)
            w = np.zeros(0, dtype=np.float32)
        if len(a) and (a[:, 0].min() < 0 or a[:, 0].max() >= num_states
                       or a[:, 3].min() < 0 or a[:, 3].max() >= num_states):
            raise FstFormatError("arc refers to a state outside [0, %d)" % num_states)
        if len(a) and (a[:, 1:3].min() < 0 or a[:, 1:3].max() >= 2 ** 31):
            raise FstFormatError("arc label %d is outside [0, 2^31)"
                                 % (a[:, 1:3].min() if a[:, 1:3].min() < 0 else a[:, 1:3].max()))
        counts = np.bincount(a[:, 0], minlength=num_states) if len(a) else np.zeros(num_states, np.int64)
        offsets = np.zeros(num_states + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(num_states=num_states, start=start, final=final, state_offsets=offsets,
                   ilabel=a[:, 1].astype(np.int32), olabel=a[:, 2].astype(np.int32),
                   weight=w, nextstate=a[:, 3].astype(np.int32), arc_type=arc_type)

    # ---------------------------------------------------------------- queries
    @property
    def num_arcs(self) -> int:
        return int(self.ilabel.shape[0])

    @property
    def src(self) -> np.ndarray:
        """int32 ``[A]``: source state of every arc."""
        return np.repeat(np.arange(self.num_states, dtype=np.int32), np.diff(self.state_offsets))

    def is_acceptor(self) -> bool:
        return bool(np.array_equal(self.ilabel, self.olabel))

    def has_epsilons(self) -> bool:
        return bool((self.ilabel == 0).any())

    def arcs(self, state: int):
        """Arcs leaving ``state`` as ``(ilabel, olabel, weight, nextstate)`` tuples."""
        b, e = self.state_offsets[state], self.state_offsets[state + 1]
        return [(int(self.ilabel[i]), int(self.olabel[i]), float(self.weight[i]),
                 int(self.nextstate[i])) for i in range(b, e)]

    def __eq__(self, other) -> bool:  # structural equality, weights exact
        if not isinstance(other, Fst):
            return NotImplemented
        return (self.num_states == other.num_states and self.start == other.start
                and np.array_equal(self.final, other.final)
                and np.array_equal(self.state_offsets, other.state_offsets)
                and np.array_equal(self.ilabel, other.ilabel)
                and np.array_equal(self.olabel, other.olabel)
                and np.array_equal(self.weight, other.weight)
                and np.array_equal(self.nextstate, other.nextstate))

    def __repr__(self) -> str:
        return "Fst(num_states=%d, num_arcs=%d, start=%d, arc_type=%r)" % (
            self.num_states, self.num_arcs, self.start, self.arc_type)

    def _computed_properties(self) -> int:
        p = _kExpanded | _kMutable
        p |= _kAcceptor if self.is_acceptor() else _kNotAcceptor
        p |= _kIEpsilons if self.has_epsilons() else _kNoIEpsilons
        return p


# -------------------------------------------------------------------- validation
def validate_fst(fst: Fst, name: str, num_ilabels: Optional[int] = None,
                 num_olabels: Optional[int] = None, epsilon_free: bool = False,
                 accepting: bool = False) -> Fst:
    """Check that ``fst`` is a well-formed FST before it reaches a decoder or a kernel;
    returns it. Every reader calls this; code handing a graph to a kernel may call it
    again with the label bounds it needs.

    Checks: start state in range (or -1 with no states), arc offsets consistent, every
    arc's next state exists, labels are >= 0 (and ``< num_ilabels`` / ``< num_olabels``
    when given; ``epsilon_free``: input label 0 is an error), no NaN or -inf weight or
    final weight; ``accepting``: some state is final and the start state is final or has
    arcs (a graph that accepts nothing fails every utterance later, obscurely).

    Raises:
      FstFormatError: naming ``name`` and the first problem found.
    """
    S = int(fst.num_states)
    if S < 0 or (S == 0 and fst.start != -1) or (S > 0 and not 0 <= fst.start < S):
        raise FstFormatError("%s: start state %d is not a state (the FST has %d)"
                             % (name, fst.start, S))
    off = fst.state_offsets
    A = len(fst.ilabel)
    if (len(off) != S + 1 or (S and (off[0] != 0 or off[-1] != A or (np.diff(off) < 0).any()))
            or not len(fst.olabel) == len(fst.weight) == len(fst.nextstate) == A
            or len(fst.final) != S):
        raise FstFormatError("%s: inconsistent FST arrays" % name)
    if A:
        ns = fst.nextstate
        bad = np.flatnonzero((ns < 0) | (ns >= S))
        if len(bad):
            raise FstFormatError("%s: arc %d of state %d goes to state %d, which does not "
                                 "exist (the FST has %d states)" % (
                                     name, bad[0] - off[fst.src[bad[0]]], fst.src[bad[0]],
                                     ns[bad[0]], S))
        for lab, what, bound in ((fst.ilabel, "input", num_ilabels),
                                 (fst.olabel, "output", num_olabels)):
            lo = 1 if (epsilon_free and what == "input") else 0
            bad = np.flatnonzero((lab < lo) | (lab >= bound if bound is not None else False))
            if len(bad):
                i = bad[0]
                rng = ("[%d, %d)" % (lo, bound)) if bound is not None else (">= %d" % lo)
                raise FstFormatError("%s: arc of state %d has %s label %d, outside %s"
                                     % (name, fst.src[i], what, lab[i], rng))
        w = fst.weight
        bad = np.flatnonzero(np.isnan(w) | (w == -np.inf))
        if len(bad):
            raise FstFormatError("%s: arc of state %d has weight %s"
                                 % (name, fst.src[bad[0]], w[bad[0]]))
    if S:
        f = fst.final
        bad = np.flatnonzero(np.isnan(f) | (f == -np.inf))
        if len(bad):
            raise FstFormatError("%s: state %d has final weight %s" % (name, bad[0], f[bad[0]]))
    if accepting:
        if S == 0 or not np.isfinite(fst.final).any():
            raise FstFormatError("%s: no final state: the FST accepts nothing" % name)
        if off[fst.start + 1] == off[fst.start] and not np.isfinite(fst.final[fst.start]):
            raise FstFormatError("%s: the start state has no arcs: the FST accepts nothing"
                                 % name)
    return fst


def check_text_state_ids(ids: Iterable[int], num_lines: int, name: str) -> int:
    """The number of states of a text FST whose lines use state ``ids``; a negative id
    or one beyond what ``num_lines`` lines can describe (each line names at most two
    states) is an error, so one bad number cannot demand a huge allocation."""
    lo, hi = min(ids, default=0), max(ids, default=-1)
    if lo < 0:
        raise FstFormatError("%s: negative state id %d" % (name, lo))
    if hi >= 2 * num_lines + 1:
        raise FstFormatError("%s: state id %d is out of range for an FST of %d lines"
                             % (name, hi, num_lines))
    return hi + 1


# -------------------------------------------------------------------- binary I/O
def _read_exact(f: BinaryIO, n: int, what: str, name: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise FstFormatError("%s: truncated FST (reading %s: wanted %d bytes, got %d)"
                             % (name, what, n, len(b)))
    return b


def _read_string(f: BinaryIO, name: str) -> str:
    (n,) = struct.unpack("<i", _read_exact(f, 4, "string length", name))
    if n < 0 or n > 1024:
        raise FstFormatError("%s: bad string length %d in FST header" % (name, n))
    return _read_exact(f, n, "string", name).decode("latin-1")


_STATE_HDR = np.dtype([("final", "<f4"), ("narcs", "<i8")])
_ARC = np.dtype([("ilabel", "<i4"), ("olabel", "<i4"), ("weight", "<f4"), ("nextstate", "<i4")])


def _remaining(f) -> Optional[int]:
    """Bytes left in a stream, when it can say."""
    if hasattr(f, "remaining"):
        return f.remaining()
    try:
        if not f.seekable():
            return None
        here = f.tell()
        end = f.seek(0, 2)
        f.seek(here)
        return end - here
    except (AttributeError, OSError, ValueError):
        return None


def read_fst_binary(f: BinaryIO, name: str = "<stream>") -> Fst:
    """Read one binary OpenFst vector FST from an open binary stream (positioned at the
    magic number); leaves the stream just after it (a stream that cannot tell its size
    is read to its end). ``name`` is used in error messages. Sizes in the header are
    checked against the bytes left before anything is allocated, and the FST is
    validated (:func:`validate_fst`)."""
    left = _remaining(f)
    if left is None:
        data = f.read()
        f, left = io.BytesIO(data), len(data)
    (magic,) = struct.unpack("<i", _read_exact(f, 4, "magic number", name))
    if magic != OPENFST_MAGIC:
        raise FstFormatError("%s: not an OpenFst binary FST (magic %d, expected %d)"
                             % (name, magic, OPENFST_MAGIC))
    fst_type = _read_string(f, name)
    arc_type = _read_string(f, name)
    if fst_type != "vector":
        raise FstFormatError("%s: FST type %r is not supported (only 'vector')" % (name, fst_type))
    if arc_type not in ("standard", "log"):
        raise FstFormatError("%s: arc type %r is not supported" % (name, arc_type))
    version, flags, properties, start, num_states, num_arcs = struct.unpack(
        "<iiQqqq", _read_exact(f, 4 + 4 + 8 + 8 * 3, "header", name))
    if flags & (_FLAG_HAS_ISYMBOLS | _FLAG_HAS_OSYMBOLS):
        raise FstFormatError("%s: FSTs with embedded symbol tables are not supported" % name)
    if num_states < 0 or (start != -1 and not (0 <= start < num_states)):
        raise FstFormatError("%s: bad FST header (start %d, %d states)" % (name, start, num_states))
    left = _remaining(f)
    if num_states * 12 > left or num_arcs * 16 > left:
        raise FstFormatError("%s: FST header declares %d states and %d arcs, more than the "
                             "%d bytes left can hold (truncated or corrupt)"
                             % (name, num_states, num_arcs, left))
    final = np.empty(num_states, dtype=np.float32)
    offsets = np.zeros(num_states + 1, dtype=np.int64)
    chunks: List[np.ndarray] = []
    # States are variable-length; read them one header at a time, arcs in bulk.
    for s in range(num_states):
        hdr = np.frombuffer(_read_exact(f, 12, "state %d" % s, name), dtype=_STATE_HDR)[0]
        n = int(hdr["narcs"])
        left -= 12
        if n < 0 or 16 * n > left:
            raise FstFormatError("%s: state %d claims %d arcs, more than the %d bytes left "
                                 "can hold (truncated or corrupt)" % (name, s, n, left))
        left -= 16 * n
        final[s] = hdr["final"]
        if n:
            chunks.append(np.frombuffer(_read_exact(f, 16 * n, "arcs of state %d" % s, name),
                                        dtype=_ARC))
        offsets[s + 1] = offsets[s] + n
    arcs = np.concatenate(chunks) if chunks else np.zeros(0, dtype=_ARC)
    # OpenFst's VectorFst writes num_arcs = 0 in the header (it is advisory); only a
    # positive count is checked.
    if num_arcs > 0 and len(arcs) != num_arcs:
        raise FstFormatError("%s: header says %d arcs, states hold %d" % (name, num_arcs, len(arcs)))
    nextstate = arcs["nextstate"].astype(np.int32)
    return validate_fst(Fst(
        num_states=int(num_states), start=int(start), final=final, state_offsets=offsets,
        ilabel=arcs["ilabel"].astype(np.int32), olabel=arcs["olabel"].astype(np.int32),
        weight=arcs["weight"].astype(np.float32), nextstate=nextstate,
        arc_type=arc_type, properties=int(properties)), name)


def check_fst_file(path) -> str:
    """Check a binary OpenFst file before a library without these checks (OpenFst, via
    kaldifst) reads it: a vector FST is read and validated in full (:func:`read_fst`:
    sizes against the bytes left, states and labels in range); for a const FST the
    header's state and arc counts must fit in the file. Returns the FST type ("vector" or
    "const"). Raises :class:`FstFormatError` naming the file."""
    name = os.fspath(path)
    with _open(name, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or struct.unpack("<i", head)[0] != OPENFST_MAGIC:
            raise FstFormatError("%s: not an OpenFst binary FST (bad magic number)" % name)
        fst_type = _read_string(f, name)
        if fst_type == "vector":
            f.seek(0)
            read_fst_binary(f, name)
            return fst_type
        if fst_type != "const":
            raise FstFormatError("%s: FST type %r is not supported (vector or const)"
                                 % (name, fst_type))
        _read_string(f, name)  # arc type
        _, _, _, start, num_states, num_arcs = struct.unpack(
            "<iiQqqq", _read_exact(f, 4 + 4 + 8 + 8 * 3, "header", name))
        left = _remaining(f)
        if num_states < 0 or num_arcs < 0 or not (-1 <= start < max(num_states, 0)) or \
                (left is not None and 20 * num_states + 16 * num_arcs > left):
            raise FstFormatError("%s: const FST header (start %d, %d states, %d arcs) does "
                                 "not fit the %s bytes of the file (truncated or corrupt)"
                                 % (name, start, num_states, num_arcs, left))
    return fst_type


def write_fst_binary(fst: Fst, f: BinaryIO) -> None:
    """Write ``fst`` as an OpenFst binary vector FST (readable by fstinfo / Kaldi)."""
    def wstr(s: str):
        b = s.encode("latin-1")
        f.write(struct.pack("<i", len(b)) + b)
    f.write(struct.pack("<i", OPENFST_MAGIC))
    wstr("vector")
    wstr(fst.arc_type)
    props = fst.properties if fst.properties else fst._computed_properties()
    f.write(struct.pack("<iiQqqq", 2, 0, props, fst.start, fst.num_states, 0))
    arcs = np.empty(fst.num_arcs, dtype=_ARC)
    arcs["ilabel"], arcs["olabel"] = fst.ilabel, fst.olabel
    arcs["weight"], arcs["nextstate"] = fst.weight, fst.nextstate
    out = io.BytesIO()
    for s in range(fst.num_states):
        b, e = int(fst.state_offsets[s]), int(fst.state_offsets[s + 1])
        out.write(struct.pack("<fq", float(fst.final[s]), e - b))
        out.write(arcs[b:e].tobytes())
    f.write(out.getvalue())


def _open(path: str, mode: str):
    return gzip.open(path, mode) if str(path).endswith(".gz") else open(path, mode)


def read_fst(path_or_file) -> Fst:
    """Read a binary OpenFst FST from a path (``.gz`` is decompressed), a file object,
    or return an :class:`Fst` unchanged. Text FSTs (fstprint form) are detected and read
    with :func:`read_fst_text` (without symbol tables)."""
    if isinstance(path_or_file, Fst):
        return path_or_file
    if hasattr(path_or_file, "read"):
        return read_fst_binary(path_or_file, getattr(path_or_file, "name", "<stream>"))
    name = str(path_or_file)
    with _open(name, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if len(head) == 4 and struct.unpack("<i", head)[0] == OPENFST_MAGIC:
            fst = read_fst_binary(f, name)
            fst.name = name
            return fst
        text = f.read().decode("utf-8", errors="replace")
    try:
        fst = read_fst_text(text, name=name)
        fst.name = name
        return fst
    except FstFormatError:
        raise
    except Exception as e:  # pragma: no cover - defensive
        raise FstFormatError("%s: neither a binary OpenFst FST nor fstprint text (%s)" % (name, e))


def write_fst(fst: Fst, path: str) -> None:
    """Write ``fst`` in binary form to ``path`` (``.gz`` compressed); the file appears
    complete or not at all (:func:`pkwrap.kaldi.io.atomic_output`)."""
    from .io import atomic_output
    with atomic_output(path) as f:
        if str(path).endswith(".gz"):
            with gzip.GzipFile(filename="", mode="wb", fileobj=f) as g:
                write_fst_binary(fst, g)
        else:
            write_fst_binary(fst, f)


# -------------------------------------------------------------------- text I/O
def read_fst_text(text: str, name: str = "<text>", acceptor: Optional[bool] = None,
                  arc_type: str = "standard") -> Fst:
    """Parse fstprint output: ``src dst ilabel [olabel] [weight]`` arc lines and
    ``state [weight]`` final lines. The first arc or final line's source is the start
    state. States are numbered as given. ``acceptor``: lines have one label (None:
    decided per line by field count, 3-4 fields are acceptor arcs only when set)."""
    arcs = []
    finals = {}
    start = None
    ids = []
    lines = text.splitlines()
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = line.split()
        try:
            if len(p) <= 2:
                s = int(p[0])
                finals[s] = float(p[1]) if len(p) == 2 else 0.0
                ids.append(s)
            else:
                s, d = int(p[0]), int(p[1])
                if acceptor:
                    il = ol = int(p[2])
                    w = float(p[3]) if len(p) > 3 else 0.0
                else:
                    if len(p) < 4:
                        raise FstFormatError("%s:%d: arc line needs 'src dst ilabel olabel [weight]'"
                                             % (name, lineno))
                    il, ol = int(p[2]), int(p[3])
                    w = float(p[4]) if len(p) > 4 else 0.0
                arcs.append((s, il, ol, w, d))
                ids += (s, d)
        except ValueError as e:
            raise FstFormatError("%s:%d: cannot parse %r (%s)" % (name, lineno, line, e))
        if start is None:
            start = int(p[0])
    if start is None:
        return Fst.from_arcs(0, -1, [], arc_type=arc_type)
    n = check_text_state_ids(ids, len(lines), name)
    return validate_fst(Fst.from_arcs(n, start, arcs, finals, arc_type=arc_type), name)


def _fmt(w: float) -> str:
    return "%.9g" % w


def write_fst_text(fst: Fst, acceptor: bool = False) -> str:
    """fstprint layout: start state's lines first, then the other states in order;
    zero weights omitted as fstprint does."""
    lines = []
    order = ([fst.start] if fst.start >= 0 else []) + [s for s in range(fst.num_states) if s != fst.start]
    for s in order:
        for il, ol, w, d in fst.arcs(s):
            f = [str(s), str(d), str(il)] + ([] if acceptor else [str(ol)])
            if w != 0.0:
                f.append(_fmt(w))
            lines.append("\t".join(f))
        fw = float(fst.final[s])
        if np.isfinite(fw):
            lines.append(str(s) if fw == 0.0 else "%d\t%s" % (s, _fmt(fw)))
    return "\n".join(lines) + ("\n" if lines else "")
