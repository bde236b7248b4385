r"""TDNN-F acoustic models with Kaldi nnet3 semantics (the ``tdnn_1j`` family).

Time-delay layer (Kaldi's ``TdnnComponent``) with time offsets :math:`o_1 < \dots < o_K`:

.. math::

   y(t) = W\,[x(t + o_1); \dots; x(t + o_K)] + b, \qquad W \in \mathbb{R}^{out \times K\,in}

(column blocks of W in the order of the offsets).  Every layer is computed only where its
whole input window exists ("valid" convolution), so a stack of layers with total context
(l, r) maps T input frames to T - l - r output frames, as nnet3 does when the egs carry
exactly the model context.

Factorized layer (TDNN-F, Povey et al., Interspeech 2018) with time stride s:

.. math::

   h = W_1 [x(t-s); x(t)], \quad
   y = \mathrm{BN}(\mathrm{ReLU}(W_2 [h(t); h(t+s)] + b_2)) + \beta\, x(t),

with :math:`W_1` (no bias) kept semi-orthogonal (:func:`constrain_orthonormal_`),
bypass scale :math:`\beta` = 0.66.  Stride 0 means the single offset 0 in both halves.

Batch normalization (Kaldi's ``BatchNormComponent``; no learned scale or offset):

.. math::

   y = \rho\,(x - \mu) / \sqrt{\sigma^2 + \epsilon}, \qquad \epsilon = 10^{-3},

with :math:`\mu, \sigma^2` of the minibatch in training (biased variance, derivatives through
both), and of the accumulated statistics in evaluation mode.  The statistics are sums
(count, sum, sum of squares) that :func:`scale_batchnorm_stats` scales down by 0.8 after
every minibatch, as ``nnet3-chain-train`` does.

Frame subsampling: with ``frame_subsampling_factor`` f = 3, the output is computed only for
input frames l, l + 3, l + 6, ...  The model keeps full frame rate up to the last layer whose
offsets are not all multiples of f, then takes every f-th frame and divides the remaining
offsets by f.  This evaluates exactly the frames Kaldi evaluates.  Input ``[B][T_in][F]``
gives output ``[B][T_out][P]`` with ``T_out = (T_in - l - r - 1) // f + 1`` and output frame
j depends on input frames ``j f .. j f + l + r``.
"""
import functools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pkwrap.ngsgd import linear, mm, spliced_linear
from pkwrap.nn.spec_augment import SpecAugment
from pkwrap.nn.natural import (NaturalAffine, natural_gradient_modules, row_sqnorm,
                                set_row_sqnorm)

__all__ = ["KaldiBatchNorm", "TDNN", "TDNNF", "PrefinalLayer", "TDNNFModel",
           "constrain_orthonormal_", "constrain_orthonormal", "scale_batchnorm_stats",
           "compute_idct_matrix", "delta_features", "relu_batchnorm", "affine_relu_batchnorm",
           "splice"]


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


