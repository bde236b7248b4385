"""Symbol tables: Kaldi's and OpenFst's text form of a bijection symbol <-> integer id.

``phones.txt``, ``words.txt`` and OpenFst ``isymbols``/``osymbols`` files hold one
``symbol id`` pair per line (any whitespace between them; blank lines are skipped)::

    <eps> 0
    SIL 1
    ...

Symbols contain no whitespace; ids are non-negative, and by convention id 0 is
``<eps>``. Disambiguation symbols are ``#0``, ``#1``, ... :class:`SymbolTable` reads,
builds, looks up and writes such tables; every error is a :class:`SymbolTableError`
naming the table (its file) and what is wrong.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

from .io import KaldiFormatError

__all__ = ["SymbolTable", "SymbolTableError"]

_WS = re.compile(r"[ \t]+")
_DISAMBIG = re.compile(r"#\d+")


class SymbolTableError(KaldiFormatError):
    """A malformed symbol table, or a symbol or id that is not in it; the message names
    the table (normally its file)."""


class SymbolTable:
    """A bijection symbol <-> integer id, in Kaldi's text form (``phones.txt``, ``words.txt``).

    Each line of the file is ``symbol id``; id 0 is conventionally ``<eps>``.

    Args:
      name: used in error messages (normally the file it came from).
    """

    def __init__(self, name: str = "<symbols>"):
        self.name = name
        self._sym2id: Dict[str, int] = {}
        self._id2sym: Dict[int, str] = {}

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_symbols(cls, symbols: Iterable[str], name: str = "<symbols>",
                     first_id: int = 0) -> "SymbolTable":
        """Table numbering ``symbols`` consecutively from ``first_id``."""
        t = cls(name)
        for i, s in enumerate(symbols):
            t.add(s, first_id + i)
        return t

    @classmethod
    def read(cls, path: Union[str, os.PathLike]) -> "SymbolTable":
        """Read a Kaldi/OpenFst text symbol table (``symbol id`` per line)."""
        path = os.fspath(path)
        t = cls(path)
        from .io import read_text  # errors (missing, not UTF-8) name the file
        for n, line in enumerate(read_text(path).split("\n"), 1):
            a = line.split()
            if not a:
                continue
            if len(a) != 2:
                raise SymbolTableError("%s:%d: expected 'symbol id', got %r"
                                       % (path, n, line.rstrip()))
            try:
                i = int(a[1])
            except ValueError:
                raise SymbolTableError("%s:%d: id %r is not an integer"
                                       % (path, n, a[1])) from None
            t.add(a[0], i)
        if not t._sym2id:
            raise SymbolTableError("%s: empty symbol table" % path)
        return t

    def write(self, path: Union[str, os.PathLike]) -> None:
        from .io import atomic_output
        with atomic_output(path, "w") as f:
            for i in sorted(self._id2sym):
                f.write("%s %d\n" % (self._id2sym[i], i))

    def add(self, symbol: str, id: Optional[int] = None) -> int:
        """Add ``symbol`` (with id ``id``, default max id + 1); returns its id."""
        if not symbol or _WS.search(symbol) or "\n" in symbol:
            raise SymbolTableError("%s: invalid symbol %r (empty or contains whitespace)"
                                   % (self.name, symbol))
        if symbol in self._sym2id:
            if id is not None and self._sym2id[symbol] != id:
                raise SymbolTableError("%s: symbol %r appears twice (ids %d and %d)"
                                       % (self.name, symbol, self._sym2id[symbol], id))
            return self._sym2id[symbol]
        if id is None:
            id = (max(self._id2sym) + 1) if self._id2sym else 0
        if id < 0:
            raise SymbolTableError("%s: negative id %d for %r" % (self.name, id, symbol))
        if id in self._id2sym:
            raise SymbolTableError("%s: id %d used by both %r and %r"
                                   % (self.name, id, self._id2sym[id], symbol))
        self._sym2id[symbol] = id
        self._id2sym[id] = symbol
        return id

    # -- lookup -------------------------------------------------------------------------
    def __getitem__(self, symbol: str) -> int:
        try:
            return self._sym2id[symbol]
        except KeyError:
            raise SymbolTableError("symbol %r is not in %s" % (symbol, self.name)) from None

    def symbol(self, id: int) -> str:
        try:
            return self._id2sym[int(id)]
        except KeyError:
            raise SymbolTableError("id %d is not in %s" % (id, self.name)) from None

    def get(self, symbol: str, default: Optional[int] = None) -> Optional[int]:
        return self._sym2id.get(symbol, default)

    def __contains__(self, symbol: str) -> bool:
        return symbol in self._sym2id

    def __len__(self) -> int:
        return len(self._sym2id)

    def __iter__(self) -> Iterator[Tuple[str, int]]:
        for i in sorted(self._id2sym):
            yield self._id2sym[i], i

    @property
    def symbols(self) -> List[str]:
        return [self._id2sym[i] for i in sorted(self._id2sym)]

    def id_to_symbol(self) -> Dict[int, str]:
        """A new dict id -> symbol, in id order."""
        return {i: self._id2sym[i] for i in sorted(self._id2sym)}

    def max_id(self) -> int:
        return max(self._id2sym) if self._id2sym else -1

    @staticmethod
    def is_disambig(symbol: str) -> bool:
        """True for a disambiguation symbol: ``#`` followed by digits (``#0``, ``#12``)."""
        return _DISAMBIG.fullmatch(symbol) is not None

    def disambig_ids(self) -> List[int]:
        """Ids of the disambiguation symbols (``#0``, ``#1``, ...), sorted."""
        return sorted(i for s, i in self._sym2id.items() if self.is_disambig(s))

    def __eq__(self, other) -> bool:
        return isinstance(other, SymbolTable) and self._sym2id == other._sym2id

    def __repr__(self) -> str:
        return "SymbolTable(%r, %d symbols)" % (self.name, len(self))
