r"""The fused training kernels of Kaldi's TDNN / TDNN-F layer patterns, shared by every nnet3
network (:mod:`pkwrap.nnet3.plan` runs them; :class:`pkwrap.nn.TDNNFModel` is one such
network), and the helpers of Kaldi's update rules.

* :class:`_AffineReluBatchNormFunction`: ``bn(relu(x W^T + b)) + scale * bypass rows`` of a
  natural-gradient affine / linear / TDNN component followed by (RectifiedLinear and)
  BatchNorm, with the TDNN-F bypass ``Sum(Scale(a, x), bn)``, as one autograd node over
  the C++ kernels of ``csrc/nn/batchnorm.h`` (two passes over the rows forward, two
  backward); :class:`_ReluBatchNormFunction` the same without the affine map
  (BatchNormComponent's training forward).
* :class:`_SplicedLinearFunction`: a TdnnComponent on consecutive frames without forming
  the spliced matrix (the TDNN-F ``linear`` halves).

Batch normalization (Kaldi's ``BatchNormComponent``; no learned scale or offset):

.. math::

   y = \rho\,(x - \mu) / \sqrt{\sigma^2 + \epsilon}, \qquad \epsilon = 10^{-3},

with :math:`\mu, \sigma^2` of the minibatch in training (biased variance, derivatives through
both), and of the accumulated statistics in evaluation mode; the kernels report the
minibatch's sums to the component's ``add_stats``.

Also here: :func:`constrain_orthonormal_` (Kaldi's semi-orthogonal constraint, which
:class:`pkwrap.optim.NGSGD` applies), :func:`scale_batchnorm_stats` and
:func:`compute_idct_matrix` (Kaldi's idct-layer).
"""
import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

from pkwrap.ngsgd import linear, mm, spliced_linear

__all__ = ["constrain_orthonormal_", "constrain_orthonormal", "scale_batchnorm_stats",
           "compute_idct_matrix"]


def compute_idct_matrix(dim: int, cepstral_lifter: float = 22.0) -> torch.Tensor:
    """The inverse DCT with liftering of Kaldi's ``idct-layer`` (MFCC -> log-mel-like).

    ``M[n][k] = c_k cos(pi/dim (n + 1/2) k) / lifter_k`` with ``c_0 = sqrt(1/dim)``,
    ``c_k = sqrt(2/dim)``, ``lifter_k = 1 + L/2 sin(pi k / L)``.

    Returns:
      A float32 ``[dim][dim]`` matrix; the layer computes ``y = M x``.
    """
    n = torch.arange(dim, dtype=torch.float64)[:, None]
    k = torch.arange(dim, dtype=torch.float64)[None, :]
    m = math.sqrt(2.0 / dim) * torch.cos(math.pi / dim * (n + 0.5) * k)
    m[:, 0] = math.sqrt(1.0 / dim)
    if cepstral_lifter != 0:
        lifter = 1.0 + 0.5 * cepstral_lifter * torch.sin(math.pi * k / cepstral_lifter)
        m = m / lifter
    return m.float()


