r"""Waveform data augmentation as Kaldi recipes do it, with everything generated in code.

All functions take float waveforms ``x`` (1-D numpy arrays, any scale) and return new
arrays; the random ones take a ``numpy.random.Generator`` and are deterministic given
its state.

* Speed perturbation (Kaldi's ``utils/data/perturb_data_dir_speed_3way.sh``): the
  signal is resampled by ``1 / factor`` and read at the original rate, so it lasts
  ``1 / factor`` as long and its pitch and formants move by ``factor``; the 3-way copies
  get utterance and speaker ids prefixed ``sp0.9-`` / ``sp1.1-`` (1.0 keeps the ids).
* Volume perturbation (``perturb_data_dir_volume.sh``): a gain uniform in [1/8, 2].
* Reverberation (what ``steps/data/reverberate_data_dir.py`` does with recorded RIRs,
  here with RIRs of the image method, Allen & Berkley 1979): in a shoebox room
  ``Lx x Ly x Lz`` with source ``s`` and microphone ``m``, every image source
  ``(2 i Lx + (-1)^p s_x, ...)``, ``i`` integer, ``p`` in {0, 1}, contributes an
  impulse at delay ``d / c`` of amplitude ``beta^{n} / (4 pi d)``, ``d`` its distance to
  the microphone, ``n`` its number of wall reflections (per axis ``|2i|`` for the images
  at ``2 i L + s``, ``|2i - 1|`` for those at ``2 i L - s``), ``beta = sqrt(1 - alpha)``
  from the wall absorption ``alpha``
  that gives the requested RT60 by Eyring's formula
  ``RT60 = 0.161 V / (-S ln(1 - alpha))``.  The reverberant signal is ``x * h``,
  shifted by the direct-path delay so that it stays aligned with ``x`` and cut to
  ``len(x)``.
* Additive noise at a given SNR: ``y = x + g n``, ``g^2 = P_x / (P_n 10^{SNR/10})``,
  ``P`` the mean power, so ``10 log10(P_x / P(g n)) = SNR`` exactly; white, pink (power
  ``~ 1/f``) or babble (a sum of other utterances) noise.
* Channel: telephone band-pass 300-3400 Hz, an 8 kHz round trip, a random EQ (spectral
  tilt in dB/octave plus a few peaks/notches), G.711 mu-law (8-bit companded PCM) and a
  GSM-like coarse codec (8 kHz, 20 ms frames, order-8 LPC, residual kept on every 3rd
  sample and quantized to 3 bits per sample with a block scale: the regular-pulse
  excitation of GSM 06.10 without its long-term predictor).
* Dynamics: a level-dependent gain, as an automatic gain control or a noise gate /
  downward expander in a recording chain: every 10-ms frame whose level ``L`` (dB against
  the loudest frame, floored at -60 dB) is below the knee ``K`` (-10 dB) gets
  ``s (L - K)`` dB of gain, smoothed over 30 ms; ``s > 0`` makes weak sounds weaker (the
  faint onsets and codas of gated or trimmed recordings), ``s < 0`` louder (a compressor
  lifting them). Frames above the knee keep their level.
* Narrowband: an 8 kHz round trip alone (the 0-4 kHz band of an 8-kHz recording, with
  its low frequencies kept, unlike the telephone band), for utterances that the channel
  left wideband.

:class:`AugmentConfig` and :func:`augment` draw a random chain of these per utterance
(reverb -> noise -> dynamics -> channel -> narrowband -> volume) and return a description
of what was done;
:func:`augment_data_dir` applies them to a Kaldi data dir (``wav.scp`` of plain WAV
paths) and records the config in ``augment.json`` and each utterance's chain in
``utt2aug``.
"""
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.io import wavfile
from scipy.signal import butter, fftconvolve, lfilter, resample_poly, sosfiltfilt

__all__ = [
    "SPEED_3WAY", "speed_perturb", "speed_utt_id", "volume_perturb", "image_method_rir",
    "random_rir", "measure_rt60", "reverberate", "white_noise", "pink_noise", "babble_noise",
    "add_noise", "snr_db", "bandpass", "resample_roundtrip", "telephone", "random_eq",
    "mu_law", "gsm_like", "dynamics", "band_energy_ratio", "AugmentConfig", "augment",
    "augment_data_dir", "read_wav", "write_wav",
]

SPEED_3WAY = (0.9, 1.0, 1.1)
SOUND_SPEED = 343.0


# ----------------------------------------------------------------------------- speed, volume

