"""Kaldi's phonetic decision tree, HMM topology and transition model, read and written.

**Context-dependency tree** (``ContextDependency``, the ``tree`` file). A phone in
context is an *event*: a sorted list of (key, value) pairs

    event = [(-1, pdf_class), (0, phone[0]), ..., (N-1, phone[N-1])]

where N is the context width, ``phone[P]`` (P = central position) the phone itself,
and the other keys its neighbours (value 0 = no phone: utterance boundary). The tree
``to_pdf`` is an *EventMap*, a recursive function ``event -> pdf-id``:

    CE a                 constant: answer a
    TE k n ( m_0 .. m_{n-1} )   table: value v of key k selects m_v (NULL entries: no answer)
    SE k [ s ] { yes no }       split: yes if the value of key k is in the sorted set s, else no
    NULL                 no answer (only inside a table)

A missing key, or a value outside a table, means "no answer" (``Map``). ``MultiMap``
instead follows every branch whose key is missing and collects all answers; Kaldi uses
it to enumerate the pdfs a (phone, pdf-class) can take in any context.

The file is ``ContextDependency N P ToPdf <EventMap> EndContextDependency``, in Kaldi's
binary form (``\\0B`` header, integers as a size byte then little-endian bytes, tokens
followed by a space) or text form (whitespace-separated tokens).

**HMM topology** (``topo``): for each set of phones, a list of HMM states; state j has
a forward pdf-class, a self-loop pdf-class (both -1 in the final, non-emitting state)
and transitions (destination state, probability). Chain models use the 1-state
topology: state 0 with ``<ForwardPdfClass> 0 <SelfLoopPdfClass> 1``, a self-loop and a
transition to the final state 1.

**Transition model** (``trans.mdl``, or the start of any ``final.mdl``). Its *tuples*
``(phone, hmm_state, forward_pdf, self_loop_pdf)`` are all combinations the tree allows,
sorted; transition-state ``s`` (1-based) is tuple ``s-1``. Each transition-state has
one transition-id per transition of its HMM state, numbered consecutively from 1 in
tuple order:

    transition_id = state2id[s] + transition_index,   state2id[1] = 1,
    state2id[s+1] = state2id[s] + len(topo[phone][hmm_state].transitions)

A transition-id's pdf is the self-loop pdf if its transition is the self-loop
(destination = its own HMM state), else the forward pdf. ``log_probs[tid]`` (index 0
unused) is the log transition probability; chain training never uses it.

All three objects read and write Kaldi's binary and text forms byte-compatibly with
``copy-tree``, ``copy-transition-model`` and Kaldi's own writers.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .io import KaldiFormatError, KaldiReader, KaldiWriter, format_float, write_kaldi_object
from .matrix import read_vector, write_vector
from .symbol_table import SymbolTable

__all__ = [
    "KaldiFormatError", "EventMap", "ConstantEventMap", "TableEventMap", "SplitEventMap",
    "ContextDependency", "HmmState", "HmmTopology", "TransitionModel",
    "read_tree", "write_tree", "read_topology", "write_topology",
    "read_transition_model", "write_transition_model", "show_transitions",
    "read_phone_symbols", "PDF_CLASS_KEY",
]

PDF_CLASS_KEY = -1  # Kaldi's kPdfClass: the event key holding the pdf-class
_NO_PDF = -1  # Kaldi's kNoPdf


# ---------------------------------------------------------------------------------------
# Whole objects: a file, bytes or stream in, bytes out (tokens and numbers: .io)


def _open_reader(path_or_file, what: str) -> KaldiReader:
    """A reader over a whole file, bytes or stream, its mode set by the binary header."""
    if isinstance(path_or_file, (str, os.PathLike)):
        name = os.fspath(path_or_file)
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as e:
            raise KaldiFormatError("%s: cannot read %s: %s" % (name, what, e.strerror or e)) from None
    elif isinstance(path_or_file, (bytes, bytearray)):
        data, name = bytes(path_or_file), "<bytes>"
    else:
        data = path_or_file.read()
        if isinstance(data, str):
            data = data.encode("latin-1")
        name = getattr(path_or_file, "name", "<stream>")
    if not data:
        raise KaldiFormatError("%s: empty file, expected %s" % (name, what))
    r = KaldiReader(data, name=name)
    r.read_header()
    return r


def _save(obj, binary: bool, path_or_file) -> Optional[bytes]:
    """Write ``obj`` (with a ``_write(KaldiWriter)`` method) after the binary header to
    ``path_or_file``, or return the bytes if it is None."""
    return write_kaldi_object(path_or_file, obj._write, binary)


def _read_prob(r: KaldiReader) -> float:
    """A transition probability, rounded to float32 as Kaldi stores it."""
    return float(np.float32(r.read_float("a transition probability")))


# ---------------------------------------------------------------------------------------
# EventMap


Event = Dict[int, int]


class EventMap:
    """Base of the three EventMap node kinds. ``event`` is a dict key -> value."""

    def map(self, event: Event) -> Optional[int]:
        """Kaldi's ``Map``: the answer, or None if the event leads nowhere."""
        raise NotImplementedError

    def multi_map(self, event: Event, out: List[int]) -> None:
        """Kaldi's ``MultiMap``: append every answer reachable when missing keys are free."""
        raise NotImplementedError

    def children(self) -> List["EventMap"]:
        raise NotImplementedError

    def max_result(self) -> int:
        """Largest answer anywhere in the map (-1 if none)."""
        best, stack = -1, [self]
        while stack:
            m = stack.pop()
            if isinstance(m, ConstantEventMap):
                best = max(best, m.answer)
            else:
                stack.extend(m.children())
        return best


@dataclass(eq=True)
class ConstantEventMap(EventMap):
    """``CE answer``."""

    answer: int

    def map(self, event):
        return self.answer

    def multi_map(self, event, out):
        out.append(self.answer)

    def children(self):
        return []