@torch.no_grad()
def constrain_orthonormal_(M: torch.Tensor, scale: float = -1.0) -> bool:
    r"""One step of Kaldi's ``ConstrainOrthonormalInternal`` on a weight matrix, in place.

    With P = M M^T (M transposed first if it has more rows than columns), the step
    :math:`M \leftarrow M - 4\nu/\alpha^2 (P - \alpha^2 I) M` moves M towards
    :math:`M M^T = \alpha^2 I` (update speed :math:`\nu` = 1/8).  ``scale`` > 0 fixes
    :math:`\alpha`; ``scale`` < 0 lets it float: :math:`\alpha^2 = \mathrm{tr}(P^2)/\mathrm{tr}(P)`, and
    :math:`\nu` is halved when :math:`\mathrm{tr}(P^2) R / \mathrm{tr}(P)^2 > 1.02` and halved again above 1.1.

    Args:
      M:
        A 2-D weight (a ``[out][in][k]`` convolution weight is viewed as ``[out][in k]``).
      scale:
        Kaldi's orthonormal-constraint value (non-zero).
    Returns:
      False if the matrix was (almost) zero and left alone, True otherwise (on a GPU
      always True: the test runs on the device, so that the host does not wait for it).
    """
    if scale == 0.0:
        raise ValueError("constrain_orthonormal_: scale must be non-zero")
    W = M.reshape(M.shape[0], -1)
    transpose = W.shape[0] > W.shape[1]
    A = W.t() if transpose else W
    P = A @ A.t()
    update_speed = 0.125
    if scale < 0.0 and M.device.type != "cpu":
        # the same rule as below, as tensor arithmetic: no wait for the device
        tr = torch.trace(P).double()
        tr2 = (P * P).sum(dtype=torch.float64)
        ok = tr >= 1.0e-15
        sq_scale = torch.where(ok, tr2 / torch.where(ok, tr, 1.0), 1.0)
        ratio = tr2 * P.shape[0] / torch.where(ok, tr * tr, 1.0)
        speed = update_speed * torch.where(ratio > 1.02, 0.5, 1.0) * \
            torch.where(ratio > 1.1, 0.5, 1.0)
        P.diagonal().sub_(sq_scale.to(P.dtype))
        coef = torch.where(ok, -4.0 * speed / sq_scale, 0.0).to(P.dtype)
        A.add_(coef * (P @ A))
        return True
    if scale < 0.0:
        trace_P = float(torch.trace(P))
        trace_P_P = float((P * P).sum())
        if trace_P < 1.0e-15:
            return False
        scale = math.sqrt(trace_P_P / trace_P)
        ratio = trace_P_P * P.shape[0] / (trace_P * trace_P)
        if ratio > 1.02:
            update_speed *= 0.5
            if ratio > 1.1:
                update_speed *= 0.5
    P.diagonal().sub_(scale * scale)
    alpha = update_speed / (scale * scale)
    A.add_(P @ A, alpha=-4.0 * alpha)  # A is a view of M: updates M in place
    return True


def constrain_orthonormal(model: nn.Module, every: int = 4, step: Optional[int] = None) -> int:
    """Apply :func:`constrain_orthonormal_` to every layer of ``model`` whose
    ``orthonormal_constraint`` is non-zero, on one call in ``every`` (Kaldi draws 1 in 4 at
    random per layer; this is deterministic so that DDP ranks stay identical).
    :class:`pkwrap.optim.NGSGD` already does this in its ``step``; call this function only
    with other optimizers.

    Args:
      model: the model.
      every: apply on calls where ``step % every == 0``.
      step: the step number; default: an internal counter of this model's calls.
    Returns:
      Number of layers constrained.
    """
    if step is None:
        step = getattr(model, "_pkwrap_orth_calls", 0)
        model._pkwrap_orth_calls = step + 1
    if step % every != 0:
        return 0
    n = 0
    for m in model.modules():
        c = getattr(m, "orthonormal_constraint", 0.0)
        if c != 0.0 and isinstance(getattr(m, "weight", None), torch.Tensor):
            n += bool(constrain_orthonormal_(m.weight.data, c))
    return n


def scale_batchnorm_stats(model: nn.Module, scale: float = 0.8) -> None:
    """Scale the statistics of every Kaldi batchnorm (nnet3's BatchNormComponent) of
    ``model`` (nnet3-chain-train does this with 0.8 after every minibatch, so test-mode
    statistics stay recent)."""
    from pkwrap.nnet3.components import BatchNormComponent
    for m in model.modules():
        if isinstance(m, BatchNormComponent):
            m.scale_stats(scale)


def _fused_ok(*ts: Optional[torch.Tensor]) -> bool:
    """Whether the fused C++ kernels apply to these tensors (CPU float32, no autocast, the
    native module present)."""
    if _native() is None or torch.is_autocast_enabled("cpu"):
        return False
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32)
               for t in ts)


@functools.lru_cache(maxsize=None)
def _native():
    """The C++ module with the fused kernels, or None (source tree without a build)."""
    try:
        from pkwrap import _pkwrap
    except ImportError:
        return None
    return _pkwrap if hasattr(_pkwrap, "relu_batchnorm_forward") else None