def speed_perturb(x: np.ndarray, factor: float) -> np.ndarray:
    """Play ``x`` ``factor`` times faster (length ``~len(x) / factor``, pitch times factor)."""
    if factor <= 0:
        raise ValueError("speed_perturb: factor must be > 0, got %r" % factor)
    if factor == 1.0:
        return np.array(x, dtype=np.float64)
    r = Fraction(1.0 / factor).limit_denominator(1000)
    return resample_poly(np.asarray(x, dtype=np.float64), r.numerator, r.denominator)


def speed_utt_id(utt: str, factor: float) -> str:
    """``sp0.9-<utt>`` as perturb_data_dir_speed_3way.sh names copies (1.0 keeps ``utt``)."""
    return utt if factor == 1.0 else "sp%s-%s" % (factor, utt)


def volume_perturb(x: np.ndarray, gain: float) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) * gain


# ----------------------------------------------------------------------------- reverberation

def eyring_reflection(room: Sequence[float], rt60: float) -> float:
    """Wall reflection coefficient beta giving ``rt60`` seconds by Eyring's formula."""
    lx, ly, lz = room
    volume, surface = lx * ly * lz, 2 * (lx * ly + lx * lz + ly * lz)
    alpha = 1.0 - math.exp(-0.161 * volume / (surface * rt60))
    return math.sqrt(1.0 - alpha)


def image_method_rir(room: Sequence[float], source: Sequence[float], mic: Sequence[float],
                     rt60: float, sample_rate: int, length_s: Optional[float] = None,
                     match_rt60: bool = True) -> np.ndarray:
    """Room impulse response of a shoebox room by the image method (see the module doc).

    Args:
      room: (Lx, Ly, Lz) in metres.  source, mic: positions inside the room.
      rt60: reverberation time in seconds (sets the uniform wall absorption).
      length_s: RIR length (default ``rt60``, at most 1 s).
      match_rt60: correct the Eyring absorption so that :func:`measure_rt60` of the RIR
        is ``rt60`` (within 2 %); otherwise the plain Eyring absorption.
    Returns:
      float64 ``[N]``, N = length_s * sample_rate, direct path at ``round(d0 / c * rate)``.
    """
    room, src, mic = (np.asarray(v, dtype=np.float64) for v in (room, source, mic))
    if room.shape != (3,) or np.any(room <= 0):
        raise ValueError("image_method_rir: bad room %s" % room)
    for name, p in (("source", src), ("mic", mic)):
        if np.any(p <= 0) or np.any(p >= room):
            raise ValueError("image_method_rir: %s %s is not inside the room %s" % (name, p, room))
    if rt60 <= 0:
        raise ValueError("image_method_rir: rt60 must be > 0")
    n = int(round((length_s if length_s is not None else min(rt60, 1.0)) * sample_rate))
    h = _image_rir(room, src, mic, eyring_reflection(room, rt60), sample_rate, n)
    if not match_rt60:
        return h
    # The image method's decay is not one exponential (paths along the longest axis meet
    # fewer walls), so Eyring's absorption gives a longer measured RT60 than asked for:
    # scale the design RT60 by asked / measured until they agree within 2 %.
    design = rt60
    for _ in range(6):
        measured = measure_rt60(h, sample_rate)
        if abs(measured / rt60 - 1) < 0.02:
            break
        design *= rt60 / measured
        h = _image_rir(room, src, mic, eyring_reflection(room, design), sample_rate, n)
    return h


def _image_rir(room, src, mic, beta, sample_rate, n):
    max_dist = n / sample_rate * SOUND_SPEED
    h = np.zeros(n)
    # per axis: image coordinates and reflection counts for i in [-N, N], p in {0, 1}
    axes = []
    for a in range(3):
        nmax = int(math.ceil(max_dist / (2 * room[a]))) + 1
        i = np.arange(-nmax, nmax + 1)
        coord = np.concatenate([2 * i * room[a] + src[a], 2 * i * room[a] - src[a]])
        refl = np.concatenate([np.abs(2 * i), np.abs(2 * i - 1)])
        keep = np.abs(coord - mic[a]) <= max_dist
        axes.append((coord[keep] - mic[a], refl[keep]))
    (dx, rx), (dy, ry) = axes[0], axes[1]
    dz, rz = axes[2]
    # loop over x images, vectorize over (y, z): bounded memory
    dyz2 = (dy[:, None] ** 2 + dz[None, :] ** 2).ravel()
    ryz = (ry[:, None] + rz[None, :]).ravel()
    log_beta = math.log(beta)
    for ddx, rrx in zip(dx, rx):
        d = np.sqrt(ddx ** 2 + dyz2)
        k = np.rint(d / SOUND_SPEED * sample_rate).astype(np.int64)
        ok = k < n
        if not ok.any():
            continue
        amp = np.exp((rrx + ryz[ok]) * log_beta) / (4 * math.pi * np.maximum(d[ok], 1e-3))
        h += np.bincount(k[ok], weights=amp, minlength=n)[:n]
    return h


