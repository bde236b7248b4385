#!/usr/bin/env python3
"""Compute 40-dim log mel filterbank features with kaldi-native-fbank.

For each frame t (25 ms window, 10 ms shift, povey window, pre-emphasis 0.97,
DC removal) the features are

    f[t][m] = log( sum_k  w_m[k] * |X_t[k]|^2 ),   m = 0..39,

with w_m the m-th triangular mel filter, exactly Kaldi's ``compute-fbank-feats``
(kaldi-native-fbank reimplements it). Options come from ``conf/fbank.conf`` in
Kaldi's flag spelling. Per-utterance mean normalization (Kaldi's
``apply-cmvn --norm-vars=false`` with utterance-level stats) is applied unless
``--cmn none``, since test voices are unseen and their spectral tilt differs.
``--cmn speaker`` subtracts the mean over all utterances of the utterance's speaker
(``utt2spk``), as Kaldi's ``compute-cmvn-stats --spk2utt`` + ``apply-cmvn --utt2spk``
(means only): better estimated than one short utterance's mean, whose words move it.

Writes ``<data>/feats.ark`` + ``<data>/feats.scp`` (kaldiio, float32 matrices
``[T][40]``) and ``<data>/utt2num_frames``.

Usage:
  local/compute_fbank.py --config conf/fbank.conf data/train
"""
import argparse
import sys
from pathlib import Path

import kaldi_native_fbank as knf
import kaldiio
import numpy as np
from scipy.io import wavfile

from pkwrap.kaldi.cmvn import read_utt2spk

_FLAGS = {
    "--sample-frequency": ("frame_opts", "samp_freq", float),
    "--frame-length": ("frame_opts", "frame_length_ms", float),
    "--frame-shift": ("frame_opts", "frame_shift_ms", float),
    "--dither": ("frame_opts", "dither", float),
    "--preemphasis-coefficient": ("frame_opts", "preemph_coeff", float),
    "--remove-dc-offset": ("frame_opts", "remove_dc_offset", "bool"),
    "--window-type": ("frame_opts", "window_type", str),
    "--snip-edges": ("frame_opts", "snip_edges", "bool"),
    "--num-mel-bins": ("mel_opts", "num_bins", int),
    "--low-freq": ("mel_opts", "low_freq", float),
    "--high-freq": ("mel_opts", "high_freq", float),
    "--use-energy": (None, "use_energy", "bool"),
}


def read_fbank_config(path):
    """Parse a Kaldi-style ``--flag=value`` config into ``knf.FbankOptions``."""
    opts = knf.FbankOptions()
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise ValueError("%s:%d: expected --flag=value, got %r" % (path, lineno, line))
        flag, value = line.split("=", 1)
        if flag not in _FLAGS:
            raise ValueError("%s:%d: unsupported option %s (known: %s)"
                             % (path, lineno, flag, " ".join(sorted(_FLAGS))))
        group, attr, cast = _FLAGS[flag]
        if cast == "bool":
            if value not in ("true", "false"):
                raise ValueError("%s:%d: %s needs true or false" % (path, lineno, flag))
            v = value == "true"
        else:
            v = cast(value)
        setattr(getattr(opts, group) if group else opts, attr, v)
    return opts


