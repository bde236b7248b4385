#!/usr/bin/env python3
"""Make Kaldi data dirs of recorded human speech from the Free Spoken Digit Dataset.

FSDD (https://github.com/Jakobovski/free-spoken-digit-dataset, CC BY-SA 4.0) holds 3000
recordings of single digits, 8 kHz mono, by six speakers (50 of each digit each), named
``{digit}_{speaker}_{index}.wav``. It is not part of this repository; point this script at
its ``recordings`` folder and score the recipe's model on the result with
``run.sh --stage 6 --extra-test DIR``:

    local/prepare_fsdd.py /path/to/free-spoken-digit-dataset/recordings data/fsdd
    local/prepare_fsdd.py --strings 300 /path/to/.../recordings data/fsdd_strings

Without ``--strings`` the data dir lists the recordings as they are: one utterance per
recording, one word each ("zero" .. "nine"). With ``--strings N`` it writes N digit strings,
each made of 3..7 recordings of one speaker (speakers in turn) joined with
pauses of 0.15..0.5 s of that speaker's own background (the quietest 10 ms frames of the
recordings around it, repeated), written as WAV files under ``<data-dir>/wav``; every
recording is used at most once. The strings are deterministic given ``--seed``.
"""

import argparse
import random
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.io import wavfile

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NAME = re.compile(r"^([0-9])_([A-Za-z]+)_([0-9]+)\.wav$")


def read_wav(path):
    try:
        rate, data = wavfile.read(str(path))
    except (ValueError, OSError) as e:
        sys.exit(f"prepare_fsdd.py: {path}: not a readable WAV file ({e})")
    if data.ndim != 1 or data.dtype != np.int16 or data.size == 0:
        sys.exit(f"prepare_fsdd.py: {path}: expected non-empty 16-bit mono PCM, got "
                 f"{data.dtype} samples of shape {data.shape}")
    return rate, data


def quiet_frames(data, rate, num=4):
    """The ``num`` 10-ms frames of lowest energy in ``data``: the recording's background."""
    n = rate // 100
    frames = data[: len(data) // n * n].reshape(-1, n).astype(np.float64)
    if len(frames) == 0:
        return np.zeros(n, dtype=np.int16)
    order = np.argsort((frames ** 2).sum(axis=1))[:num]
    return frames[np.sort(order)].reshape(-1).astype(np.int16)


def pause(background, samples, rng):
    """``samples`` of background made by repeating randomly chosen pieces of it."""
    n = len(background)
    out = np.empty(samples, dtype=np.int16)
    pos = 0
    while pos < samples:
        start = rng.randrange(n // 2 + 1)
        piece = background[start:start + min(n - start, samples - pos)]
        out[pos:pos + len(piece)] = piece
        pos += len(piece)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recordings", type=Path, help="FSDD's recordings folder")
    p.add_argument("data_dir", type=Path, help="the Kaldi data dir to write")
    p.add_argument("--speakers", default="", help="comma-separated speakers to keep (default all)")
    p.add_argument("--strings", type=int, default=0,
                   help="make this many digit strings of 3..7 recordings each (default 0: "
                        "the single recordings as they are)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if not args.recordings.is_dir():
        sys.exit(f"prepare_fsdd.py: {args.recordings}: not a folder")
    keep = set(filter(None, args.speakers.split(",")))
    recs = defaultdict(list)                  # speaker -> [(digit, index, path)]
    for f in sorted(args.recordings.iterdir()):
        m = NAME.match(f.name)
        if not m:
            continue
        digit, spk, idx = int(m.group(1)), m.group(2).lower(), int(m.group(3))
        if keep and spk not in keep:
            continue
        recs[spk].append((digit, idx, f))
    if not recs:
        sys.exit(f"prepare_fsdd.py: {args.recordings}: no recordings named "
                 f"<digit>_<speaker>_<index>.wav{' of ' + args.speakers if keep else ''}")
    missing = keep - set(recs)
    if missing:
        sys.exit(f"prepare_fsdd.py: {args.recordings}: no recordings of {','.join(sorted(missing))}")

    # everything is written into a temporary folder that becomes the data dir at the end
    out = args.data_dir.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=out.name + ".tmp.", dir=out.parent))
    try:
        make_data_dir(args, recs, out, tmp_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp_dir.rename(out)
    print(f"prepare_fsdd.py: {args.data_dir}: {len((out / 'text').read_text().splitlines())} "
          f"utterances of {len(recs)} speakers ({', '.join(sorted(recs))})", file=sys.stderr)


def make_data_dir(args, recs, out, tmp_dir):
    """Write the data dir's files into ``tmp_dir``; paths in wav.scp point into ``out``."""
    wav_scp, text, utt2spk = [], [], []
    if args.strings <= 0:
        for spk in sorted(recs):
            for digit, idx, f in sorted(recs[spk]):
                utt = f"fsdd-{spk}-{digit}-{idx:02d}"
                wav_scp.append(f"{utt} {f.resolve()}")
                text.append(f"{utt} {WORDS[digit]}")
                utt2spk.append(f"{utt} fsdd-{spk}")
    else:
        rng = random.Random(args.seed)
        (tmp_dir / "wav").mkdir()
        speakers = sorted(recs)
        pools = {s: rng.sample(recs[s], len(recs[s])) for s in speakers}
        for i in range(args.strings):
            spk = speakers[i % len(speakers)]
            n = rng.randint(3, 7)
            if len(pools[spk]) < n:
                sys.exit(f"prepare_fsdd.py: {args.recordings}: not enough recordings of {spk} "
                         f"for {args.strings} strings (each recording is used once)")
            parts, words, rate = [], [], None
            for digit, idx, f in (pools[spk].pop() for _ in range(n)):
                r, data = read_wav(f)
                if rate is not None and r != rate:
                    sys.exit(f"prepare_fsdd.py: {f}: sample rate {r} differs from {rate}")
                rate = r
                if parts:
                    bg = quiet_frames(np.concatenate([parts[-1], data]), rate)
                    parts.append(pause(bg, int(rate * rng.uniform(0.15, 0.5)), rng))
                parts.append(data)
                words.append(WORDS[digit])
            utt = f"fsdd-{spk}-str{i:04d}"
            wavfile.write(str(tmp_dir / "wav" / f"{utt}.wav"), rate, np.concatenate(parts))
            wav_scp.append(f"{utt} {out / 'wav' / (utt + '.wav')}")
            text.append(f"{utt} {' '.join(words)}")
            utt2spk.append(f"{utt} fsdd-{spk}")

    order = np.argsort([line.split()[0] for line in wav_scp], kind="stable")
    spk2utt = defaultdict(list)
    for i in order:
        utt, spk = utt2spk[i].split()
        spk2utt[spk].append(utt)
    for name, lines in (("wav.scp", [wav_scp[i] for i in order]), ("text", [text[i] for i in order]),
                        ("utt2spk", [utt2spk[i] for i in order]),
                        ("spk2utt", [f"{s} {' '.join(u)}" for s, u in sorted(spk2utt.items())])):
        (tmp_dir / name).write_text("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    main()
