"""Model context and frame subsampling, found by probing the model.

pkwrap trains any ``nn.Module`` that maps features ``[B][T_in][F]`` to chain outputs
``[B][T_out][P]`` (and optionally xent outputs of the same shape). Its output may be a
tensor, a tuple ``(chain, xent)`` or a dict ``{"output": chain, "output-xent": xent}``.
Two conventions are recognised, as Kaldi's nnet3 computations would see them:

* **valid** (Kaldi's, and pkwrap.nn's TDNN/TDNN-F): no padding, so output frame ``j``
  sits at input frame ``L + j*f`` and

      T_out = floor((T_in - L - R - 1) / f) + 1,

  where L/R are the left/right context and f the frame-subsampling factor. Probing the
  output length over input lengths gives f and ``C = L + R`` exactly (C + 1 is the
  shortest input giving one output frame). The split of C into L and R cannot be seen
  from outside a valid computation (output 0 depends on inputs 0..C whatever the
  split). It is taken from the model's ``left_context``/``right_context`` attributes
  when it has them (checked against C); otherwise it is symmetric, L = ceil(C/2).
* **same** (padded convolutions): ``T_out = ceil(T_in / f)`` and output ``j`` sits at input
  frame ``j*f``. Then L and R are measured: the input frames with a nonzero gradient
  of one output frame in the middle of a long random input span ``[j*f - L, j*f + R]``.

:func:`select_model_input` cuts the rows a model needs out of a Kaldi chunk (which
carries ``egs_left_context >= L`` frames before the first output frame), honouring the
frame shift used for augmentation.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from torch import nn

__all__ = ["ModelContext", "probe_model_context", "split_model_output", "select_model_input",
           "model_ivector_dim", "call_model"]


@dataclass(frozen=True)
class ModelContext:
    """What the trainer must know of a model's time axis.

    Args:
      left_context: input frames needed before an output frame (L).
      right_context: input frames needed after it (R).
      frame_subsampling_factor: input frames per output frame (f).
      padded: True for "same" models (T_out = ceil(T_in / f)); False for "valid".
      has_xent: the model returns an xent output beside the chain output.
      num_outputs: P, the output dimension.
      ivector_dim: the model reads an ``ivector`` input of this dimension (0: none);
        it is called as ``model(x, ivector=[B][ivector_dim])`` (pkwrap.nnet3.Nnet3 with
        an ``ivector`` input node; Kaldi's chain egs carry one i-vector per sequence).
    """

    left_context: int
    right_context: int
    frame_subsampling_factor: int
    padded: bool = False
    has_xent: bool = False
    num_outputs: int = 0
    ivector_dim: int = 0

    def num_input_frames(self, num_output_frames: int) -> int:
        """Input frames a valid model needs for ``num_output_frames`` outputs."""
        if self.padded:
            return num_output_frames * self.frame_subsampling_factor
        return self.left_context + self.right_context + \
            (num_output_frames - 1) * self.frame_subsampling_factor + 1

    def num_output_frames(self, num_input_frames: int) -> int:
        """Output frames the model gives for ``num_input_frames`` inputs."""
        f = self.frame_subsampling_factor
        if self.padded:
            return (num_input_frames + f - 1) // f
        n = num_input_frames - self.left_context - self.right_context
        return 0 if n <= 0 else (n - 1) // f + 1


def split_model_output(out: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chain output and optional xent output of a model's forward.

    Args:
      out: a tensor ``[B][T][P]``, a tuple/list ``(chain, xent)`` or ``(chain,)``, or a
        dict with key ``"output"`` and optionally ``"output-xent"`` (or ``"xent"``).
    Returns:
      ``(chain, xent_or_None)``.
    """
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, dict):
        if "output" not in out:
            raise ValueError("model returned a dict without an 'output' key: %s" % sorted(out))
        return out["output"], out.get("output-xent", out.get("xent"))
    if isinstance(out, (tuple, list)) and 1 <= len(out) <= 2:
        if not isinstance(out[0], torch.Tensor):
            raise ValueError("model output[0] is %s, not a tensor" % type(out[0]).__name__)
        return out[0], (out[1] if len(out) == 2 else None)
    raise ValueError("model output must be a tensor, (chain, xent) or a dict, got %s"
                     % type(out).__name__)


