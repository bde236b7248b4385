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

import struct
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import numpy as np

from .fst import OPENFST_MAGIC
from .io import KaldiReader
from .table import Holder, SequentialTableReader

__all__ = ["CompactLattice", "read_compact_lattice", "read_compact_lattices",
           "write_compact_lattice", "phone_align_lattice", "PhoneAlignError",
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


def read_compact_lattices(spec: str) -> Iterator[Tuple[str, CompactLattice]]:
    """``(key, CompactLattice)`` of an rspecifier, or of a ``lat.N.gz`` path.

    Example::

        for key, lat in read_compact_lattices("exp/chain/lats/lat.1.gz"):
            times, num_frames = lat.state_times()
    """
    s = str(spec)
    if ":" not in s.split("/")[0] and s.endswith(".gz"):
        from .table import read_archive_file
        return read_archive_file(s, COMPACT_LATTICE_HOLDER)
    return iter(SequentialTableReader(s, COMPACT_LATTICE_HOLDER))


# ======================================================================= writing
def write_compact_lattice(w, lat: CompactLattice) -> None:
    """Binary CompactLattice at the writer's position (the body of an archive entry, as
    Kaldi writes it: no ``"\\0B"`` header of its own)."""
    def string(s):
        b = s.encode("latin-1")
        w.write(struct.pack("<i", len(b)) + b)

    def weight(g, a, tids):
        tids = np.asarray(tids, dtype="<i4")
        w.write(struct.pack("<ffi", g, a, len(tids)) + tids.tobytes())

    w.write(struct.pack("<i", OPENFST_MAGIC))
    string("vector")
    string(_ARC_TYPE)
    n_arcs = sum(len(a) for a in lat.arcs)
    # version 2, no symbol tables, properties kExpanded | kMutable (the rest unknown)
    w.write(struct.pack("<iiQqqq", 2, 0, 3, lat.start, lat.num_states, n_arcs))
    inf = float("inf")
    for s in range(lat.num_states):
        f = lat.final[s]
        if f is None:
            weight(inf, inf, ())
        else:
            weight(*f)
        w.write(struct.pack("<q", len(lat.arcs[s])))
        for lab, g, a, tids, d in lat.arcs[s]:
            w.write(struct.pack("<ii", lab, lab))
            weight(g, a, tids)
            w.write(struct.pack("<i", d))


COMPACT_LATTICE_HOLDER = Holder(read_compact_lattice, write_compact_lattice,
                                binary_header=False)
"""Table holder for binary CompactLattices (read and write)."""


# ======================================================================= phone alignment
class PhoneAlignError(ValueError):
    """A lattice that cannot be phone-aligned (broken lattice or mismatched model)."""


_TID_TABLES: dict = {}


def _tid_tables(trans_model):
    """(is_final, is_self_loop, phone) per transition-id, built once per model."""
    ent = _TID_TABLES.get(id(trans_model))
    if ent is None or ent[0] is not trans_model:
        n = trans_model.num_transition_ids
        is_final = np.zeros(n + 1, bool)
        is_loop = np.zeros(n + 1, bool)
        phone_of = np.zeros(n + 1, np.int64)
        for t in range(1, n + 1):
            is_final[t] = trans_model.is_final(t)
            is_loop[t] = trans_model.is_self_loop(t)
            phone_of[t] = trans_model.transition_id_to_phone(t)
        ent = _TID_TABLES[id(trans_model)] = (trans_model, (is_final, is_loop, phone_of))
    return ent[1]


def phone_align_lattice(lat: CompactLattice, trans_model, replace_output_symbols: bool = True,
                        key: str = "<utt>") -> CompactLattice:
    """Kaldi's ``lattice-align-phones`` (``PhoneAlignLattice`` with ``--reorder=true``):
    a lattice whose every arc holds exactly one phone's transition-ids.

    A phone ends after its final transition-id (one that enters the topology's final
    state) and the self-loops that follow it (Kaldi's reordered HMMs); the next
    non-self-loop transition-id starts the next phone. Phones that cross the arcs of the
    input (word boundaries inside a phone) are joined along every path; an arc's
    weight (graph, acoustic) goes to the phone that holds its first frame, so every
    path keeps its total weight. With ``replace_output_symbols`` (as train.py uses it)
    the labels are the phones; else each phone arc keeps the first word label met on
    it (0 if none). States are numbered in time order.

    The result has the same timed phone paths with the same weights as Kaldi's; its
    state numbering and the split of weights between arcs may differ.

    Args:
      lat: the word lattice (a topologically sorted CompactLattice).
      trans_model: the :class:`pkwrap.kaldi.hmm.TransitionModel` the lattice was made
        with (the lat dir's ``final.mdl``).
      replace_output_symbols: labels become phones (``--replace-output-symbols=true``).
      key: the utterance, for error messages.
    Raises:
      PhoneAlignError: a phone changes before its final transition-id, a path starts
        with a self-loop or ends inside a phone.
    """
    if lat.start < 0 or lat.num_states == 0:
        raise PhoneAlignError("utterance %s: empty lattice" % key)
    times, total = lat.state_times()
    is_final, is_loop, phone_of = _tid_tables(trans_model)

    def bad(msg):
        return PhoneAlignError("utterance %s: %s (broken lattice or mismatched model?)"
                               % (key, msg))

    try:
        for s, arcs in enumerate(lat.arcs):
            for arc in arcs:
                trans_model.check_transition_ids(arc[3], "state %d" % s)
        for s, f in enumerate(lat.final):
            if f is not None:
                trans_model.check_transition_ids(f[2], "final weight of state %d" % s)
    except ValueError as e:
        raise bad(str(e)) from None

    # output nodes: ("B", s) boundary at lattice state s; ("M", s, ai, k) boundary
    # inside arc ai of state s before its k-th transition-id; ("E",) the end.
    node_id = {}
    node_time = []
    queue = []
    out_arcs: List[List] = []
    out_final: List = []

    def node(k, t):
        i = node_id.get(k)
        if i is None:
            i = node_id[k] = len(node_time)
            node_time.append(t)
            out_arcs.append([])
            out_final.append(None)
            queue.append(k)
        return i

    def add_final(i, g, a):
        f = out_final[i]
        if f is None or g + a < f[0] + f[1]:  # tropical: keep the better one
            out_final[i] = (g, a, np.zeros(0, np.int32))

    node(("B", lat.start), 0)
    head = 0
    while head < len(queue):
        nk = queue[head]
        src = head
        head += 1
        if nk[0] == "E":
            continue
        # stack items: (state, arc index or -1 (at the state), offset, g, a, tids, seen_final,
        #               label)
        if nk[0] == "B":
            stack = [(nk[1], -1, 0, 0.0, 0.0, (), False, 0)]
        else:
            stack = [(nk[1], nk[2], nk[3], 0.0, 0.0, (), False, 0)]
        while stack:
            s, ai, k, g, a, tids, seen, lab = stack.pop()
            if ai < 0:
                # at lattice state s: try every way on
                for j, (wl, ag, aa, atids, d) in enumerate(lat.arcs[s]):
                    if len(atids) == 0:
                        stack.append((d, -1, 0, g + ag, a + aa, tids, seen, lab or wl))
                        continue
                    b = int(atids[0])
                    if tids and seen and not is_loop[b]:
                        continue  # this phone ends here: handled below
                    if not tids and is_loop[b]:
                        continue  # no phone starts with a self-loop here
                    stack.append((s, j, 0, g + ag, a + aa, tids, seen, lab or wl))
                if tids and seen and any(len(x[3]) and not is_loop[int(x[3][0])]
                                         for x in lat.arcs[s]):
                    d = node(("B", s), times[s])
                    out_arcs[src].append((lab, g, a, tids, d))
                f = lat.final[s]
                if f is not None:
                    fg, fa, ftids = f
                    if len(ftids) == 0:
                        if not tids:
                            add_final(src, g + fg, a + fa)
                        elif seen:
                            d = node(("B", s), times[s])
                            out_arcs[src].append((lab, g, a, tids, d))
                            add_final(d, fg, fa)
                        else:
                            raise bad("a path ends inside phone %d" % phone_of[tids[0]])
                    else:
                        t2 = list(tids)
                        sn = seen
                        for b in ftids.tolist():
                            if t2 and sn and not is_loop[b]:
                                raise bad("final weight holds more than one phone")
                            if t2 and phone_of[b] != phone_of[t2[0]]:
                                raise bad("phone changes before its final transition-id")
                            t2.append(b)
                            sn = sn or bool(is_final[b])
                        if not sn:
                            raise bad("a path ends inside phone %d" % phone_of[t2[0]])
                        d = node(("E",), total)
                        out_arcs[src].append((lab, g + fg, a + fa, tuple(t2), d))
                        add_final(d, 0.0, 0.0)
                continue
            wl, _, _, atids, d = lat.arcs[s][ai]
            n = len(atids)
            t2 = list(tids)
            while k < n:
                b = int(atids[k])
                if t2 and seen and not is_loop[b]:
                    break
                if t2 and phone_of[b] != phone_of[t2[0]]:
                    raise bad("phone %d changes to %d before its final transition-id"
                              % (phone_of[t2[0]], phone_of[b]))
                if not t2 and is_loop[b]:
                    raise bad("a phone starts with a self-loop")
                t2.append(b)
                seen = seen or bool(is_final[b])
                k += 1
            if k < n:
                dn = node(("M", s, ai, k), times[s] + k)
                out_arcs[src].append((lab, g, a, tuple(t2), dn))
            else:
                stack.append((d, -1, 0, g, a, tuple(t2), seen, lab))
    # number the states in time order (every arc holds >= 1 frame: topological)
    order = sorted(range(len(node_time)), key=lambda i: (node_time[i], i))
    new = [0] * len(order)
    for r, i in enumerate(order):
        new[i] = r
    arcs = [[] for _ in order]
    final = [None] * len(order)
    for i in range(len(order)):
        r = new[i]
        final[r] = out_final[i]
        for lab, g, a, tids, d in out_arcs[i]:
            ph = int(phone_of[tids[0]])
            arcs[r].append((ph if replace_output_symbols else int(lab), float(g), float(a),
                            np.asarray(tids, np.int32), new[d]))
    return CompactLattice(new[0], final, arcs)
