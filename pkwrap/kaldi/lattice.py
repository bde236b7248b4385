"""Kaldi ``CompactLattice`` archives (``lat.N.gz`` of a lattice dir), binary form.

A CompactLattice is an OpenFst vector FST (arc type ``"compactlattice44"``) whose arcs
carry ``ilabel == olabel`` (a word, or a phone after ``lattice-align-phones
--replace-output-symbols``) and a ``CompactLatticeWeight``: the pair (graph cost,
acoustic cost) of ``LatticeWeight`` plus the string of transition-ids the arc
consumes, one per frame. In an archive, Kaldi writes ``key<space>`` followed directly by
the OpenFst binary (no ``"\\0B"`` header)::

    int32 magic 2125659606, string "vector", string "compactlattice44", int32 version,
    int32 flags, uint64 properties, int64 start, int64 num_states, int64 num_arcs
    per state:  weight (final; graph and acoustic cost +inf = not final),
                int64 num_arcs, num_arcs x (int32 ilabel, int32 olabel, weight,
                                            int32 nextstate)
    weight:     float32 graph cost, float32 acoustic cost, int32 n, n x int32 tid

Read one with :func:`read_compact_lattices` (``"ark:gunzip -c lat.1.gz |"`` or a
``.gz`` path). Text lattices are not read (a one-line error says so).
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import numpy as np

from .fst import OPENFST_MAGIC
from .io import KaldiReader
from .table import Holder, SequentialTableReader

__all__ = ["CompactLattice", "read_compact_lattice", "read_compact_lattices",
           "COMPACT_LATTICE_HOLDER"]

_ARC_TYPE = "compactlattice44"


@dataclass
class CompactLattice:
    """A Kaldi CompactLattice.

    Args:
      start: start state (-1: empty lattice).
      final: ``[S]`` of ``(graph_cost, acoustic_cost, tids)`` or None (not final).
      arcs: ``[S]`` lists of ``(label, graph_cost, acoustic_cost, tids, nextstate)``;
        ``tids`` an int32 array of transition-ids (one per frame).
    """

    start: int
    final: List
    arcs: List[List[Tuple[int, float, float, np.ndarray, int]]]

    @property
    def num_states(self) -> int:
        return len(self.arcs)

    def state_times(self) -> Tuple[List[int], int]:
        """Kaldi's ``CompactLatticeStateTimes``: frame index of every state (states in
        topological order, as Kaldi's lattices are) and the number of frames.

        Raises:
          ValueError: a state reached at two different times, or states out of
            topological order.
        """
        n = self.num_states
        times = [-1] * n
        if self.start < 0:
            return times, 0
        times[self.start] = 0
        total = -1
        for s in range(n):
            t = times[s]
            if t < 0:
                continue
            for _, _, _, tids, d in self.arcs[s]:
                if d <= s:
                    raise ValueError("lattice is not topologically sorted (arc %d -> %d)"
                                     % (s, d))
                t2 = t + len(tids)
                if times[d] == -1:
                    times[d] = t2
                elif times[d] != t2:
                    raise ValueError("state %d is reached at frames %d and %d"
                                     % (d, times[d], t2))
            f = self.final[s]
            if f is not None:
                tf = t + len(f[2])
                if total not in (-1, tf):
                    raise ValueError("final states at frames %d and %d" % (total, tf))
                total = tf
        return times, max(total, 0)


def _weight(r: KaldiReader, what: str):
    g, a, n = struct.unpack("<ffi", r.take(12, what))
    if n < 0:
        raise r.error("%s: negative string length %d" % (what, n))
    tids = np.frombuffer(r.take(4 * n, what), dtype="<i4").astype(np.int32)
    return float(g), float(a), tids


def read_compact_lattice(r: KaldiReader) -> CompactLattice:
    """One binary CompactLattice at the reader's position (an archive entry)."""
    head = r.take(4, "lattice magic")
    if struct.unpack("<i", head)[0] != OPENFST_MAGIC:
        raise r.error("not a binary CompactLattice (no OpenFst magic; text lattices are "
                      "not supported)")

    def string(what):
        n = struct.unpack("<i", r.take(4, what))[0]
        return r.take(n, what).decode("latin-1")

    fst_type, arc_type = string("fst type"), string("arc type")
    if fst_type != "vector" or arc_type != _ARC_TYPE:
        raise r.error("expected a vector FST of arc type %s, got %s/%s"
                      % (_ARC_TYPE, fst_type, arc_type))
    _version, flags = struct.unpack("<ii", r.take(8, "header"))
    if flags & 3:
        raise r.error("lattices with symbol tables are not supported")
    _props, start, ns, na = struct.unpack("<Qqqq", r.take(32, "header"))
    if ns < 0 or na < 0 or not (-1 <= start < max(ns, 1)):
        raise r.error("bad lattice header (start %d, %d states, %d arcs)" % (start, ns, na))
    final, arcs = [], []
    n_arcs = 0
    for s in range(ns):
        g, a, tids = _weight(r, "final weight")
        final.append(None if g == float("inf") else (g, a, tids))
        k = struct.unpack("<q", r.take(8, "arc count"))[0]
        lst = []
        for _ in range(k):
            il, ol = struct.unpack("<ii", r.take(8, "arc"))
            if il != ol:
                raise r.error("state %d: arc with labels %d:%d (a CompactLattice is an "
                              "acceptor)" % (s, il, ol))
            g, a, tids = _weight(r, "arc weight")
            d = struct.unpack("<i", r.take(4, "arc"))[0]
            if not 0 <= d < ns:
                raise r.error("state %d: arc to state %d of %d" % (s, d, ns))
            lst.append((il, g, a, tids, d))
        n_arcs += k
        arcs.append(lst)
    if na and n_arcs != na:  # Kaldi's lattice writer leaves the header's count at 0
        raise r.error("header says %d arcs, found %d" % (na, n_arcs))
    return CompactLattice(int(start), final, arcs)


COMPACT_LATTICE_HOLDER = Holder(read_compact_lattice)
"""Table holder for binary CompactLattices (read only)."""


def read_compact_lattices(spec: str) -> Iterator[Tuple[str, CompactLattice]]:
    """``(key, CompactLattice)`` of an rspecifier, or of a ``lat.N.gz`` path.

    Example::

        for key, lat in read_compact_lattices("exp/chain/lats/lat.1.gz"):
            times, num_frames = lat.state_times()
    """
    s = str(spec)
    if ":" not in s.split("/")[0] and s.endswith(".gz"):
        with gzip.open(s, "rb") as f:
            try:
                data = f.read()
            except (OSError, EOFError) as e:
                raise OSError("%s: cannot decompress (%s)" % (s, e))
        from .table import _iter_archive
        return _iter_archive(data, s, COMPACT_LATTICE_HOLDER)
    return iter(SequentialTableReader(s, COMPACT_LATTICE_HOLDER))