def model_ivector_dim(model: nn.Module) -> int:
    """Dimension of the ``ivector`` input a model reads (0: it reads none): a module with
    ``input_names`` containing ``"ivector"`` and ``input_dim(name)`` (pkwrap.nnet3.Nnet3),
    or one that says so with an ``ivector_dim`` attribute."""
    m = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    names = getattr(m, "input_names", None)
    if names is not None and "ivector" in list(names) and hasattr(m, "input_dim"):
        return int(m.input_dim("ivector"))
    return int(getattr(m, "ivector_dim", 0) or 0)


def call_model(model: nn.Module, x: torch.Tensor, ivector_dim: int = 0,
               ivector: Optional[torch.Tensor] = None):
    """``model(x)``, or ``model(x, ivector=...)`` for a model with an i-vector input
    (random i-vectors when none are given: probing)."""
    if ivector_dim <= 0:
        return model(x)
    if ivector is None:
        ivector = torch.randn(x.shape[0], ivector_dim, device=x.device, dtype=x.dtype)
    return model(x, ivector=ivector)


def _out_len(model: nn.Module, feat_dim: int, t_in: int, device, dtype,
             strict: bool = False) -> int:
    # two sequences: batchnorm in training mode needs more than one row per channel
    x = torch.randn(2, t_in, feat_dim, device=device, dtype=dtype)
    try:
        with torch.no_grad():
            y, _ = split_model_output(call_model(model, x, model_ivector_dim(model)))
    except (RuntimeError, ValueError, IndexError):
        if strict:
            raise
        return 0  # input too short for the model's convolutions
    if y.dim() != 3 or y.shape[0] != 2:
        raise ValueError("model output for input [2][%d][%d] has shape %s, expected [2][T][P]"
                         % (t_in, feat_dim, tuple(y.shape)))
    return int(y.shape[1])


@torch.no_grad()
def _probe_lengths(model, feat_dim, device, dtype, max_context):
    base = 4 * max_context + 240
    span = 240  # divisible by 1, 2, 3, 4, 5, 6, 8: the factor is exact for all of them
    a = _out_len(model, feat_dim, base, device, dtype)
    b = _out_len(model, feat_dim, base + span, device, dtype)
    if a <= 0 or b <= a:
        raise ValueError("model gives %d and %d output frames for %d and %d input frames: "
                         "cannot find its frame subsampling" % (a, b, base, base + span))
    ratio = span / (b - a)
    f = int(round(ratio))
    if f < 1 or abs(ratio - f) > 1e-6:
        raise ValueError("output length does not grow by 1 every f input frames "
                         "(%d input frames per output frame)" % ratio)
    return f, a, base


def probe_model_context(model: nn.Module, feat_dim: int, device=None, dtype=torch.float32,
                        max_context: int = 200) -> ModelContext:
    """Find a model's left/right context and frame-subsampling factor.

    A deep copy of the model is run on random inputs, in eval mode (in train mode if
    eval mode raises, as Kaldi batchnorm without statistics does), with the RNG states
    restored afterwards: the model itself and the training RNG stream are untouched.

    Args:
      model: the acoustic model, ``[B][T_in][F] -> [B][T_out][P]`` (see module docstring).
      feat_dim: F.
      device: where to run the probe (default: the model's parameters' device).
      dtype: input dtype.
      max_context: upper bound on L + R searched for.
    Returns:
      A :class:`ModelContext`.
    """
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    # Probe a copy: a model may update statistics even in eval mode, and batchnorm with
    # no statistics yet (Kaldi's) only runs in training mode. The RNGs are put back.
    probe = copy.deepcopy(model)
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        probe.eval()
        try:
            _out_len(probe, feat_dim, 4 * max_context + 240, device, dtype, strict=True)
        except RuntimeError:
            probe.train()  # e.g. batchnorm that refuses test mode before training
        return _probe(probe, feat_dim, device, dtype, max_context,
                      getattr(model, "left_context", None), getattr(model, "right_context", None))


