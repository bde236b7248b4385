"""The LF-MMI ("chain") loss: Kaldi's ComputeChainObjfAndDeriv as a torch module.

For a minibatch of S sequences of T frames with supervision weight w, chain output
X ``[S][T][P]`` and (optionally) xent output Y ``[S][T][P]``::

    objf      = w * log p_num(X) - w * log p_den(X)      (num_logprob_weighted - den_logprob_weighted)
    l2_term   = -0.5 * w * l2_regularize * sum(X**2)
    oor_term  = -0.5 * out_of_range_regularize * sum((|X| - 30)_+ ** 2)
    xent_objf = sum(Y * w * num_post)                    (num_post: numerator posteriors)
    weight    = w * S * T

    loss      = -(objf + l2_term + oor_term + xent_regularize * xent_objf)   reduction "sum"
    loss      = that / weight                                               reduction "mean"

Kaldi's derivative (gradient *ascent*) is
``nnet_output_deriv = w * num_post - w * den_post - w * l2_regularize * X + penalty``
and ``xent_output_deriv = w * num_post``; with reduction "sum",
``d loss / d X = -nnet_output_deriv`` and ``d loss / d Y = -xent_regularize * xent_output_deriv``.
Like Kaldi, den_post is the denominator occupation posterior even where X is
clamped to [-30, 30].

Out-of-range penalty. Kaldi adds ``-2 * out_of_range_regularize * (x -+ 30)`` to the
derivative of elements beyond +-30 on a random half of the minibatches; pkwrap adds
its expected value ``-out_of_range_regularize * (x -+ 30)`` on every minibatch (the
gradient of oor_term). It never changes objf, as in Kaldi.

Failure (Kaldi's behaviour). If objf is not finite (NaN/inf in X, no numerator path)
or the denominator's frame-0 check fails, the derivatives are zeroed, objf is set to
``-10 * weight``, a warning is logged and ``ChainLoss.num_failed`` is incremented. As
in Kaldi the l2 term and its derivative are still added afterwards (for e2e
supervision only when the numerator succeeded), unless they are not finite
themselves.

Deriv weights. nnet3 training (``NnetChainTrainer::ProcessOutputs``) multiplies the
rows of nnet_output_deriv and xent_output_deriv by the eg's ``deriv_weights`` after
the objective is computed; pkwrap does the same: the gradients are multiplied by
``deriv_weights[s][t]`` while objf, l2_term, xent_objf and the loss value are not.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from ..kaldi.chain_egs import Supervision
from .den_graph import DenominatorGraph
from .denominator import _check_input, _pick_backend, denominator_forward_backward
from .numerator import check_supervision, numerator_forward_backward
from .options import ChainOptions

__all__ = ["ChainLoss", "ChainResult", "chain_loss"]

logger = logging.getLogger("pkwrap.chain")


@dataclass
class ChainResult:
    """What :class:`ChainLoss` returns for one minibatch.

    Attributes:
      loss: scalar tensor to back-propagate (see the module docstring).
      objf: Kaldi's objf = num_logprob_weighted - den_logprob_weighted (or -10*weight
        after a failure). Does not include l2_term.
      l2_term: -0.5 * w * l2_regularize * sum(X**2).
      weight: w * S * T; Kaldi prints objf/weight and (objf + l2_term)/weight.
      num_logprob_weighted: w * log p_num.
      den_logprob_weighted: w * log p_den (summed over sequences).
      xent_objf: sum(xent_output * w * num_post); 0.0 without xent_output.
      out_of_range_term: -0.5 * out_of_range_regularize * sum((|X|-30)_+**2).
      num_elements_out_of_range: how many elements of X lie outside [-30, 30].
      ok: False when Kaldi's failure rule applied (derivatives zeroed).
    """

    loss: torch.Tensor
    objf: float
    l2_term: float
    weight: float
    num_logprob_weighted: float
    den_logprob_weighted: float
    xent_objf: float = 0.0
    out_of_range_term: float = 0.0
    num_elements_out_of_range: int = 0
    ok: bool = True

    @property
    def objf_per_frame(self) -> float:
        return self.objf / self.weight

    @property
    def objf_plus_l2_per_frame(self) -> float:
        return (self.objf + self.l2_term) / self.weight

    @property
    def xent_per_frame(self) -> float:
        return self.xent_objf / self.weight


class _PrecomputedGradFunction(torch.autograd.Function):
    """loss = value; d loss / d output = g_out; d loss / d xent = g_xent (computed in forward).

    On the usual ``loss.backward()`` (incoming gradient 1) the stored gradients are
    handed over without a copy (autograd then uses them as ``.grad`` directly), so a
    second backward through the same result is refused.
    """

    @staticmethod
    def forward(ctx, value, output, xent_output, g_out, g_xent):
        ctx.g_out, ctx.g_xent = g_out, g_xent
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        g_out, g_xent = ctx.g_out, ctx.g_xent
        if g_out is None:
            raise RuntimeError("ChainLoss: backward through the same result twice; its "
                               "gradient was handed over on the first call")
        one = grad.dim() == 0 and bool(grad == 1)
        if one:
            ctx.g_out = ctx.g_xent = None
        go = gx = None
        if ctx.needs_input_grad[1]:
            go = g_out if one else grad * g_out
        if ctx.needs_input_grad[2]:
            gx = g_xent if one else grad * g_xent
        return None, go, gx, None, None


def _deriv_weights_bf(deriv_weights, S: int, T: int, device) -> torch.Tensor:
    dw = torch.as_tensor(np.asarray(deriv_weights) if not isinstance(deriv_weights, torch.Tensor)
                         else deriv_weights).to(device=device, dtype=torch.float32)
    if dw.dim() == 2 and tuple(dw.shape) == (S, T):
        return dw
    if dw.dim() == 1 and dw.numel() == S * T:
        # Kaldi's order (NnetChainSupervision::deriv_weights): row t*S + s.
        return dw.reshape(T, S).t()
    raise ValueError("deriv_weights must have shape (S, T) = (%d, %d), or be Kaldi's t-major "
                     "vector of length S*T = %d; got shape %s" % (S, T, S * T, tuple(dw.shape)))


def chain_loss(den_graph: DenominatorGraph, output: torch.Tensor, supervision: Supervision,
               options: Optional[ChainOptions] = None, xent_output: Optional[torch.Tensor] = None,
               deriv_weights=None, reduction: str = "sum", backend: Optional[str] = None,
               num_threads: Optional[int] = None, _stats: Optional[dict] = None) -> ChainResult:
    """Kaldi's chain objective and its derivatives for one minibatch (functional form).

    Args:
      den_graph: the denominator graph (its num_pdfs must equal P).
      output: chain output ``[S][T][P]`` (batch-first; row (s, t) is Kaldi's row t*S+s).
      supervision: a :class:`pkwrap.kaldi.chain_egs.Supervision` for S x T frames.
      options: a :class:`ChainOptions` (default ChainOptions()).
      xent_output: optional 'output-xent' log-softmax ``[S][T][P]``.
      deriv_weights: optional ``[S][T]`` (or Kaldi's t-major vector of S*T) frame
        weights applied to the gradients only (see the module docstring).
      reduction: "sum" (Kaldi's totals) or "mean" (divided by weight; a zero
        weight, e.g. a multilingual eg switched off, divides by 1).
      backend: "auto": C++ kernels for CPU tensors; for other devices the
        denominator in Triton kernels (CUDA; plain torch ops without Triton) and the
        numerator's C++ recursion on the host over log-likelihoods gathered on the
        device. "cpp" (CPU only), "triton" (Triton denominator, numerator as for
        "auto") or "torch" (plain torch ops for both, any device) force one path.
      num_threads: threads of the C++ denominator (default torch.get_num_threads()).
    Returns:
      A :class:`ChainResult`.
    """
    opts = options if options is not None else ChainOptions()
    if reduction not in ("sum", "mean"):
        raise ValueError("reduction must be 'sum' or 'mean', got %r" % (reduction,))
    _check_input(den_graph, output, opts.leaky_hmm_coefficient)
    S, T, P = output.shape
    check_supervision(supervision, S, T, P)
    if xent_output is not None and tuple(xent_output.shape) != (S, T, P):
        raise ValueError("xent_output has shape %s but output has shape %s"
                         % (tuple(xent_output.shape), (S, T, P)))
    # None/"auto"/"triton": the numerator's C++ on the host for every device
    num_backend = None if backend == "triton" else backend
    backend = _pick_backend(output, backend)
    dev = output.device
    w = float(supervision.weight)
    weight = w * S * T
    x = output.detach()
    need_grad = torch.is_grad_enabled() and (
        output.requires_grad or (xent_output is not None and xent_output.requires_grad))

    norm = weight if (reduction == "mean" and weight > 0) else 1.0
    # G accumulates d loss / d X directly (Kaldi's nnet_output_deriv negated, / norm).
    den = denominator_forward_backward(den_graph, x, opts.leaky_hmm_coefficient,
                                       want_post=need_grad, post_scale=w / norm,
                                       backend=backend, num_threads=num_threads)
    den_lp_w = w * float(den.logprob.sum())
    G = den.post  # w * den_post / norm, or None
    xent_d = None
    if xent_output is not None:
        xent_d = torch.zeros(S, T, P, dtype=torch.float32, device=dev)
        num_lp_w, num_ok = numerator_forward_backward(supervision, x, xent_d, backend=num_backend)
        if G is not None and num_ok:
            G.sub_(xent_d, alpha=1.0 / norm)
    else:
        num_lp_w, num_ok = numerator_forward_backward(supervision, x, G, backend=num_backend,
                                                      post_scale=-1.0 / norm)

    xf = x if x.dtype == torch.float32 else x.to(torch.float32)
    n_oor = 0
    oor_term = 0.0
    # one transfer for both; also tells whether X is finite (NaN/inf show in min or max)
    lo, hi = torch.stack(torch.aminmax(xf)).tolist()
    x_finite = math.isfinite(lo) and math.isfinite(hi)
    if x_finite and not (lo >= -30.0 and hi <= 30.0):
        n_oor = int((xf.abs() > 30.0).sum())
        if n_oor and opts.out_of_range_regularize > 0:
            over = xf - xf.clamp(-30.0, 30.0)
            ov = over.reshape(-1)
            oor_term = -0.5 * opts.out_of_range_regularize * float(torch.dot(ov, ov))
            if G is not None:
                G.add_(over, alpha=opts.out_of_range_regularize / norm)

    objf = num_lp_w - den_lp_w
    # +-inf in X is treated like NaN (the denominator clamps X, so it would not notice)
    ok = bool(np.isfinite(objf)) and den.ok and num_ok and x_finite
    if not ok:
        logger.warning("Objective function is %s and denominator computation returned %s and "
                       "numerator computation returned %s%s, setting objective function to -10 "
                       "per frame and zeroing the derivative.", objf, den.ok, num_ok,
                       "" if x_finite else " (the network output is not finite)")
        if G is not None:
            G.zero_()
        if xent_d is not None:
            xent_d.zero_()
        objf = -10.0 * weight
        oor_term = 0.0
        if _stats is not None:
            _stats["num_failed"] = _stats.get("num_failed", 0) + 1

    l2_term = 0.0
    if opts.l2_regularize != 0.0 and x_finite and (num_ok or not supervision.e2e):
        scale = w * opts.l2_regularize
        l2 = -0.5 * scale * float(torch.linalg.vector_norm(xf, dtype=torch.float64)) ** 2
        if np.isfinite(l2):
            l2_term = l2
            if G is not None:
                G.add_(xf, alpha=scale / norm)

    xent_objf = 0.0
    if xent_output is not None:
        # one read of both (a float64 sum of the product would first write a float64
        # copy of it); Kaldi's TraceMatMat is a float dot product too
        xent_objf = float(torch.dot(xent_output.detach().to(torch.float32).reshape(-1),
                                    xent_d.reshape(-1)))
        if not np.isfinite(xent_objf) and not ok:
            xent_objf = 0.0

    if deriv_weights is not None:
        dw = _deriv_weights_bf(deriv_weights, S, T, dev).unsqueeze(-1)
        if G is not None:
            G.mul_(dw)
        if xent_d is not None:
            xent_d.mul_(dw)

    total = objf + l2_term + oor_term + opts.xent_regularize * xent_objf
    value = torch.tensor(-total / norm, dtype=output.dtype if output.is_floating_point()
                         else torch.float32, device=dev)
    if need_grad:
        g_out = G.to(output.dtype)
        if xent_d is not None:
            g_xent = xent_d.mul_(-opts.xent_regularize / norm).to(xent_output.dtype)
        else:
            g_xent = torch.empty(0, device=dev)
        loss = _PrecomputedGradFunction.apply(value, output, xent_output, g_out, g_xent)
    else:
        loss = value
    return ChainResult(loss=loss, objf=objf, l2_term=l2_term, weight=weight,
                       num_logprob_weighted=num_lp_w, den_logprob_weighted=den_lp_w,
                       xent_objf=xent_objf, out_of_range_term=oor_term,
                       num_elements_out_of_range=n_oor, ok=ok)


class ChainLoss(nn.Module):
    """LF-MMI loss module: Kaldi's chain objective with torch autograd.

    Args:
      den_graph: a :class:`DenominatorGraph` (e.g. ``DenominatorGraph.from_fst("den.fst", P)``).
      options: a :class:`ChainOptions` (default ChainOptions()).
      reduction: "sum" (Kaldi's totals; gradients equal Kaldi's derivatives negated)
        or "mean" (everything divided by ``weight = w * S * T``).
      backend: "auto" (C++ kernels for CPU tensors; for CUDA tensors the Triton
        denominator, or plain torch ops without Triton), "cpp", "triton" or "torch".
      num_threads: threads of the C++ denominator (default torch.get_num_threads()).

    Attributes:
      num_failed: minibatches on which Kaldi's failure rule applied (zero derivative,
        objf = -10 per frame); a trainer logs it.
      num_minibatches: minibatches seen by forward().

    Example::

        den = DenominatorGraph.from_fst("exp/chain/tdnn/den.fst", num_pdfs)
        criterion = ChainLoss(den, ChainOptions(l2_regularize=5e-5, xent_regularize=0.1))
        res = criterion(chain_out, eg.supervision, xent_out)   # (S, T, P) each
        res.loss.backward()
        print(res.objf / res.weight)
    """

    def __init__(self, den_graph: DenominatorGraph, options: Optional[ChainOptions] = None,
                 reduction: str = "sum", backend: Optional[str] = None,
                 num_threads: Optional[int] = None):
        super().__init__()
        if not isinstance(den_graph, DenominatorGraph):
            raise TypeError("den_graph must be a DenominatorGraph, got %s" % type(den_graph).__name__)
        if reduction not in ("sum", "mean"):
            raise ValueError("reduction must be 'sum' or 'mean', got %r" % (reduction,))
        if backend not in (None, "auto", "cpp", "triton", "torch"):
            raise ValueError("backend must be 'auto', 'cpp', 'triton' or 'torch', got %r"
                             % (backend,))
        self.den_graph = den_graph
        self.options = options if options is not None else ChainOptions()
        self.reduction = reduction
        self.backend = backend
        self.num_threads = num_threads
        self.num_failed = 0
        self.num_minibatches = 0

    def forward(self, output: torch.Tensor, supervision: Supervision,
                xent_output: Optional[torch.Tensor] = None, deriv_weights=None) -> ChainResult:
        """Compute the chain objective of one minibatch.

        Args:
          output: chain output ``[S][T][P]`` (batch-first).
          supervision: the minibatch's Supervision (S sequences of T frames).
          xent_output: optional 'output-xent' log-softmax ``[S][T][P]``.
          deriv_weights: optional ``[S][T]`` gradient weights (or Kaldi's t-major vector).
        Returns:
          A :class:`ChainResult`; back-propagate ``result.loss``.
        """
        stats = {}
        res = chain_loss(self.den_graph, output, supervision, self.options, xent_output,
                         deriv_weights, self.reduction, self.backend, self.num_threads, stats)
        self.num_minibatches += 1
        self.num_failed += stats.get("num_failed", 0)
        return res

    def extra_repr(self) -> str:
        return "%r, %r, reduction=%r" % (self.den_graph, self.options, self.reduction)
