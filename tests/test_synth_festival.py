"""egs/digits/local/synth_corpus.py: festival's voices of other languages reading English digits.

Each of these voices (Italian, Czech, Finnish, Telugu; one male talker's recordings each)
reads the digits respelled in its own language (``FESTIVAL_SPELLING``). Checked for every
such voice: each respelled word gives a non-empty waveform of about a spoken word's
length (festival spelling out letters, or reading nothing, would not), different words
give different audio, a three-word string is longer than its words, and the duration
stretch lengthens the speech. English voices get the words as they are.
"""
import shutil
import subprocess

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(shutil.which("festival") is None,
                                reason="festival (make install)")


@pytest.fixture(scope="module")
def sc(synth_corpus):
    return synth_corpus


@pytest.fixture(scope="module")
def installed():
    r = subprocess.run(["festival", "-b", "(print (voice.list))"], capture_output=True, text=True)
    return r.stdout


def speech_seconds(x, rate):
    """Seconds of 10-ms frames within 25 dB of the loudest one."""
    n = rate // 100
    frames = x[: len(x) // n * n].reshape(-1, n).astype(np.float64)
    db = 10 * np.log10((frames ** 2).mean(axis=1) + 1e-12)
    return (db > db.max() - 25).sum() / 100


def envelope(x, rate, frames=40):
    """The log-energy contour of ``x`` resampled to ``frames`` points (word shape)."""
    n = rate // 100
    e = np.log((x[: len(x) // n * n].reshape(-1, n).astype(np.float64) ** 2).mean(axis=1) + 1e-9)
    return np.interp(np.linspace(0, len(e) - 1, frames), np.arange(len(e)), e)


def test_english_voices_read_the_words(sc):
    assert "kal_diphone" not in sc.FESTIVAL_SPELLING
    assert sc.respell({}, ["oh", "seven"]) == "oh seven"
    assert sc.respell(sc.FESTIVAL_SPELLING["czech_ph"], ["oh", "seven"]) == "ou sevn"


@pytest.mark.parametrize("voice", ["pc_diphone", "czech_machac", "czech_ph", "hy_fi_mv_diphone",
                                   "telugu_NSK_diphone"])
def test_foreign_voice_reads_every_digit(sc, installed, voice, tmp_path):
    talker = [t for t, vs in sc.RECORDED_TALKERS.items() if any(v == voice for _, v, _ in vs)]
    pkg = [p for _, v, p in sc.RECORDED_TALKERS[talker[0]] if v == voice][0]
    assert voice in installed, "festival voice %s missing: apt-get install %s" % (voice, pkg)
    spelling = sc.FESTIVAL_SPELLING[voice]
    assert sorted(spelling) == sorted(sc.DIGIT_WORDS + ["oh"])
    items = [("w-" + w, sc.respell(spelling, [w]), 1.0) for w in spelling]
    items += [("s-slow", sc.respell(spelling, ["three", "six", "nine"]), 1.25),
              ("s-fast", sc.respell(spelling, ["three", "six", "nine"]), 0.8)]
    sc.synthesize_festival_batch(voice, items, tmp_path)
    wav = {u: sc.read_pcm_wav(tmp_path / (u + ".wav")) for u, _, _ in items}
    single = {u: speech_seconds(x, r) for u, (x, r) in wav.items() if u.startswith("w-")}
    for u, t in single.items():
        x, rate = wav[u]
        assert x.size and np.isfinite(x).all() and np.abs(x).max() > 0.05, u
        # a digit, not silence, a click or letters spelt out one by one
        assert 0.08 <= t <= 1.6, (u, t)
    # different words sound different (a voice reading nothing useful would not)
    env = {u: envelope(*wav[u]) for u in single}
    names = sorted(env)
    corr = [np.corrcoef(env[a], env[b])[0, 1] for i, a in enumerate(names) for b in names[i + 1:]]
    assert np.median(corr) < 0.9
    # three words take longer than any of them alone; the stretch lengthens the string
    assert speech_seconds(*wav["s-fast"]) > max(single["w-" + w] for w in ("three", "six", "nine"))
    (slow, r1), (fast, r2) = wav["s-slow"], wav["s-fast"]
    assert len(slow) / r1 > 1.3 * len(fast) / r2
