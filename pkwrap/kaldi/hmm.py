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
import io
import os
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "KaldiFormatError", "EventMap", "ConstantEventMap", "TableEventMap", "SplitEventMap",
    "ContextDependency", "HmmState", "HmmTopology", "TransitionModel",
    "read_tree", "write_tree", "read_topology", "write_topology",
    "read_transition_model", "write_transition_model", "show_transitions",
    "read_phone_symbols", "PDF_CLASS_KEY",
]

PDF_CLASS_KEY = -1  # Kaldi's kPdfClass: the event key holding the pdf-class
_NO_PDF = -1  # Kaldi's kNoPdf


class KaldiFormatError(ValueError):
    """Raised when a file is not a readable Kaldi tree/topology/model. Names the source."""


# ---------------------------------------------------------------------------------------
# Kaldi basic I/O (io-funcs): tokens, integers, floats, vectors; binary and text.


class _Reader:
    """Reads Kaldi's basic types from an in-memory buffer.

    Args:
      data: the bytes (after the ``\\0B`` header in binary mode).
      binary: binary or text mode.
      name: name of the source for error messages.
      pos: start offset in ``data``.
    """

    def __init__(self, data: bytes, binary: bool, name: str, pos: int = 0):
        self.data = data
        self.binary = binary
        self.name = name
        self.pos = pos

    def error(self, what: str):
        raise KaldiFormatError("%s: %s (at byte %d)" % (self.name, what, self.pos))

    def _skip_ws(self):
        d, n = self.data, len(self.data)
        while self.pos < n and d[self.pos] in b" \t\n\r\v\f":
            self.pos += 1

    def _text_word(self, what: str) -> str:
        self._skip_ws()
        d, n, start = self.data, len(self.data), self.pos
        while self.pos < n and d[self.pos] not in b" \t\n\r\v\f":
            self.pos += 1
        if self.pos == start:
            self.error("unexpected end of file while reading %s" % what)
        return d[start:self.pos].decode("latin-1")

    def peek_char(self) -> str:
        if not self.binary:
            self._skip_ws()
        if self.pos >= len(self.data):
            self.error("unexpected end of file")
        return chr(self.data[self.pos])

    def at_eof(self) -> bool:
        if not self.binary:
            self._skip_ws()
        return self.pos >= len(self.data)

    def token(self) -> str:
        if not self.binary:
            return self._text_word("a token")
        end = self.data.find(b" ", self.pos)
        if end < 0:
            self.error("unexpected end of file while reading a token")
        tok = self.data[self.pos:end].decode("latin-1")
        self.pos = end + 1
        return tok

    def expect(self, token: str):
        got = self.token()
        if got != token:
            self.error("expected token %r, got %r" % (token, got))

    def int32(self, what: str = "an integer") -> int:
        if not self.binary:
            w = self._text_word(what)
            try:
                return int(w)
            except ValueError:
                self.error("expected %s, got %r" % (what, w))
        if self.pos + 5 > len(self.data):
            self.error("unexpected end of file while reading %s" % what)
        size = struct.unpack_from("<b", self.data, self.pos)[0]
        if size == 4:
            v = struct.unpack_from("<i", self.data, self.pos + 1)[0]
        elif size == -4:
            v = struct.unpack_from("<I", self.data, self.pos + 1)[0]
        else:
            self.error("expected a 4-byte integer while reading %s, got size byte %d"
                       % (what, size))
        self.pos += 5
        return v

    def float(self, what: str = "a float") -> float:
        if not self.binary:
            w = self._text_word(what)
            try:
                return float(np.float32(w))
            except ValueError:
                self.error("expected %s, got %r" % (what, w))
        if self.pos + 1 > len(self.data):
            self.error("unexpected end of file while reading %s" % what)
        size = self.data[self.pos]
        fmt = {4: "<f", 8: "<d"}.get(size)
        if fmt is None or self.pos + 1 + size > len(self.data):
            self.error("bad or truncated float while reading %s" % what)
        v = struct.unpack_from(fmt, self.data, self.pos + 1)[0]
        self.pos += 1 + size
        return float(np.float32(v))

    def int_vector(self, what: str = "an integer vector") -> List[int]:
        if not self.binary:
            if self._text_word(what) != "[":
                self.error("expected '[' opening %s" % what)
            out = []
            while True:
                w = self._text_word(what)
                if w == "]":
                    return out
                try:
                    out.append(int(w))
                except ValueError:
                    self.error("expected an integer in %s, got %r" % (what, w))
        if self.pos + 5 > len(self.data):
            self.error("unexpected end of file while reading %s" % what)
        if self.data[self.pos] != 4:
            self.error("expected int32 elements in %s" % what)
        n = struct.unpack_from("<i", self.data, self.pos + 1)[0]
        self.pos += 5
        if n < 0 or self.pos + 4 * n > len(self.data):
            self.error("bad or truncated %s (size %d)" % (what, n))
        out = list(struct.unpack_from("<%di" % n, self.data, self.pos))
        self.pos += 4 * n
        return out

    def float_vector(self, what: str = "a vector") -> np.ndarray:
        """Kaldi ``Vector<float>``: binary ``FV``/``DV`` + size + data; text ``[ ... ]``."""
        if not self.binary:
            if self._text_word(what) != "[":
                self.error("expected '[' opening %s" % what)
            out = []
            while True:
                w = self._text_word(what)
                if w == "]":
                    return np.array(out, dtype=np.float32)
                try:
                    out.append(float(w))
                except ValueError:
                    self.error("expected a number in %s, got %r" % (what, w))
        tok = self.token()
        if tok not in ("FV", "DV"):
            self.error("expected FV or DV opening %s, got %r" % (what, tok))
        n = self.int32(what)
        size = 4 if tok == "FV" else 8
        if n < 0 or self.pos + size * n > len(self.data):
            self.error("bad or truncated %s (size %d)" % (what, n))
        arr = np.frombuffer(self.data, dtype="<f4" if size == 4 else "<f8", count=n,
                            offset=self.pos)
        self.pos += size * n
        return arr.astype(np.float32)


