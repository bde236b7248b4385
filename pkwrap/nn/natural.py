r"""Natural-gradient affine layers: Kaldi's NaturalGradientAffineComponent for torch.

For an affine layer :math:`y = W x + b` and a minibatch of N rows, the plain gradient of
the weights is :math:`\nabla_W = G^T X` (G: ``[N][out]`` derivatives w.r.t. y, X:
``[N][in]`` inputs).  Kaldi's NG-SGD replaces both factors by their preconditioned
versions before forming the product (see :mod:`pkwrap.ngsgd`):

.. math::

   \tilde X, \gamma_{in} = \mathrm{precondition}_{in}([X\; \mathbf{1}]), \qquad
   \tilde G, \gamma_{out} = \mathrm{precondition}_{out}(G),

.. math::

   \nabla_W \leftarrow \gamma_{in}\gamma_{out}\, \tilde G^T \tilde X_{:, :in}, \qquad
   \nabla_b \leftarrow \gamma_{in}\gamma_{out}\, \tilde G^T \tilde X_{:, in}.

Both preconditioners multiply the rows by a fixed matrix, :math:`P = I - W^T W`, so the
product is formed as :math:`\gamma_{in}\gamma_{out} P_{out} (G^T X) P_{in}`: the plain
gradient times two skinny corrections, at a cost that does not grow with N (the
preconditioners still read every row for their statistics).
The bias goes through the appended column of ones, as in Kaldi, so the input
preconditioner works in dimension in + 1.  The derivative passed back to the layer
below is the plain :math:`G W`.  Kaldi's ranks: ``rank_in = min(20, (in + 1) // 2)`` and
``rank_out = min(80, (out + 1) // 2)``; update period 4, 2000 samples of history, alpha 4.

:class:`NaturalAffine` and :class:`NaturalConv1d` are subclasses of ``nn.Linear`` and
``nn.Conv1d`` with the same parameters (``weight``, ``bias``), so their ``state_dict`` keys are
unchanged, and :func:`natural_gradient` converts an existing model in place.  A
convolution is an affine map of its unfolded input patches, which is how Kaldi's
``TdnnComponent`` preconditions its spliced input.

Preconditioning happens only when the gradient of the weight is needed (training).  The
preconditioner state is not in the module ``state_dict`` (which must stay unchanged); the
:class:`pkwrap.optim.NGSGD` optimizer saves and restores it, or use
:func:`natural_gradient_state_dict` / :func:`load_natural_gradient_state_dict`.
"""
import logging
import weakref
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pkwrap.ngsgd import OnlineNaturalGradient, linear, mm

__all__ = ["NaturalAffine", "NaturalConv1d", "natural_gradient", "natural_gradient_modules",
           "natural_gradient_owner",
           "natural_gradient_state_dict", "load_natural_gradient_state_dict",
           "freeze_natural_gradient", "row_sqnorm", "set_row_sqnorm"]

logger = logging.getLogger(__name__)

# weight Parameter -> weakref to its natural-gradient layer.  Kept outside the Parameter so
# that pickling/deep-copying a model is unaffected; the optimizer uses it to find the
# preconditioners of the parameters it was given.
# Keyed by id(); entries are checked against the live objects on lookup.
_OWNERS: Dict[int, nn.Module] = {}