@dataclass(eq=True)
class TableEventMap(EventMap):
    """``TE key size ( ... )``: ``table[v]`` handles value v of ``key``; None = NULL."""

    key: int
    table: List[Optional[EventMap]]

    def map(self, event):
        v = event.get(self.key)
        if v is None or v < 0 or v >= len(self.table) or self.table[v] is None:
            return None
        return self.table[v].map(event)

    def multi_map(self, event, out):
        v = event.get(self.key)
        if v is None:
            for m in self.table:
                if m is not None:
                    m.multi_map(event, out)
        elif 0 <= v < len(self.table) and self.table[v] is not None:
            self.table[v].multi_map(event, out)

    def children(self):
        return [m for m in self.table if m is not None]


@dataclass(eq=True)
class SplitEventMap(EventMap):
    """``SE key [ yes_set ] { yes no }``: yes if the value of ``key`` is in ``yes_set``."""

    key: int
    yes_set: Tuple[int, ...]
    yes: EventMap
    no: EventMap

    def __post_init__(self):
        self.yes_set = tuple(sorted(set(self.yes_set)))
        self._set = frozenset(self.yes_set)

    def map(self, event):
        v = event.get(self.key)
        if v is None:
            return None
        return (self.yes if v in self._set else self.no).map(event)

    def multi_map(self, event, out):
        v = event.get(self.key)
        if v is None:
            self.yes.multi_map(event, out)
            self.no.multi_map(event, out)
        else:
            (self.yes if v in self._set else self.no).multi_map(event, out)

    def children(self):
        return [self.yes, self.no]


def _read_event_map(r: KaldiReader) -> Optional[EventMap]:
    # Iterative parser: trees can be deep (long chains of SE nodes).
    # Each frame is [kind, data, children-so-far, expected-children].
    def read_node():
        b = r.peek_char()
        if b < 0:
            raise r.error("unexpected end of data, expected an EventMap")
        c = chr(b)
        if c == "N":
            r.expect_token("NULL")
            return ("leaf", None)
        if c == "C":
            r.expect_token("CE")
            return ("leaf", ConstantEventMap(r.read_int32("a CE answer")))
        if c == "T":
            r.expect_token("TE")
            key = r.read_int32("a TE key")
            size = r.read_uint32("a TE size")
            if size > 10_000_000:
                raise r.error("implausible TE table size %d" % size)
            r.expect_token("(")
            return ("open", ["TE", key, size, []])
        if c == "S":
            r.expect_token("SE")
            key = r.read_int32("an SE key")
            yes_set = r.read_int_vector(what="an SE yes-set").tolist()
            r.expect_token("{")
            return ("open", ["SE", key, yes_set, []])
        raise r.error("expected an EventMap (CE, TE, SE or NULL), got character %r" % c)

    stack: List[list] = []
    kind, val = read_node()
    while True:
        if kind == "open":
            frame = val
            if frame[0] == "TE" and frame[2] == 0:
                r.expect_token(")")
                kind, val = "leaf", TableEventMap(frame[1], [])
                continue
            stack.append(frame)
            kind, val = read_node()
            continue
        # a finished node `val`: attach it to the parent (or return it)
        while True:
            if not stack:
                return val
            parent = stack[-1]
            parent[3].append(val)
            if parent[0] == "TE":
                if len(parent[3]) < parent[2]:
                    break
                r.expect_token(")")
                stack.pop()
                val = TableEventMap(parent[1], parent[3])
            else:
                if len(parent[3]) < 2:
                    break
                r.expect_token("}")
                stack.pop()
                yes, no = parent[3]
                if yes is None or no is None:
                    raise r.error("SE node with a NULL branch")
                val = SplitEventMap(parent[1], tuple(parent[2]), yes, no)
        kind, val = read_node()


def _write_event_map(w: KaldiWriter, m: Optional[EventMap]) -> None:
    # Kaldi's layout: after ")" of a TE and "}" of an SE, text mode adds a newline.
    stack: List[Tuple[str, object]] = [("node", m)]
    while stack:
        op, x = stack.pop()
        if op == "tok":
            w.write_token(x)
            if not w.binary and x in (")", "}"):
                w.newline()
            continue
        if x is None:
            w.write_token("NULL")
        elif isinstance(x, ConstantEventMap):
            w.write_token("CE")
            w.write_int32(x.answer)
        elif isinstance(x, TableEventMap):
            w.write_token("TE")
            w.write_int32(x.key)
            w.write_uint32(len(x.table))
            w.write_token("(")
            stack.append(("tok", ")"))
            for child in reversed(x.table):
                stack.append(("node", child))
        elif isinstance(x, SplitEventMap):
            w.write_token("SE")
            w.write_int32(x.key)
            w.write_int_vector(x.yes_set)
            w.write_token("{")
            stack.append(("tok", "}"))
            stack.append(("node", x.no))
            stack.append(("node", x.yes))
        else:
            raise TypeError("not an EventMap: %r" % (x,))


# ---------------------------------------------------------------------------------------
# ContextDependency