class _Writer:
    """Writes Kaldi's basic types (the mirror of :class:`_Reader`)."""

    def __init__(self, binary: bool):
        self.binary = binary
        self.buf = io.BytesIO()

    def raw(self, s: str):
        self.buf.write(s.encode("latin-1"))

    def token(self, tok: str):
        self.raw(tok + " ")

    def int32(self, v: int, unsigned: bool = False):
        if self.binary:
            self.buf.write(struct.pack("<bI" if unsigned else "<bi", -4 if unsigned else 4, v))
        else:
            self.raw("%d " % v)

    def float(self, v: float):
        if self.binary:
            self.buf.write(struct.pack("<bf", 4, v))
        else:
            self.raw(_fmt_float(v, 7) + " ")

    def int_vector(self, v: Sequence[int]):
        if self.binary:
            self.buf.write(struct.pack("<bi", 4, len(v)))
            self.buf.write(np.asarray(v, dtype="<i4").tobytes())
        else:
            self.raw("[ " + "".join("%d " % x for x in v) + "]\n")

    def float_vector(self, v: np.ndarray):
        v = np.asarray(v, dtype=np.float32)
        if self.binary:
            self.token("FV")
            self.int32(len(v))
            self.buf.write(v.astype("<f4").tobytes())
        else:
            self.raw(" [ " + "".join(_fmt_float(x, 7) + " " for x in v) + "]\n")

    def getvalue(self) -> bytes:
        return self.buf.getvalue()


def _fmt_float(v: float, precision: int) -> str:
    """C++ ``ostream << float`` with the given precision (``%g``)."""
    s = "%.*g" % (precision, float(v))
    if s in ("inf", "-inf", "nan"):
        return s
    return s


def _load(path_or_file, what: str) -> Tuple[bytes, str]:
    if isinstance(path_or_file, (str, os.PathLike)):
        name = os.fspath(path_or_file)
        try:
            with open(name, "rb") as f:
                return f.read(), name
        except OSError as e:
            raise KaldiFormatError("%s: cannot read %s: %s" % (name, what, e)) from None
    if isinstance(path_or_file, (bytes, bytearray)):
        return bytes(path_or_file), "<bytes>"
    data = path_or_file.read()
    if isinstance(data, str):
        data = data.encode("latin-1")
    return data, getattr(path_or_file, "name", "<stream>")


def _open_reader(path_or_file, what: str) -> _Reader:
    data, name = _load(path_or_file, what)
    if not data:
        raise KaldiFormatError("%s: empty file, expected %s" % (name, what))
    if data[:2] == b"\0B":
        return _Reader(data, True, name, 2)
    return _Reader(data, False, name, 0)


