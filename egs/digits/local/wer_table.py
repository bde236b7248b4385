#!/usr/bin/env python3
"""Print the WER of every decoded condition as a Markdown table (run.sh stage 6).

For each part P: references ``<data>/P/text``, hypotheses ``<exp>/decode_P/hyp.txt``
(decode.py). Besides the WER over all utterances, the table splits the synthesized test
sets by kind of voice: espeak-ng voices (speaker ids ``v*``) and the held-out talkers
of flite/festival, whose voices are built from recordings of a person (``r*``).

Usage:
  local/wer_table.py --data data --exp exp/chain --parts test,test_telephone,test_noise5
"""
import argparse
import sys
from pathlib import Path

from pkwrap.decode import compute_wer, read_transcripts

NAMES = {"test": "clean (synthesized, unseen voices)", "test_telephone": "telephone band",
         "test_reverb": "reverberant", "test_noise0": "noise 0 dB", "test_noise5": "noise 5 dB",
         "test_noise10": "noise 10 dB"}


def fmt(refs, hyps):
    if not refs:
        return "-"
    s = compute_wer(refs, hyps)
    return "%.2f %% (%d/%d)" % (s.wer, s.errors, s.words)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--exp", type=Path, default=Path("exp/chain"))
    p.add_argument("--parts", required=True, help="comma-separated parts")
    args = p.parse_args()
    rows = []
    for part in [x for x in args.parts.split(",") if x]:
        text, hyp = args.data / part / "text", args.exp / ("decode_" + part) / "hyp.txt"
        for f in (text, hyp):
            if not f.is_file():
                sys.exit("wer_table.py: %s not found (decode.py --part %s writes it)" % (f, part))
        refs, hyps = read_transcripts(text), read_transcripts(hyp)
        spk = {}
        u2s = args.data / part / "utt2spk"
        if u2s.is_file():
            spk = dict(l.split()[:2] for l in u2s.read_text().splitlines() if l.strip())
        sub = {k: {u: r for u, r in refs.items() if spk.get(u, "")[:1] == k} for k in "vr"}
        rows.append((NAMES.get(part, part), fmt(refs, hyps), fmt(sub["v"], hyps),
                     fmt(sub["r"], hyps)))
    print("| condition | WER all | espeak-ng voices | recorded-talker voices (flite/festival) |")
    print("|---|---|---|---|")
    for r in rows:
        print("| %s |" % " | ".join(r))


if __name__ == "__main__":
    main()