def _probe(model, feat_dim, device, dtype, max_context, lc, rc) -> ModelContext:
    f, t_out_base, t_in_base = _probe_lengths(model, feat_dim, device, dtype, max_context)
    with torch.no_grad():
        y, xent = split_model_output(call_model(
            model, torch.randn(2, t_in_base, feat_dim, device=device, dtype=dtype),
            model_ivector_dim(model)))
    has_xent = xent is not None
    iv = model_ivector_dim(model)
    num_outputs = int(y.shape[-1])
    if t_out_base == (t_in_base + f - 1) // f:
        left, right = _probe_padded_context(model, feat_dim, f, device, dtype, max_context)
        return ModelContext(left, right, f, True, has_xent, num_outputs, iv)
    # valid: the shortest input giving one output frame is C + 1
    lo, hi = 1, t_in_base
    while lo < hi:
        mid = (lo + hi) // 2
        with torch.no_grad():
            n = _out_len(model, feat_dim, mid, device, dtype)
        if n >= 1:
            hi = mid
        else:
            lo = mid + 1
    total = lo - 1
    expect = (t_in_base - total - 1) // f + 1
    if expect != t_out_base:
        raise ValueError("model output lengths fit neither T_out = ceil(T_in/f) nor "
                         "floor((T_in - C - 1)/f) + 1 (f=%d, C=%d)" % (f, total))
    if lc is not None and rc is not None:
        lc, rc = int(lc), int(rc)
        if lc + rc != total:
            raise ValueError("model says left_context=%d right_context=%d but its output "
                             "length implies a total context of %d" % (lc, rc, total))
    else:
        lc = (total + 1) // 2
        rc = total - lc
    return ModelContext(lc, rc, f, False, has_xent, num_outputs, iv)


def _probe_padded_context(model, feat_dim, f, device, dtype, max_context):
    t_in = 2 * max_context + 8 * f + 1
    t_in = ((t_in + f - 1) // f) * f
    j = (t_in // f) // 2
    found = None
    for _ in range(2):  # two random inputs: a gradient that is exactly 0 by chance is rare
        x = torch.randn(1, t_in, feat_dim, device=device, dtype=dtype, requires_grad=True)
        y, _ = split_model_output(call_model(model, x, model_ivector_dim(model)))
        y[0, j].sum().backward()
        nz = (x.grad[0].abs().sum(dim=1) != 0).nonzero().flatten()
        if nz.numel() == 0:
            continue
        lo, hi = int(nz.min()), int(nz.max())
        found = (lo, hi) if found is None else (min(found[0], lo), max(found[1], hi))
    if found is None:
        return 0, 0
    return j * f - found[0], found[1] - j * f


def select_model_input(feats: torch.Tensor, ctx: ModelContext, egs_left_context: int,
                       num_output_frames: int, frame_shift: int = 0
                       ) -> Tuple[torch.Tensor, int]:
    """The input rows a model needs from a Kaldi chunk, and where its outputs start.

    A chain eg's input for one sequence covers frames ``t = -egs_left_context ..`` of
    its chunk; the outputs sit at ``t = 0, f, .., (T-1) f``. Frame shift ``d`` (as
    nnet3-chain-copy-egs --frame-shift, reduced to ``-f//2 .. f//2``: the features move
    by d relative to the labels) moves the window.

    A valid model gets exactly ``L + (T-1) f + 1 + R`` rows and gives T outputs. A padded
    model gets ``Lp + T f + Rp`` rows, Lp and Rp being L and R rounded up to multiples
    of f (as far as the chunk has them), and its outputs ``off .. off+T-1`` are the
    ones wanted, off = Lp / f.

    Args:
      feats: ``[B][T_chunk][F]`` chunk features, row 0 = t = -egs_left_context.
      ctx: the model's context.
      egs_left_context: frames before t=0 in the chunk.
      num_output_frames: T, output frames per sequence.
      frame_shift: d.
    Returns:
      ``(x, off)``: x ``[B][T_in][F]`` a view of ``feats``; off the first output to keep.
    """
    f = ctx.frame_subsampling_factor
    t_chunk = feats.shape[1]
    centre0 = egs_left_context + frame_shift  # row of output frame 0's input frame
    if ctx.padded:
        lp = min(-(-ctx.left_context // f) * f, (centre0 // f) * f)
        end = centre0 + num_output_frames * f
        rp = min(-(-ctx.right_context // f) * f, max(0, ((t_chunk - end) // f) * f))
        start, length, off = centre0 - lp, lp + num_output_frames * f + rp, lp // f
    else:
        start = centre0 - ctx.left_context
        length = ctx.num_input_frames(num_output_frames)
        off = 0
    if start < 0 or start + length > t_chunk:
        raise ValueError(
            "chunk of %d input frames (left context %d) is too short for the model "
            "(context %d/%d, %d output frames, frame shift %d): make egs with "
            "--left-context >= %d and --right-context >= %d"
            % (t_chunk, egs_left_context, ctx.left_context, ctx.right_context,
               num_output_frames, frame_shift, ctx.left_context + abs(frame_shift),
               ctx.right_context + abs(frame_shift)))
    return feats[:, start:start + length], off