def _save(data: bytes, binary: bool, path_or_file) -> Optional[bytes]:
    if binary:
        data = b"\0B" + data
    if path_or_file is None:
        return data
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "wb") as f:
            f.write(data)
    else:
        path_or_file.write(data)
    return None


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


def _read_event_map(r: _Reader) -> Optional[EventMap]:
    # Iterative parser: trees can be deep (long chains of SE nodes).
    # Each frame is [kind, data, children-so-far, expected-children].
    def read_node():
        c = r.peek_char()
        if c == "N":
            r.expect("NULL")
            return ("leaf", None)
        if c == "C":
            r.expect("CE")
            return ("leaf", ConstantEventMap(r.int32("a CE answer")))
        if c == "T":
            r.expect("TE")
            key = r.int32("a TE key")
            size = r.int32("a TE size")
            if size < 0 or size > 10_000_000:
                r.error("implausible TE table size %d" % size)
            r.expect("(")
            return ("open", ["TE", key, size, []])
        if c == "S":
            r.expect("SE")
            key = r.int32("an SE key")
            yes_set = r.int_vector("an SE yes-set")
            r.expect("{")
            return ("open", ["SE", key, yes_set, []])
        r.error("expected an EventMap (CE, TE, SE or NULL), got character %r" % c)

    stack: List[list] = []
    kind, val = read_node()
    while True:
        if kind == "open":
            frame = val
            if frame[0] == "TE" and frame[2] == 0:
                r.expect(")")
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
                r.expect(")")
                stack.pop()
                val = TableEventMap(parent[1], parent[3])
            else:
                if len(parent[3]) < 2:
                    break
                r.expect("}")
                stack.pop()
                yes, no = parent[3]
                if yes is None or no is None:
                    r.error("SE node with a NULL branch")
                val = SplitEventMap(parent[1], tuple(parent[2]), yes, no)
        kind, val = read_node()