def set_row_sqnorm(x: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """Attach the squared norms of the rows of x (``sq``: x's shape without the last
    dimension) for the natural-gradient layer that reads x next; returns x.  Fused kernels
    that write x get them for free, which saves that layer a pass over x."""
    x._pkwrap_row_sqnorm = (x._version, sq)
    return x


def row_sqnorm(x: torch.Tensor) -> Optional[torch.Tensor]:
    """What :func:`set_row_sqnorm` attached to x, or None (also when x was modified in
    place since, or is another tensor, e.g. a view)."""
    got = getattr(x, "_pkwrap_row_sqnorm", None)
    if got is None or got[0] != x._version or tuple(got[1].shape) != tuple(x.shape[:-1]):
        return None
    return got[1]


def natural_gradient_owner(p: torch.Tensor) -> Optional[nn.Module]:
    """The natural-gradient layer whose ``weight`` is ``p`` (None if there is none)."""
    ref = _OWNERS.get(id(p))
    m = ref() if ref is not None else None
    return m if m is not None and m.weight is p else None


class _NaturalGradientMixin:
    """Shared state of natural-gradient layers: the two preconditioners and Kaldi's
    per-layer training settings that the optimizer reads (max_change, l2_regularize,
    learning_rate_factor, orthonormal_constraint)."""

    def _init_natural_gradient(self, in_dim: int, out_dim: int,
                               rank_in: Optional[int], rank_out: Optional[int],
                               update_period: int, num_samples_history: float, alpha: float,
                               max_change: float, l2_regularize: float,
                               learning_rate_factor: float,
                               orthonormal_constraint: float) -> None:
        if rank_in is None:
            rank_in = min(20, (in_dim + 1) // 2)
        if rank_out is None:
            rank_out = min(80, (out_dim + 1) // 2)
        self.preconditioner_in = OnlineNaturalGradient(max(1, rank_in), update_period,
                                                       num_samples_history, 0.0, alpha)
        self.preconditioner_out = OnlineNaturalGradient(max(1, rank_out), update_period,
                                                        num_samples_history, 0.0, alpha)
        self.use_natural_gradient = True
        self.max_change = float(max_change)
        self.l2_regularize = float(l2_regularize)
        self.learning_rate_factor = float(learning_rate_factor)
        self.orthonormal_constraint = float(orthonormal_constraint)
        self._register_owner()

    def _register_owner(self) -> None:
        if natural_gradient_owner(self.weight) is not self:
            if len(_OWNERS) > 4096:  # drop entries of dead modules
                for k in [k for k, r in _OWNERS.items() if r() is None]:
                    del _OWNERS[k]
            _OWNERS[id(self.weight)] = weakref.ref(self)

    def _preconditioned_grads(self, x: torch.Tensor, g: torch.Tensor, has_bias: bool,
                              g_sum: Optional[torch.Tensor] = None,
                              g_sqnorm: Optional[float] = None,
                              x_sqnorm: Optional[float] = None
                              ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Weight (as ``[out][in]``) and bias gradients from inputs x ``[N][in]`` and
        output derivatives g ``[N][out]``; ``g_sum`` (the column sums of g, i.e. the plain
        bias gradient), ``g_sqnorm`` (``|g|^2``) and ``x_sqnorm`` (``|x|^2``) when the
        caller has them already (from the fused kernels of :mod:`pkwrap.nn.tdnnf`).

        Preconditioning multiplies the rows on the right by a fixed matrix:
        X_hat = X P_i and G_hat = G P_o with P = I - W^T W (W of the preconditioner, the
        estimate before this call's update), X = [x, 1].  So the gradient
        gamma_i gamma_o G_hat^T X_hat = gamma_i gamma_o P_o (G^T X) P_i is the plain gradient
        G^T X (``[out][in + 1]``) multiplied by P_i on the right and P_o on the left: two
        products with skinny matrices whose cost does not depend on N.  The preconditioners
        still see every row (for their statistics and scales: N (in R_i + out R_o)
        multiply-adds, plus the Fisher update on updating calls).
        """
        def bias_grad(g):
            if not has_bias:
                return None
            return g.sum(0) if g_sum is None else g_sum.to(dtype=g.dtype, device=g.device)

        if not self.use_natural_gradient:
            return mm(g.t(), x), bias_grad(g)
        if x.dtype not in (torch.float32, torch.float64):  # e.g. autocast: precondition in float32
            x = x.float()
        if g.dtype not in (torch.float32, torch.float64):
            g = g.float()
        _, Wi, s_in = self.preconditioner_in.precondition_factors(x, ones_column=has_bias,
                                                                  sqnorm=x_sqnorm)
        _, Wo, s_out = self.preconditioner_out.precondition_factors(g, sqnorm=g_sqnorm)
        dt = Wo.dtype if Wo.numel() else g.dtype
        x = x.to(dt)
        g = g.to(dt)
        gw = mm(g.t(), x)  # [out][in]
        gb = bias_grad(g)  # [out]: the ones column
        return self._precondition_gradient(gw, gb, Wi, Wo, s_in, s_out)

    @staticmethod
    def _precondition_gradient(gw: torch.Tensor, gb: Optional[torch.Tensor], Wi: torch.Tensor,
                               Wo: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor
                               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """gamma_i gamma_o P_o [gw, gb] P_i (see :meth:`_preconditioned_grads`); gw is
        modified in place."""
        has_bias = gb is not None
        n_in = gw.shape[1]
        if Wi.numel() and Wi.dtype != gw.dtype:
            Wi = Wi.to(gw.dtype)
        if Wo.numel() and Wo.dtype != gw.dtype:
            Wo = Wo.to(gw.dtype)
        if Wi.numel():  # right: M <- M - (M W_i^T) W_i
            T1 = mm(gw, Wi[:, :n_in].t())  # [out][R_i]
            if has_bias:
                T1.addmm_(gb[:, None], Wi[None, :, n_in])
                gb = gb - T1 @ Wi[:, n_in]
            gw.sub_(mm(T1, Wi[:, :n_in]))
        if Wo.numel():  # left: M <- M - W_o^T (W_o M)
            gw.sub_(mm(Wo.t(), mm(Wo, gw)))
            if has_bias:
                gb = gb - Wo.t() @ (Wo @ gb)
        scale = (s_in * s_out).to(gw.dtype)
        gw.mul_(scale)
        if not has_bias:
            return gw, None
        return gw, gb.mul_(scale)

    def freeze_natural_gradient(self, frozen: bool = True) -> None:
        """Freeze (True) or unfreeze the Fisher-matrix estimates (backstitch step 1)."""
        self.preconditioner_in.freeze(frozen)
        self.preconditioner_out.freeze(frozen)

    def natural_gradient_state_dict(self) -> Dict[str, Any]:
        return {"in": self.preconditioner_in.state_dict(),
                "out": self.preconditioner_out.state_dict()}

    def load_natural_gradient_state_dict(self, state: Dict[str, Any]) -> None:
        self.preconditioner_in.load_state_dict(state["in"])
        self.preconditioner_out.load_state_dict(state["out"])
        for p in (self.preconditioner_in, self.preconditioner_out):
            p.to(self.weight.device)


class _NaturalAffineFunction(torch.autograd.Function):
    """y = x W^T + b with natural-gradient weight/bias gradients (x: ``[N][in]``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, x_sqnorm=None):
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.x_sqnorm = x_sqnorm
        ctx.save_for_backward(x, weight)
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g = g.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:  # dtypes differ under autocast
            grad_x = mm(g, weight.to(g.dtype)).to(x.dtype)
        grad_w = grad_b = None
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            grad_w, grad_b = ctx.layer._preconditioned_grads(x, g, ctx.has_bias,
                                                             x_sqnorm=ctx.x_sqnorm)
            grad_w = grad_w.to(weight.dtype)
            if grad_b is not None:
                grad_b = grad_b.to(ctx.layer.bias.dtype)
        return grad_x, grad_w, grad_b, None, None


class NaturalAffine(_NaturalGradientMixin, nn.Linear):
    """Drop-in ``nn.Linear`` trained with Kaldi's natural gradient.

    Args:
      in_features:
        Input dimension.
      out_features:
        Output dimension.
      bias:
        Whether there is a bias (Kaldi's NaturalGradientAffineComponent has one;
        LinearComponent does not).
      rank_in:
        Rank of the input preconditioner; default ``min(20, (in_features + 1) // 2)``.
      rank_out:
        Rank of the output-derivative preconditioner; default ``min(80, (out_features + 1) // 2)``.
      update_period:
        Update the Fisher estimates every this many minibatches (after the first 11); Kaldi: 4.
      num_samples_history:
        Forgetting time constant in rows (frames); Kaldi: 2000.
      alpha:
        Smoothing of the Fisher matrix towards the identity; Kaldi: 4.
      max_change:
        Kaldi's per-layer max-change: the largest 2-norm of one update of this layer's
        parameters (0.75; Kaldi uses 1.5 for output layers; 0 = none).  Read by the optimizer.
      l2_regularize:
        Kaldi's per-layer l2-regularize (read by the optimizer).
      learning_rate_factor:
        Multiplies the learning rate of this layer (Kaldi's learning-rate-factor).
      orthonormal_constraint:
        Kaldi's orthonormal-constraint: 0 = none, < 0 = semi-orthogonal with floating scale,
        > 0 = rows of this 2-norm.  Applied by the optimizer about every 4th step.

    Input ``[..., in_features]``, output ``[..., out_features]``.  With ``use_natural_gradient``
    set to False the layer behaves exactly like ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 rank_in: Optional[int] = None, rank_out: Optional[int] = None,
                 update_period: int = 4, num_samples_history: float = 2000.0,
                 alpha: float = 4.0, max_change: float = 0.75, l2_regularize: float = 0.0,
                 learning_rate_factor: float = 1.0, orthonormal_constraint: float = 0.0,
                 device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_natural_gradient(in_features, out_features, rank_in, rank_out,
                                    update_period, num_samples_history, alpha, max_change,
                                    l2_regularize, learning_rate_factor, orthonormal_constraint)

    def reset_parameters(self) -> None:
        """Kaldi's initialization: weight ~ N(0, 1/in), bias ~ N(0, 1)."""
        with torch.no_grad():
            self.weight.normal_(0.0, self.in_features ** -0.5)
            if self.bias is not None:
                self.bias.normal_(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            if x.dim() == 2:
                return linear(x, self.weight, self.bias)
            return F.linear(x, self.weight, self.bias)
        if not self.use_natural_gradient and (x.dtype != torch.float32 or
                                              torch.is_autocast_enabled(x.device.type)):
            return F.linear(x, self.weight, self.bias)
        self._register_owner()
        lead = x.shape[:-1]
        sq = row_sqnorm(x)
        y = _NaturalAffineFunction.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias, self,
                                         None if sq is None else float(sq.sum()))
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", rank_in={self.preconditioner_in.rank}, "
                f"rank_out={self.preconditioner_out.rank}, max_change={self.max_change}")


class _NaturalConv1dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.conv1d(x, weight, bias, layer.stride, layer.padding, layer.dilation, 1)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv1d_input(x.shape, weight.to(g.dtype), g, layer.stride,
                                                layer.padding, layer.dilation, 1).to(x.dtype)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            B, C, T = x.shape
            k = weight.shape[2]
            # patches: [B][C*k][T_out], channel-major like weight.reshape(out, C*k)
            patches = F.unfold(x.unsqueeze(2), (1, k), dilation=(1, layer.dilation[0]),
                               padding=(0, layer.padding[0]), stride=(1, layer.stride[0]))
            rows_x = patches.transpose(1, 2).reshape(-1, C * k)
            rows_g = g.transpose(1, 2).reshape(-1, g.shape[1])
            gw, grad_b = layer._preconditioned_grads(rows_x, rows_g.contiguous(), ctx.has_bias)
            grad_w = gw.reshape(weight.shape).to(weight.dtype)
            if grad_b is not None:
                grad_b = grad_b.to(layer.bias.dtype)
        return grad_x, grad_w, grad_b, None


class NaturalConv1d(_NaturalGradientMixin, nn.Conv1d):
    """``nn.Conv1d`` (groups=1, zero padding) trained with Kaldi's natural gradient.

    The weight gradient is formed from preconditioned unfolded input patches
    (dimension ``in_channels * kernel_size`` (+1 for the bias)) and preconditioned output
    derivatives, as Kaldi's TdnnComponent does.  Arguments are those of ``nn.Conv1d`` plus
    the natural-gradient ones of :class:`NaturalAffine`; ``padding`` must be an int.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, bias: bool = True,
                 rank_in: Optional[int] = None, rank_out: Optional[int] = None,
                 update_period: int = 4, num_samples_history: float = 2000.0,
                 alpha: float = 4.0, max_change: float = 0.75, l2_regularize: float = 0.0,
                 learning_rate_factor: float = 1.0, orthonormal_constraint: float = 0.0,
                 device=None, dtype=None):
        nn.Conv1d.__init__(self, in_channels, out_channels, kernel_size, stride, padding,
                           dilation, 1, bias, "zeros", device=device, dtype=dtype)
        self._init_natural_gradient(in_channels * self.kernel_size[0], out_channels, rank_in,
                                    rank_out, update_period, num_samples_history, alpha,
                                    max_change, l2_regularize, learning_rate_factor,
                                    orthonormal_constraint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.use_natural_gradient and torch.is_grad_enabled() and self.weight.requires_grad):
            return nn.Conv1d.forward(self, x)
        self._register_owner()
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
        y = _NaturalConv1dFunction.apply(x, self.weight, self.bias, self)
        return y.squeeze(0) if unbatched else y


def _convertible_conv(m: nn.Conv1d) -> Optional[str]:
    if m.groups != 1:
        return "groups != 1"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r}"
    if isinstance(m.padding, str):
        return f"padding={m.padding!r}"
    return None


def natural_gradient(model: nn.Module, rank_in: Optional[int] = None,
                     rank_out: Optional[int] = None, update_period: int = 4,
                     num_samples_history: float = 2000.0, alpha: float = 4.0,
                     max_change: float = 0.75, output_max_change: float = 1.5,
                     l2_regularize: float = 0.0) -> nn.Module:
    """Convert every ``nn.Linear`` and ``nn.Conv1d`` of ``model`` to natural-gradient training,
    in place.

    The modules keep their parameters (same tensors, same ``state_dict`` keys), their hooks and
    their forward result; only the gradients they produce change.  Layers that already are
    natural-gradient layers are left alone; a Conv1d that cannot be converted (groups, padding
    mode) is skipped with a warning.

    Args:
      model:
        The model (or a single layer).
      rank_in, rank_out, update_period, num_samples_history, alpha:
        See :class:`NaturalAffine` (None = Kaldi's defaults from the dimensions).
      max_change:
        Per-layer max-change given to each converted layer.
      output_max_change:
        Max-change of the last converted ``nn.Linear`` in module order (Kaldi: 1.5 for
        output layers).
      l2_regularize:
        Per-layer l2-regularize given to each converted layer.
    Returns:
      ``model`` itself.
    """
    converted = []
    for name, m in model.named_modules():
        if isinstance(m, _NaturalGradientMixin):
            continue
        if type(m) is nn.Linear:
            m.__class__ = NaturalAffine
            m._init_natural_gradient(m.in_features, m.out_features, rank_in, rank_out,
                                     update_period, num_samples_history, alpha, max_change,
                                     l2_regularize, 1.0, 0.0)
            converted.append(m)
        elif type(m) is nn.Conv1d:
            why = _convertible_conv(m)
            if why is not None:
                logger.warning("natural_gradient: not converting Conv1d %r (%s)", name, why)
                continue
            m.__class__ = NaturalConv1d
            m._init_natural_gradient(m.in_channels * m.kernel_size[0], m.out_channels, rank_in,
                                     rank_out, update_period, num_samples_history, alpha,
                                     max_change, l2_regularize, 1.0, 0.0)
            converted.append(m)
    linears = [m for m in converted if isinstance(m, NaturalAffine)]
    if linears:
        linears[-1].max_change = float(output_max_change)
    return model


def natural_gradient_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, module) for every natural-gradient layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, _NaturalGradientMixin):
            yield name, m


def natural_gradient_state_dict(model: nn.Module) -> Dict[str, Any]:
    """The preconditioner state of every natural-gradient layer, keyed by module name."""
    return {name: m.natural_gradient_state_dict() for name, m in natural_gradient_modules(model)}


def load_natural_gradient_state_dict(model: nn.Module, state: Dict[str, Any]) -> None:
    """Restore what :func:`natural_gradient_state_dict` returned."""
    mods = dict(natural_gradient_modules(model))
    missing = set(mods) - set(state)
    unexpected = set(state) - set(mods)
    if missing or unexpected:
        raise KeyError(f"load_natural_gradient_state_dict: missing {sorted(missing)}, "
                       f"unexpected {sorted(unexpected)}")
    for name, m in mods.items():
        m.load_natural_gradient_state_dict(state[name])


def freeze_natural_gradient(model: nn.Module, frozen: bool = True) -> None:
    """Freeze or unfreeze every preconditioner of ``model`` (Kaldi's FreezeNaturalGradient)."""
    for _, m in natural_gradient_modules(model):
        m.freeze_natural_gradient(frozen)
