"""egs/digits/local/prepare_fsdd.py: Kaldi data dirs of recorded digits (FSDD's layout).

A fake FSDD folder of two speakers (tones instead of speech: only names, lengths and
samples are checked) gives a data dir of the recordings as they are, and one of digit
strings joined from them.
"""
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "egs" / "digits" / "local" / "prepare_fsdd.py"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write(path, samples, rate=8000):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def read(path):
    with wave.open(str(path), "rb") as w:
        return w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


@pytest.fixture(scope="module")
def fsdd(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdd") / "recordings"
    d.mkdir()
    rng = np.random.default_rng(0)
    recs = {}
    for spk in ("ann", "bob"):
        for digit in range(10):
            for idx in range(3):
                n = int(rng.integers(1500, 4000))
                x = (3000 * np.sin(np.arange(n) * (0.05 + 0.01 * digit))
                     + 30 * rng.standard_normal(n)).astype(np.int16)
                write(d / f"{digit}_{spk}_{idx}.wav", x)
                recs[(spk, digit, idx)] = x
    (d / "README.txt").write_text("not a recording\n")
    return d, recs


def run(*args, check=True):
    r = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def table(path):
    return dict(line.split(" ", 1) for line in Path(path).read_text().splitlines())


def test_recordings_as_they_are(fsdd, tmp_path):
    d, recs = fsdd
    run(d, tmp_path / "iso", "--speakers", "bob")
    text, scp, u2s = (table(tmp_path / "iso" / f) for f in ("text", "wav.scp", "utt2spk"))
    assert len(text) == 30 and sorted(text) == list(text) == list(scp) == list(u2s)
    assert text["fsdd-bob-7-02"] == "seven" and u2s["fsdd-bob-7-02"] == "fsdd-bob"
    assert Path(scp["fsdd-bob-7-02"]) == (d / "7_bob_2.wav").resolve()
    spk2utt = table(tmp_path / "iso" / "spk2utt")
    assert spk2utt == {"fsdd-bob": " ".join(text)}


def test_digit_strings(fsdd, tmp_path):
    d, recs = fsdd
    run(d, tmp_path / "s", "--strings", "8", "--seed", "3")
    text, scp, u2s = (table(tmp_path / "s" / f) for f in ("text", "wav.scp", "utt2spk"))
    assert len(text) == 8 and list(text) == sorted(text) == list(scp)
    assert {u2s[u] for u in text} == {"fsdd-ann", "fsdd-bob"}
    used = set()
    for utt, words in text.items():
        spk = u2s[utt].split("-")[1]
        words = words.split()
        assert 3 <= len(words) <= 7
        rate, x = read(scp[utt])
        assert rate == 8000
        # every word is one whole recording of that speaker, in order, used once
        pos = 0
        for w in words:
            digit = WORDS.index(w)
            cands = [(spk, digit, i) for i in range(3) if (spk, digit, i) not in used]
            # the first word starts the string; each other one follows a pause of 0.15-0.5 s
            starts = [0] if pos == 0 else range(pos + int(0.15 * rate), pos + int(0.5 * rate) + 1)
            for k in cands:
                rec = recs[k]
                hit = next((p for p in starts
                            if np.array_equal(x[p:p + len(rec)], rec)), None)
                if hit is not None:
                    break
            else:
                raise AssertionError(f"{utt}: no recording of {w} by {spk} at {pos}")
            used.add(k)
            pos = hit + len(rec)
        assert pos == len(x)
    # the same seed gives the same strings
    run(d, tmp_path / "s2", "--strings", "8", "--seed", "3")
    assert table(tmp_path / "s2" / "text") == text
    run(d, tmp_path / "s3", "--strings", "8", "--seed", "4")
    assert table(tmp_path / "s3" / "text") != text


def test_bad_input(fsdd, tmp_path):
    d, _ = fsdd
    r = run(tmp_path / "nowhere", tmp_path / "x", check=False)
    assert r.returncode != 0 and "nowhere: not a folder" in r.stderr
    r = run(d, tmp_path / "x", "--speakers", "carl", check=False)
    assert r.returncode != 0 and "no recordings" in r.stderr
    r = run(d, tmp_path / "x", "--strings", "100", check=False)
    assert r.returncode != 0 and "not enough recordings" in r.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("x.tmp*"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.glob("*_bob_*.wav"):
        (bad / f.name).write_bytes(b"RIFF junk")     # every recording damaged
    r = run(bad, tmp_path / "y", "--strings", "3", check=False)
    assert r.returncode != 0 and "_bob_" in r.stderr and ".wav: not a readable WAV file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "y").exists()