def _bn_forward(y: torch.Tensor, x: Optional[torch.Tensor], bn, relu: bool,
                scale: float, bmap: Tuple[int, int, int, int, int], row_norms: bool):
    """The fused forward kernel on y ``[..][D]`` (overwritten by the ReLU, so pass a fresh
    layer output) with bypass rows of x per ``bmap`` (B, J, Tx, offset, step); updates bn's
    statistics.  Returns (out, squared norms of out's rows (float64 [N]) or None, mean,
    scale), the last two what :func:`_bn_backward` needs."""
    D = y.shape[-1]
    y2 = y.reshape(-1, D)
    N = y2.shape[0]
    if N < 2:
        raise ValueError(f"BatchNormComponent: training needs at least 2 rows, got {N}")
    out = torch.empty_like(y)
    ssum, ssq, mean, sc, osq = _native().relu_batchnorm_forward(
        y2.numpy(), out.numpy().reshape(N, D), x.numpy() if x is not None else None, bmap,
        float(scale), bool(relu), bn.epsilon, bn.target_rms, torch.get_num_threads(),
        bool(row_norms))
    bn.add_stats(N, torch.from_numpy(ssum), torch.from_numpy(ssq))
    return (out, torch.from_numpy(osq) if row_norms else None, torch.from_numpy(mean),
            torch.from_numpy(sc))


def _bn_backward(g: torch.Tensor, r: torch.Tensor, mean: torch.Tensor, sc: torch.Tensor,
                 bn, relu: bool, scale: float,
                 bmap: Tuple[int, int, int, int, int], x_shape, stats: bool):
    """The fused backward kernel: returns (grad of y, grad of the bypass input (None if
    ``x_shape`` is None), and with ``stats`` (column sums of the grad of y as a float64
    tensor, its squared norm as a float), else None)."""
    D = r.shape[-1]
    g = g.contiguous()
    gy = torch.empty_like(r)
    gx = g.new_empty(x_shape) if x_shape is not None else None
    st = _native().relu_batchnorm_backward(
        g.reshape(-1, D).numpy(), r.reshape(-1, D).numpy(), mean.numpy(), sc.numpy(),
        gy.reshape(-1, D).numpy(), gx.numpy() if gx is not None else None, bmap,
        float(scale), bool(relu), bn.epsilon, bn.target_rms, torch.get_num_threads(),
        bool(stats))
    if st is not None:
        st = (torch.from_numpy(st[0]), float(st[1]))
    return gy, gx, st


def _bypass_map(y_shape, x: Optional[torch.Tensor], bypass) -> Tuple[int, int, int, int, int]:
    """The kernels' (B, J, Tx, offset, step) for output rows ``[B][J]`` reading x's rows
    ``offset + j * step`` (``bypass = (offset, step)``); a dummy without x."""
    if x is None:
        return (1, 1, 1, 0, 1)
    return (y_shape[0], y_shape[1], x.shape[1], bypass[0], bypass[1])


class _ReluBatchNormFunction(torch.autograd.Function):
    """Training-mode ``bn(relu(y)) + scale * x[:, offset::step]`` in the C++ kernels of
    ``csrc/nn/batchnorm.h`` (two passes over the rows forward, two backward, instead of
    one or more per operation).  y ``[..][D]`` is overwritten by the ReLU (callers pass a
    fresh layer output that nothing else keeps); x ``[B][Tx][D]`` or None; ``bypass`` is
    ``(offset, step)`` of the rows of x read for y's frames, or None."""

    @staticmethod
    def forward(ctx, y, x, bn, relu, scale, bypass):
        bmap = _bypass_map(y.shape, x, bypass)
        out, _, mean, sc = _bn_forward(y, x, bn, relu, scale, bmap, False)
        ctx.save_for_backward(y, mean, sc)
        ctx.relu, ctx.scale, ctx.bmap, ctx.bn = relu, scale, bmap, bn
        ctx.x_shape = x.shape if x is not None else None
        return out

    @staticmethod
    def backward(ctx, g):
        r, mean, sc = ctx.saved_tensors
        x_shape = ctx.x_shape if ctx.needs_input_grad[1] else None
        gy, gx, _ = _bn_backward(g, r, mean, sc, ctx.bn, ctx.relu, ctx.scale, ctx.bmap,
                                 x_shape, False)
        return gy, gx, None, None, None, None


