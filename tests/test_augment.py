"""pkwrap.data.augment: each augmentation's expected effect, determinism, data dirs."""
import json
import math

import numpy as np
import pytest
from scipy.io import wavfile

from pkwrap.data import augment as A

SR = 16000


def tone_mix(n=SR, sr=SR, freqs=(150, 1000, 2500, 5000, 7000), seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    return 0.1 * sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in freqs)


def speechlike(n=SR, seed=0):
    """Noise bursts with pauses (so that reverb tails and SNRs are not trivial)."""
    rng = np.random.default_rng(seed)
    env = np.repeat(rng.random(n // 800 + 1) < 0.6, 800)[:n]
    return 0.2 * env * A.pink_noise(n, rng)


def test_speed_perturb_changes_duration_and_pitch():
    x = np.sin(2 * np.pi * 500 * np.arange(SR) / SR)
    for f in A.SPEED_3WAY:
        y = A.speed_perturb(x, f)
        assert abs(len(y) - SR / f) <= 1
        # the tone moves to 500 * f Hz
        spec = np.abs(np.fft.rfft(y))
        peak = np.argmax(spec) * SR / len(y)
        assert abs(peak - 500 * f) < 3
    assert A.speed_utt_id("spk1-0001", 0.9) == "sp0.9-spk1-0001"
    assert A.speed_utt_id("spk1-0001", 1.0) == "spk1-0001"
    with pytest.raises(ValueError):
        A.speed_perturb(x, 0)


@pytest.mark.parametrize("rt60", [0.25, 0.5, 0.8])
def test_image_method_rir_has_the_requested_rt60(rt60):
    h = A.image_method_rir([6.0, 4.5, 3.0], [1.2, 1.0, 1.5], [4.0, 3.2, 1.4], rt60, SR)
    assert abs(A.measure_rt60(h, SR) / rt60 - 1) < 0.1
    # the direct path comes first, at distance / c
    d = math.dist([1.2, 1.0, 1.5], [4.0, 3.2, 1.4])
    assert int(np.argmax(np.abs(h) > 0)) == round(d / 343.0 * SR)
    # plain Eyring absorption decays more slowly than asked (why the correction exists)
    h0 = A.image_method_rir([6.0, 4.5, 3.0], [1.2, 1.0, 1.5], [4.0, 3.2, 1.4], rt60, SR,
                            match_rt60=False)
    assert A.measure_rt60(h0, SR) > 1.1 * rt60


def test_random_rir_deterministic_and_in_range():
    h1, i1 = A.random_rir(np.random.default_rng(5), SR, (0.3, 0.6))
    h2, i2 = A.random_rir(np.random.default_rng(5), SR, (0.3, 0.6))
    assert i1 == i2 and np.array_equal(h1, h2)
    assert 0.3 <= i1["rt60"] <= 0.6
    assert all(0.5 <= p <= l - 0.5 for p, l in zip(i1["mic"], i1["room"]))
    with pytest.raises(ValueError, match="not inside"):
        A.image_method_rir([3, 3, 3], [1, 1, 4], [1, 1, 1], 0.3, SR)


def test_reverberate_keeps_length_alignment_power_and_adds_a_tail():
    x = np.zeros(SR)
    x[1000:1400] = 0.2 * A.pink_noise(400, np.random.default_rng(0))
    h = A.image_method_rir([5, 4, 3], [1, 1, 1], [3, 2.5, 1.5], 0.5, SR)
    y = A.reverberate(x, h)
    assert len(y) == len(x)
    np.testing.assert_allclose(np.mean(y ** 2), np.mean(x ** 2), rtol=1e-9)
    # aligned: the direct sound starts where x does; energy remains long after x ends
    assert np.argmax(np.abs(y) > 1e-6) >= 990
    assert np.mean(y[3000:4000] ** 2) > 1e-4 * np.mean(x[1000:1400] ** 2)
    assert np.all(x[3000:4000] == 0)


@pytest.mark.parametrize("kind", ["white", "pink", "babble"])
@pytest.mark.parametrize("snr", [0.0, 5.0, 10.0])
def test_add_noise_gives_the_requested_snr(kind, snr):
    rng = np.random.default_rng(1)
    x = speechlike(SR)
    if kind == "white":
        n = A.white_noise(SR, rng)
    elif kind == "pink":
        n = A.pink_noise(SR, rng)
    else:
        n = A.babble_noise(SR, [speechlike(7000, s) for s in range(3, 8)], rng, 4)
    y = A.add_noise(x, n, snr)
    assert A.snr_db(x, y - x) == pytest.approx(snr, abs=1e-9)


def test_pink_noise_is_pink():
    n = A.pink_noise(1 << 16, np.random.default_rng(0))
    p = np.abs(np.fft.rfft(n)) ** 2
    f = np.fft.rfftfreq(len(n), 1 / SR)
    lo = p[(f > 100) & (f < 200)].mean()
    hi = p[(f > 1600) & (f < 3200)].mean()
    assert 10 * math.log10(lo / hi) == pytest.approx(10 * math.log10(16), abs=1.5)  # 3 dB/oct


def test_telephone_band_attenuates_out_of_band_energy():
    x = tone_mix()
    y = A.telephone(x, SR)
    assert len(y) == len(x)
    e_out = A.band_energy_ratio(y, SR, 0, 250) + A.band_energy_ratio(y, SR, 3800, SR / 2)
    assert A.band_energy_ratio(x, SR, 3800, SR / 2) > 0.3
    assert e_out < 0.01
    # the in-band tones pass (within 1 dB)
    p_in = lambda s: A.band_energy_ratio(s, SR, 900, 1100) * np.sum(s ** 2)
    assert abs(10 * math.log10(p_in(y) / p_in(x))) < 1.0
    r = A.resample_roundtrip(x, SR, 8000)
    assert len(r) == len(x) and A.band_energy_ratio(r, SR, 4100, SR / 2) < 1e-3


def test_random_eq_tilt_and_determinism():
    x = A.white_noise(SR, np.random.default_rng(0))
    y = A.apply_eq(x, SR, 4.0)  # +4 dB/octave: 2 kHz vs 500 Hz differ by 8 dB more
    band = lambda s, f: A.band_energy_ratio(s, SR, f / 1.2, f * 1.2) * np.sum(s ** 2)
    gain = lambda f: 10 * math.log10(band(y, f) / band(x, f))
    assert gain(2000) - gain(500) == pytest.approx(8.0, abs=0.5)
    y1, d1 = A.random_eq(x, SR, np.random.default_rng(3))
    y2, d2 = A.random_eq(x, SR, np.random.default_rng(3))
    assert d1 == d2 and np.array_equal(y1, y2)


def test_mu_law_is_8_bit_companding():
    x = np.linspace(-1, 1, 10001)
    y = A.mu_law(x)
    assert len(np.unique(y)) <= 256
    assert np.max(np.abs(y - x)) < 0.05
    # companding: small signals keep a fine step, large ones a coarse one
    assert np.max(np.abs(y - x)[np.abs(x) < 0.01]) < 4e-4
    assert A.snr_db(x, y - x) > 30


def _band_db(s, edges):
    p = np.abs(np.fft.rfft(s)) ** 2
    f = np.fft.rfftfreq(len(s), 1 / SR)
    return np.array([10 * np.log10(p[(f >= a) & (f < b)].sum() + 1e-20)
                     for a, b in zip(edges[:-1], edges[1:])])


def test_gsm_like_codes_coarsely_but_keeps_the_spectral_envelope():
    from scipy.signal import lfilter
    e = np.zeros(SR)
    e[::128] = 1.0  # a 125 Hz "vowel": pulse train through two resonances
    x = lfilter([1], [1, 0.3, 0.5], lfilter([1], [1, -1.3, 0.9], e))
    x = 0.2 * x / np.abs(x).max()
    y = A.gsm_like(x, SR)
    assert len(y) == len(x)
    np.testing.assert_allclose(np.mean(y ** 2), np.mean(x ** 2), rtol=1e-9)
    assert A.band_energy_ratio(y, SR, 4100, SR / 2) < 0.01  # it ran at 8 kHz
    xl = A.resample_roundtrip(x, SR, 8000)
    assert A.snr_db(xl, y - xl) < 15.0  # clearly degraded ...
    edges = np.linspace(100, 3800, 20)
    assert np.corrcoef(_band_db(x, edges), _band_db(y, edges))[0, 1] > 0.9  # ... same envelope


def test_augment_chain_is_deterministic_and_described():
    cfg = A.AugmentConfig(reverb_prob=1, noise_prob=1, channel_prob=1, codec_prob=1,
                          telephone_prob=1, volume=True)
    x = speechlike(SR)
    y1, d1 = A.augment(x, SR, cfg, np.random.default_rng(7), [speechlike(8000, 9)])
    y2, d2 = A.augment(x, SR, cfg, np.random.default_rng(7), [speechlike(8000, 9)])
    assert np.array_equal(y1, y2) and d1 == d2
    assert [d.split("=")[0] for d in d1] == ["reverb", "noise", "channel", "volume"]
    assert d1[2].startswith("channel=tel+eq")
    y, d = A.augment(x, SR, A.AugmentConfig(), np.random.default_rng(0))
    assert d == [] and np.array_equal(y, x)
    with pytest.raises(ValueError, match="not a probability"):
        A.AugmentConfig(noise_prob=2)


def _make_dir(tmp_path, n=4):
    src = tmp_path / "src"
    (src / "wav").mkdir(parents=True)
    wav, text, u2s = [], [], []
    for i in range(n):
        utt = "spk%d-%04d" % (i % 2, i)
        p = src / "wav" / (utt + ".wav")
        wavfile.write(str(p), SR, np.round(speechlike(6000 + 400 * i, i) * 32767).astype(np.int16))
        wav.append("%s %s\n" % (utt, p))
        text.append("%s one two\n" % utt)
        u2s.append("%s spk%d\n" % (utt, i % 2))
    for name, lines in (("wav.scp", wav), ("text", text), ("utt2spk", u2s)):
        (src / name).write_text("".join(sorted(lines)))
    return src


def test_augment_data_dir_speed_3way_copies_and_records(tmp_path):
    src = _make_dir(tmp_path)
    cfg = A.AugmentConfig(reverb_prob=0.5, noise_prob=1.0, channel_prob=0.5)
    allowed = [30, 45, 60, 90]
    dst = tmp_path / "aug"
    table = A.augment_data_dir(src, dst, tmp_path / "augwav", cfg, SR, seed=3,
                               speed_factors=A.SPEED_3WAY, copies=1, keep_clean=True,
                               allowed_frames=allowed)
    utts = [l.split()[0] for l in (dst / "wav.scp").read_text().splitlines()]
    assert len(utts) == 4 * 3 * 2 and utts == sorted(utts)
    assert {"spk0-0000", "sp0.9-spk0-0000", "sp1.1-spk0-0000", "aug1-sp0.9-spk0-0000"} <= set(utts)
    u2s = dict(l.split() for l in (dst / "utt2spk").read_text().splitlines())
    assert all(u.startswith(s + "-") for u, s in u2s.items())
    assert table["spk0-0000"] == "none" and table["sp1.1-spk0-0000"] == "speed=1.1"
    assert "noise=" in table["aug1-spk0-0000"]
    meta = json.loads((dst / "augment.json").read_text())
    assert meta["speed_factors"] == [0.9, 1.0, 1.1] and meta["config"]["noise_prob"] == 1.0
    for line in (dst / "wav.scp").read_text().splitlines():
        utt, path = line.split()
        rate, pcm = wavfile.read(path)
        frames = 1 + (len(pcm) - 400) // 160
        assert rate == SR and frames in allowed
    # the slowed copy is longer than the sped-up one
    n = lambda u: len(wavfile.read(dict(l.split() for l in (dst / "wav.scp").read_text()
                                        .splitlines())[u])[1])
    assert n("sp0.9-spk1-0003") >= n("sp1.1-spk1-0003")
    # deterministic given the seed
    dst2 = tmp_path / "aug2"
    A.augment_data_dir(src, dst2, tmp_path / "augwav2", cfg, SR, seed=3,
                       speed_factors=A.SPEED_3WAY, copies=1, keep_clean=True,
                       allowed_frames=allowed, nj=2)
    assert (dst2 / "utt2aug").read_text() == (dst / "utt2aug").read_text()
    a = wavfile.read(str(tmp_path / "augwav" / "aug1-spk0-0000.wav"))[1]
    b = wavfile.read(str(tmp_path / "augwav2" / "aug1-spk0-0000.wav"))[1]
    assert np.array_equal(a, b)


def test_augment_data_dir_bad_input_names_the_file(tmp_path):
    src = _make_dir(tmp_path, 2)
    (src / "wav.scp").write_text("spk0-0000 sox x.wav -t wav - |\n")
    with pytest.raises(ValueError, match="wav.scp: spk0-0000: only plain WAV"):
        A.augment_data_dir(src, tmp_path / "o", tmp_path / "w", A.AugmentConfig(), SR)
    src = _make_dir(tmp_path / "b", 2)
    with pytest.raises(ValueError, match="expected 8000 Hz"):
        A.augment_data_dir(src, tmp_path / "o", tmp_path / "w", A.AugmentConfig(), 8000)
    assert not (tmp_path / "o" / "wav.scp").exists()


def test_augment_data_dir_resamples_recordings_at_other_rates(tmp_path):
    src = _make_dir(tmp_path, 2)
    dst = tmp_path / "o8k"
    table = A.augment_data_dir(src, dst, tmp_path / "w8k", A.AugmentConfig(), 8000,
                               resample=True)
    assert set(table.values()) == {"none"}
    for line in (dst / "wav.scp").read_text().splitlines():
        utt, path = line.split()
        rate, pcm = wavfile.read(path)
        i = int(utt.split("-")[1])
        assert rate == 8000 and abs(len(pcm) - (6000 + 400 * i) / 2) <= 1


def test_narrowband_keeps_low_band_and_only_when_wideband():
    """narrowband_prob: an 8 kHz round trip (nothing above 4 kHz, the low band kept, unlike
    the telephone channel); skipped where the channel already went through 8 kHz; no
    random draw when off, so the other steps' chains are those of a config without it."""
    x = speechlike(SR)
    y, d = A.augment(x, SR, A.AugmentConfig(narrowband_prob=1.0), np.random.default_rng(1))
    assert d == ["narrowband=8k"]
    assert A.band_energy_ratio(y, SR, 4100, SR / 2) < 0.01
    assert A.band_energy_ratio(x, SR, 4100, SR / 2) > 0.01
    assert A.band_energy_ratio(y, SR, 50, 250) > 0.5 * A.band_energy_ratio(x, SR, 50, 250)
    tel = A.AugmentConfig(channel_prob=1, telephone_prob=1, eq=False, codec_prob=0,
                          narrowband_prob=1.0)
    _, d = A.augment(x, SR, tel, np.random.default_rng(1))
    assert d == ["channel=tel"]
    base = A.AugmentConfig(reverb_prob=0.5, noise_prob=0.5, channel_prob=0.5, volume=True)
    off = A.AugmentConfig(reverb_prob=0.5, noise_prob=0.5, channel_prob=0.5, volume=True,
                          narrowband_prob=0.0)
    for seed in range(5):
        (y1, d1), (y2, d2) = (A.augment(x, SR, c, np.random.default_rng(seed)) for c in (base, off))
        assert d1 == d2 and np.array_equal(y1, y2)
    y, d = A.augment(x, 8000, A.AugmentConfig(narrowband_prob=1.0), np.random.default_rng(1))
    assert d == [] and np.array_equal(y, x)  # already narrowband
    with pytest.raises(ValueError, match="not a probability"):
        A.AugmentConfig(narrowband_prob=1.5)


def _level_db(y, a, b):
    return 10 * np.log10(np.mean(np.asarray(y[a:b], dtype=np.float64) ** 2))


@pytest.mark.parametrize("slope", [0.5, -0.4])
def test_dynamics_gain_follows_the_level_below_the_knee(slope):
    """dynamics(): a part 40 dB below the loudest gets slope * 30 dB of gain (knee -10 dB),
    one at the top keeps its level, and the gain moves smoothly (no step at the joins)."""
    rng = np.random.default_rng(0)
    n = SR // 5
    loud = np.sin(2 * np.pi * 220 * np.arange(n) / SR)
    weak = rng.standard_normal(n) * 10 ** (-40 / 20) * np.sqrt(0.5)
    x = np.concatenate([weak, loud, weak])
    y = A.dynamics(x, SR, slope)
    mid = slice(n // 4, 3 * n // 4)  # away from the 30-ms smoothing at the joins
    gain_weak = _level_db(y[:n], mid.start, mid.stop) - _level_db(x[:n], mid.start, mid.stop)
    gain_loud = (_level_db(y[n:2 * n], mid.start, mid.stop)
                 - _level_db(x[n:2 * n], mid.start, mid.stop))
    assert abs(gain_weak - slope * -30) < 1.0, gain_weak
    assert abs(gain_loud) < 0.5, gain_loud
    ratio = np.abs(y[1:] / np.where(x[1:] == 0, 1, x[1:]))
    assert np.max(np.abs(np.diff(20 * np.log10(ratio[x[1:] != 0])))) < 0.5  # smooth gain
    assert np.array_equal(A.dynamics(x, SR, 0.0), x)


def test_dynamics_in_the_chain_is_drawn_described_and_deterministic():
    """dynamics_prob: the slope is drawn from dynamics_range, recorded as dynamics=<slope>,
    the same with the same seed; with the default 0 no such step (and no draw) happens."""
    x = speechlike(SR)
    cfg = A.AugmentConfig(dynamics_prob=1.0, dynamics_range=(0.2, 0.3))
    (y1, d1), (y2, d2) = (A.augment(x, SR, cfg, np.random.default_rng(4)) for _ in range(2))
    assert d1 == d2 and np.array_equal(y1, y2)
    assert len(d1) == 1 and d1[0].startswith("dynamics=+")
    slope = float(d1[0].split("=")[1])
    assert 0.2 <= slope <= 0.3
    np.testing.assert_allclose(y1, A.dynamics(x, SR, slope), rtol=1e-6, atol=1e-9)
    # off: the chain of the other steps is the one without the field at all
    base = A.AugmentConfig(reverb_prob=0.5, noise_prob=0.5, channel_prob=0.5, volume=True)
    on = A.AugmentConfig(reverb_prob=0.5, noise_prob=0.5, channel_prob=0.5, volume=True,
                         dynamics_prob=1.0, dynamics_range=(0.0, 0.0))
    differ = 0
    for seed in range(5):
        (y0, d0), (y1, d1) = (A.augment(x, SR, c, np.random.default_rng(seed)) for c in (base, on))
        assert not any(s.startswith("dynamics") for s in d0)
        assert any(s.startswith("dynamics") for s in d1)
        differ += d0 != [s for s in d1 if not s.startswith("dynamics")]
    assert differ > 0  # a drawn step moves the later draws: so 0 must not draw
    with pytest.raises(ValueError, match="not a probability"):
        A.AugmentConfig(dynamics_prob=-0.1)