class ContextDependency:
    """Kaldi's phonetic-context decision tree.

    Args:
      context_width: N, the number of phones in a context window (1 mono, 2 left biphone,
        3 triphone).
      central_position: P, the index of the phone itself inside the window.
      to_pdf: the EventMap from (pdf-class, phone window) to pdf-id.
    """

    def __init__(self, context_width: int, central_position: int, to_pdf: EventMap):
        if context_width < 1 or not 0 <= central_position < context_width:
            raise ValueError("bad context width %d / central position %d"
                             % (context_width, central_position))
        self.context_width = int(context_width)
        self.central_position = int(central_position)
        self.to_pdf = to_pdf
        self.num_pdfs = to_pdf.max_result() + 1 if to_pdf is not None else 0

    def __eq__(self, other):
        return (isinstance(other, ContextDependency)
                and self.context_width == other.context_width
                and self.central_position == other.central_position
                and self.to_pdf == other.to_pdf)

    def __repr__(self):
        return "ContextDependency(context_width=%d, central_position=%d, num_pdfs=%d)" % (
            self.context_width, self.central_position, self.num_pdfs)

    def compute(self, phone_window: Sequence[int], pdf_class: int) -> Optional[int]:
        """The pdf-id of a phone in context (Kaldi's ``Compute``).

        Args:
          phone_window: N phone ids; entry ``central_position`` is the phone, the others
            its context (0 = no phone, at an utterance boundary).
          pdf_class: the HMM state's pdf-class.
        Returns:
          the pdf-id, or None if the tree has no answer for this context.
        """
        if len(phone_window) != self.context_width:
            raise ValueError("phone window %r has %d phones, the tree's context width is %d"
                             % (list(phone_window), len(phone_window), self.context_width))
        event = {PDF_CLASS_KEY: int(pdf_class)}
        for i, p in enumerate(phone_window):
            if p < 0:
                raise ValueError("negative phone %d in window %r" % (p, list(phone_window)))
            event[i] = int(p)
        return self.to_pdf.map(event)

    def _multi(self, window: Sequence[int], pdf_class: int) -> List[int]:
        event = {i: p for i, p in enumerate(window) if p >= 0}
        event[PDF_CLASS_KEY] = pdf_class
        out: List[int] = []
        self.to_pdf.multi_map(event, out)
        return sorted(set(out))

    def _enumerate_pairs(self, phones, self_loop_pdf_class, forward_pdf_class, window, pairs):
        forward = self._multi(window, forward_pdf_class)
        if self_loop_pdf_class < 0:
            pairs.update((f, -1) for f in forward)
            return
        self_loop = self._multi(window, self_loop_pdf_class)
        if len(forward) == 1 or len(self_loop) == 1:
            pairs.update((f, s) for f in forward for s in self_loop)
            return
        # Both ambiguous: fix the free position nearest the centre, try every value.
        N, P = self.context_width, self.central_position
        position, min_dist = 0, N - 1
        for i in range(N):
            if window[i] == -1 and abs(P - i) < min_dist:
                position, min_dist = i, abs(P - i)
        if min_dist >= N or position == P:
            raise ValueError("cannot enumerate pdf pairs for window %r" % (list(window),))
        new_window = list(window)
        for value in [0] + list(phones):
            new_window[position] = value
            self._enumerate_pairs(phones, self_loop_pdf_class, forward_pdf_class,
                                  new_window, pairs)

    def get_pdf_info(self, phones: Sequence[int],
                     pdf_class_pairs: Dict[int, List[Tuple[int, int]]]
                     ) -> Dict[int, List[List[Tuple[int, int]]]]:
        """For each phone and (forward, self-loop) pdf-class pair, the (forward pdf,
        self-loop pdf) pairs the tree allows in any context (Kaldi's ``GetPdfInfo``).

        Args:
          phones: sorted phone ids.
          pdf_class_pairs: phone -> list of (forward pdf-class, self-loop pdf-class).
        Returns:
          phone -> list (parallel to ``pdf_class_pairs[phone]``) of sorted pair lists.
        """
        info = {}
        for phone in phones:
            info[phone] = []
            for fwd_class, sl_class in pdf_class_pairs[phone]:
                window = [-1] * self.context_width
                window[self.central_position] = phone
                pairs: set = set()
                self._enumerate_pairs(phones, sl_class, fwd_class, window, pairs)
                info[phone].append(sorted(pairs))
        return info

    # -- I/O --
    @classmethod
    def _read(cls, r: KaldiReader) -> "ContextDependency":
        r.expect_token("ContextDependency")
        N = r.read_int32("the context width")
        P = r.read_int32("the central position")
        tok = r.read_token()
        if tok == "ToLength":  # old format: skip the length map
            _read_event_map(r)
            tok = r.read_token()
        if tok != "ToPdf":
            raise r.error("expected ToPdf, got %r" % tok)
        to_pdf = _read_event_map(r)
        r.expect_token("EndContextDependency")
        if to_pdf is None:
            raise r.error("the tree's ToPdf map is NULL")
        try:
            return cls(N, P, to_pdf)
        except ValueError as e:
            raise r.error(str(e)) from None

    def _write(self, w: KaldiWriter) -> None:
        w.write_token("ContextDependency")
        w.write_int32(self.context_width)
        w.write_int32(self.central_position)
        w.write_token("ToPdf")
        _write_event_map(w, self.to_pdf)
        w.write_token("EndContextDependency")


def read_tree(path_or_file) -> ContextDependency:
    """Read a Kaldi ``tree`` (binary or text, as ``copy-tree`` writes it).

    Args:
      path_or_file: a path, bytes, or a binary file object.
    Returns:
      the :class:`ContextDependency`.
    """
    r = _open_reader(path_or_file, "a Kaldi tree")
    return ContextDependency._read(r)


def write_tree(tree: ContextDependency, path_or_file=None, binary: bool = True):
    """Write a tree as ``copy-tree [--binary=false]`` does.

    Args:
      tree: the tree.
      path_or_file: destination; None returns the bytes.
      binary: Kaldi binary (default) or text form.
    """
    return _save(tree, binary, path_or_file)


# ---------------------------------------------------------------------------------------
# HmmTopology


@dataclass
class HmmState:
    """One state of a topology entry.

    Args:
      forward_pdf_class: pdf-class of transitions leaving the state (-1: non-emitting).
      self_loop_pdf_class: pdf-class of its self-loop (equal to forward in a plain HMM).
      transitions: list of (destination state, probability).
    """

    forward_pdf_class: int = _NO_PDF
    self_loop_pdf_class: int = _NO_PDF
    transitions: List[Tuple[int, float]] = field(default_factory=list)


