"""Pronunciation lexicons and the lexicon FST L.

A lexicon maps each word w to pronunciations (p, q) with phone string
q = q_1 ... q_n and pronunciation probability p (Kaldi's ``lexiconp.txt``:
``word prob q_1 ... q_n``; ``lexicon.txt`` has no prob, i.e. p = 1).

L is a transducer from phones to words. With optional silence of probability
s (``utils/lang/make_lexicon_fst.py``) it has a start state 0, a loop state 1
where words begin and end and a silence state 2::

    0 --eps:eps / -log(1-s)--> 1          0 --eps:eps / -log s--> 2
    2 --SIL:eps--> 1                       (2 --SIL--> d --#k:eps--> 1 with sil_disambig)
    1 --q_1:w / -log p--> ... --q_n:eps / -log(1-s)--> 1
                              ... --q_n:eps / -log s  --> 2
    final(1) = 0

so every word is followed (and the utterance preceded) by SIL with probability
s. Without silence (s = 0) state 0 is the loop state and the only final state.

Disambiguation (``utils/add_lex_disambig.pl``): a pronunciation that is a
proper prefix of another one, or that several words share, gets a suffix
``#k`` so that L∘G can be determinized; #0 is left for G's back-off arcs.
All weights are -log probabilities (tropical semiring); the FSTs are
``kaldifst.StdVectorFst`` objects, the type kaldifst's graph algorithms take.
Symbol tables (``SymbolTable``, re-exported here) live in :mod:`pkwrap.kaldi.symbol_table`.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from ..kaldi.symbol_table import SymbolTable, SymbolTableError

__all__ = ["SymbolTable", "SymbolTableError", "LexiconEntry", "read_lexicon", "read_lexiconp",
           "write_lexiconp", "add_disambig_symbols", "make_phone_table", "make_word_table",
           "make_lexicon_fst", "LexiconError"]

LexiconEntry = Tuple[str, float, List[str]]
"""One pronunciation: (word, pron_prob, [phone, ...])."""


class LexiconError(ValueError):
    """Bad lexicon, or a word or phone missing from a symbol table or transcript; the
    message names the file/word at fault. (A malformed symbol table itself raises
    :class:`~pkwrap.kaldi.symbol_table.SymbolTableError`.)"""


# ---------------------------------------------------------------------------------------
# lexicon files

def _read_lexicon_file(path, with_probs: bool) -> List[LexiconEntry]:
    path = os.fspath(path)
    ans: List[LexiconEntry] = []
    from ..kaldi.io import read_text  # errors (missing, not UTF-8) name the file
    for n, line in enumerate(read_text(path).split("\n"), 1):
        a = line.split()
        if not a:
            continue
        word = a[0]
        if word == "<eps>":
            raise LexiconError("%s:%d: <eps> cannot be a word" % (path, n))
        if with_probs:
            if len(a) < 2:
                raise LexiconError("%s:%d: expected 'word prob phone ...', got %r"
                                   % (path, n, line.rstrip()))
            try:
                prob = float(a[1])
            except ValueError:
                raise LexiconError("%s:%d: second field %r should be the pron-prob"
                                   % (path, n, a[1])) from None
            if not prob > 0.0 or not math.isfinite(prob):
                raise LexiconError("%s:%d: invalid pron-prob %r" % (path, n, a[1]))
            phones = a[2:]
        else:
            prob, phones = 1.0, a[1:]
        if not phones:
            raise LexiconError("%s:%d: word %r has an empty pronunciation" % (path, n, word))
        ans.append((word, prob, phones))
    if not ans:
        raise LexiconError("%s: no pronunciations found" % path)
    return ans


def read_lexicon(path) -> List[LexiconEntry]:
    """Read Kaldi's ``lexicon.txt`` (``word phone1 phone2 ...``); pron-probs are 1.0.

    Returns:
      A list of ``(word, 1.0, phones)`` in file order.
    """
    return _read_lexicon_file(path, with_probs=False)


def read_lexiconp(path) -> List[LexiconEntry]:
    """Read Kaldi's ``lexiconp.txt`` (``word prob phone1 phone2 ...``)."""
    return _read_lexicon_file(path, with_probs=True)


