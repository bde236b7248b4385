#!/usr/bin/env python3
"""Augment a Kaldi data dir (thin wrapper of ``pkwrap.data.augment.augment_data_dir``).

Two uses in run.sh:

* training data (stage 1): 3-way speed perturbation as ``perturb_data_dir_speed_3way.sh``
  (``--speed-perturb``), then per utterance a random chain of simulated reverberation,
  additive noise, channel/bandwidth and volume (``--*-prob``, ``--volume``), padded to
  the allowed lengths of the source dir;
* evaluation conditions (stage 6): ``--condition clean|telephone|reverb|noise<SNR>|resample``
  applies one degradation to every utterance of a test dir (``resample`` only brings
  recordings at another rate to ``--sample-rate``).

The chains are deterministic given ``--seed``; ``<dst>/augment.json`` holds the options
and ``<dst>/utt2aug`` what each utterance got.

Usage:
  local/augment_data.py --sample-rate 16000 --reverb-prob 0.3 --noise-prob 0.3 \\
      --channel-prob 0.4 --volume true data/train data/train_aug corpus/wav_aug
  local/augment_data.py --sample-rate 16000 --condition noise5 data/test data/test_noise5 \\
      corpus/wav_test_noise5
"""
import argparse
import sys
from pathlib import Path

from pkwrap.data.augment import SPEED_3WAY, AugmentConfig, augment_data_dir


def _bool(s):
    if s not in ("true", "false"):
        raise argparse.ArgumentTypeError("expected true or false, got %r" % s)
    return s == "true"


def _range(s):
    lo, hi = (float(v) for v in s.split(","))
    if lo > hi:
        raise argparse.ArgumentTypeError("bad range %r" % s)
    return lo, hi


def condition_config(name):
    """The AugmentConfig of one evaluation condition."""
    if name in ("clean", "resample"):
        return AugmentConfig()
    if name == "telephone":  # 300-3400 Hz and an 8 kHz round trip, nothing else
        return AugmentConfig(channel_prob=1.0, telephone_prob=1.0, eq=False, codec_prob=0.0)
    if name == "reverb":
        return AugmentConfig(reverb_prob=1.0, rt60_range=(0.3, 0.8))
    if name.startswith("noise"):
        snr = float(name[len("noise"):])
        return AugmentConfig(noise_prob=1.0, snr_range=(snr, snr))
    raise ValueError("unknown condition %r (clean, telephone, reverb, noise<SNR>, resample)" % name)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample-rate", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nj", type=int, default=2)
    p.add_argument("--condition", default=None, help="evaluation condition (see above)")
    p.add_argument("--speed-perturb", type=_bool, default=False, help="3-way 0.9/1.0/1.1")
    p.add_argument("--copies", type=int, default=1, help="augmented copies per utterance")
    p.add_argument("--keep-clean", type=_bool, default=False,
                   help="also keep the unaugmented utterances")
    p.add_argument("--reverb-prob", type=float, default=0.0)
    p.add_argument("--rt60-range", type=_range, default=(0.2, 0.8))
    p.add_argument("--noise-prob", type=float, default=0.0)
    p.add_argument("--snr-range", type=_range, default=(0.0, 20.0))
    p.add_argument("--channel-prob", type=float, default=0.0)
    p.add_argument("--narrowband-prob", type=float, default=0.0,
                   help="probability of an 8 kHz round trip (0-4 kHz band) for an utterance "
                        "the channel left wideband")
    p.add_argument("--dynamics-prob", type=float, default=0.0,
                   help="probability of a level-dependent gain before the channel (a gate "
                        "making weak sounds weaker, or a compressor making them louder)")
    p.add_argument("--volume", type=_bool, default=False, help="gain uniform in [1/8, 2]")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("wav_dir", type=Path)
    args = p.parse_args()
    try:
        if args.condition:
            cfg = condition_config(args.condition)
            augment_data_dir(args.src, args.dst, args.wav_dir, cfg, args.sample_rate,
                             seed=args.seed, nj=args.nj, resample=True,
                             prefix=args.condition)
        else:
            cfg = AugmentConfig(reverb_prob=args.reverb_prob, rt60_range=args.rt60_range,
                                noise_prob=args.noise_prob, snr_range=args.snr_range,
                                channel_prob=args.channel_prob,
                                narrowband_prob=args.narrowband_prob,
                                dynamics_prob=args.dynamics_prob, volume=args.volume)
            allowed = None
            if (args.src / "allowed_lengths.txt").is_file():
                allowed = [int(v) for v in (args.src / "allowed_lengths.txt").read_text().split()]
            augment_data_dir(args.src, args.dst, args.wav_dir, cfg, args.sample_rate,
                             seed=args.seed, speed_factors=SPEED_3WAY if args.speed_perturb
                             else (1.0,), copies=args.copies, keep_clean=args.keep_clean,
                             allowed_frames=allowed, nj=args.nj)
    except (ValueError, FileNotFoundError) as e:
        sys.exit("augment_data.py: %s" % e)
    table = (args.dst / "utt2aug").read_text().splitlines()
    n_aug = sum(1 for l in table if not l.endswith(" none"))
    print("augment_data.py: %s -> %s: %d utterances, %d augmented"
          % (args.src, args.dst, len(table), n_aug))


if __name__ == "__main__":
    main()
