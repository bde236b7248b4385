"""Word error rate, as Kaldi's ``compute-wer``.

For reference word sequences r_u and hypotheses h_u over utterances u,

    WER = 100 * sum_u E(r_u, h_u) / sum_u |r_u|,   E = min #(insertions + deletions + substitutions)

(Levenshtein distance, computed by ``kaldialign``), and the sentence error rate
SER = 100 * #{u : h_u != r_u} / #utterances. The report has Kaldi's layout::

    %WER 12.50 [ 2 / 16, 1 ins, 0 del, 1 sub ]
    %SER 50.00 [ 1 / 2 ]
    Scored 2 sentences, 0 not present in hyp.

Modes (``--mode``): ``strict`` (a reference without hypothesis is an error),
``present`` (score only utterances with a hypothesis), ``all`` (a missing hypothesis
counts as empty). ``[PARTIAL]`` follows the WER line when hypotheses were missing.
How ties between equally short alignments split into ins/del/sub may differ from
Kaldi's; the error total never does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Tuple, Union

__all__ = ["WerStats", "compute_wer", "read_transcripts", "ScoringError"]


class ScoringError(ValueError):
    """Missing hypothesis in strict mode, unreadable transcript file, bad mode."""


@dataclass
class WerStats:
    """Error counts over a set of utterances (see the module docstring)."""

    errors: int = 0
    words: int = 0
    ins: int = 0
    dels: int = 0
    subs: int = 0
    sent_errors: int = 0
    sents: int = 0
    absent: int = 0

    @property
    def wer(self) -> float:
        """Percent WER (nan when the references have no words, as Kaldi's 0/0)."""
        return 100.0 * self.errors / self.words if self.words else float("nan")

    @property
    def ser(self) -> float:
        return 100.0 * self.sent_errors / self.sents if self.sents else float("nan")

    def __str__(self) -> str:
        return ("%%WER %.2f [ %d / %d, %d ins, %d del, %d sub ]%s\n"
                "%%SER %.2f [ %d / %d ]\n"
                "Scored %d sentences, %d not present in hyp.\n"
                % (self.wer, self.errors, self.words, self.ins, self.dels, self.subs,
                   " [PARTIAL]" if self.absent else "", self.ser, self.sent_errors,
                   self.sents, self.sents, self.absent))


def _tokens(v, key: str) -> List[str]:
    if isinstance(v, str):
        return v.split()
    try:
        return [str(t) for t in v]
    except TypeError:
        raise ScoringError("transcript of %s is neither a string nor a sequence" % key) from None


def compute_wer(refs: Union[Mapping[str, object], Iterable[Tuple[str, object]]],
                hyps: Mapping[str, object], mode: str = "strict") -> WerStats:
    """Compare hypotheses with references, Kaldi's ``compute-wer``.

    Args:
      refs: utterance-id -> reference (a string of space-separated words or a list of
        tokens), in scoring order; or an iterable of such pairs.
      hyps: utterance-id -> hypothesis, same forms.
      mode: ``strict`` | ``present`` | ``all`` (see the module docstring).
    Returns:
      :class:`WerStats`; ``str()`` of it is compute-wer's report.
    """
    import kaldialign
    if mode not in ("strict", "present", "all"):
        raise ScoringError('mode must be "present"|"all"|"strict", got %r' % mode)
    st = WerStats()
    items = refs.items() if isinstance(refs, Mapping) else refs
    for key, ref in items:
        r = _tokens(ref, key)
        if key not in hyps:
            if mode == "strict":
                raise ScoringError("no hypothesis for utterance %s (mode strict)" % key)
            st.absent += 1
            if mode == "present":
                continue
            h: List[str] = []
        else:
            h = _tokens(hyps[key], key)
        st.words += len(r)
        d = kaldialign.edit_distance(r, h)
        st.errors += d["total"]
        st.ins += d["ins"]
        st.dels += d["del"]
        st.subs += d["sub"]
        st.sents += 1
        st.sent_errors += int(r != h)
    return st


def read_transcripts(path: Union[str, os.PathLike]) -> Dict[str, List[str]]:
    """Read a Kaldi ``text`` file (``utt word1 word2 ...``, also integer transcripts).

    An utterance with no words is kept with an empty list; a repeated id is an error.
    """
    path = os.fspath(path)
    out: Dict[str, List[str]] = {}
    from ..kaldi.io import read_text  # errors (missing, not UTF-8) name the file
    for n, line in enumerate(read_text(path).split("\n"), 1):
        a = line.split()
        if not a:
            continue
        if a[0] in out:
            raise ScoringError("%s:%d: utterance %s appears twice" % (path, n, a[0]))
        out[a[0]] = a[1:]
    return out