def _write_event_map(w: _Writer, m: Optional[EventMap]) -> None:
    # Kaldi's layout: after ")" of a TE and "}" of an SE, text mode adds a newline.
    stack: List[Tuple[str, object]] = [("node", m)]
    while stack:
        op, x = stack.pop()
        if op == "tok":
            w.token(x)
            if not w.binary and x in (")", "}"):
                w.raw("\n")
            continue
        if x is None:
            w.token("NULL")
        elif isinstance(x, ConstantEventMap):
            w.token("CE")
            w.int32(x.answer)
        elif isinstance(x, TableEventMap):
            w.token("TE")
            w.int32(x.key)
            w.int32(len(x.table), unsigned=True)
            w.token("(")
            stack.append(("tok", ")"))
            for child in reversed(x.table):
                stack.append(("node", child))
        elif isinstance(x, SplitEventMap):
            w.token("SE")
            w.int32(x.key)
            w.int_vector(x.yes_set)
            w.token("{")
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
    def _read(cls, r: _Reader) -> "ContextDependency":
        r.expect("ContextDependency")
        N = r.int32("the context width")
        P = r.int32("the central position")
        tok = r.token()
        if tok == "ToLength":  # old format: skip the length map
            _read_event_map(r)
            tok = r.token()
        if tok != "ToPdf":
            r.error("expected ToPdf, got %r" % tok)
        to_pdf = _read_event_map(r)
        r.expect("EndContextDependency")
        if to_pdf is None:
            r.error("the tree's ToPdf map is NULL")
        try:
            return cls(N, P, to_pdf)
        except ValueError as e:
            r.error(str(e))

    def _write(self, w: _Writer) -> None:
        w.token("ContextDependency")
        w.int32(self.context_width)
        w.int32(self.central_position)
        w.token("ToPdf")
        _write_event_map(w, self.to_pdf)
        w.token("EndContextDependency")


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
    w = _Writer(binary)
    tree._write(w)
    return _save(w.getvalue(), binary, path_or_file)


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
                    if p <= 0:
                        bad("entry %d state %d: non-positive transition probability" % (i, j))
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
    def _read(cls, r: _Reader) -> "HmmTopology":
        r.expect("<Topology>")
        entries: List[List[HmmState]] = []
        phone_to_entry: Dict[int, int] = {}
        if not r.binary:
            while True:
                tok = r.token()
                if tok == "</Topology>":
                    break
                if tok != "<TopologyEntry>":
                    r.error("expected <TopologyEntry> or </Topology>, got %r" % tok)
                r.expect("<ForPhones>")
                phones = []
                while True:
                    w = r.token()
                    if w == "</ForPhones>":
                        break
                    try:
                        phones.append(int(w))
                    except ValueError:
                        r.error("expected a phone id in <ForPhones>, got %r" % w)
                entry: List[HmmState] = []
                tok = r.token()
                while tok != "</TopologyEntry>":
                    if tok != "<State>":
                        r.error("expected <State> or </TopologyEntry>, got %r" % tok)
                    s = r.int32("a state id")
                    if s != len(entry):
                        r.error("states must be numbered in order from 0: expected %d, got %d"
                                % (len(entry), s))
                    tok = r.token()
                    st = HmmState()
                    if tok == "<PdfClass>":
                        st.forward_pdf_class = st.self_loop_pdf_class = r.int32("a pdf-class")
                        tok = r.token()
                    elif tok == "<ForwardPdfClass>":
                        st.forward_pdf_class = r.int32("a pdf-class")
                        r.expect("<SelfLoopPdfClass>")
                        st.self_loop_pdf_class = r.int32("a pdf-class")
                        tok = r.token()
                    while tok == "<Transition>":
                        dst = r.int32("a destination state")
                        st.transitions.append((dst, r.float("a transition probability")))
                        tok = r.token()
                    if tok != "</State>":
                        r.error("expected </State>, got %r" % tok)
                    entry.append(st)
                    tok = r.token()
                for p in phones:
                    if p in phone_to_entry:
                        r.error("phone %d appears in more than one topology entry" % p)
                    phone_to_entry[p] = len(entries)
                entries.append(entry)
        else:
            phones = r.int_vector("the topology's phones")
            phone2idx = r.int_vector("the topology's phone-to-entry map")
            n = r.int32("the number of topology entries")
            is_hmm = True
            if n == -1:
                is_hmm = False
                n = r.int32("the number of topology entries")
            for _ in range(n):
                m = r.int32("the number of HMM states")
                entry = []
                for _ in range(m):
                    st = HmmState()
                    st.forward_pdf_class = r.int32("a pdf-class")
                    st.self_loop_pdf_class = (st.forward_pdf_class if is_hmm
                                              else r.int32("a pdf-class"))
                    k = r.int32("the number of transitions")
                    for _ in range(k):
                        dst = r.int32("a destination state")
                        st.transitions.append((dst, r.float("a transition probability")))
                    entry.append(st)
                entries.append(entry)
            r.expect("</Topology>")
            for p in phones:
                if p >= len(phone2idx) or not 0 <= phone2idx[p] < n:
                    r.error("phone %d has no valid topology entry" % p)
                phone_to_entry[p] = phone2idx[p]
        try:
            return cls(entries, phone_to_entry, r.name)
        except KaldiFormatError:
            raise

    def _write(self, w: _Writer) -> None:
        is_hmm = self.is_hmm()
        w.token("<Topology>")
        if not w.binary:
            w.raw("\n")
            for i, entry in enumerate(self.entries):
                w.token("<TopologyEntry>")
                w.raw("\n")
                w.token("<ForPhones>")
                w.raw("\n")
                w.raw("".join("%d " % p for p in self.phones if self.phone_to_entry[p] == i))
                w.raw("\n")
                w.token("</ForPhones>")
                w.raw("\n")
                for j, st in enumerate(entry):
                    w.token("<State>")
                    w.int32(j)
                    if st.forward_pdf_class != _NO_PDF:
                        if is_hmm:
                            w.token("<PdfClass>")
                            w.int32(st.forward_pdf_class)
                        else:
                            w.token("<ForwardPdfClass>")
                            w.int32(st.forward_pdf_class)
                            w.token("<SelfLoopPdfClass>")
                            w.int32(st.self_loop_pdf_class)
                    for dst, p in st.transitions:
                        w.token("<Transition>")
                        w.int32(dst)
                        w.float(p)
                    w.token("</State>")
                    w.raw("\n")
                w.token("</TopologyEntry>")
                w.raw("\n")
        else:
            w.int_vector(self.phones)
            phone2idx = [-1] * (self.phones[-1] + 1)
            for p, i in self.phone_to_entry.items():
                phone2idx[p] = i
            w.int_vector(phone2idx)
            if not is_hmm:
                w.int32(-1)
            w.int32(len(self.entries))
            for entry in self.entries:
                w.int32(len(entry))
                for st in entry:
                    w.int32(st.forward_pdf_class)
                    if not is_hmm:
                        w.int32(st.self_loop_pdf_class)
                    w.int32(len(st.transitions))
                    for dst, p in st.transitions:
                        w.int32(dst)
                        w.float(p)
        w.token("</Topology>")
        if not w.binary:
            w.raw("\n")


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
    w = _Writer(binary)
    topo._write(w)
    return _save(w.getvalue(), binary, path_or_file)


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
    def _read(cls, r: _Reader) -> "TransitionModel":
        r.expect("<TransitionModel>")
        topo = HmmTopology._read(r)
        tok = r.token()
        if tok not in ("<Tuples>", "<Triples>"):
            r.error("expected <Tuples> or <Triples>, got %r" % tok)
        n = r.int32("the number of tuples")
        if n < 0:
            r.error("negative number of tuples")
        tuples = []
        for _ in range(n):
            phone = r.int32("a tuple's phone")
            hmm_state = r.int32("a tuple's HMM state")
            fpdf = r.int32("a tuple's pdf")
            spdf = r.int32("a tuple's self-loop pdf") if tok == "<Tuples>" else fpdf
            tuples.append((phone, hmm_state, fpdf, spdf))
        end = r.token()
        if end not in ("</Tuples>", "</Triples>"):
            r.error("expected </Tuples> or </Triples>, got %r" % end)
        r.expect("<LogProbs>")
        log_probs = r.float_vector("the transition log-probs")
        r.expect("</LogProbs>")
        r.expect("</TransitionModel>")
        if tuples != sorted(tuples):
            r.error("tuples are not sorted")
        return cls(topo, tuples, log_probs, name=r.name)

    def _write(self, w: _Writer) -> None:
        is_hmm = self.topology.is_hmm()
        w.token("<TransitionModel>")
        if not w.binary:
            w.raw("\n")
        self.topology._write(w)
        w.token("<Triples>" if is_hmm else "<Tuples>")
        w.int32(len(self.tuples))
        if not w.binary:
            w.raw("\n")
        for phone, hmm_state, fpdf, spdf in self.tuples:
            w.int32(phone)
            w.int32(hmm_state)
            w.int32(fpdf)
            if not is_hmm:
                w.int32(spdf)
            if not w.binary:
                w.raw("\n")
        w.token("</Triples>" if is_hmm else "</Tuples>")
        if not w.binary:
            w.raw("\n")
        w.token("<LogProbs>")
        if not w.binary:
            w.raw("\n")
        w.float_vector(self.log_probs)
        w.token("</LogProbs>")
        if not w.binary:
            w.raw("\n")
        w.token("</TransitionModel>")
        if not w.binary:
            w.raw("\n")


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
    w = _Writer(binary)
    trans_model._write(w)
    return _save(w.getvalue(), binary, path_or_file)


