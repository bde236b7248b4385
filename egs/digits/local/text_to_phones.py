#!/usr/bin/env python3
"""Turn word transcripts into phone sequences for the phone LM (flat start).

Each word is replaced by one of its lexicon pronunciations, picked at random
(seeded); optional silence ``SIL`` is inserted at the utterance edges with
probability ``--edge-silprob`` and between words with ``--between-silprob``, as
Kaldi's ``steps/nnet3/chain/e2e/text_to_phones.py`` does before
``chain-est-phone-lm``. Output: ``<utt> <phone> <phone> ...`` lines; with
``--int``, phone ids from ``<lang>/phones.txt`` (the form the phone LM estimator
reads). With ``--copies N`` every utterance is written N times (keys ``<utt>-<i>``)
with independent draws, so that the phone LM sees the pronunciation variants of
word pairs it would otherwise miss (an n-gram the LM never saw makes an utterance's
normalized numerator empty). ``--all-word-pairs`` also writes, for every ordered
pair of words and every pair of their pronunciations, the two pronunciations back
to back (keys ``pair-<n>``): the digit loop allows any word after any other, so
every cross-word phone bigram should be possible in the denominator graph too.

Usage:
  local/text_to_phones.py --int data/lang data/train/text > exp/chain/phone_seqs.txt
"""
import argparse
import random
import sys
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--edge-silprob", type=float, default=0.8)
    p.add_argument("--between-silprob", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copies", type=int, default=1, help="draws per utterance")
    p.add_argument("--all-word-pairs", action="store_true",
                   help="add every word pair, in every pronunciation pair")
    p.add_argument("--int", action="store_true", help="write phone ids instead of names")
    p.add_argument("lang_dir", type=Path)
    p.add_argument("text", type=Path)
    args = p.parse_args()
    rng = random.Random(args.seed)
    lexicon = {}
    for line in (args.lang_dir / "lexicon.txt").read_text().splitlines():
        w, *pron = line.split()
        lexicon.setdefault(w, []).append(pron)
    sil = (args.lang_dir / "optional_silence.txt").read_text().split()[0]
    phone_id = dict(l.split() for l in (args.lang_dir / "phones.txt").read_text().splitlines())
    n_bad = 0
    for lineno, line in enumerate(args.text.read_text().splitlines(), 1):
        utt, *words = line.split()
        unknown = [w for w in words if w not in lexicon]
        if not words or unknown:
            n_bad += 1
            print("text_to_phones.py: %s:%d: utterance %s %s, skipped" % (
                args.text, lineno, utt, "is empty" if not words else
                "has words not in the lexicon: " + " ".join(unknown)), file=sys.stderr)
            continue
        for copy in range(args.copies):
            phones = [sil] if rng.random() < args.edge_silprob else []
            for i, w in enumerate(words):
                phones += rng.choice(lexicon[w])
                last = i + 1 == len(words)
                if rng.random() < (args.edge_silprob if last else args.between_silprob):
                    phones.append(sil)
            if args.int:
                phones = [phone_id[ph] for ph in phones]
            print(utt if args.copies == 1 else "%s-%d" % (utt, copy), " ".join(phones))
    if args.all_word_pairs:
        n = 0
        for w1 in sorted(lexicon):
            for w2 in sorted(lexicon):
                for p1 in lexicon[w1]:
                    for p2 in lexicon[w2]:
                        phones = p1 + p2
                        if args.int:
                            phones = [phone_id[ph] for ph in phones]
                        print("pair-%d" % n, " ".join(phones))
                        n += 1
    if n_bad:
        print("text_to_phones.py: %d utterance(s) skipped" % n_bad, file=sys.stderr)


if __name__ == "__main__":
    main()