def splice(x: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """Append frames at the given (sorted, non-empty) offsets, valid frames only.

    Args:
      x:
        ``[B][T][F]``.
      offsets:
        Time offsets in frames of ``x``.
    Returns:
      ``[B][T - (max - min)][K F]``; output frame j is centred on input frame j - min(offsets).
    """
    lo, hi = offsets[0], offsets[-1]
    T_out = x.shape[1] - (hi - lo)
    if T_out <= 0:
        raise ValueError(f"splice: {x.shape[1]} frames are too few for offsets {list(offsets)}")
    if len(offsets) == 1:
        return x
    return torch.cat([x[:, o - lo:o - lo + T_out] for o in offsets], dim=-1)


def delta_features(x: torch.Tensor) -> torch.Tensor:
    """Kaldi's ``delta-layer``: ``[x(t), x(t+1) - x(t-1), x(t-2) + x(t+2) - 2 x(t)]``.

    Args:
      x: ``[B][T][F]``.
    Returns:
      ``[B][T - 4][3 F]`` (2 frames of context on each side).
    """
    T = x.shape[1]
    if T < 5:
        raise ValueError(f"delta_features: need at least 5 frames, got {T}")
    c = x[:, 2:T - 2]
    d1 = x[:, 3:T - 1] - x[:, 1:T - 3]
    d2 = x[:, 0:T - 4] + x[:, 4:T] - 2.0 * c
    return torch.cat([c, d1, d2], dim=-1)


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
    """Scale the statistics of every Kaldi batchnorm of ``model`` (KaldiBatchNorm, nnet3's
    BatchNormComponent; nnet3-chain-train does this with 0.8 after every minibatch, so
    test-mode statistics stay recent)."""
    from pkwrap.nnet3.components import BatchNormComponent
    for m in model.modules():
        if isinstance(m, (KaldiBatchNorm, BatchNormComponent)):
            m.scale_stats(scale)


class KaldiBatchNorm(nn.Module):
    """Kaldi's BatchNormComponent: normalization without affine, with target RMS.

    Args:
      dim:
        Feature dimension (the last axis of the input).
      target_rms:
        Output RMS (Kaldi's target-rms, default 1).
      epsilon:
        Added to the variance (Kaldi: 0.001).

    Buffers ``stats_count`` (scalar), ``stats_sum`` ``[dim]``, ``stats_sumsq`` ``[dim]`` (float64)
    accumulate the training-mode inputs; evaluation mode normalizes with their mean and variance.
    """

    def __init__(self, dim: int, target_rms: float = 1.0, epsilon: float = 1e-3):
        super().__init__()
        if dim <= 0 or target_rms <= 0 or epsilon <= 0:
            raise ValueError(f"KaldiBatchNorm: bad dim={dim}, target_rms={target_rms}, epsilon={epsilon}")
        self.dim = dim
        self.target_rms = float(target_rms)
        self.epsilon = float(epsilon)
        self.register_buffer("stats_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("stats_sum", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("stats_sumsq", torch.zeros(dim, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"KaldiBatchNorm: expected last dim {self.dim}, got {tuple(x.shape)}")
        if self.training and _fused_ok(x):
            return _ReluBatchNormFunction.apply(x.contiguous(), None, self, False, 0.0, None)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain-torch path (any device and dtype; evaluation mode)."""
        rows = x.reshape(-1, self.dim)
        if self.training:
            n = rows.shape[0]
            if n < 2:
                raise ValueError(f"KaldiBatchNorm: training needs at least 2 rows, got {n}")
            # The minibatch mean and (unbiased) variance come out of the normalization pass
            # itself, through running-stat buffers with momentum 1 (no extra pass over x).
            # Kaldi computes them in float too and accumulates in double.
            dt = x.dtype if x.dtype == torch.float64 else torch.float32
            mean = torch.zeros(self.dim, dtype=dt, device=x.device)
            uvar = torch.zeros(self.dim, dtype=dt, device=x.device)
            y = F.batch_norm(rows, mean, uvar, training=True, momentum=1.0, eps=self.epsilon)
            with torch.no_grad():
                m = mean.to(torch.float64)
                v = uvar.to(torch.float64) * ((n - 1) / n)  # biased variance
                self.stats_count += n
                self.stats_sum.add_(m, alpha=n)
                self.stats_sumsq.add_(v + m * m, alpha=n)
            if self.target_rms != 1.0:
                y = y * self.target_rms
            return y.reshape(x.shape)
        if float(self.stats_count) <= 0:
            raise RuntimeError("KaldiBatchNorm: evaluation mode needs statistics; "
                               "run the model in training mode first")
        mean = self.stats_sum / self.stats_count
        var = (self.stats_sumsq / self.stats_count - mean * mean).clamp(min=0.0)
        scale = self.target_rms * (var + self.epsilon).rsqrt()
        return ((rows - mean.to(x.dtype)) * scale.to(x.dtype)).reshape(x.shape)

    @torch.no_grad()
    def add_stats(self, count: int, row_sum: torch.Tensor, row_sumsq: torch.Tensor) -> None:
        """Accumulate ``count`` rows given their sum and sum of squares (float64 ``[dim]``)."""
        self.stats_count += count
        self.stats_sum.add_(row_sum.to(self.stats_sum.device))
        self.stats_sumsq.add_(row_sumsq.to(self.stats_sumsq.device))

    def scale_stats(self, scale: float) -> None:
        """Multiply the accumulated statistics by ``scale`` (0 resets them)."""
        self.stats_count *= scale
        self.stats_sum *= scale
        self.stats_sumsq *= scale

    def set_stats(self, count: float, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Set the statistics from a mean and variance (e.g. a Kaldi model's StatsMean/StatsVar)."""
        mean = torch.as_tensor(mean, dtype=torch.float64)
        var = torch.as_tensor(var, dtype=torch.float64)
        self.stats_count.fill_(float(count))
        self.stats_sum.copy_(mean * count)
        self.stats_sumsq.copy_((var + mean * mean) * count)

    def extra_repr(self) -> str:
        return f"{self.dim}, target_rms={self.target_rms}, epsilon={self.epsilon}"


def _fused_ok(*ts: Optional[torch.Tensor]) -> bool:
    """Whether the C++ kernels of :func:`relu_batchnorm` apply to these tensors (CPU float32,
    no autocast, the native module present)."""
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


def _bn_forward(y: torch.Tensor, x: Optional[torch.Tensor], bn: "KaldiBatchNorm", relu: bool,
                scale: float, bmap: Tuple[int, int, int, int, int], row_norms: bool):
    """The fused forward kernel on y ``[..][D]`` (overwritten by the ReLU, so pass a fresh
    layer output) with bypass rows of x per ``bmap`` (B, J, Tx, offset, step); updates bn's
    statistics.  Returns (out, squared norms of out's rows (float64 [N]) or None, mean,
    scale), the last two what :func:`_bn_backward` needs."""
    D = y.shape[-1]
    y2 = y.reshape(-1, D)
    N = y2.shape[0]
    if N < 2:
        raise ValueError(f"KaldiBatchNorm: training needs at least 2 rows, got {N}")
    out = torch.empty_like(y)
    ssum, ssq, mean, sc, osq = _native().relu_batchnorm_forward(
        y2.numpy(), out.numpy().reshape(N, D), x.numpy() if x is not None else None, bmap,
        float(scale), bool(relu), bn.epsilon, bn.target_rms, torch.get_num_threads(),
        bool(row_norms))
    bn.add_stats(N, torch.from_numpy(ssum), torch.from_numpy(ssq))
    return (out, torch.from_numpy(osq) if row_norms else None, torch.from_numpy(mean),
            torch.from_numpy(sc))


def _bn_backward(g: torch.Tensor, r: torch.Tensor, mean: torch.Tensor, sc: torch.Tensor,
                 bn: "KaldiBatchNorm", relu: bool, scale: float,
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


def _check_bypass(y_shape, x: torch.Tensor, c: int, pick) -> Tuple[int, int]:
    """(offset, step) of the rows of x ``[B][T][D]`` that the bypass adds to the output
    frames ``[B][J]`` (``x[:, c:T-c][:, j0::f]`` with ``pick = (j0, f)``), or ValueError."""
    bypass = (c + (pick[0] if pick is not None else 0), pick[1] if pick is not None else 1)
    if (x.dim() != 3 or x.shape[0] != y_shape[0] or x.shape[-1] != y_shape[-1] or
            len(range(bypass[0], x.shape[1] - c, bypass[1])) != y_shape[1]):
        raise ValueError(f"relu_batchnorm: bypass input {tuple(x.shape)} does not match "
                         f"{tuple(y_shape)} (c={c}, pick={pick})")
    return bypass


def affine_relu_batchnorm(x: torch.Tensor, affine: NaturalAffine, bn: "KaldiBatchNorm",
                          bypass: Optional[torch.Tensor] = None, c: int = 0,
                          bypass_scale: float = 0.0, pick: Optional[Tuple[int, int]] = None,
                          row_norms: bool = False) -> torch.Tensor:
    """``relu_batchnorm(x W^T + b, bn, bypass, c, bypass_scale, pick)`` with the weight and
    bias of ``affine`` (a :class:`TDNN`'s on its spliced rows: x ``[B][J][in_features]`` are
    the rows the map reads), in training on CPU float32 as one fused autograd node
    (:class:`_AffineReluBatchNormFunction`), elsewhere as the separate modules.

    With ``row_norms`` the fused path attaches the squared norms of the output frames to
    the output (:func:`pkwrap.nn.natural.set_row_sqnorm`) for the next layer's input
    preconditioner.
    """
    if bypass is not None and bypass_scale == 0.0:
        bypass = None
    w, b = affine.weight, affine.bias
    fused = (bn.training and torch.is_grad_enabled() and w.requires_grad and
             _fused_ok(x, bypass, w, b) and w.shape[0] == bn.dim and x.dim() == 3)
    if not fused:
        return relu_batchnorm(NaturalAffine.forward(affine, x), bn, bypass, c, bypass_scale,
                              pick)
    affine._register_owner()
    B, J = x.shape[0], x.shape[1]
    bmap = _bypass_map((B, J), bypass, None if bypass is None else
                       _check_bypass((B, J, bn.dim), bypass, c, pick))
    if bypass is not None:
        bypass = bypass.contiguous()
    out, osq = _AffineReluBatchNormFunction.apply(
        x.reshape(B * J, x.shape[-1]).contiguous(), w, b, bypass, affine, bn,
        float(bypass_scale), bmap, bool(row_norms))
    out = out.view(B, J, bn.dim)
    if row_norms:
        set_row_sqnorm(out, osq.view(B, J))
    return out


def relu_batchnorm(y: torch.Tensor, bn: "KaldiBatchNorm", x: Optional[torch.Tensor] = None,
                   c: int = 0, bypass_scale: float = 0.0,
                   pick: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """``bn(relu(y))``, plus ``bypass_scale * x[:, c:T-c]`` (its frames ``pick = (j0, f)``:
    j0, j0 + f, ... when given) if x is given: the elementwise tail of a TDNN-F layer.

    In training mode on CPU float32 this runs as one fused C++ operation that overwrites y
    with relu(y) (pass only a fresh layer output); elsewhere as separate torch operations.
    """
    if x is not None and bypass_scale == 0.0:
        x = None
    if bn.training and _fused_ok(y, x) and y.dim() == 3 and y.shape[-1] == bn.dim:
        bypass = None
        if x is not None:
            bypass = _check_bypass(y.shape, x, c, pick)
            x = x.contiguous()
        return _ReluBatchNormFunction.apply(y.contiguous(), x, bn, True, bypass_scale, bypass)
    out = bn(torch.relu(y))
    if x is not None:
        out = _BypassAddFunction.apply(out, x, c, bypass_scale, pick)
    return out


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


class _BypassAddFunction(torch.autograd.Function):
    """``y + scale * x[:, c:T-c][:, j0::f]`` (the TDNN-F bypass) in one pass; the backward
    writes ``scale * g`` into a fresh gradient of x and zeroes only the frames the bypass
    does not read."""

    @staticmethod
    def forward(ctx, y, x, c, scale, pick):
        T = x.shape[1]
        xs = x[:, c:T - c]
        if pick is not None:
            xs = xs[:, pick[0]::pick[1]]
        ctx.c, ctx.scale, ctx.pick, ctx.x_shape = c, scale, pick, x.shape
        return torch.add(y, xs, alpha=scale)

    @staticmethod
    def backward(ctx, g):
        c, scale, pick = ctx.c, ctx.scale, ctx.pick
        gx = None
        if ctx.needs_input_grad[1]:
            T = ctx.x_shape[1]
            if pick is None:
                gx = g.new_empty(ctx.x_shape)
                gx[:, :c].zero_()
                gx[:, T - c:].zero_()
                torch.mul(g, scale, out=gx[:, c:T - c])
            else:
                gx = g.new_zeros(ctx.x_shape)
                gx[:, c:T - c][:, pick[0]::pick[1]] = g * scale
        return g, gx, None, None, None


class TDNN(NaturalAffine):
    """Kaldi's TdnnComponent: an affine map of frames spliced at fixed time offsets.

    Args:
      in_dim:
        Input dimension per frame.
      out_dim:
        Output dimension.
      time_offsets:
        Sorted offsets in input frames, e.g. ``(-1, 0)``; the weight is
        ``[out_dim][len(time_offsets) * in_dim]``.
      bias:
        Whether there is a bias (Kaldi's use-bias).
      **kwargs:
        Natural-gradient and update settings of :class:`NaturalAffine` (rank_in defaults to
        ``min(20, (len(offsets) * in_dim + 1) // 2)`` as in Kaldi).

    ``forward(x, rate=1)``: x ``[B][T][in_dim]`` -> ``[B][T - span / rate][out_dim]``, where
    ``rate`` is the frame subsampling already applied to x (offsets must be multiples of it).
    """

    def __init__(self, in_dim: int, out_dim: int, time_offsets: Sequence[int] = (0,),
                 bias: bool = True, **kwargs):
        offs = [int(o) for o in time_offsets]
        if not offs or sorted(set(offs)) != offs:
            raise ValueError(f"TDNN: time_offsets must be sorted and distinct, got {time_offsets}")
        self.in_dim = in_dim
        self.time_offsets = tuple(offs)
        super().__init__(in_dim * len(offs), out_dim, bias=bias, **kwargs)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, self.in_features ** -0.5)
            if self.bias is not None:
                self.bias.normal_(0.0, 1.0)

    @property
    def context(self) -> Tuple[int, int]:
        return -self.time_offsets[0], self.time_offsets[-1]

    def _relative_offsets(self, rate: int) -> Tuple[int, ...]:
        """The offsets in frames of an input at frame rate ``rate``, the first made 0."""
        offs = self.time_offsets
        if any(o % rate for o in offs):
            raise ValueError(f"TDNN: offsets {offs} are not multiples of the frame rate {rate}")
        return tuple((o - offs[0]) // rate for o in offs)

    def _spliced_product(self, x: torch.Tensor, rate: int,
                         pick: Optional[Tuple[int, int]]) -> bool:
        """Whether :meth:`forward` uses :class:`_SplicedLinearFunction` (no spliced copy)."""
        rel = self._relative_offsets(rate)
        return (pick is None and len(rel) > 1 and self.in_dim >= self.out_features
                and x.dim() == 3 and x.dtype == torch.float32
                and self.weight.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.is_autocast_enabled("cpu") and x.shape[1] > rel[-1])

    def spliced_input(self, x: torch.Tensor, rate: int = 1,
                      pick: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The rows the affine map reads: x's frames spliced at the offsets
        ``[B][J][K in_dim]`` (only output positions j0, j0 + f, ... with ``pick``)."""
        spliced = splice(x, self._relative_offsets(rate))
        if pick is not None:
            spliced = spliced[:, pick[0]::pick[1]]
        return spliced

    def forward(self, x: torch.Tensor, rate: int = 1,
                pick: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """x ``[B][T][in_dim]`` at frame rate ``rate``; ``pick = (j0, f)`` computes only output
        positions j0, j0 + f, ... (frame subsampling inside the layer, as nnet3 does)."""
        if self._spliced_product(x, rate, pick):
            if torch.is_grad_enabled() and self.weight.requires_grad:
                self._register_owner()
            return _SplicedLinearFunction.apply(x.contiguous(), self.weight, self.bias, self,
                                                self._relative_offsets(rate), row_sqnorm(x))
        return super().forward(self.spliced_input(x, rate, pick))

    def extra_repr(self) -> str:
        return f"time_offsets={self.time_offsets}, " + super().extra_repr()


class TDNNF(nn.Module):
    """One factorized TDNN layer (Kaldi's ``tdnnf-layer``).

    Args:
      dim:
        Input and output dimension.
      bottleneck_dim:
        Dimension of the semi-orthogonal linear bottleneck.
      time_stride:
        s: offsets (-s, 0) for ``linear`` and (0, s) for ``affine``; 0 gives (0,) and (0,).
      bypass_scale:
        Scale of the residual input (0.66 in tdnn_1j).
      l2_regularize:
        Kaldi's l2-regularize of both halves.
      max_change:
        Per-component max-change of both halves.

    Submodules: ``linear`` (TDNN, no bias, orthonormal_constraint -1), ``affine`` (TDNN),
    ``batchnorm`` (KaldiBatchNorm).
    """

    def __init__(self, dim: int, bottleneck_dim: int, time_stride: int = 1,
                 bypass_scale: float = 0.66, l2_regularize: float = 0.0, max_change: float = 0.75):
        super().__init__()
        s = int(time_stride)
        if s < 0:
            raise ValueError(f"TDNNF: time_stride must be >= 0, got {time_stride}")
        self.time_stride = s
        self.bypass_scale = float(bypass_scale)
        self.linear = TDNN(dim, bottleneck_dim, (-s, 0) if s else (0,), bias=False,
                           orthonormal_constraint=-1.0, l2_regularize=l2_regularize,
                           max_change=max_change)
        self.affine = TDNN(bottleneck_dim, dim, (0, s) if s else (0,),
                           l2_regularize=l2_regularize, max_change=max_change)
        self.batchnorm = KaldiBatchNorm(dim)

    @property
    def context(self) -> Tuple[int, int]:
        return self.time_stride, self.time_stride

    def forward(self, x: torch.Tensor, rate: int = 1,
                pick: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """x ``[B][T][dim]`` at frame rate ``rate`` -> ``[B][T - 2 s / rate][dim]``; with
        ``pick = (j0, f)`` only output positions j0, j0 + f, ... are computed."""
        if self.time_stride % rate:
            raise ValueError(f"TDNNF: stride {self.time_stride} is not a multiple of rate {rate}")
        s = self.time_stride // rate
        if pick is not None and 0 < s < pick[1]:
            rows = self._picked_linear_rows(x, s, pick)
            h = NaturalAffine.forward(self.linear, rows)
            h = h.view(h.shape[0], -1, 2 * h.shape[-1])
        else:
            h = self.affine.spliced_input(self.linear(x, rate), rate, pick)
        return affine_relu_batchnorm(h, self.affine, self.batchnorm, x, s, self.bypass_scale,
                                     pick, row_norms=True)

    @staticmethod
    def _picked_linear_rows(x: torch.Tensor, s: int, pick: Tuple[int, int]) -> torch.Tensor:
        """The spliced input rows of ``linear`` at only the frames the picked outputs read.

        Output j reads the linear outputs at j and j + s, which read input frames (j, j + s)
        and (j + s, j + 2 s).  For j = j0, j0 + f, ... with s < f these pairs are distinct,
        so, as nnet3 does, ``linear`` is evaluated at 2 of every f frames only (and its
        natural-gradient statistics see just those rows).  Returns ``[B][2 J][2 D]``, the
        rows of output j at 2 i and 2 i + 1, whose products viewed as ``[B][J][2 out]``
        are the affine half's spliced input.
        """
        j0, f = pick
        B, T, D = x.shape
        J = len(range(j0, T - 2 * s, f))
        if J <= 0:
            raise ValueError(f"TDNNF: {T} frames are too few for stride {s} and pick {pick}")
        rows = _PickedPairsFunction.apply(x, j0, s, f, J)
        fq = row_sqnorm(x)
        if fq is not None:  # the rows' squared norms from the frames'
            fa, fb, fc = (fq[:, j0 + k * s::f][:, :J] for k in range(3))
            set_row_sqnorm(rows, torch.stack((fa + fb, fb + fc), dim=2).view(B, 2 * J))
        return rows


class _PickedPairsFunction(torch.autograd.Function):
    """Rows ``[x(j), x(j + s)]`` and ``[x(j + s), x(j + 2 s)]`` for j = j0 + f i, i < J
    (x ``[B][T][D]`` -> ``[B][2 J][2 D]``), with a backward that writes each frame's
    gradient once (slicing and concatenating in autograd would zero-fill and add a
    ``[B][T][D]`` gradient per slice)."""

    @staticmethod
    def forward(ctx, x, j0, s, f, J):
        B, T, D = x.shape
        frames = [x[:, j0 + k * s::f][:, :J] for k in range(3)]
        rows = torch.cat((frames[0], frames[1], frames[1], frames[2]), dim=-1)
        ctx.meta = (x.shape, j0, s, f, J)
        return rows.view(B, 2 * J, 2 * D)

    @staticmethod
    def backward(ctx, g):
        (B, T, D), j0, s, f, J = ctx.meta
        g = g.reshape(B, J, 4 * D)
        gx = g.new_zeros(B, T, D)
        gx[:, j0::f][:, :J].copy_(g[..., :D])
        torch.add(g[..., D:2 * D], g[..., 2 * D:3 * D], out=gx[:, j0 + s::f][:, :J])
        gx[:, j0 + 2 * s::f][:, :J].add_(g[..., 3 * D:])
        return gx, None, None, None, None


class PrefinalLayer(nn.Module):
    """Kaldi's ``prefinal-layer``: affine -> ReLU -> batchnorm1 -> linear (semi-orthogonal) -> batchnorm2.

    Args:
      in_dim: input dimension (small-dim of the previous linear layer).
      big_dim: dimension after the affine layer.
      small_dim: output dimension.
      l2_regularize, max_change: per-component settings of both linear maps.
    """

    def __init__(self, in_dim: int, big_dim: int, small_dim: int, l2_regularize: float = 0.0,
                 max_change: float = 0.75):
        super().__init__()
        self.affine = NaturalAffine(in_dim, big_dim, l2_regularize=l2_regularize,
                                    max_change=max_change)
        self.batchnorm1 = KaldiBatchNorm(big_dim)
        self.linear = NaturalAffine(big_dim, small_dim, bias=False, orthonormal_constraint=-1.0,
                                    l2_regularize=l2_regularize, max_change=max_change)
        self.batchnorm2 = KaldiBatchNorm(small_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = affine_relu_batchnorm(x, self.affine, self.batchnorm1, row_norms=True)
        return self.batchnorm2(self.linear(h))


class TDNNFModel(nn.Module):
    """A TDNN-F chain model like Kaldi's mini_librispeech ``tdnn_1j`` (without i-vectors).

    input -> [idct] -> batchnorm0 -> [delta (+-2 frames) -> batchnorm] -> tdnn1 (affine, ReLU,
    batchnorm) -> ``num_tdnnf`` TDNN-F layers -> prefinal_l (semi-orthogonal linear) -> two heads:
    prefinal_chain -> output (chain, no softmax) and prefinal_xent -> output_xent -> log-softmax.

    Args:
      num_pdfs:
        Output dimension P (number of pdf-ids).
      feat_dim:
        Input feature dimension F (40 MFCCs in 1j).
      tdnn_dim:
        Output dimension of tdnn1.
      tdnnf_dim:
        Dimension of the TDNN-F layers.
      bottleneck_dim:
        Bottleneck of the TDNN-F layers.
      time_strides:
        One time stride per TDNN-F layer (1j: 1,1,1,0,3,3,3,3,3,3,3,3); its length is the
        number of TDNN-F layers.
      prefinal_dim:
        small-dim of prefinal_l and the prefinal layers (1j: 192).
      prefinal_big_dim:
        big-dim of the prefinal layers (1j: 768).
      bypass_scale:
        TDNN-F bypass scale (0.66).
      frame_subsampling_factor:
        Output frame rate divisor f (3 for chain models).
      use_idct:
        Start with Kaldi's fixed idct-layer (lifter 22); needs MFCC input.
      use_delta:
        Append delta and delta-delta features (Kaldi's delta-layer) after batchnorm0.
      l2_regularize:
        Per-layer l2 of the hidden layers (0.03 in 1j); output layers get half of it.
      xent_head:
        Build the xent head (``prefinal_xent``, ``output_xent``, learning-rate factor 5).

      spec_augment:
        Keyword arguments of :class:`pkwrap.nn.spec_augment.SpecAugment` (Kaldi's
        ``spec-augment-layer``), applied after batchnorm0 in training only; None: none.

    Not included: the ReLU self-repair term (it changes only training, not the network
    function).

    :meth:`nnet3_config` gives the network as Kaldi nnet3 config lines and :meth:`to_nnet3`
    the equivalent :class:`pkwrap.nnet3.Nnet3` (same parameters; in training it computes the
    same frames with the same fused kernels; tests/test_nnet3_plan.py).

    Attributes ``left_context``, ``right_context`` (input frames needed on each side) and
    ``frame_subsampling_factor``.  ``forward(x)`` with x ``[B][T_in][F]`` returns
    ``(chain [B][T_out][P], xent log-softmax [B][T_out][P] or None)``; see the module docstring
    for T_out.
    """

    def __init__(self, num_pdfs: int, feat_dim: int = 40, tdnn_dim: int = 768,
                 tdnnf_dim: int = 768, bottleneck_dim: int = 96,
                 time_strides: Sequence[int] = (1, 1, 1, 0, 3, 3, 3, 3, 3, 3, 3, 3),
                 prefinal_dim: int = 192, prefinal_big_dim: int = 768,
                 bypass_scale: float = 0.66, frame_subsampling_factor: int = 3,
                 use_idct: bool = True, use_delta: bool = True, l2_regularize: float = 0.03,
                 xent_head: bool = True, spec_augment: Optional[Dict] = None):
        super().__init__()
        if num_pdfs <= 0 or feat_dim <= 0:
            raise ValueError(f"TDNNFModel: bad num_pdfs={num_pdfs} or feat_dim={feat_dim}")
        if frame_subsampling_factor < 1:
            raise ValueError("TDNNFModel: frame_subsampling_factor must be >= 1")
        self.num_pdfs = num_pdfs
        self.feat_dim = feat_dim
        self.frame_subsampling_factor = int(frame_subsampling_factor)
        self.use_idct = use_idct
        self.use_delta = use_delta
        if use_idct:
            self.register_buffer("idct", compute_idct_matrix(feat_dim, 22.0))
        self.batchnorm0 = KaldiBatchNorm(feat_dim)
        self.spec_augment = SpecAugment(**spec_augment) if spec_augment else None
        in_dim = feat_dim
        if use_delta:
            in_dim = 3 * feat_dim
            self.delta_batchnorm = KaldiBatchNorm(in_dim)
        self.tdnn1 = NaturalAffine(in_dim, tdnn_dim, l2_regularize=l2_regularize)
        self.tdnn1_batchnorm = KaldiBatchNorm(tdnn_dim)
        if tdnn_dim != tdnnf_dim and len(time_strides) > 0 and bypass_scale != 0:
            raise ValueError("TDNNFModel: tdnn_dim must equal tdnnf_dim when there is a bypass")
        self.tdnnfs = nn.ModuleList(
            TDNNF(tdnnf_dim, bottleneck_dim, s, bypass_scale, l2_regularize)
            for s in time_strides)
        last_dim = tdnnf_dim if len(time_strides) else tdnn_dim
        self.prefinal_l = NaturalAffine(last_dim, prefinal_dim, bias=False,
                                        orthonormal_constraint=-1.0, l2_regularize=l2_regularize)
        self.prefinal_chain = PrefinalLayer(prefinal_dim, prefinal_big_dim, prefinal_dim,
                                            l2_regularize)
        self.output = NaturalAffine(prefinal_dim, num_pdfs, max_change=1.5,
                                    l2_regularize=l2_regularize / 2)
        self.xent_head = xent_head
        if xent_head:
            self.prefinal_xent = PrefinalLayer(prefinal_dim, prefinal_big_dim, prefinal_dim,
                                               l2_regularize)
            self.output_xent = NaturalAffine(prefinal_dim, num_pdfs, max_change=1.5,
                                             l2_regularize=l2_regularize / 2,
                                             learning_rate_factor=5.0)
        with torch.no_grad():  # Kaldi: param-stddev=0 bias-stddev=0 for output layers
            for m in [self.output] + ([self.output_xent] if xent_head else []):
                m.weight.zero_()
                m.bias.zero_()
        f = self.frame_subsampling_factor
        strides = [int(s) for s in time_strides]
        # nnet3 evaluates each layer only at the frames the outputs need.  Everything after the
        # last operation with offsets that are not multiples of f runs at 1/f of the frame rate;
        # that operation itself (the affine half of the last such TDNN-F layer, else the delta
        # layer, else the input) is computed only at the needed frames.
        fine = [i for i, s in enumerate(strides) if s % f]
        self._last_fine_layer = fine[-1] if (fine and f > 1) else -1
        self.left_context = (2 if use_delta else 0) + sum(strides)
        self.right_context = self.left_context

    @classmethod
    def tdnn_1j(cls, num_pdfs: int, feat_dim: int = 40) -> "TDNNFModel":
        """Kaldi's mini_librispeech tdnn_1j network without i-vectors (5,024,134 parameters
        for 2051 pdfs, context 29/29)."""
        return cls(num_pdfs, feat_dim=feat_dim)

    # ------------------------------------------------------------------ as an nnet3 graph
    def nnet3_config(self) -> str:
        """This network as Kaldi nnet3 config lines, as ``xconfig_to_configs.py`` expands
        the tdnn_1j xconfig (component and node names as in Kaldi's ``final.config``:
        ``tdnn1.affine``, ``tdnnf2.linear``, ``tdnnf2.noop``, ``prefinal-chain.linear``, ...);
        ``pkwrap.nnet3.nnet3_from_config`` builds it (with random parameters;
        :meth:`to_nnet3` copies this model's). SpecAugment is included when the model has it.
        """
        F_, L = self.feat_dim, []
        comp = L.append

        def ng(name, typ, i, o, extra=""):
            comp("component name=%s type=%s input-dim=%d output-dim=%d%s"
                 % (name, typ, i, o, extra))

        def node(name, inp):
            comp("component-node name=%s component=%s input=%s" % (name, name, inp))

        def opts(m):
            out = " max-change=%g l2-regularize=%g" % (m.max_change, m.l2_regularize)
            if m.learning_rate_factor != 1.0:
                out += " learning-rate-factor=%g" % m.learning_rate_factor
            if m.orthonormal_constraint != 0.0:
                out += " orthonormal-constraint=%g" % m.orthonormal_constraint
            return out

        def bn(name, b, inp):
            comp("component name=%s type=BatchNormComponent dim=%d target-rms=%g epsilon=%g"
                 % (name, b.dim, b.target_rms, b.epsilon))
            node(name, inp)

        comp("input-node name=input dim=%d" % F_)
        prev = "input"
        if self.use_idct:
            comp("component name=idct type=FixedAffineComponent input-dim=%d output-dim=%d"
                 % (F_, F_))
            node("idct", prev)
            prev = "idct"
        bn("batchnorm0", self.batchnorm0, prev)
        prev = "batchnorm0"
        sa = self.spec_augment
        if sa is not None:
            comp("component name=spec-augment.freq-mask type=GeneralDropoutComponent dim=%d "
                 "specaugment-max-proportion=%g%s" % (
                     F_, sa.freq_max_proportion, " specaugment-max-regions=%d"
                     % sa.freq_max_regions if sa.freq_max_regions > 1 else ""))
            node("spec-augment.freq-mask", prev)
            comp("component name=spec-augment.time-mask type=SpecAugmentTimeMaskComponent "
                 "dim=%d zeroed-proportion=%g time-mask-max-frames=%d"
                 % (F_, sa.time_zeroed_proportion, sa.time_mask_max_frames))
            node("spec-augment.time-mask", "spec-augment.freq-mask")
            prev = "spec-augment.time-mask"
        in_dim = F_
        if self.use_delta:
            for k in (1, 2):
                comp("dim-range-node name=%s_copy%d input-node=%s dim=%d dim-offset=0"
                     % (prev, k, prev, F_))
            comp("component name=%s_2 type=NoOpComponent dim=%d" % (prev, 3 * F_))
            node("%s_2" % prev, "Append(%s, Sum(Offset(Scale(-1.0, %s_copy1), -1), "
                 "Offset(%s, 1)), Sum(Offset(%s, -2), Sum(Offset(%s, 2), "
                 "Scale(-2.0, %s_copy2))))" % ((prev,) * 6))
            comp("component name=delta type=BatchNormComponent dim=%d target-rms=%g "
                 "epsilon=%g" % (3 * F_, self.delta_batchnorm.target_rms,
                                 self.delta_batchnorm.epsilon))
            comp("component-node name=delta component=delta input=%s_2" % prev)
            prev, in_dim = "delta", 3 * F_
        t1 = self.tdnn1
        ng("tdnn1.affine", "NaturalGradientAffineComponent", in_dim, t1.out_features, opts(t1))
        node("tdnn1.affine", prev)
        comp("component name=tdnn1.relu type=RectifiedLinearComponent dim=%d"
             % t1.out_features)
        node("tdnn1.relu", "tdnn1.affine")
        bn("tdnn1.batchnorm", self.tdnn1_batchnorm, "tdnn1.relu")
        prev = "tdnn1.batchnorm"
        for i, layer in enumerate(self.tdnnfs):
            n = "tdnnf%d" % (i + 2)
            lin, aff = layer.linear, layer.affine
            ng(n + ".linear", "TdnnComponent", lin.in_dim, lin.out_features,
               opts(lin) + " use-bias=false time-offsets=%s"
               % ",".join(str(o) for o in lin.time_offsets))
            node(n + ".linear", prev)
            ng(n + ".affine", "TdnnComponent", aff.in_dim, aff.out_features,
               opts(aff) + " time-offsets=%s" % ",".join(str(o) for o in aff.time_offsets))
            node(n + ".affine", n + ".linear")
            comp("component name=%s.relu type=RectifiedLinearComponent dim=%d"
                 % (n, aff.out_features))
            node(n + ".relu", n + ".affine")
            bn(n + ".batchnorm", layer.batchnorm, n + ".relu")
            comp("component name=%s.noop type=NoOpComponent dim=%d" % (n, aff.out_features))
            node(n + ".noop", "Sum(Scale(%g, %s), %s.batchnorm)"
                 % (layer.bypass_scale, prev, n) if layer.bypass_scale != 0
                 else n + ".batchnorm")
            prev = n + ".noop"
        pl = self.prefinal_l
        ng("prefinal-l", "LinearComponent", pl.in_features, pl.out_features, opts(pl))
        node("prefinal-l", prev)
        heads = [("prefinal-chain", "output", self.prefinal_chain, self.output)]
        if self.xent_head:
            heads.append(("prefinal-xent", "output-xent", self.prefinal_xent,
                          self.output_xent))
        for pre, out, layer, o in heads:
            a, li = layer.affine, layer.linear
            ng(pre + ".affine", "NaturalGradientAffineComponent", a.in_features,
               a.out_features, opts(a))
            node(pre + ".affine", "prefinal-l")
            comp("component name=%s.relu type=RectifiedLinearComponent dim=%d"
                 % (pre, a.out_features))
            node(pre + ".relu", pre + ".affine")
            bn(pre + ".batchnorm1", layer.batchnorm1, pre + ".relu")
            ng(pre + ".linear", "LinearComponent", li.in_features, li.out_features, opts(li))
            node(pre + ".linear", pre + ".batchnorm1")
            bn(pre + ".batchnorm2", layer.batchnorm2, pre + ".linear")
            ng(out + ".affine", "NaturalGradientAffineComponent", o.in_features,
               o.out_features, opts(o) + " param-stddev=0.0 bias-stddev=0.0")
            node(out + ".affine", pre + ".batchnorm2")
            if out == "output-xent":
                comp("component name=output-xent.log-softmax type=LogSoftmaxComponent dim=%d"
                     % o.out_features)
                node("output-xent.log-softmax", "output-xent.affine")
                comp("output-node name=output-xent input=output-xent.log-softmax "
                     "objective=linear")
            else:
                comp("output-node name=output input=output.affine objective=linear")
        return "\n".join(L) + "\n"

    def nnet3_layers(self) -> List[Tuple[str, nn.Module]]:
        """(component name in :meth:`nnet3_config`, this model's module) for every layer
        with parameters or statistics (``idct`` maps to the buffer's holder, the model)."""
        out: List[Tuple[str, nn.Module]] = []
        out.append(("batchnorm0", self.batchnorm0))
        if self.use_delta:
            out.append(("delta", self.delta_batchnorm))
        out += [("tdnn1.affine", self.tdnn1), ("tdnn1.batchnorm", self.tdnn1_batchnorm)]
        for i, layer in enumerate(self.tdnnfs):
            n = "tdnnf%d" % (i + 2)
            out += [(n + ".linear", layer.linear), (n + ".affine", layer.affine),
                    (n + ".batchnorm", layer.batchnorm)]
        out.append(("prefinal-l", self.prefinal_l))
        heads = [("prefinal-chain", "output", self.prefinal_chain, self.output)]
        if self.xent_head:
            heads.append(("prefinal-xent", "output-xent", self.prefinal_xent,
                          self.output_xent))
        for pre, o, layer, ol in heads:
            out += [(pre + ".affine", layer.affine), (pre + ".batchnorm1", layer.batchnorm1),
                    (pre + ".linear", layer.linear), (pre + ".batchnorm2", layer.batchnorm2),
                    (o + ".affine", ol)]
        return out

    def to_nnet3(self):
        """The same network as a :class:`pkwrap.nnet3.Nnet3` (:meth:`nnet3_config`) with
        this model's parameters and batchnorm statistics (copies), and its frame
        subsampling factor; it computes what this model computes, in training too (the
        same frames, the same fused kernels)."""
        from pkwrap.nnet3.nnet import nnet3_from_config
        net = nnet3_from_config(self.nnet3_config(), name="<TDNNFModel>")
        net.frame_subsampling_factor = self.frame_subsampling_factor
        with torch.no_grad():
            if self.use_idct:
                c = net.component("idct")
                c.weight.copy_(self.idct)
                c.bias.zero_()
            for name, m in self.nnet3_layers():
                c = net.component(name)
                if isinstance(m, KaldiBatchNorm):
                    n = float(m.stats_count)
                    mean = m.stats_sum / n if n > 0 else torch.zeros_like(m.stats_sum)
                    var = m.stats_sumsq / n - mean * mean if n > 0 else mean
                    c.count.fill_(n)
                    c.stats_mean.copy_(mean)
                    c.stats_var.copy_(var)
                else:
                    c.weight.copy_(m.weight)
                    if m.bias is not None:
                        c.bias.copy_(m.bias)
        return net.train(self.training)

    def num_output_frames(self, num_input_frames: int) -> int:
        """T_out for an input of ``num_input_frames`` frames."""
        n = num_input_frames - self.left_context - self.right_context
        if n <= 0:
            return 0
        return (n - 1) // self.frame_subsampling_factor + 1

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if x.dim() != 3 or x.shape[-1] != self.feat_dim:
            raise ValueError(f"TDNNFModel: expected input [B][T][{self.feat_dim}], got {tuple(x.shape)}")
        if x.shape[1] <= self.left_context + self.right_context:
            raise ValueError(f"TDNNFModel: {x.shape[1]} input frames, need more than "
                             f"{self.left_context + self.right_context} (left + right context)")
        f = self.frame_subsampling_factor
        # 'first': the frame (relative to the first output frame) at position 0 of x
        first = -self.left_context
        rate = 1
        coarse_from_start = f > 1 and self._last_fine_layer < 0
        if self.use_idct:
            x = x @ self.idct.t()
        if coarse_from_start and not self.use_delta:
            x, first, rate = x[:, (-first) % f::f], (first + (-first) % f) // f, f
        x = self.batchnorm0(x)
        if self.spec_augment is not None:
            x = self.spec_augment(x)  # identity in eval mode
        if self.use_delta:
            x = delta_features(x)
            first += 2
            if coarse_from_start:
                x, first, rate = x[:, (-first) % f::f], (first + (-first) % f) // f, f
            x = self.delta_batchnorm(x)
        x = affine_relu_batchnorm(x, self.tdnn1, self.tdnn1_batchnorm, row_norms=True)
        for i, layer in enumerate(self.tdnnfs):
            if i == self._last_fine_layer:
                j0 = (-(first + layer.time_stride)) % f
                x = layer(x, 1, (j0, f))
                first, rate = (first + layer.time_stride + j0) // f, f
            else:
                x = layer(x, rate)
                first += layer.time_stride // rate
        x = self.prefinal_l(x)
        chain = self.output(self.prefinal_chain(x))
        xent = None
        if self.xent_head:
            xent = F.log_softmax(self.output_xent(self.prefinal_xent(x)), dim=-1)
        return chain, xent