def compute_fbank(samples, opts):
    """Features of one waveform.

    Args:
      samples:
        float32 ``[N]``, 16-bit PCM scale (as Kaldi reads WAV: -32768..32767).
      opts:
        ``knf.FbankOptions``.
    Returns:
      float32 ``[T][num_bins]``.
    """
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(opts.frame_opts.samp_freq, samples.tolist())
    fb.input_finished()
    n = fb.num_frames_ready
    if n == 0:
        return np.zeros((0, opts.mel_opts.num_bins), dtype=np.float32)
    return np.stack([np.asarray(fb.get_frame(i), dtype=np.float32) for i in range(n)])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="conf/fbank.conf")
    p.add_argument("--cmn", choices=("utterance", "speaker", "none"), default="utterance",
                   help="mean normalization: over the utterance, over all utterances of its "
                        "speaker (utt2spk), or none (raw log filterbanks)")
    p.add_argument("--sample-frequency", type=float, default=None,
                   help="override the config's --sample-frequency (run.sh --sample-rate)")
    p.add_argument("data_dir", type=Path)
    args = p.parse_args()
    opts = read_fbank_config(args.config)
    if args.sample_frequency is not None:
        opts.frame_opts.samp_freq = args.sample_frequency
    wav_scp = args.data_dir / "wav.scp"
    if not wav_scp.is_file():
        sys.exit("compute_fbank.py: %s not found" % wav_scp)
    utt2spk = None
    if args.cmn == "speaker":
        path = args.data_dir / "utt2spk"
        if not path.is_file():
            sys.exit("compute_fbank.py: --cmn speaker needs %s" % path)
        try:
            utt2spk = read_utt2spk(path)
        except (ValueError, OSError) as e:  # one line naming the file
            sys.exit("compute_fbank.py: %s" % e)

    def utterances():
        """``(utt, log filterbanks)`` of wav.scp, in its order."""
        for lineno, line in enumerate(wav_scp.read_text().splitlines(), 1):
            parts = line.split()
            if len(parts) != 2:
                sys.exit("compute_fbank.py: %s:%d: expected '<utt> <wav path>'"
                         % (wav_scp, lineno))
            utt, path = parts
            if utt2spk is not None and utt not in utt2spk:
                sys.exit("compute_fbank.py: %s: utterance %s has no speaker in utt2spk"
                         % (wav_scp, utt))
            rate, pcm = wavfile.read(path)
            if rate != opts.frame_opts.samp_freq or pcm.ndim != 1 or pcm.dtype != np.int16:
                sys.exit("compute_fbank.py: %s: need 16-bit mono at %d Hz, got %s %s at %d Hz"
                         % (path, opts.frame_opts.samp_freq, pcm.dtype, pcm.shape, rate))
            feats = compute_fbank(pcm.astype(np.float32), opts)
            if feats.shape[0] == 0:
                sys.exit("compute_fbank.py: %s (%s) is too short for one frame" % (utt, path))
            yield utt, feats

    normalized = utterances()
    if utt2spk is not None:
        # Kaldi's compute-cmvn-stats --spk2utt + apply-cmvn --utt2spk (means only): the
        # speaker means need every utterance first, so only this mode holds them all
        feats_of = list(normalized)
        sums = {}
        for utt, feats in feats_of:
            acc = sums.setdefault(utt2spk[utt], [0.0, 0])
            acc[0] = acc[0] + feats.sum(axis=0, dtype=np.float64)
            acc[1] += feats.shape[0]
        mean = {spk: (s / n).astype(np.float32) for spk, (s, n) in sums.items()}
        normalized = ((u, f - mean[utt2spk[u]]) for u, f in feats_of)
    elif args.cmn == "utterance":
        normalized = ((u, f - f.mean(axis=0, keepdims=True)) for u, f in normalized)
    # absolute ark path in feats.scp, so the scp works from any directory
    ark, scp = (args.data_dir / "feats.ark").resolve(), args.data_dir / "feats.scp"
    lens = []
    with kaldiio.WriteHelper("ark,scp:%s,%s" % (ark, scp)) as writer:
        for utt, feats in normalized:
            writer(utt, feats)
            lens.append((utt, feats.shape[0]))
    n_done, n_frames = len(lens), sum(n for _, n in lens)
    with open(args.data_dir / "utt2num_frames", "w") as f:
        for utt, n in lens:
            f.write("%s %d\n" % (utt, n))
    print("compute_fbank.py: %s: %d utterances, %d frames" % (args.data_dir, n_done, n_frames))


if __name__ == "__main__":
    main()