def random_rir(rng: np.random.Generator, sample_rate: int, rt60_range=(0.2, 0.8),
               room_range=((3.0, 10.0), (3.0, 10.0), (2.4, 4.0))) -> Tuple[np.ndarray, Dict]:
    """A random room (size, RT60, source and mic at least 0.5 m from the walls) and its RIR."""
    room = [float(rng.uniform(lo, hi)) for lo, hi in room_range]
    rt60 = float(rng.uniform(*rt60_range))
    src = [float(rng.uniform(0.5, l - 0.5)) for l in room]
    mic = [float(rng.uniform(0.5, l - 0.5)) for l in room]
    h = image_method_rir(room, src, mic, rt60, sample_rate)
    info = {"room": [round(v, 2) for v in room], "rt60": round(rt60, 3),
            "source": [round(v, 2) for v in src], "mic": [round(v, 2) for v in mic]}
    return h, info


def measure_rt60(h: np.ndarray, sample_rate: int, db_range=(-5.0, -25.0)) -> float:
    """RT60 from the Schroeder backward integral: the slope between ``db_range`` (T20 x 3)."""
    e = np.cumsum((np.asarray(h, dtype=np.float64) ** 2)[::-1])[::-1]
    edc = 10 * np.log10(e / e[0] + 1e-300)
    hi, lo = db_range
    i0, i1 = int(np.argmax(edc <= hi)), int(np.argmax(edc <= lo))
    if i1 <= i0:
        raise ValueError("measure_rt60: the decay does not reach %g dB" % lo)
    t = np.arange(i0, i1 + 1) / sample_rate
    slope = np.polyfit(t, edc[i0:i1 + 1], 1)[0]  # dB per second
    return -60.0 / slope