class HmmTopology:
    """Kaldi's ``HmmTopology``: one list of :class:`HmmState` per topology entry.

    Args:
      entries: list of topology entries (each a list of HmmState).
      phone_to_entry: dict phone -> entry index.
    """

    def __init__(self, entries: List[List[HmmState]], phone_to_entry: Dict[int, int],
                 name: str = "<topology>"):
        self.entries = entries
        self.phones = sorted(phone_to_entry)
        self.phone_to_entry = dict(phone_to_entry)
        self._check(name)

    def __eq__(self, other):
        return (isinstance(other, HmmTopology) and self.entries == other.entries
                and self.phone_to_entry == other.phone_to_entry)

    def __repr__(self):
        return "HmmTopology(%d entries, %d phones)" % (len(self.entries), len(self.phones))

    def topology_for_phone(self, phone: int) -> List[HmmState]:
        """The HMM states of ``phone``'s entry (KeyError-free: ValueError if unknown)."""
        idx = self.phone_to_entry.get(phone)
        if idx is None:
            raise ValueError("phone %d is not in the topology (phones %d..%d)"
                             % (phone, self.phones[0], self.phones[-1]))
        return self.entries[idx]

    def num_pdf_classes(self, phone: int) -> int:
        """1 + the largest pdf-class of the phone's states."""
        m = -1
        for st in self.topology_for_phone(phone):
            m = max(m, st.forward_pdf_class, st.self_loop_pdf_class)
        return m + 1

    def is_hmm(self) -> bool:
        """True if every state's forward and self-loop pdf-classes coincide."""
        return all(st.forward_pdf_class == st.self_loop_pdf_class
                   for e in self.entries for st in e)

    def min_length(self, phone: int) -> int:
        """Fewest frames a phone can take (emitting states on the shortest path)."""
        entry = self.topology_for_phone(phone)
        n = len(entry)
        dist = [None] * n
        dist[0] = 0
        changed = True
        while changed:
            changed = False
            for j, st in enumerate(entry):
                if dist[j] is None:
                    continue
                cost = 1 if st.forward_pdf_class != _NO_PDF else 0
                for dst, _ in st.transitions:
                    if dst != j and (dist[dst] is None or dist[j] + cost < dist[dst]):
                        dist[dst] = dist[j] + cost
                        changed = True
        return dist[n - 1]

    def _check(self, name: str):
        def bad(msg):
            raise KaldiFormatError("%s: %s" % (name, msg))

        if not self.entries or not self.phones:
            bad("empty topology")
        used = set(self.phone_to_entry.values())
        for i, entry in enumerate(self.entries):
            if i not in used:
                bad("topology entry %d has no phones" % i)
            n = len(entry)
            if n <= 1:
                bad("topology entry %d must have at least one emitting state" % i)
            if entry[-1].transitions or entry[-1].forward_pdf_class != _NO_PDF:
                bad("the last state of topology entry %d must be final: no pdf, no transitions"
                    % i)
            classes = set()
            for j, st in enumerate(entry):
                if st.forward_pdf_class != _NO_PDF:
                    classes.update((st.forward_pdf_class, st.self_loop_pdf_class))
                seen = set()
                for dst, p in st.transitions:
                    if not 0 <= dst < n:
                        bad("entry %d state %d: invalid destination state %d" % (i, j, dst))
                    if not 0 < p <= 1:  # also NaN / inf
                        bad("entry %d state %d: transition probability %r is not in (0, 1]"
                            % (i, j, p))
                    if dst in seen:
                        bad("entry %d state %d: duplicate transition to %d" % (i, j, dst))
                    seen.add(dst)
                if j + 1 < n and not st.transitions:
                    bad("entry %d state %d: non-final state without transitions" % (i, j))
            has_in = {dst for st in entry for dst, _ in st.transitions}
            for j in range(1, n):
                if j not in has_in:
                    bad("entry %d state %d has no input transitions" % (i, j))
            if not classes or min(classes) != 0 or max(classes) != len(classes) - 1:
                bad("entry %d: pdf-classes must be contiguous from 0" % i)
        for p in self.phones:
            if p <= 0:
                bad("phone ids must be positive, got %d" % p)

    # -- I/O --
    @classmethod
    def _read(cls, r: KaldiReader) -> "HmmTopology":
        r.expect_token("<Topology>")
        entries: List[List[HmmState]] = []
        phone_to_entry: Dict[int, int] = {}
        if not r.binary:
            while True:
                tok = r.read_token()
                if tok == "</Topology>":
                    break
                if tok != "<TopologyEntry>":
                    raise r.error("expected <TopologyEntry> or </Topology>, got %r" % tok)
                r.expect_token("<ForPhones>")
                phones = []
                while True:
                    w = r.read_token()
                    if w == "</ForPhones>":
                        break
                    try:
                        phones.append(int(w))
                    except ValueError:
                        raise r.error("expected a phone id in <ForPhones>, got %r" % w)
                entry: List[HmmState] = []
                tok = r.read_token()
                while tok != "</TopologyEntry>":
                    if tok != "<State>":
                        raise r.error("expected <State> or </TopologyEntry>, got %r" % tok)
                    s = r.read_int32("a state id")
                    if s != len(entry):
                        raise r.error("states must be numbered in order from 0: "
                                      "expected %d, got %d" % (len(entry), s))
                    tok = r.read_token()
                    st = HmmState()
                    if tok == "<PdfClass>":
                        st.forward_pdf_class = r.read_int32("a pdf-class")
                        st.self_loop_pdf_class = st.forward_pdf_class
                        tok = r.read_token()
                    elif tok == "<ForwardPdfClass>":
                        st.forward_pdf_class = r.read_int32("a pdf-class")
                        r.expect_token("<SelfLoopPdfClass>")
                        st.self_loop_pdf_class = r.read_int32("a pdf-class")
                        tok = r.read_token()
                    while tok == "<Transition>":
                        dst = r.read_int32("a destination state")
                        st.transitions.append((dst, _read_prob(r)))
                        tok = r.read_token()
                    if tok != "</State>":
                        raise r.error("expected </State>, got %r" % tok)
                    entry.append(st)
                    tok = r.read_token()
                for p in phones:
                    if not 0 < p < 10 * (len(phone_to_entry) + len(phones)) + 1000:
                        # the phone-to-entry map is sized by the largest phone id
                        raise r.error("phone id %d in <ForPhones> is out of range" % p)
                    if p in phone_to_entry:
                        raise r.error("phone %d appears in more than one topology entry" % p)
                    phone_to_entry[p] = len(entries)
                entries.append(entry)
        else:
            phones = r.read_int_vector(what="the topology's phones").tolist()
            phone2idx = r.read_int_vector(what="the topology's phone-to-entry map").tolist()
            n = r.read_int32("the number of topology entries")
            is_hmm = True
            if n == -1:
                is_hmm = False
                n = r.read_int32("the number of topology entries")
            for _ in range(n):
                m = r.read_int32("the number of HMM states")
                entry = []
                for _ in range(m):
                    st = HmmState()
                    st.forward_pdf_class = r.read_int32("a pdf-class")
                    st.self_loop_pdf_class = (st.forward_pdf_class if is_hmm
                                              else r.read_int32("a pdf-class"))
                    k = r.read_int32("the number of transitions")
                    for _ in range(k):
                        dst = r.read_int32("a destination state")
                        st.transitions.append((dst, _read_prob(r)))
                    entry.append(st)
                entries.append(entry)
            r.expect_token("</Topology>")
            for p in phones:
                if p >= len(phone2idx) or not 0 <= phone2idx[p] < n:
                    raise r.error("phone %d has no valid topology entry" % p)
                phone_to_entry[p] = phone2idx[p]
        return cls(entries, phone_to_entry, r.name)

    def _write(self, w: KaldiWriter) -> None:
        is_hmm = self.is_hmm()
        w.write_token("<Topology>")
        if not w.binary:
            w.newline()
            for i, entry in enumerate(self.entries):
                w.write_token("<TopologyEntry>")
                w.newline()
                w.write_token("<ForPhones>")
                w.newline()
                w.write("".join("%d " % p for p in self.phones
                                if self.phone_to_entry[p] == i).encode())
                w.newline()
                w.write_token("</ForPhones>")
                w.newline()
                for j, st in enumerate(entry):
                    w.write_token("<State>")
                    w.write_int32(j)
                    if st.forward_pdf_class != _NO_PDF:
                        if is_hmm:
                            w.write_token("<PdfClass>")
                            w.write_int32(st.forward_pdf_class)
                        else:
                            w.write_token("<ForwardPdfClass>")
                            w.write_int32(st.forward_pdf_class)
                            w.write_token("<SelfLoopPdfClass>")
                            w.write_int32(st.self_loop_pdf_class)
                    for dst, p in st.transitions:
                        w.write_token("<Transition>")
                        w.write_int32(dst)
                        w.write_float(p)
                    w.write_token("</State>")
                    w.newline()
                w.write_token("</TopologyEntry>")
                w.newline()
        else:
            w.write_int_vector(self.phones)
            phone2idx = [-1] * (self.phones[-1] + 1)
            for p, i in self.phone_to_entry.items():
                phone2idx[p] = i
            w.write_int_vector(phone2idx)
            if not is_hmm:
                w.write_int32(-1)
            w.write_int32(len(self.entries))
            for entry in self.entries:
                w.write_int32(len(entry))
                for st in entry:
                    w.write_int32(st.forward_pdf_class)
                    if not is_hmm:
                        w.write_int32(st.self_loop_pdf_class)
                    w.write_int32(len(st.transitions))
                    for dst, p in st.transitions:
                        w.write_int32(dst)
                        w.write_float(p)
        w.write_token("</Topology>")
        w.newline()


