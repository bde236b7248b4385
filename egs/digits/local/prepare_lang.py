#!/usr/bin/env python3
"""Build the digits lexicon from espeak-ng's own phonemes.

For every word w and every accent voice a, ``espeak-ng -q -x --sep=_ -v a w``
prints w's phoneme mnemonics separated by ``_`` (e.g. ``s_'E_v_@_n``). Stress and
syllable marks (``'`` ``,`` ``%`` ``=``) are dropped; each distinct phoneme string
becomes one pronunciation, so ``one`` gets both ``w V n`` (en-us) and ``w 0 n``
(en-gb). The phone set is every phoneme seen, plus ``SIL`` for silence.

Writes a Kaldi lang directory (position-independent phones), the FSTs made by
``pkwrap.decode.write_lang_dir`` (Kaldi's ``prepare_lang.sh`` + ``format_lm.sh``):

  <lang>/lexicon.txt   <word> <phone> <phone> ...   (one line per pronunciation)
  <lang>/phones.txt    <eps> 0, SIL 1, the phonemes sorted, then #0 #1 ... (disambiguation)
  <lang>/words.txt     <eps> 0, the words sorted, then #0 <s> </s>
  <lang>/silence_phones.txt, nonsilence_phones.txt, optional_silence.txt
  <lang>/L.fst, L_disambig.fst  lexicon FSTs with optional silence (probability --sil-prob)
  <lang>/G.fst         the digit-loop grammar: any sequence of the words, uniform
  <lang>/phones/disambig.{int,txt}, lexiconp.txt, lexiconp_disambig.txt

Usage:
  local/prepare_lang.py --accents conf/accents.txt data/lang
"""
import argparse
import subprocess
import sys
from pathlib import Path

from pkwrap.decode import SymbolTable, read_lexicon, write_lang_dir

WORDS = ["eight", "five", "four", "nine", "oh", "one", "seven", "six", "three", "two", "zero"]
MARKS = "'%,="


def pronounce(word, accent):
    """espeak-ng's phonemes of one word in one accent, as a list of phone names."""
    r = subprocess.run(["espeak-ng", "-q", "-x", "--sep=_", "-v", accent, word],
                       capture_output=True, text=True)
    if r.returncode != 0 or r.stderr.strip():
        raise RuntimeError("espeak-ng -v %s failed on %r: %s" % (accent, word, r.stderr.strip()))
    phones = []
    for tok in r.stdout.split():
        for ph in tok.split("_"):
            ph = "".join(c for c in ph if c not in MARKS)
            if ph:
                phones.append(ph)
    if not phones:
        raise RuntimeError("espeak-ng -v %s gave no phonemes for %r" % (accent, word))
    return phones


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--accents", type=Path, default=Path("conf/accents.txt"),
                   help="file with one espeak-ng English voice per line")
    p.add_argument("--words", default=",".join(WORDS))
    p.add_argument("--sil-prob", type=float, default=0.5,
                   help="optional-silence probability in L (prepare_lang.sh's default)")
    p.add_argument("lang_dir", type=Path)
    args = p.parse_args()
    accents = [l.split("#", 1)[0].strip() for l in args.accents.read_text().splitlines()]
    accents = [a for a in accents if a]
    if not accents:
        sys.exit("prepare_lang.py: no accents in %s" % args.accents)
    words = sorted(w for w in args.words.split(",") if w)
    lexicon = []
    for w in words:
        seen = []
        for a in accents:
            pron = pronounce(w, a)
            if pron not in seen:
                seen.append(pron)
        lexicon += [(w, pron) for pron in seen]
    phones = sorted({ph for _, pron in lexicon for ph in pron})
    if "SIL" in phones:
        sys.exit("prepare_lang.py: espeak-ng produced a phoneme named SIL")
    d = args.lang_dir
    d.mkdir(parents=True, exist_ok=True)
    (d / "lexicon.txt").write_text("".join("%s %s\n" % (w, " ".join(pr)) for w, pr in lexicon))
    (d / "silence_phones.txt").write_text("SIL\n")
    (d / "optional_silence.txt").write_text("SIL\n")
    (d / "nonsilence_phones.txt").write_text("".join(ph + "\n" for ph in phones))
    phone_table = SymbolTable.from_symbols(["<eps>", "SIL"] + phones, name=str(d / "phones.txt"))
    # phones.txt (+ #k), words.txt (+ #0 <s> </s>), L.fst, L_disambig.fst, G.fst
    write_lang_dir(d, read_lexicon(d / "lexicon.txt"), phone_table, grammar=words,
                   sil_phone="SIL", sil_prob=args.sil_prob)
    print("prepare_lang.py: %d words, %d pronunciations, %d phones + SIL (%s)"
          % (len(words), len(lexicon), len(phones), " ".join(phones)))


if __name__ == "__main__":
    main()