def write_lexiconp(lexicon: Sequence[LexiconEntry], path) -> None:
    from ..kaldi.io import atomic_output
    with atomic_output(path, "w") as f:
        for word, prob, phones in lexicon:
            f.write("%s\t%s\t%s\n" % (word, repr(float(prob)), " ".join(phones)))


def add_disambig_symbols(lexicon: Sequence[LexiconEntry], first_allowed: int = 1
                         ) -> Tuple[List[LexiconEntry], int]:
    """Append ``#k`` to pronunciations that are shared or are prefixes of others.

    Same rule as Kaldi's ``add_lex_disambig.pl``: the j-th word sharing a
    pronunciation gets ``#(first_allowed + j - 1)``; a pronunciation that is a
    proper prefix of another gets one too.

    Args:
      lexicon: entries ``(word, prob, phones)``.
      first_allowed: the first disambiguation index to use (1: #0 is for G).
    Returns:
      ``(lexicon_disambig, max_disambig)``: the new entries and the largest k used
      (``first_allowed - 1`` if none was needed).
    """
    count: Dict[Tuple[str, ...], int] = {}
    prefixes = set()
    for word, _, phones in lexicon:
        if not phones:
            raise LexiconError("word %r has an empty pronunciation" % word)
        count[tuple(phones)] = count.get(tuple(phones), 0) + 1
        for k in range(len(phones)):
            prefixes.add(tuple(phones[:k]))
    last_used: Dict[Tuple[str, ...], int] = {}
    max_disambig = first_allowed - 1
    out: List[LexiconEntry] = []
    for word, prob, phones in lexicon:
        key = tuple(phones)
        if key not in prefixes and count[key] == 1:
            out.append((word, prob, list(phones)))
            continue
        k = last_used.get(key, first_allowed - 1) + 1
        last_used[key] = k
        max_disambig = max(max_disambig, k)
        out.append((word, prob, list(phones) + ["#%d" % k]))
    return out, max_disambig


def make_phone_table(phones: Union[SymbolTable, Sequence[str]], num_disambig: int = 0
                     ) -> SymbolTable:
    """Kaldi's ``phones.txt``: ``<eps>`` 0, the phones, then ``#0 .. #num_disambig``.

    Args:
      phones: a table to extend (its ids are kept; e.g. the one the tree was built
        with) or a list of phone names (numbered from 1).
      num_disambig: highest disambiguation symbol to add (``#0`` is always added).
    """
    if isinstance(phones, SymbolTable):
        t = SymbolTable(phones.name)
        for s, i in phones:
            if not SymbolTable.is_disambig(s):
                t.add(s, i)
    else:
        t = SymbolTable.from_symbols(["<eps>"] + list(phones), name="phones.txt")
    if t.get("<eps>") != 0:
        raise LexiconError("%s: id 0 must be <eps>" % t.name)
    for k in range(num_disambig + 1):
        t.add("#%d" % k)
    return t


def make_word_table(words: Iterable[str], sort: bool = True) -> SymbolTable:
    """Kaldi's ``words.txt``: ``<eps>`` 0, the words, then ``#0``, ``<s>``, ``</s>``."""
    ws = sorted(set(words)) if sort else list(dict.fromkeys(words))
    for w in ws:
        if w in ("<eps>", "#0", "<s>", "</s>"):
            raise LexiconError("reserved symbol %r cannot be a word" % w)
    return SymbolTable.from_symbols(["<eps>"] + ws + ["#0", "<s>", "</s>"], name="words.txt")


def _ids(table: SymbolTable, symbols: Sequence[str], what: str, word: str) -> List[int]:
    out = []
    for s in symbols:
        i = table.get(s)
        if i is None:
            raise LexiconError("%s %r of word %r is not in %s" % (what, s, word, table.name))
        out.append(i)
    return out