class _AffineReluBatchNormFunction(torch.autograd.Function):
    """``bn(relu(x W^T + b)) + scale * bypass rows`` (see :class:`_ReluBatchNormFunction`)
    with a natural-gradient layer's weight and bias, as one autograd node: the batchnorm
    kernel's backward also returns the column sums of the layer's output gradient (its
    plain bias gradient) and that gradient's squared norm (the trace its output
    preconditioner needs), saving two passes over an ``[N][D]`` matrix per layer.  Its
    forward can return the squared norms of the output rows, for the layer reading the
    output next.  x ``[N][in]`` (the spliced input of a TDNN layer)."""

    @staticmethod
    def forward(ctx, x, weight, bias, bypass_x, layer, bn, scale, bmap, row_norms, relu=True):
        y = linear(x, weight, bias)
        out, osq, mean, sc = _bn_forward(y, bypass_x, bn, relu, scale, bmap, row_norms)
        ctx.save_for_backward(x, weight, y, mean, sc)
        ctx.layer, ctx.bn, ctx.scale, ctx.bmap, ctx.relu = layer, bn, scale, bmap, relu
        ctx.has_bias = bias is not None
        ctx.x_shape = bypass_x.shape if bypass_x is not None else None
        if osq is None:
            osq = out.new_empty(0, dtype=torch.float64)
        ctx.mark_non_differentiable(osq)
        return out, osq

    @staticmethod
    def backward(ctx, g, _):
        x, weight, r, mean, sc = ctx.saved_tensors
        layer = ctx.layer
        need_w = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])
        x_shape = ctx.x_shape if ctx.needs_input_grad[3] else None
        gy, gx, st = _bn_backward(g, r, mean, sc, ctx.bn, ctx.relu, ctx.scale, ctx.bmap, x_shape,
                                  need_w)
        grad_x = mm(gy, weight) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if need_w:
            grad_w, grad_b = layer._preconditioned_grads(x, gy, ctx.has_bias, g_sum=st[0],
                                                         g_sqnorm=st[1])
            grad_w = grad_w.to(weight.dtype)
            if grad_b is not None:
                grad_b = grad_b.to(layer.bias.dtype)
        return grad_x, grad_w, grad_b, gx, None, None, None, None, None, None


class _SplicedLinearFunction(torch.autograd.Function):
    r"""TDNN layer on frames spliced at offsets :math:`0 = o_1 < \dots < o_K` (in frames of x)
    without forming the spliced matrix in the forward pass:

    .. math::  y(j) = \sum_k W_k\, x(j + o_k) + b,

    computed as one product of the flat ``[B T][C]`` frames with the K blocks
    :math:`W_k` side by side (``[B T][K out]``; the products at the last o_k frames of each
    sequence are dropped) and K shifted sums.  Used where the input is wider than the
    output (the TDNN-F ``linear`` halves), so the dropped products cost little and the K
    C-wide copies of splicing are saved.  Backward: the input gradient and the weight
    gradient as single products with the K shifted output-gradient blocks side by side
    (natural gradient as in :class:`pkwrap.nn.NaturalAffine`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, layer, offs, frame_sq=None):
        y = spliced_linear(x, weight, offs)
        if bias is not None:
            y.add_(bias)
        ctx.layer = layer
        ctx.offs = offs
        ctx.frame_sq = frame_sq
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        layer, offs = ctx.layer, ctx.offs
        B, T, C = x.shape
        K = len(offs)
        T_out = T - offs[-1]
        N = B * T
        out = weight.shape[0]
        g = g.contiguous()
        grad_x = grad_w = grad_b = None
        # On the flat rows r of x: G[r] = [g(r - o_1), ..., g(r - o_K)] (zero where that
        # output frame does not exist).  Then the input gradient is G [W_1; ..; W_K] and
        # the weight gradient's blocks are G^T X: two products with inner dimension
        # K * out, and no K * C-wide intermediate to combine.
        G = g.new_zeros(B, T, K, out)
        for k, o in enumerate(offs):
            G[:, o:o + T_out, k] = g
        G = G.view(N, K * out)
        if ctx.needs_input_grad[0]:
            Wk = weight.view(out, K, C).transpose(0, 1).reshape(K * out, C)
            grad_x = mm(G, Wk).view(B, T, C)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            gw = mm(G.t(), x.reshape(N, C))  # [K out][C]
            grad_w = gw.view(K, out, C).transpose(0, 1).reshape(out, K * C)
            grad_b = g.reshape(B * T_out, out).sum(0) if ctx.has_bias else None
            if layer.use_natural_gradient:
                Wi, s_in = layer.preconditioner_in.precondition_factors_spliced(
                    x, offs, ones_column=ctx.has_bias, frame_sqnorm=ctx.frame_sq)
                _, Wo, s_out = layer.preconditioner_out.precondition_factors(
                    g.reshape(B * T_out, out))
                grad_w, grad_b = layer._precondition_gradient(grad_w, grad_b, Wi, Wo, s_in,
                                                              s_out)
            grad_w = grad_w.to(weight.dtype)
            if grad_b is not None:
                grad_b = grad_b.to(layer.bias.dtype)
        return grad_x, grad_w, grad_b, None, None, None
