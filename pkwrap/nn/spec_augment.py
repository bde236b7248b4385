r"""SpecAugment with the semantics of Kaldi's xconfig ``spec-augment-layer``.

Kaldi's ``spec-augment-layer freq-max-proportion=p time-zeroed-proportion=z
time-mask-max-frames=M`` is two components applied in training only:

1. the frequency mask, a ``GeneralDropoutComponent`` with ``specaugment-max-proportion=p``
   (one mask per sequence, shared by all its frames): with ``D`` the feature dimension
   and ``K = floor(D p + 0.5)``, draw ``k`` uniform in ``{0..K}``; if ``k > 0`` draw a start
   bin ``s`` uniform in ``{0..D-1}`` and zero bins ``s, s+1, ..., s+k-1`` taken modulo ``D``
   (the band may wrap around from the top to the bottom of the spectrum).  The other bins
   are *not* rescaled.  With ``specaugment-max-regions=R > 1``, ``R - 1`` times a random
   start ``a`` is drawn and bins ``(a + i) mod D`` and ``(a + D//2 - i) mod D`` are swapped
   for ``i < D//4`` (half the circle of bins turned over), which may split the band into
   several pieces of the same total width.
2. the time mask, ``SpecAugmentTimeMaskComponent`` with ``zeroed-proportion=z`` and
   ``time-mask-max-frames=M``: each sequence is covered by alternating segments, zeroed
   ones of length uniform in ``{1..M}`` and kept ones of length uniform in ``{1..N}``,
   ``N = floor(M (1 - z) / z)`` (so about a proportion z of frames is zeroed).  The first
   segment is a kept one with probability z and a zeroed one otherwise, as in Kaldi.

The masks are drawn here for both: :class:`SpecAugment` (for any model) and the two nnet3
components (:mod:`pkwrap.nnet3.components`, which Kaldi models and TDNNFModel use).

Both multiply the input by a 0/1 mask (and so the gradient by the same mask); in
evaluation mode the layer is the identity.  Input ``[B][T][D]``: each of the B sequences
gets its own masks.  Kaldi's defaults are p = 0.5, z = 0.2, M = 20.
"""
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["SpecAugment", "spec_augment_freq_mask", "spec_augment_time_mask"]


def _randint(lo: int, hi: int, gen: Optional[torch.Generator]) -> int:
    """Uniform integer in [lo, hi] (both included)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen).item())


def spec_augment_freq_mask(batch: int, dim: int, max_proportion: float, max_regions: int = 1,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[batch][dim]`` 0/1 masks of the frequency part (see the module docstring)."""
    mask = torch.ones(batch, dim)
    max_zeroed = int(dim * max_proportion + 0.5)
    for b in range(batch):
        k = _randint(0, max_zeroed, generator)
        if k == 0:
            continue
        start = _randint(0, dim - 1, generator)
        mask[b, torch.arange(start, start + k) % dim] = 0.0
        half, quarter = dim // 2, dim // 4
        for _ in range(1, max_regions):
            a = _randint(0, dim - 1, generator)
            i = torch.arange(quarter)
            lo, hi = (a + i) % dim, (a + half - i) % dim
            row = mask[b].clone()
            row[lo], row[hi] = mask[b, hi], mask[b, lo]
            mask[b] = row
    return mask


def spec_augment_time_mask(batch: int, num_frames: int, zeroed_proportion: float,
                           max_frames: int, generator: Optional[torch.Generator] = None
                           ) -> torch.Tensor:
    """``[batch][num_frames]`` 0/1 masks of the time part (see the module docstring)."""
    z = zeroed_proportion
    max_kept = int(max_frames * (1 - z) / z)
    if max_frames < 1 or max_kept < 1:
        raise ValueError("spec_augment_time_mask: time-mask-max-frames=%d with "
                         "zeroed-proportion=%g leaves no kept segment" % (max_frames, z))
    mask = torch.ones(batch, num_frames)
    for b in range(batch):
        t = 0
        while t < num_frames:
            if t > 0 or torch.rand((), generator=generator).item() < z:
                t += _randint(1, max_kept, generator)  # kept frames stay 1
            n = _randint(1, max_frames, generator)
            mask[b, t:t + n] = 0.0
            t += n
    return mask


class SpecAugment(nn.Module):
    """Kaldi's ``spec-augment-layer`` (frequency mask, then time mask) for ``[B][T][D]``.

    Args:
      freq_max_proportion: p, the largest proportion of bins zeroed (0 < p < 1).
      time_zeroed_proportion: z, the proportion of frames zeroed (0 < z < 1).
      time_mask_max_frames: M, the longest zeroed stretch in frames.
      freq_max_regions: Kaldi's ``specaugment-max-regions`` (1: one band).
      generator: optional ``torch.Generator`` (masks are drawn on the CPU).
    """

    def __init__(self, freq_max_proportion: float = 0.5, time_zeroed_proportion: float = 0.2,
                 time_mask_max_frames: int = 20, freq_max_regions: int = 1,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if not (0 < freq_max_proportion < 1 and 0 < time_zeroed_proportion < 1
                and time_mask_max_frames >= 1 and freq_max_regions >= 1):
            raise ValueError("SpecAugment: need 0 < freq_max_proportion < 1, "
                             "0 < time_zeroed_proportion < 1, time_mask_max_frames >= 1, "
                             "freq_max_regions >= 1")
        self.freq_max_proportion = freq_max_proportion
        self.time_zeroed_proportion = time_zeroed_proportion
        self.time_mask_max_frames = int(time_mask_max_frames)
        self.freq_max_regions = int(freq_max_regions)
        self.generator = generator

    def extra_repr(self) -> str:
        return ("freq_max_proportion=%g, time_zeroed_proportion=%g, time_mask_max_frames=%d"
                % (self.freq_max_proportion, self.time_zeroed_proportion,
                   self.time_mask_max_frames))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if x.dim() != 3:
            raise ValueError("SpecAugment: expected [B][T][D], got %s" % (tuple(x.shape),))
        b, t, d = x.shape
        fm = spec_augment_freq_mask(b, d, self.freq_max_proportion, self.freq_max_regions,
                                    self.generator)
        tm = spec_augment_time_mask(b, t, self.time_zeroed_proportion,
                                    self.time_mask_max_frames, self.generator)
        mask = (tm[:, :, None] * fm[:, None, :]).to(device=x.device, dtype=x.dtype)
        return x * mask
