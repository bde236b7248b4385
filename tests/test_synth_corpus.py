"""egs/digits/local/synth_corpus.py: how an utterance is padded (espeak-ng voices).

Training utterances are padded to an allowed length with silence; with
``--tight-edge-prob`` some start or end right at their first or last word, as recordings
trimmed to the words do: the padding then goes to the other side, or (both sides tight)
the words are slowed down to the allowed length.
"""
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy.io import wavfile

from conftest import SYNTH_CORPUS

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng")


@pytest.fixture(scope="module")
def sc(synth_corpus):
    return synth_corpus


def quiet_ms(x, side, rate=16000):
    """Milliseconds of silence (10-ms frames under 1 % of the peak) at one end of ``x``."""
    n = rate // 100
    frames = x[: len(x) // n * n].reshape(-1, n).astype(np.float64)
    loud = np.sqrt((frames ** 2).mean(axis=1)) > 0.01 * np.abs(x).max()
    idx = np.flatnonzero(loud)
    return 10 * (idx[0] if side == "lead" else len(loud) - 1 - idx[-1])


@pytest.mark.parametrize("tight", [(None, None), (20.0, None), (None, 30.0), (25.0, 25.0)])
def test_tight_edges(sc, tmp_path, tight):
    lengths = sc.allowed_lengths(1.08)
    spec = dict(utt="u", spk="vm1", variant="m1", words=["three", "six", "nine"], accent="en-us",
                speed=170, pitch=50, gap=2, snr=None, seed=5)
    if tight != (None, None):
        spec["tight"] = tight
    path = tmp_path / "u.wav"
    sc.make_utterance(spec, path, 16000, lengths)
    rate, x = wavfile.read(str(path))
    # padded to an allowed length exactly, whichever side took the padding
    assert rate == 16000 and sc.num_frames(len(x), rate) in lengths
    for side, level in zip(("lead", "trail"), tight):
        if level is not None:
            assert quiet_ms(x, side) <= 20, side        # the synthesizer's edge, trimmed
        else:
            assert quiet_ms(x, side) >= 90, side        # 0.1-0.5 s of silence, or more
    # the same words: a tight utterance is no shorter than its speech alone
    plain = tmp_path / "plain.wav"
    sc.make_utterance(dict(spec, tight=(25.0, 25.0)), plain, 16000, None)
    _, y = wavfile.read(str(plain))
    assert len(x) >= len(y) and quiet_ms(y, "lead") <= 20 and quiet_ms(y, "trail") <= 20


def test_endpoint_cuts_weak_onsets_and_codas(sc):
    rate = 16000
    rng = np.random.default_rng(0)
    # 50 ms at -30 dB (a weak fricative), 200 ms at 0 dB, 30 ms at -25 dB, 100 ms silence
    parts = [10 ** (-30 / 20) * rng.standard_normal(800), rng.standard_normal(3200),
             10 ** (-25 / 20) * rng.standard_normal(480), np.zeros(1600)]
    x = np.concatenate(parts)
    b = [800, 4000, 4480]                     # where the parts end
    assert len(sc.endpoint(x, rate, None, None)) == len(x)
    # a 20-dB endpointer cuts the weak onset and the weak coda with the silence
    assert len(sc.endpoint(x, rate, 20.0, None)) == len(x) - b[0]
    assert len(sc.endpoint(x, rate, None, 20.0)) == b[1]
    # a 35-dB one keeps them (10-ms frames: the weak parts are whole frames here)
    assert len(sc.endpoint(x, rate, 35.0, 35.0)) == b[2]


@pytest.mark.parametrize("opts, msg", [
    (["--foreign-accent-prob", "2"], "--foreign-accent-prob must be in [0, 1]"),
    (["--tight-edge-prob", "1.5"], "--tight-edge-prob must be in [0, 1]"),
    (["--tight-edge-db", "30,10"], "--tight-edge-db: bad range"),
    (["--tight-edge-db", "0,20"], "--tight-edge-db: levels are dB below the peak"),
])
def test_bad_edge_options(tmp_path, opts, msg):
    r = subprocess.run([sys.executable, str(SYNTH_CORPUS), "--out-dir", str(tmp_path / "data"),
                        "--wav-dir", str(tmp_path / "wav"), "--accents",
                        str(SYNTH_CORPUS.parent.parent / "conf" / "accents.txt"), *opts],
                       capture_output=True, text=True)
    assert r.returncode != 0 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


def test_foreign_accents_read_every_digit(sc):
    """--foreign-accent-prob: each language's voice reads each respelled digit as one
    word (espeak-ng spells out a string it cannot read as letter names, with secondary
    stresses, as Spanish does "zri": T,eta,e**e'i)."""
    for lang, spelling in sc.ESPEAK_SPELLING.items():
        assert sorted(spelling) == sorted(sc.DIGIT_WORDS + ["oh"]), lang
        for word, text in spelling.items():
            assert len(text.split()) == 1, (lang, word)
            phones = subprocess.run(["espeak-ng", "-q", "-x", "-v", lang, text],
                                    capture_output=True, text=True, check=True).stdout.strip()
            assert phones and "," not in phones, (lang, word, text, phones)
            x, rate = sc.synthesize(text, lang + "+m1", 175, 50, 0)
            assert rate == sc.ESPEAK_RATE
            loud = np.flatnonzero(np.abs(x) > 0.05 * np.abs(x).max())
            assert 0.08 < (loud[-1] - loud[0]) / rate < 0.5, (lang, word)


def test_foreign_accent_utterance_text(sc, tmp_path, espeak_calls):
    """make_utterance gives espeak-ng the respelled words for a foreign accent, the words
    themselves for an English one."""
    for accent in ("de", "en-gb"):
        spec = dict(utt="u", spk="vm1", variant="m1", words=["three", "oh", "six"],
                    accent=accent, speed=170, pitch=50, gap=2, snr=None, seed=5)
        sc.make_utterance(spec, tmp_path / "u.wav", 16000, None)
    assert espeak_calls == [("de+m1", "sri oh sicks"), ("en-gb+m1", "three oh six")]
