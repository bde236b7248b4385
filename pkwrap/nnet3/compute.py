"""What Kaldi's ``nnet3-compute`` does with one utterance (``DecodableNnetSimple``,
``src/nnet3/nnet-am-decodable-simple.cc``).

For an utterance of ``T`` frames and frame-subsampling factor ``f``, the output has
``ceil(T / f)`` rows; row ``i`` is output frame ``i * f``. The rows are computed in chunks
of ``frames_per_chunk`` output frames (first rounded up to a multiple of
``lcm(f, modulus)``), each chunk ``first..last`` (multiples of ``f``) from the input
frames ``first - left - extra_left .. last + right + extra_right`` where ``left``/``right``
is the network's context; input frames outside ``[0, T-1]`` are copies of frame 0 or
``T-1``. Each chunk gets **one** i-vector, given at ``t = 0``:

* ``ivector`` (``--ivectors``): that vector for every chunk;
* ``online_ivectors`` (``--online-ivectors``, one row per ``period`` frames): row
  ``(first + (last - first) // 2) // period``, clamped to the last row (an error when that
  moves it by more than 50 frames).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from pkwrap.nnet3.nnet import Nnet3

__all__ = ["nnet3_compute", "online_ivector_row", "chunk_plan"]


def chunk_plan(num_frames: int, frame_subsampling_factor: int = 1,
               frames_per_chunk: int = 50, modulus: int = 1):
    """The chunks ``nnet3-compute`` computes, as ``(first, last)`` output frames.

    Args:
      num_frames: T, the utterance's input frames.
      frame_subsampling_factor: f; output frames are ``0, f, 2f, ...`` below T.
      frames_per_chunk: rounded up to a multiple of ``lcm(f, modulus)`` first.
      modulus: the network's shift-invariance modulus.
    Returns:
      a list of ``(first, last)``, both multiples of f.
    """
    f = frame_subsampling_factor
    if f < 1 or frames_per_chunk < 1:
        raise ValueError("--frame-subsampling-factor and --frames-per-chunk must be > 0")
    n = f * modulus // math.gcd(f, modulus)
    per_chunk = (n * ((frames_per_chunk + n - 1) // n)) // f
    num_sub = (num_frames + f - 1) // f
    out, s = [], 0
    while s < num_sub:
        k = min(num_sub - s, per_chunk)
        out.append((s * f, (s + k - 1) * f))
        s += k
    return out


def online_ivector_row(first: int, last: int, num_rows: int, period: int) -> int:
    """The online i-vector row Kaldi uses for a chunk of output frames ``first..last``.

    Raises:
      ValueError: when the row would be more than 50 frames past the last one.
    """
    frame = first + (last - first) // 2
    row = frame // period
    if row >= num_rows:
        if (row - (num_rows - 1)) * period > 50:
            raise ValueError("could not get an i-vector for frame %d, only available till "
                             "frame %d * online-ivector-period=%d (mismatched period?)"
                             % (frame, num_rows, period))
        row = num_rows - 1
    return row


@torch.no_grad()
def nnet3_compute(nnet: Nnet3, feats, ivector=None, online_ivectors=None,
                  online_ivector_period: int = 0, frame_subsampling_factor: int = 1,
                  frames_per_chunk: int = 50, extra_left_context: int = 0,
                  extra_right_context: int = 0, extra_left_context_initial: int = -1,
                  extra_right_context_final: int = -1, output: str = "output",
                  log_priors=None, acoustic_scale: float = 1.0) -> np.ndarray:
    """One utterance through the network, chunk by chunk, as ``nnet3-compute`` does.

    The network is evaluated in eval mode (restored afterwards).

    Args:
      nnet: the network.
      feats: ``[T][D]`` features.
      ivector: ``[D_iv]`` utterance i-vector, or None.
      online_ivectors: ``[ceil(T/period)][D_iv]`` online i-vectors, or None.
      online_ivector_period: frames per online i-vector row.
      frame_subsampling_factor: keep every f-th output frame.
      frames_per_chunk: output frames per computation.
      extra_left_context, extra_right_context: extra input frames given per chunk.
      extra_left_context_initial, extra_right_context_final: if >= 0, used instead for
        the first / last chunk.
      output: the output node.
      log_priors: ``[D_out]`` subtracted from every row (``--use-priors``), or None.
      acoustic_scale: the rows (after the priors) are multiplied by it.
    Returns:
      ``[ceil(T/f)][D_out]`` float32.
    """
    feats = torch.as_tensor(np.asarray(feats, dtype=np.float32))
    T = feats.shape[0]
    if T == 0:
        raise ValueError("zero-length utterance")
    if ivector is not None and online_ivectors is not None:
        raise ValueError("give either an utterance i-vector or online i-vectors, not both")
    if online_ivectors is not None and online_ivector_period <= 0:
        raise ValueError("online i-vectors need --online-ivector-period > 0")
    f = frame_subsampling_factor
    plan = chunk_plan(T, f, frames_per_chunk, nnet.modulus())
    left0, right0 = nnet.context(output)
    if online_ivectors is not None:
        online_ivectors = np.asarray(online_ivectors, dtype=np.float32)
    out = []
    was_training = nnet.training
    nnet.eval()
    try:
        for first, last in plan:
            left = left0 + (extra_left_context_initial if first == 0 and
                            extra_left_context_initial >= 0 else extra_left_context)
            right = right0 + (extra_right_context_final if last == plan[-1][1] and
                              extra_right_context_final >= 0 else extra_right_context)
            idx = torch.arange(first - left, last + right + 1).clamp(0, T - 1)
            inputs = {"input": (first - left, feats[idx][None])}
            iv = None
            if ivector is not None:
                iv = np.asarray(ivector, dtype=np.float32)
            elif online_ivectors is not None:
                iv = online_ivectors[online_ivector_row(first, last, len(online_ivectors),
                                                        online_ivector_period)]
            if iv is not None:
                inputs["ivector"] = (0, torch.as_tensor(iv).reshape(1, 1, -1))
            y = nnet.compute(inputs, {output: (first, last)})[output][0]
            out.append(y[::f])
    finally:
        nnet.train(was_training)
    y = torch.cat(out)
    if log_priors is not None:
        y = y - torch.as_tensor(np.asarray(log_priors, dtype=np.float32))
    if acoustic_scale != 1.0:
        y = y * acoustic_scale
    return y.numpy()