def reverberate(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``x * h`` aligned to the direct path (the first RIR sample above a tenth of its peak:
    later bins can be higher where several images arrive together), cut to ``len(x)``,
    power kept."""
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(h)
    delay = int(np.argmax(a >= 0.1 * a.max()))
    y = fftconvolve(x, h)[delay:delay + len(x)]
    p_x, p_y = np.mean(x ** 2), np.mean(y ** 2)
    return y * math.sqrt(p_x / p_y) if p_y > 0 else y


# ----------------------------------------------------------------------------- noise

def white_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise whose power spectrum falls as 1/f (amplitude 1/sqrt(f)), unit power."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    y = np.fft.irfft(spec / np.sqrt(f), n)
    return y / (np.std(y) + 1e-12)


def babble_noise(n: int, sources: Sequence[np.ndarray], rng: np.random.Generator,
                 num_talkers: int = 4) -> np.ndarray:
    """The sum of ``num_talkers`` random stretches of ``sources`` (other utterances), each
    at unit power and looped to ``n`` samples."""
    if not sources:
        raise ValueError("babble_noise: no source utterances")
    y = np.zeros(n)
    for _ in range(num_talkers):
        s = np.asarray(sources[int(rng.integers(len(sources)))], dtype=np.float64)
        if not np.any(s):
            continue
        reps = int(math.ceil((n + len(s)) / len(s)))
        start = int(rng.integers(len(s)))
        seg = np.tile(s, reps)[start:start + n]
        y += seg / (np.sqrt(np.mean(seg ** 2)) + 1e-12)
    return y


def snr_db(signal: np.ndarray, noise: np.ndarray) -> float:
    return 10 * math.log10(np.mean(np.square(signal)) / np.mean(np.square(noise)))


def add_noise(x: np.ndarray, noise: np.ndarray, snr: float) -> np.ndarray:
    """``x + g * noise`` with g such that ``snr_db(x, g * noise) == snr`` (mean powers)."""
    x = np.asarray(x, dtype=np.float64)
    noise = np.asarray(noise, dtype=np.float64)[:len(x)]
    if len(noise) != len(x):
        raise ValueError("add_noise: noise is shorter than the signal")
    p_x, p_n = np.mean(x ** 2), np.mean(noise ** 2)
    if p_n <= 0:
        raise ValueError("add_noise: the noise is all zeros")
    return x + math.sqrt(p_x / (p_n * 10 ** (snr / 10))) * noise


# ----------------------------------------------------------------------------- channel

def bandpass(x: np.ndarray, sample_rate: int, low: float = 300.0, high: float = 3400.0,
             order: int = 6) -> np.ndarray:
    """Zero-phase Butterworth band-pass (forward-backward, so ``2 * order`` in effect)."""
    nyq = sample_rate / 2
    if not 0 < low < high:
        raise ValueError("bandpass: need 0 < low < high")
    if high >= nyq:
        sos = butter(order, low, btype="highpass", fs=sample_rate, output="sos")
    else:
        sos = butter(order, [low, high], btype="bandpass", fs=sample_rate, output="sos")
    return sosfiltfilt(sos, np.asarray(x, dtype=np.float64))


def resample_roundtrip(x: np.ndarray, sample_rate: int, mid_rate: int = 8000) -> np.ndarray:
    """Down to ``mid_rate`` and back (polyphase filters), same length as ``x``."""
    x = np.asarray(x, dtype=np.float64)
    if mid_rate >= sample_rate:
        return x.copy()
    r = Fraction(mid_rate, sample_rate)
    y = resample_poly(resample_poly(x, r.numerator, r.denominator), r.denominator, r.numerator)
    return np.pad(y, (0, max(0, len(x) - len(y))))[:len(x)]


def dynamics(x: np.ndarray, sample_rate: int, slope: float, knee_db: float = -10.0,
             floor_db: float = -60.0, smooth_ms: float = 30.0) -> np.ndarray:
    """Level-dependent gain (see the module doc): ``slope`` dB of gain per dB that a 10-ms
    frame lies below ``knee_db`` (relative to the loudest frame; levels below ``floor_db``
    count as ``floor_db``), smoothed by a ``smooth_ms`` moving average and interpolated
    between frame centres. ``slope > 0`` expands (a gate), ``slope < 0`` compresses."""
    x = np.asarray(x, dtype=np.float64)
    n = max(1, sample_rate // 100)
    num = len(x) // n
    if num < 2 or slope == 0.0:
        return x.copy()
    frames = x[:num * n].reshape(num, n)
    level = 10 * np.log10((frames ** 2).mean(axis=1) + 1e-20)
    level = np.maximum(level - level.max(), floor_db)
    gain_db = slope * np.minimum(level - knee_db, 0.0)
    k = max(1, int(round(smooth_ms / 10)))
    if k > 1:
        pad = np.pad(gain_db, (k // 2, k - 1 - k // 2), mode="edge")
        gain_db = np.convolve(pad, np.ones(k) / k, mode="valid")
    centres = np.arange(num) * n + n / 2
    g = np.interp(np.arange(len(x)), centres, gain_db)
    return x * 10.0 ** (g / 20)


def telephone(x: np.ndarray, sample_rate: int) -> np.ndarray:
    """A telephone channel: 300-3400 Hz band-pass and an 8 kHz round trip."""
    return resample_roundtrip(bandpass(x, sample_rate, 300.0, 3400.0), sample_rate, 8000)


def random_eq(x: np.ndarray, sample_rate: int, rng: np.random.Generator,
              max_tilt_db_per_octave: float = 3.0, num_peaks=(0, 3), max_peak_db: float = 8.0
              ) -> Tuple[np.ndarray, Dict]:
    """Random spectral tilt (dB/octave around 1 kHz) plus peaks/notches (Gaussian in
    log-frequency, 1/3-1 octave wide), applied as a zero-phase gain on the spectrum."""
    x = np.asarray(x, dtype=np.float64)
    tilt = float(rng.uniform(-max_tilt_db_per_octave, max_tilt_db_per_octave))
    peaks = []
    for _ in range(int(rng.integers(num_peaks[0], num_peaks[1] + 1))):
        peaks.append((float(np.exp(rng.uniform(np.log(200), np.log(0.9 * sample_rate / 2)))),
                      float(rng.uniform(-max_peak_db, max_peak_db)), float(rng.uniform(1 / 3, 1))))
    y = apply_eq(x, sample_rate, tilt, peaks)
    return y, {"tilt": round(tilt, 2), "peaks": [[round(f), round(g, 1), round(w, 2)]
                                                  for f, g, w in peaks]}


def apply_eq(x: np.ndarray, sample_rate: int, tilt_db_per_octave: float,
             peaks: Sequence[Tuple[float, float, float]] = ()) -> np.ndarray:
    """Gain ``tilt * log2(f / 1 kHz) + sum_k g_k exp(-(log2(f / f_k) / w_k)^2 / 2)`` dB."""
    n = len(x)
    spec = np.fft.rfft(x)
    f = np.maximum(np.fft.rfftfreq(n, 1.0 / sample_rate), 50.0)
    octaves = np.log2(f / 1000.0)
    gain_db = tilt_db_per_octave * octaves
    for fk, gk, wk in peaks:
        gain_db += gk * np.exp(-0.5 * (np.log2(f / fk) / wk) ** 2)
    return np.fft.irfft(spec * 10 ** (gain_db / 20), n)


def mu_law(x: np.ndarray, mu: int = 255, bits: int = 8) -> np.ndarray:
    """G.711-style mu-law: compress, quantize to ``bits``, expand (x in [-1, 1])."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    c = np.sign(x) * np.log1p(mu * np.abs(x)) / math.log1p(mu)
    levels = 2 ** (bits - 1)
    q = np.clip(np.round(c * levels), -levels, levels - 1) / levels
    return np.sign(q) * ((1 + mu) ** np.abs(q) - 1) / mu


def _lpc(frame: np.ndarray, order: int) -> np.ndarray:
    """LPC polynomial [1, a1..ap] by Levinson-Durbin on the windowed autocorrelation."""
    w = frame * np.hanning(len(frame))
    r = np.correlate(w, w, "full")[len(w) - 1:len(w) + order]
    if r[0] <= 0:
        return np.concatenate([[1.0], np.zeros(order)])
    r = r.copy()
    r[0] *= 1.0001  # white-noise correction keeps the filter stable
    a = np.zeros(order + 1)
    a[0], err = 1.0, r[0]
    for i in range(1, order + 1):
        k = -(r[i] + np.dot(a[1:i], r[i - 1:0:-1])) / err
        a[1:i] = a[1:i] + k * a[i - 1:0:-1]
        a[i] = k
        err *= 1 - k * k
    return a


def gsm_like(x: np.ndarray, sample_rate: int, order: int = 8, frame_ms: float = 20.0,
             decimation: int = 3, bits: int = 3) -> np.ndarray:
    """A coarse LPC codec in the spirit of GSM 06.10 full rate (see the module doc).

    The signal goes to 8 kHz; per frame, the LPC residual ``e = A(z) x`` is kept on the
    one of ``decimation`` sample grids with most energy, quantized with ``bits`` bits
    relative to the frame's peak (APCM), and the frame is resynthesized by ``1 / A(z)``
    with the filter state carried across frames.  Returns the signal at ``sample_rate``.
    """
    x = np.asarray(x, dtype=np.float64)
    r = Fraction(8000, sample_rate)
    s = resample_poly(x, r.numerator, r.denominator) if sample_rate != 8000 else x.copy()
    flen = int(8000 * frame_ms / 1000)
    out = np.zeros(len(s))
    zi_an = np.zeros(order)
    zi_syn = np.zeros(order)
    levels = 2 ** (bits - 1)
    for start in range(0, len(s), flen):
        fr = s[start:start + flen]
        ctx = s[max(0, start - flen // 2):start + flen + flen // 2]
        a = _lpc(ctx, order)
        e, zi_an = lfilter(a, [1.0], fr, zi=zi_an)
        best = max(range(decimation), key=lambda g: np.sum(e[g::decimation] ** 2))
        pulses = e[best::decimation]
        peak = np.max(np.abs(pulses)) if len(pulses) else 0.0
        q = np.zeros_like(e)
        if peak > 0:
            q[best::decimation] = (np.clip(np.round(pulses / peak * levels), -levels, levels)
                                   / levels * peak * math.sqrt(decimation))
        y, zi_syn = lfilter([1.0], a, q, zi=zi_syn)
        out[start:start + len(fr)] = y
    if sample_rate != 8000:
        out = resample_poly(out, r.denominator, r.numerator)
    out = np.pad(out, (0, max(0, len(x) - len(out))))[:len(x)]
    # the codec's level follows the signal's
    p_x, p_y = np.mean(x ** 2), np.mean(out ** 2)
    return out * math.sqrt(p_x / p_y) if p_y > 0 else out


def band_energy_ratio(x: np.ndarray, sample_rate: int, low: float, high: float) -> float:
    """Fraction of the energy of ``x`` between ``low`` and ``high`` Hz."""
    p = np.abs(np.fft.rfft(np.asarray(x, dtype=np.float64))) ** 2
    f = np.fft.rfftfreq(len(x), 1.0 / sample_rate)
    return float(p[(f >= low) & (f <= high)].sum() / p.sum())


# ----------------------------------------------------------------------------- random chains

@dataclass
class AugmentConfig:
    """Probabilities and ranges of the random chain of :func:`augment`.

    Each utterance independently gets reverb with ``reverb_prob``, noise with
    ``noise_prob`` (type from ``noise_types``, SNR uniform in ``snr_range`` dB), a channel
    with ``channel_prob`` (telephone band with ``telephone_prob``, random EQ if ``eq``, then
    mu-law / GSM-like coding with ``codec_prob``), before the channel a level-dependent
    gain (:func:`dynamics`, slope uniform in ``dynamics_range``) with ``dynamics_prob``,
    an 8 kHz round trip with ``narrowband_prob`` if the channel did not already limit the
    band to 4 kHz, and a volume gain uniform in ``volume_range`` when ``volume`` is set.
    """
    reverb_prob: float = 0.0
    rt60_range: Tuple[float, float] = (0.2, 0.8)
    noise_prob: float = 0.0
    noise_types: Tuple[str, ...] = ("white", "pink", "babble")
    snr_range: Tuple[float, float] = (0.0, 20.0)
    channel_prob: float = 0.0
    telephone_prob: float = 0.5
    eq: bool = True
    codec_prob: float = 0.5
    narrowband_prob: float = 0.0
    dynamics_prob: float = 0.0
    dynamics_range: Tuple[float, float] = (-0.5, 0.5)
    volume: bool = False
    volume_range: Tuple[float, float] = (0.125, 2.0)

    def __post_init__(self):
        for name in ("reverb_prob", "noise_prob", "channel_prob", "telephone_prob", "codec_prob",
                     "narrowband_prob", "dynamics_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError("AugmentConfig: %s=%r is not a probability" % (name, v))
        bad = set(self.noise_types) - {"white", "pink", "babble"}
        if bad:
            raise ValueError("AugmentConfig: unknown noise types %s" % sorted(bad))

    @property
    def any(self) -> bool:
        return bool(self.reverb_prob or self.noise_prob or self.channel_prob or
                    self.narrowband_prob or self.dynamics_prob or self.volume)


def augment(x: np.ndarray, sample_rate: int, config: AugmentConfig, rng: np.random.Generator,
            babble_sources: Sequence[np.ndarray] = ()) -> Tuple[np.ndarray, List[str]]:
    """One random chain reverb -> noise -> dynamics -> channel -> narrowband -> volume; returns
    ``(y, description)`` with one ``name=value`` item per step done (``[]`` if the signal
    is unchanged)."""
    y = np.asarray(x, dtype=np.float64)
    desc = []
    if rng.random() < config.reverb_prob:
        h, info = random_rir(rng, sample_rate, config.rt60_range)
        y = reverberate(y, h)
        desc.append("reverb=rt60:%s,room:%s" % (info["rt60"], "x".join(map(str, info["room"]))))
    if rng.random() < config.noise_prob:
        kinds = [k for k in config.noise_types if k != "babble" or len(babble_sources)]
        kind = kinds[int(rng.integers(len(kinds)))]
        snr = float(rng.uniform(*config.snr_range))
        if kind == "white":
            n = white_noise(len(y), rng)
        elif kind == "pink":
            n = pink_noise(len(y), rng)
        else:
            n = babble_noise(len(y), babble_sources, rng, int(rng.integers(3, 8)))
        y = add_noise(y, n, snr)
        desc.append("noise=%s:%.1fdB" % (kind, snr))
    # (no draw when off: the chains of configurations without it stay as they were)
    if config.dynamics_prob > 0 and rng.random() < config.dynamics_prob:
        slope = round(float(rng.uniform(*config.dynamics_range)), 3)  # as described
        y = dynamics(y, sample_rate, slope)
        desc.append("dynamics=%+.3f" % slope)
    narrow = sample_rate <= 8000  # the band is already 0-4 kHz at most
    if rng.random() < config.channel_prob:
        parts = []
        if rng.random() < config.telephone_prob:
            y = telephone(y, sample_rate)
            parts.append("tel")
            narrow = True
        if config.eq:
            y, eq = random_eq(y, sample_rate, rng)
            parts.append("eq:%+.1fdB/oct:%dpeaks" % (eq["tilt"], len(eq["peaks"])))
        if rng.random() < config.codec_prob:
            peak = np.max(np.abs(y)) + 1e-12
            if rng.random() < 0.5:
                y = mu_law(y / peak * 0.9) * peak / 0.9
                parts.append("mulaw")
            else:
                y = gsm_like(y, sample_rate)
                parts.append("gsm")
                narrow = True
        desc.append("channel=" + ("+".join(parts) or "none"))
    # (no draw when off: the chains of configurations without it stay as they were)
    if config.narrowband_prob > 0 and rng.random() < config.narrowband_prob and not narrow:
        y = resample_roundtrip(y, sample_rate, 8000)
        desc.append("narrowband=8k")
    if config.volume:
        g = float(rng.uniform(*config.volume_range))
        y = volume_perturb(y, g)
        desc.append("volume=%.3f" % g)
    return y, desc


# ----------------------------------------------------------------------------- I/O, data dirs

def read_wav(path) -> Tuple[np.ndarray, int]:
    """A mono 16-bit WAV as float64 in [-1, 1] and its rate; one-line errors naming the file."""
    try:
        rate, pcm = wavfile.read(str(path))
    except (OSError, ValueError) as e:
        raise ValueError("%s: cannot read WAV: %s" % (path, e)) from None
    if pcm.ndim != 1:
        raise ValueError("%s: need mono audio, got %d channels" % (path, pcm.shape[1]))
    if pcm.dtype == np.int16:
        return pcm.astype(np.float64) / 32768.0, int(rate)
    if pcm.dtype == np.int32:
        return pcm.astype(np.float64) / 2147483648.0, int(rate)
    if pcm.dtype in (np.float32, np.float64):
        return pcm.astype(np.float64), int(rate)
    if pcm.dtype == np.uint8:
        return (pcm.astype(np.float64) - 128) / 128.0, int(rate)
    raise ValueError("%s: unsupported sample type %s" % (path, pcm.dtype))


def write_wav(path, x: np.ndarray, sample_rate: int, peak: float = 0.99) -> None:
    """16-bit PCM; scaled down if it would clip (peak above ``peak``)."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(np.abs(x)) if len(x) else 0.0
    if m > peak:
        x = x * (peak / m)
    wavfile.write(str(path), sample_rate, np.round(x * 32767).astype(np.int16))


def _read_table(path: Path) -> Dict[str, str]:
    out = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        k, _, v = line.strip().partition(" ")
        if not v:
            raise ValueError("%s:%d: expected '<key> <value>'" % (path, lineno))
        if k in out:
            raise ValueError("%s:%d: duplicate key %s" % (path, lineno, k))
        out[k] = v.strip()
    return out


def _frames_to_samples(frames: int, sample_rate: int) -> int:
    """Samples giving exactly ``frames`` 25 ms / 10 ms snip-edges frames."""
    return int(0.025 * sample_rate) + (frames - 1) * int(0.010 * sample_rate)


def _num_frames(num_samples: int, sample_rate: int) -> int:
    win, shift = int(0.025 * sample_rate), int(0.010 * sample_rate)
    return 0 if num_samples < win else 1 + (num_samples - win) // shift


def augment_data_dir(src: Path, dst: Path, wav_dir: Path, config: AugmentConfig,
                     sample_rate: int, seed: int = 0, speed_factors: Sequence[float] = (1.0,),
                     copies: int = 1, keep_clean: bool = False,
                     allowed_frames: Optional[Sequence[int]] = None, prefix: str = "aug",
                     nj: int = 1, resample: bool = False) -> Dict[str, str]:
    """Write the augmented Kaldi data dir ``dst`` from ``src``.

    For every speed factor (3-way: ``SPEED_3WAY``) each utterance is speed-perturbed
    (ids ``sp<f>-``), then padded with silence to the next of ``allowed_frames`` if given
    (end-to-end training merges only equal lengths), then gets ``copies`` random chains
    (ids ``<prefix><k>-``; with ``copies == 1`` and no ``keep_clean`` the id is kept), plus
    the unaugmented one if ``keep_clean``.  Speaker ids get the same prefixes, so
    utterance ids still start with their speaker's.  Writes ``wav.scp``, ``text``,
    ``utt2spk``, ``spk2utt``, ``utt2aug`` (each utterance's chain, ``none`` if
    clean), ``augment.json`` (the config, seed and factors) and, if ``allowed_frames``,
    ``allowed_lengths.txt``.  Every input WAV must be at ``sample_rate`` unless ``resample``
    (then it is resampled to it: for recordings at other rates).  Returns the
    utt2aug table.  The files of ``dst`` are written only after every WAV is.
    """
    src, dst, wav_dir = Path(src), Path(dst), Path(wav_dir)
    for name in ("wav.scp", "text", "utt2spk"):
        if not (src / name).is_file():
            raise FileNotFoundError("augment_data_dir: %s not found" % (src / name))
    wavs, text, utt2spk = (_read_table(src / n) for n in ("wav.scp", "text", "utt2spk"))
    for utt, path in wavs.items():
        if len(path.split()) != 1 or path.endswith("|"):
            raise ValueError("%s: %s: only plain WAV paths are supported, got %r"
                             % (src / "wav.scp", utt, path))
    if copies < 1 and not keep_clean:
        raise ValueError("augment_data_dir: copies=0 needs keep_clean")
    utts = sorted(wavs)
    # babble from a fixed random subset of the source utterances (read once)
    rng0 = np.random.default_rng([seed, 0])
    babble = []
    if config.noise_prob > 0 and "babble" in config.noise_types:
        pick = rng0.choice(len(utts), size=min(50, len(utts)), replace=False)
        babble = [read_wav(wavs[utts[i]])[0] for i in sorted(pick)]
    wav_dir.mkdir(parents=True, exist_ok=True)
    dst.mkdir(parents=True, exist_ok=True)
    tags = ([("", False)] if keep_clean else []) + [
        ("" if copies == 1 and not keep_clean else "%s%d-" % (prefix, k + 1), True)
        for k in range(copies)]

    def job(args):
        idx, utt = args
        x, rate = read_wav(wavs[utt])
        if rate != sample_rate:
            if not resample:
                raise ValueError("%s: %d Hz, expected %d Hz" % (wavs[utt], rate, sample_rate))
            r = Fraction(sample_rate, rate)
            x = resample_poly(x, r.numerator, r.denominator)
        rows = []
        for fi, factor in enumerate(speed_factors):
            xs = speed_perturb(x, factor)
            if allowed_frames is not None:
                n = _num_frames(len(xs), sample_rate)
                target = next((m for m in allowed_frames if m >= n), None)
                if target is None:
                    raise ValueError("%s: %s is longer than every allowed length"
                                     % (src / "wav.scp", utt))
                extra = max(0, _frames_to_samples(target, sample_rate) - len(xs))
                lead = extra // 2
                xs = np.pad(xs, (lead, extra - lead))
            for ti, (tag, aug) in enumerate(tags):
                new = tag + speed_utt_id(utt, factor)
                spk = tag + speed_utt_id(utt2spk[utt], factor)
                desc = []
                y = xs
                if aug and config.any:
                    rng = np.random.default_rng([seed, 1, idx, fi, ti])
                    y, desc = augment(xs, sample_rate, config, rng, babble)
                if factor != 1.0:
                    desc = ["speed=%s" % factor] + desc
                path = (wav_dir / (new + ".wav")).resolve()
                write_wav(path, y, sample_rate)
                rows.append((new, spk, text[utt], str(path), " ".join(desc) or "none"))
        return rows

    with ThreadPoolExecutor(max_workers=max(1, nj)) as ex:
        rows = sorted(r for rs in ex.map(job, enumerate(utts)) for r in rs)
    tmp = {}
    tmp["wav.scp"] = "".join("%s %s\n" % (r[0], r[3]) for r in rows)
    tmp["text"] = "".join("%s %s\n" % (r[0], r[2]) for r in rows)
    tmp["utt2spk"] = "".join("%s %s\n" % (r[0], r[1]) for r in rows)
    spk2utt: Dict[str, List[str]] = {}
    for r in rows:
        spk2utt.setdefault(r[1], []).append(r[0])
    tmp["spk2utt"] = "".join("%s %s\n" % (s, " ".join(us)) for s, us in sorted(spk2utt.items()))
    tmp["utt2aug"] = "".join("%s %s\n" % (r[0], r[4]) for r in rows)
    meta = {"source": str(src), "seed": seed, "sample_rate": sample_rate,
            "speed_factors": list(speed_factors), "copies": copies, "keep_clean": keep_clean,
            "config": asdict(config)}
    tmp["augment.json"] = json.dumps(meta, indent=1) + "\n"
    if allowed_frames is not None:
        tmp["allowed_lengths.txt"] = "".join("%d\n" % n for n in allowed_frames)
    for name, content in tmp.items():  # write-then-rename: complete files or none
        p = dst / name
        p.with_suffix(p.suffix + ".tmp").write_text(content)
        p.with_suffix(p.suffix + ".tmp").replace(p)
    return {r[0]: r[4] for r in rows}