def make_lexicon_fst(lexicon: Sequence[LexiconEntry], phone_table: SymbolTable,
                     word_table: SymbolTable, sil_phone: Optional[str] = None,
                     sil_prob: float = 0.5, sil_disambig: Optional[str] = None,
                     word_disambig_loops: bool = False):
    """Build L (phones -> words) as ``utils/lang/make_lexicon_fst.py`` does.

    Args:
      lexicon: entries ``(word, prob, phones)``; phones may end in ``#k`` (from
        :func:`add_disambig_symbols`) to make ``L_disambig``.
      phone_table: input symbols; must contain every phone (and ``#k``) used.
      word_table: output symbols; must contain every word.
      sil_phone: the optional-silence phone (e.g. ``"SIL"``); ``None`` or
        ``sil_prob == 0`` gives L without optional silence.
      sil_prob: probability of silence at the start and after each word, in [0, 1).
      sil_disambig: e.g. ``"#3"`` to follow the optional silence by that
        disambiguation symbol (Kaldi does this in ``L_disambig.fst``).
      word_disambig_loops: add ``#0:#0`` self-loops (``fstaddselfloops``) at the final
        state and every state with a word on an outgoing arc, so that the back-off
        symbol #0 on G's input passes through L; ``prepare_lang.sh`` does this for
        ``L_disambig.fst``. Needs ``#0`` in both tables.
    Returns:
      A ``kaldifst.StdVectorFst``, arcs sorted by output label (like
      ``fstarcsort --sort_type=olabel`` in ``prepare_lang.sh``).
    """
    import kaldifst

    if not 0.0 <= sil_prob < 1.0:
        raise LexiconError("sil_prob must be in [0, 1), got %r" % sil_prob)
    if not lexicon:
        raise LexiconError("empty lexicon")
    use_sil = sil_phone is not None and sil_prob > 0.0
    fst = kaldifst.StdVectorFst()
    arc = kaldifst.StdArc

    def new_state() -> int:
        return fst.add_state()

    if use_sil:
        sil_id = _ids(phone_table, [sil_phone], "silence phone", "<optional silence>")[0]
        sil_cost, nosil_cost = -math.log(sil_prob), -math.log(1.0 - sil_prob)
        start, loop, sil_state = new_state(), new_state(), new_state()
        fst.add_arc(start, arc(0, 0, nosil_cost, loop))
        fst.add_arc(start, arc(0, 0, sil_cost, sil_state))
        if sil_disambig is None:
            fst.add_arc(sil_state, arc(sil_id, 0, 0.0, loop))
        else:
            dis_id = _ids(phone_table, [sil_disambig], "silence disambiguation symbol",
                          "<optional silence>")[0]
            d = new_state()
            fst.add_arc(sil_state, arc(sil_id, 0, 0.0, d))
            fst.add_arc(d, arc(dis_id, 0, 0.0, loop))
        ends = [(loop, nosil_cost), (sil_state, sil_cost)]
    else:
        start = loop = new_state()
        ends = [(loop, 0.0)]
    fst.start = start
    for word, prob, phones in lexicon:
        if not prob > 0.0:
            raise LexiconError("word %r: pron-prob must be > 0, got %r" % (word, prob))
        w = word_table.get(word)
        if w is None:
            raise LexiconError("word %r of the lexicon is not in %s" % (word, word_table.name))
        if not phones:
            raise LexiconError("word %r has an empty pronunciation" % word)
        p = _ids(phone_table, phones, "phone", word)
        pron_cost = -math.log(prob)
        cur = loop
        for i in range(len(p) - 1):
            nxt = new_state()
            fst.add_arc(cur, arc(p[i], w if i == 0 else 0, pron_cost if i == 0 else 0.0, nxt))
            cur = nxt
        last_first = len(p) == 1
        for dest, cost in ends:
            fst.add_arc(cur, arc(p[-1], w if last_first else 0,
                                 cost + (pron_cost if last_first else 0.0), dest))
    fst.set_final(loop, 0.0)
    if word_disambig_loops:
        for table in (phone_table, word_table):
            if "#0" not in table:
                raise LexiconError("%s has no #0, needed for word_disambig_loops" % table.name)
        kaldifst.add_self_loops(fst, [phone_table["#0"]], [word_table["#0"]])
    kaldifst.arcsort(fst, sort_type="olabel")
    return fst