def read_topology(path_or_file) -> HmmTopology:
    """Read a Kaldi topology file (``topo``: text, or binary as inside a model).

    Args:
      path_or_file: a path, bytes or binary file object.
    Returns:
      the :class:`HmmTopology`.
    """
    return HmmTopology._read(_open_reader(path_or_file, "a Kaldi HMM topology"))


def write_topology(topo: HmmTopology, path_or_file=None, binary: bool = False):
    """Write a topology (text by default, like ``topo`` files).

    Args:
      topo: the topology.
      path_or_file: destination; None returns the bytes.
      binary: Kaldi binary or text form.
    """
    return _save(topo, binary, path_or_file)


# ---------------------------------------------------------------------------------------
# TransitionModel


class TransitionModel:
    """Kaldi's ``TransitionModel``.

    Args:
      topology: the :class:`HmmTopology`.
      tuples: sorted list of (phone, hmm_state, forward_pdf, self_loop_pdf); transition-state
        s (1-based) is ``tuples[s-1]``.
      log_probs: float32 ``[num_transition_ids + 1]``, log transition probabilities
        indexed by transition-id (entry 0 unused). Default: from the topology.
    """

    def __init__(self, topology: HmmTopology, tuples: Sequence[Tuple[int, int, int, int]],
                 log_probs: Optional[np.ndarray] = None, name: str = "<transition model>"):
        self.topology = topology
        self.tuples = [tuple(int(x) for x in t) for t in tuples]
        self._name = name
        self._compute_derived()
        if log_probs is None:
            log_probs = self._initial_log_probs()
        log_probs = np.asarray(log_probs, dtype=np.float32)
        if log_probs.shape != (self.num_transition_ids + 1,):
            raise KaldiFormatError("%s: %d log-probs for %d transition-ids (expected %d)"
                                   % (name, log_probs.shape[0], self.num_transition_ids,
                                      self.num_transition_ids + 1))
        if np.any(log_probs[1:] > 0) or not np.all(np.isfinite(log_probs[1:])):
            raise KaldiFormatError("%s: transition log-probs must be finite and <= 0" % name)
        # each transition state's probabilities sum to one (Kaldi's TransitionModel::Check);
        # a graph built from anything else is not stochastic (weight pushing may not end)
        st = self._state2id
        sums = np.add.reduceat(np.exp(log_probs[1:].astype(np.float64)),
                               np.asarray(st[1:-1], np.int64) - 1) if len(st) > 2 else []
        bad = np.flatnonzero(np.abs(np.asarray(sums) - 1.0) > 0.01)
        if len(bad):
            raise KaldiFormatError("%s: the transition probabilities of transition-state %d "
                                   "sum to %g, not 1" % (name, bad[0] + 1, sums[bad[0]]))
        self.log_probs = log_probs

    @classmethod
    def from_tree(cls, tree: ContextDependency, topology: HmmTopology) -> "TransitionModel":
        """Kaldi's ``TransitionModel(ctx_dep, topo)``: every (phone, HMM state, forward pdf,
        self-loop pdf) combination the tree allows, sorted; probabilities from the topology.

        Args:
          tree: the context-dependency tree.
          topology: the HMM topology (its phones are the model's phones).
        """
        phones = topology.phones
        tuples = []
        if topology.is_hmm():
            num_classes = {p: topology.num_pdf_classes(p) for p in phones}
            pdf_info: Dict[int, List[Tuple[int, int]]] = {}
            for phone in phones:
                for pos in range(num_classes[phone]):
                    event = {tree.central_position: phone, PDF_CLASS_KEY: pos}
                    out: List[int] = []
                    tree.to_pdf.multi_map(event, out)
                    for pdf in sorted(set(out)):
                        pdf_info.setdefault(pdf, []).append((phone, pos))
            states = {}
            for phone in phones:
                for j, st in enumerate(topology.topology_for_phone(phone)):
                    if st.forward_pdf_class != _NO_PDF:
                        states.setdefault((phone, st.forward_pdf_class), []).append(j)
            for pdf in sorted(pdf_info):
                for phone, pdf_class in sorted(pdf_info[pdf]):
                    for j in states.get((phone, pdf_class), []):
                        tuples.append((phone, j, pdf, pdf))
        else:
            class_pairs = {}
            for phone in phones:
                class_pairs[phone] = [(st.forward_pdf_class, st.self_loop_pdf_class)
                                      for st in topology.topology_for_phone(phone)
                                      if st.forward_pdf_class != _NO_PDF]
            info = tree.get_pdf_info(phones, class_pairs)
            for phone in phones:
                entry = topology.topology_for_phone(phone)
                for (fc, sc), pairs in zip(class_pairs[phone], info[phone]):
                    for j, st in enumerate(entry):
                        if (st.forward_pdf_class, st.self_loop_pdf_class) == (fc, sc) \
                                and st.forward_pdf_class != _NO_PDF:
                            for pdf, sl_pdf in pairs:
                                tuples.append((phone, j, pdf, sl_pdf))
        if not tuples:
            raise ValueError("the tree gives no pdf for any phone of the topology")
        tuples.sort()
        return cls(topology, tuples)

    def _compute_derived(self):
        n = len(self.tuples)
        state2id = np.zeros(n + 2, dtype=np.int64)
        cur = 1
        self.num_pdfs = 0
        for s in range(1, n + 2):
            state2id[s] = cur
            if s <= n:
                phone, hmm_state, fpdf, spdf = self.tuples[s - 1]
                try:
                    entry = self.topology.topology_for_phone(phone)
                except ValueError as e:
                    raise KaldiFormatError("%s: tuple %d: %s" % (self._name, s, e)) from None
                if not 0 <= hmm_state < len(entry):
                    raise KaldiFormatError("%s: tuple %d has HMM state %d, phone %d has %d"
                                           % (self._name, s, hmm_state, phone, len(entry)))
                if not (0 <= fpdf < 2 * n + 1 and 0 <= spdf < 2 * n + 1):
                    # pdfs are numbered densely; the tuples mention every one of them
                    raise KaldiFormatError("%s: tuple %d has pdf %d, out of range for %d "
                                           "tuples" % (self._name, s, max(fpdf, spdf)
                                                       if min(fpdf, spdf) >= 0
                                                       else min(fpdf, spdf), n))
                self.num_pdfs = max(self.num_pdfs, 1 + fpdf, 1 + spdf)
                cur += len(entry[hmm_state].transitions)
        self._state2id = state2id
        num_tids = cur - 1
        id2state = np.zeros(num_tids + 1, dtype=np.int32)
        id2index = np.zeros(num_tids + 1, dtype=np.int32)
        id2pdf = np.full(num_tids + 1, -1, dtype=np.int32)
        id2self_loop = np.zeros(num_tids + 1, dtype=bool)
        id2dest = np.zeros(num_tids + 1, dtype=np.int32)
        for s in range(1, n + 1):
            phone, hmm_state, fpdf, spdf = self.tuples[s - 1]
            st = self.topology.topology_for_phone(phone)[hmm_state]
            for k in range(state2id[s + 1] - state2id[s]):
                tid = state2id[s] + k
                id2state[tid] = s
                id2index[tid] = k
                dst = st.transitions[k][0]
                id2dest[tid] = dst
                id2self_loop[tid] = dst == hmm_state
                id2pdf[tid] = spdf if dst == hmm_state else fpdf
        self._id2state, self._id2index, self._id2pdf = id2state, id2index, id2pdf
        self._id2self_loop, self._id2dest = id2self_loop, id2dest
        self.num_transition_ids = num_tids
        self.num_transition_states = n

    def _initial_log_probs(self) -> np.ndarray:
        lp = np.zeros(self.num_transition_ids + 1, dtype=np.float32)
        for tid in range(1, self.num_transition_ids + 1):
            phone, hmm_state, _, _ = self.tuples[self._id2state[tid] - 1]
            p = self.topology.topology_for_phone(phone)[hmm_state].transitions[
                self._id2index[tid]][1]
            lp[tid] = np.log(np.float32(p))
        return lp

    def __eq__(self, other):
        return (isinstance(other, TransitionModel) and self.topology == other.topology
                and self.tuples == other.tuples
                and np.array_equal(self.log_probs, other.log_probs))

    def __repr__(self):
        return ("TransitionModel(num_phones=%d, num_pdfs=%d, num_transition_states=%d, "
                "num_transition_ids=%d)" % (len(self.topology.phones), self.num_pdfs,
                                             self.num_transition_states,
                                             self.num_transition_ids))

    # -- lookups --
    def _check_tid(self, tid: int):
        if not 1 <= tid <= self.num_transition_ids:
            raise ValueError("transition-id %d out of range [1, %d]"
                             % (tid, self.num_transition_ids))

    def check_transition_ids(self, tids, what: str = "input") -> None:
        """Raise ValueError (naming ``what``) unless every transition-id in ``tids`` (an
        array or sequence) is in ``[1, num_transition_ids]``: labels read from a
        lattice, alignment or graph are checked before they index the model's tables."""
        a = np.asarray(tids)
        if a.size and (int(a.min()) < 1 or int(a.max()) > self.num_transition_ids):
            bad = a[(a < 1) | (a > self.num_transition_ids)].flat[0]
            raise ValueError("%s: transition-id %d out of range [1, %d] (not made with this "
                             "transition model, or corrupt)" % (what, int(bad),
                                                                 self.num_transition_ids))

    @property
    def phones(self) -> List[int]:
        return list(self.topology.phones)

    def transition_id_to_pdf(self, tid: int) -> int:
        """pdf-id of a transition-id (self-loop pdf for self-loops)."""
        self._check_tid(tid)
        return int(self._id2pdf[tid])

    def transition_id_to_phone(self, tid: int) -> int:
        self._check_tid(tid)
        return self.tuples[self._id2state[tid] - 1][0]

    def transition_id_to_hmm_state(self, tid: int) -> int:
        self._check_tid(tid)
        return self.tuples[self._id2state[tid] - 1][1]

    def transition_id_to_transition_state(self, tid: int) -> int:
        self._check_tid(tid)
        return int(self._id2state[tid])

    def transition_id_to_transition_index(self, tid: int) -> int:
        self._check_tid(tid)
        return int(self._id2index[tid])

    def transition_id_to_pdf_class(self, tid: int) -> int:
        self._check_tid(tid)
        phone, hmm_state, _, _ = self.tuples[self._id2state[tid] - 1]
        st = self.topology.topology_for_phone(phone)[hmm_state]
        return st.self_loop_pdf_class if self._id2self_loop[tid] else st.forward_pdf_class

    def is_self_loop(self, tid: int) -> bool:
        self._check_tid(tid)
        return bool(self._id2self_loop[tid])

    def is_final(self, tid: int) -> bool:
        """True if the transition enters the final (non-emitting) state of its phone."""
        self._check_tid(tid)
        phone = self.tuples[self._id2state[tid] - 1][0]
        return int(self._id2dest[tid]) + 1 == len(self.topology.topology_for_phone(phone))

    def tuple_to_transition_state(self, phone: int, hmm_state: int, forward_pdf: int,
                                  self_loop_pdf: int) -> int:
        """1-based transition-state of a tuple (ValueError if the tree never makes it)."""
        t = (phone, hmm_state, forward_pdf, self_loop_pdf)
        i = bisect.bisect_left(self.tuples, t)
        if i == len(self.tuples) or self.tuples[i] != t:
            raise ValueError("tuple %r not in the transition model (tree and model "
                             "incompatible?)" % (t,))
        return i + 1

    def pair_to_transition_id(self, trans_state: int, trans_index: int) -> int:
        if not 1 <= trans_state <= self.num_transition_states:
            raise ValueError("transition-state %d out of range" % trans_state)
        n = int(self._state2id[trans_state + 1] - self._state2id[trans_state])
        if not 0 <= trans_index < n:
            raise ValueError("transition-index %d out of range for state %d"
                             % (trans_index, trans_state))
        return int(self._state2id[trans_state] + trans_index)

    def tuple_to_transition_id(self, phone: int, hmm_state: int, forward_pdf: int,
                               self_loop_pdf: int, trans_index: int) -> int:
        """Transition-id of transition ``trans_index`` of a tuple's transition-state."""
        return self.pair_to_transition_id(
            self.tuple_to_transition_state(phone, hmm_state, forward_pdf, self_loop_pdf),
            trans_index)

    def num_transition_indices(self, trans_state: int) -> int:
        return int(self._state2id[trans_state + 1] - self._state2id[trans_state])

    def self_loop_of(self, trans_state: int) -> int:
        """Transition-id of the state's self-loop, 0 if it has none."""
        for tid in range(int(self._state2id[trans_state]), int(self._state2id[trans_state + 1])):
            if self._id2self_loop[tid]:
                return tid
        return 0

    def transition_prob(self, tid: int) -> float:
        self._check_tid(tid)
        return float(np.exp(self.log_probs[tid]))

    def transition_log_prob(self, tid: int) -> float:
        self._check_tid(tid)
        return float(self.log_probs[tid])

    @property
    def pdf_to_transition_ids(self) -> List[List[int]]:
        """``[num_pdfs]`` lists of the transition-ids that carry each pdf."""
        out: List[List[int]] = [[] for _ in range(self.num_pdfs)]
        for tid in range(1, self.num_transition_ids + 1):
            out[self._id2pdf[tid]].append(tid)
        return out

    @property
    def transition_id_to_pdf_array(self) -> np.ndarray:
        """int32 ``[num_transition_ids + 1]``: pdf of each transition-id (entry 0 = -1)."""
        return self._id2pdf.copy()

    @property
    def transition_id_to_transition_state_array(self) -> np.ndarray:
        """int32 ``[num_transition_ids + 1]``: 1-based transition-state of each
        transition-id (entry 0 = 0)."""
        return self._id2state.copy()

    @property
    def is_self_loop_array(self) -> np.ndarray:
        """bool ``[num_transition_ids + 1]``: whether each transition-id is a self-loop
        (entry 0 = False)."""
        return self._id2self_loop.copy()

    def pdf_counts(self, transition_id_counts: np.ndarray) -> np.ndarray:
        """Sum counts per transition-id into counts per pdf (what ``ali-to-pdf`` followed by
        ``analyze-counts`` gives, e.g. for priors).

        Args:
          transition_id_counts: ``[num_transition_ids + 1]`` (entry 0 ignored).
        Returns:
          float64 ``[num_pdfs]``.
        """
        c = np.asarray(transition_id_counts, dtype=np.float64)
        if c.shape != (self.num_transition_ids + 1,):
            raise ValueError("expected %d counts, got %s" % (self.num_transition_ids + 1,
                                                              c.shape))
        return np.bincount(self._id2pdf[1:], weights=c[1:], minlength=self.num_pdfs)

    # -- I/O --
    @classmethod
    def _read(cls, r: KaldiReader) -> "TransitionModel":
        r.expect_token("<TransitionModel>")
        topo = HmmTopology._read(r)
        tok = r.read_token()
        if tok not in ("<Tuples>", "<Triples>"):
            raise r.error("expected <Tuples> or <Triples>, got %r" % tok)
        n = r.read_int32("the number of tuples")
        if n < 0:
            raise r.error("negative number of tuples")
        tuples = []
        for _ in range(n):
            phone = r.read_int32("a tuple's phone")
            hmm_state = r.read_int32("a tuple's HMM state")
            fpdf = r.read_int32("a tuple's pdf")
            spdf = r.read_int32("a tuple's self-loop pdf") if tok == "<Tuples>" else fpdf
            tuples.append((phone, hmm_state, fpdf, spdf))
        end = r.read_token()
        if end not in ("</Tuples>", "</Triples>"):
            raise r.error("expected </Tuples> or </Triples>, got %r" % end)
        r.expect_token("<LogProbs>")
        log_probs = read_vector(r)
        r.expect_token("</LogProbs>")
        r.expect_token("</TransitionModel>")
        if tuples != sorted(tuples):
            raise r.error("tuples are not sorted")
        return cls(topo, tuples, log_probs, name=r.name)

    def _write(self, w: KaldiWriter) -> None:
        is_hmm = self.topology.is_hmm()
        w.write_token("<TransitionModel>")
        w.newline()
        self.topology._write(w)
        w.write_token("<Triples>" if is_hmm else "<Tuples>")
        w.write_int32(len(self.tuples))
        w.newline()
        for phone, hmm_state, fpdf, spdf in self.tuples:
            w.write_int32(phone)
            w.write_int32(hmm_state)
            w.write_int32(fpdf)
            if not is_hmm:
                w.write_int32(spdf)
            w.newline()
        w.write_token("</Triples>" if is_hmm else "</Tuples>")
        w.newline()
        w.write_token("<LogProbs>")
        w.newline()
        write_vector(w, np.asarray(self.log_probs, dtype=np.float32))
        w.write_token("</LogProbs>")
        w.newline()
        w.write_token("</TransitionModel>")
        w.newline()