def read_phone_symbols(path) -> Dict[int, str]:
    """Read ``phones.txt`` (``name id`` per line) into a dict id -> name."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise KaldiFormatError("%s:%d: expected 'symbol id', got %r"
                                       % (path, lineno, line.rstrip("\n")))
            try:
                out[int(parts[1])] = parts[0]
            except ValueError:
                raise KaldiFormatError("%s:%d: bad id %r" % (path, lineno, parts[1])) from None
    return out


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
            raise ValueError("phone %d has no symbol" % phone)
        if is_hmm:
            lines.append("Transition-state %d: phone = %s hmm-state = %d pdf = %d"
                         % (s, name, hmm_state, fpdf))
        else:
            lines.append("Transition-state %d: phone = %s hmm-state = %d forward-pdf = %d "
                         "self-loop-pdf = %d" % (s, name, hmm_state, fpdf, spdf))
        for k in range(trans_model.num_transition_indices(s)):
            tid = trans_model.pair_to_transition_id(s, k)
            p = np.float32(np.exp(np.float32(trans_model.log_probs[tid])))
            line = " Transition-id = %d p = %s" % (tid, _fmt_float(p, 6))
            if occs is not None:
                pdf = spdf if trans_model.is_self_loop(tid) else fpdf
                line += " count of pdf = %s" % _fmt_float(occs[pdf], 6)
            if trans_model.is_self_loop(tid):
                line += " [self-loop]"
            else:
                line += " [%d -> %d]" % (hmm_state, trans_model._id2dest[tid])
            lines.append(line)
    return "\n".join(lines) + "\n"
