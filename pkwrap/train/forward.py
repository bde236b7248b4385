"""Forward pass for decoding, as ``nnet3-compute`` does it.

For an utterance of T frames, a model with context L/R and frame subsampling f gives
``ceil(T / f)`` output rows; row i is output frame ``t = i f`` computed from input frames
``t - L .. t + R``, where frames outside ``[0, T-1]`` are copies of frame 0 or frame T-1
(edge replication, never zero padding). For a valid model that is: pad L copies of
frame 0 in front and R copies of frame T-1 behind, run, and the outputs are the rows.
Long utterances are cut into chunks of ``frames_per_chunk`` input frames (rounded up
to a multiple of f), each with its own context; for a non-recurrent model the result
is the same up to float rounding.

The outputs (chain "log-likelihoods", acoustic scale 1, no prior) are written as a
Kaldi archive that ``latgen-faster-mapped`` reads, or returned as a dict.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .context import ModelContext, probe_model_context, split_model_output
from .diagnostics import test_mode

__all__ = ["compute_nnet_output", "compute_nnet_outputs"]


@torch.no_grad()
def compute_nnet_output(model: nn.Module, feats: Union[np.ndarray, torch.Tensor],
                        ctx: ModelContext, frames_per_chunk: int = 0, output: str = "output",
                        device=None) -> torch.Tensor:
    """Outputs of one utterance, nnet3-compute style (module docstring).

    Args:
      model: the acoustic model (put in test mode for the call).
      feats: ``[T][F]`` features.
      ctx: the model's context (:func:`~pkwrap.train.context.probe_model_context`).
      frames_per_chunk: input frames per computation (0: whole utterance).
      output: ``"output"`` (chain) or ``"output-xent"``.
      device: where to compute (default: the model's device).
    Returns:
      ``[ceil(T/f)][P]`` float32 on CPU.
    """
    x = torch.as_tensor(np.asarray(feats) if not isinstance(feats, torch.Tensor) else feats,
                        dtype=torch.float32)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError("features must be [T][F] with T > 0, got %s" % (tuple(x.shape),))
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    f = ctx.frame_subsampling_factor
    t_len = x.shape[0]
    n_out = (t_len + f - 1) // f
    lp, rp = ctx.left_context, ctx.right_context
    if ctx.padded:  # keep the output grid on multiples of f
        lp = -(-lp // f) * f
        rp = -(-rp // f) * f
    padded = torch.cat([x[:1].expand(lp, -1), x, x[-1:].expand(rp + f, -1)], dim=0)
    per_chunk = n_out if frames_per_chunk <= 0 else max(1, -(-frames_per_chunk // f))
    pieces = []
    with test_mode(model):
        for j0 in range(0, n_out, per_chunk):
            j1 = min(n_out, j0 + per_chunk)
            if ctx.padded:
                a, b = j0 * f, j1 * f + lp + rp
                off = lp // f
            else:
                a, b = j0 * f, (j1 - 1) * f + lp + rp + 1
                off = 0
            y = model(padded[a:b].unsqueeze(0).to(device))
            chain, xent = split_model_output(y)
            if output == "output":
                y = chain
            elif output in ("output-xent", "xent"):
                if xent is None:
                    raise ValueError("the model has no xent output")
                y = xent
            else:
                raise ValueError("unknown output %r (use 'output' or 'output-xent')" % output)
            y = y[0, off:off + (j1 - j0)]
            if y.shape[0] != j1 - j0:
                raise ValueError("model gave %d output frames for a chunk needing %d"
                                 % (y.shape[0], j1 - j0))
            pieces.append(y.float().cpu())
    return torch.cat(pieces, dim=0)


def compute_nnet_outputs(model: nn.Module, feats, wspecifier: Optional[str] = None,
                         ctx: Optional[ModelContext] = None, frames_per_chunk: int = 0,
                         output: str = "output", device=None
                         ) -> Optional[Dict[str, np.ndarray]]:
    """Run the model over utterances and write their outputs as a Kaldi archive.

    Args:
      model: the acoustic model.
      feats: an rspecifier (``scp:feats.scp``, ``ark:feats.ark``, read with kaldiio), a
        dict ``utt -> [T][F]`` or an iterable of ``(utt, [T][F])``.
      wspecifier: e.g. ``ark:out.ark`` or ``ark,scp:out.ark,out.scp`` (kaldiio), for
        ``latgen-faster-mapped``; None returns the outputs instead.
      ctx: model context (default: probed).
      frames_per_chunk: as for :func:`compute_nnet_output`.
      output: ``"output"`` or ``"output-xent"``.
      device: compute device.
    Returns:
      ``{utt: [ceil(T/f)][P] float32}`` when ``wspecifier`` is None, else None.
    """
    import kaldiio
    if isinstance(feats, str):
        items: Iterable[Tuple[str, np.ndarray]] = kaldiio.ReadHelper(feats)
    elif isinstance(feats, dict):
        items = feats.items()
    else:
        items = feats
    writer = kaldiio.WriteHelper(wspecifier) if wspecifier is not None else None
    result: Dict[str, np.ndarray] = {}
    try:
        for utt, mat in items:
            mat = np.asarray(mat, dtype=np.float32)
            if ctx is None:
                ctx = probe_model_context(model, mat.shape[1], device=device)
            y = compute_nnet_output(model, mat, ctx, frames_per_chunk, output,
                                    device).numpy()
            if writer is not None:
                writer(utt, y)
            else:
                result[utt] = y
    finally:
        if writer is not None:
            writer.close()
        if hasattr(items, "close"):
            items.close()
    return None if writer is not None else result