def read_transition_model(path_or_file) -> TransitionModel:
    """Read the TransitionModel at the start of a Kaldi model file (``trans.mdl``, a GMM
    ``final.mdl`` or an nnet3 ``final.mdl``; what follows it is ignored).

    Args:
      path_or_file: a path, bytes or binary file object.
    Returns:
      the :class:`TransitionModel`.
    """
    return TransitionModel._read(_open_reader(path_or_file, "a Kaldi transition model"))


def write_transition_model(trans_model: TransitionModel, path_or_file=None,
                           binary: bool = True):
    """Write a TransitionModel as ``copy-transition-model [--binary=false]`` does.

    Args:
      trans_model: the model.
      path_or_file: destination; None returns the bytes.
      binary: Kaldi binary (default) or text form.
    """
    return _save(trans_model, binary, path_or_file)


def read_phone_symbols(path) -> Dict[int, str]:
    """Read ``phones.txt`` (``name id`` per line) into a dict id -> name.

    Args:
      path: the symbol table file (read with :meth:`SymbolTable.read`).
    Returns:
      dict phone id -> phone name, in id order.
    Raises:
      SymbolTableError (a :class:`KaldiFormatError`) naming the file and line at fault.
    """
    return SymbolTable.read(path).id_to_symbol()


def show_transitions(trans_model: TransitionModel, phone_names: Dict[int, str],
                     occs: Optional[Sequence[float]] = None) -> str:
    """The text ``show-transitions phones.txt trans.mdl [occs]`` prints.

    Args:
      trans_model: the model.
      phone_names: phone id -> symbol (from :func:`read_phone_symbols`).
      occs: optional ``[num_pdfs]`` pdf occupation counts.
    Returns:
      the listing, one transition-state block after another.
    """
    is_hmm = trans_model.topology.is_hmm()
    lines = []
    for s in range(1, trans_model.num_transition_states + 1):
        phone, hmm_state, fpdf, spdf = trans_model.tuples[s - 1]
        name = phone_names.get(phone)
        if name is None:
            raise ValueError("phone %d of the transition model has no symbol" % phone)
        if is_hmm:
            lines.append("Transition-state %d: phone = %s hmm-state = %d pdf = %d"
                         % (s, name, hmm_state, fpdf))
        else:
            lines.append("Transition-state %d: phone = %s hmm-state = %d forward-pdf = %d "
                         "self-loop-pdf = %d" % (s, name, hmm_state, fpdf, spdf))
        for k in range(trans_model.num_transition_indices(s)):
            tid = trans_model.pair_to_transition_id(s, k)
            p = np.float32(np.exp(np.float32(trans_model.log_probs[tid])))
            line = " Transition-id = %d p = %s" % (tid, format_float(p, 6))
            if occs is not None:
                pdf = spdf if trans_model.is_self_loop(tid) else fpdf
                line += " count of pdf = %s" % format_float(occs[pdf], 6)
            if trans_model.is_self_loop(tid):
                line += " [self-loop]"
            else:
                line += " [%d -> %d]" % (hmm_state, trans_model._id2dest[tid])
            lines.append(line)
    return "\n".join(lines) + "\n"
