r"""Kaldi's nnet3 parameter update (NG-SGD) as a torch optimizer, and its learning-rate schedule.

The update of ``nnet3-chain-train`` (``NnetChainTrainer::TrainInternal`` with
``UpdateNnetWithMaxChange``), for components (parameter groups) :math:`c`:

.. math::

   \Delta_c \leftarrow \mu \Delta_c - \eta_c \big(g_c + 2 \lambda\, S\, l2_c\, \theta_c\big)

where :math:`g_c` is the (natural-gradient preconditioned) gradient of the loss summed over
frames, :math:`\eta_c` = lr times the component's learning-rate factor, :math:`S` = number of
sequences in the minibatch, :math:`\lambda` = ``l2_regularize_factor`` (1/num_jobs in Kaldi),
:math:`\mu` = momentum.  With :math:`s = 1 - \mu`, per-component factors

.. math::

   f_c = \min\Big(1, \frac{m_c}{s \lVert \Delta_c \rVert}\Big), \qquad
   s \leftarrow s \min\Big(1, \frac{M}{s \sqrt{\sum_c f_c^2 \lVert \Delta_c \rVert^2}}\Big),

(:math:`m_c` = max_change of the component, M = max_param_change; 0 disables either), then
:math:`\theta_c \leftarrow \theta_c + s f_c \Delta_c` and :math:`\Delta_c \leftarrow \mu \Delta_c`.
"""
import logging
import math
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from pkwrap.nn.natural import natural_gradient_owner
from pkwrap.nn.tdnnf import constrain_orthonormal_

__all__ = ["NGSGD", "ngsgd", "kaldi_param_groups", "KaldiLRScheduler", "kaldi_learning_rate",
           "kaldi_num_jobs"]

logger = logging.getLogger(__name__)


def kaldi_param_groups(model: nn.Module, default_max_change: float = 0.75,
                       default_l2_regularize: float = 0.0) -> List[Dict[str, Any]]:
    """One parameter group per layer (Kaldi "component"), with its per-layer settings.

    Each module that directly owns trainable parameters becomes one group: ``params``,
    ``name`` and, read from the module's attributes when present, ``max_change``,
    ``l2_regularize``, ``learning_rate_factor``, ``orthonormal_constraint`` (see
    :class:`pkwrap.nn.NaturalAffine`).  Plain layers get the defaults given here.

    Args:
      model:
        The model.
      default_max_change:
        max_change of layers that do not set it (Kaldi's default 0.75).
      default_l2_regularize:
        l2_regularize of layers that do not set it.
    Returns:
      A list of group dicts for :class:`NGSGD`.
    """
    groups = []
    for name, m in model.named_modules():
        params = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not params:
            continue
        groups.append({
            "params": params,
            "name": name or type(m).__name__,
            "max_change": float(getattr(m, "max_change", default_max_change)),
            "l2_regularize": float(getattr(m, "l2_regularize", default_l2_regularize)),
            "learning_rate_factor": float(getattr(m, "learning_rate_factor", 1.0)),
            "orthonormal_constraint": float(getattr(m, "orthonormal_constraint", 0.0)),
        })
    return groups


class NGSGD(Optimizer):
    r"""Kaldi's NG-SGD update: SGD with per-component and global max-change, l2, momentum,
    backstitch, orthonormal constraints.

    .. math::
       \begin{aligned}
       &\textbf{input}: \eta \text{ (lr)}, \mu \text{ (momentum)}, m_c \text{ (max\_change)},
            M \text{ (max\_param\_change)}, l2_c, \lambda, S \text{ (sequences)} \\
       &\Delta_c \leftarrow \mu \Delta_c - \eta\, r_c\, (g_c + 2 \lambda S\, l2_c\, \theta_c)
            \quad \text{for every component } c \\
       &s \leftarrow 1 - \mu, \quad f_c \leftarrow \min(1, m_c / (s \lVert\Delta_c\rVert)) \\
       &s \leftarrow s \min\big(1, M / (s \textstyle\sqrt{\sum_c f_c^2 \lVert\Delta_c\rVert^2})\big) \\
       &\textbf{if } \text{the total change is not finite: skip (warn), } \Delta \leftarrow 0 \\
       &\theta_c \leftarrow \theta_c + s f_c \Delta_c, \quad \Delta_c \leftarrow \mu \Delta_c \\
       &\text{every 4th step: constrain components with orthonormal\_constraint} \ne 0
       \end{aligned}

    (:math:`r_c`: the component's learning_rate_factor.)

    .. note::
       This differs from ``torch.optim.SGD`` as Kaldi differs from plain SGD.  (1) The
       natural-gradient preconditioning is not done here but in the backward pass of the
       :mod:`pkwrap.nn` layers, so ``p.grad`` already is the preconditioned gradient
       (the optimizer saves and restores the preconditioners' state in :meth:`state_dict`).
       (2) Max-change limits the 2-norm of each component's **parameter change** (after the
       learning rate), not the gradient norm, and a global limit applies on top; a
       non-finite change skips the whole update, like Kaldi's "Infinite parameter change,
       will not apply" (Kaldi lets NaN through; we skip it too).  (3) Momentum is Kaldi's:
       the applied step is :math:`(1-\mu)` times the accumulated change, so momentum does not
       change the effective learning rate.  (4) L2 is scaled by the number of sequences in
       the minibatch (pass ``num_sequences`` to :meth:`step`), because the loss is a sum over
       frames.  (5) Backstitch (``backstitch_training_scale`` > 0) takes a step of
       :math:`-\alpha` with frozen preconditioners, then a step of :math:`1+\alpha` on the
       same minibatch, which needs a ``closure``.  (6) The orthonormal constraint is applied
       on every 4th step (Kaldi draws 1 in 4 at random; deterministic here so that
       distributed ranks stay identical).  With ``maximize=True`` gradients are of an
       objective to maximize (Kaldi's sign).

    Args:
      params:
        Parameters or groups; use :func:`kaldi_param_groups` for one group per layer with
        the layers' Kaldi settings (max-change is per group).
      lr:
        Learning rate (Kaldi's per-job rate: num_jobs times the effective rate).
      momentum:
        Kaldi's momentum (default 0).
      max_change:
        Default per-group max-change (0.75); groups may set their own (output layer 1.5).
      max_param_change:
        Global max-change over all groups (Kaldi's --max-param-change, 2.0; 0 disables).
      l2_regularize:
        Default per-group l2-regularize (groups may set their own).
      l2_regularize_factor:
        Kaldi's --l2-regularize-factor (1/num_jobs in train.py).
      learning_rate_factor:
        Default per-group learning-rate factor.
      orthonormal_constraint:
        Default per-group orthonormal constraint (0 = none).
      backstitch_training_scale:
        Kaldi's --backstitch-training-scale (0 = off; needs momentum 0).
      backstitch_training_interval:
        Do backstitch on one minibatch in this many.
      orthonormal_every:
        Apply orthonormal constraints on one step in this many (4).
      maximize:
        Gradients are of an objective to maximize.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0,
                 max_change: float = 0.75, max_param_change: float = 2.0,
                 l2_regularize: float = 0.0, l2_regularize_factor: float = 1.0,
                 learning_rate_factor: float = 1.0, orthonormal_constraint: float = 0.0,
                 backstitch_training_scale: float = 0.0, backstitch_training_interval: int = 1,
                 orthonormal_every: int = 4, maximize: bool = False):
        for name, v in (("lr", lr), ("momentum", momentum), ("max_change", max_change),
                        ("max_param_change", max_param_change), ("l2_regularize", l2_regularize),
                        ("l2_regularize_factor", l2_regularize_factor),
                        ("learning_rate_factor", learning_rate_factor),
                        ("orthonormal_constraint", orthonormal_constraint),
                        ("backstitch_training_scale", backstitch_training_scale)):
            _check_finite(name, v)
        if not lr >= 0.0:
            raise ValueError(f"NGSGD: invalid learning rate {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"NGSGD: momentum must be in [0, 1), got {momentum}")
        if max_change < 0.0 or max_param_change < 0.0:
            raise ValueError("NGSGD: max_change and max_param_change must be >= 0")
        if l2_regularize < 0.0 or l2_regularize_factor < 0.0:
            raise ValueError("NGSGD: l2_regularize and l2_regularize_factor must be >= 0")
        if backstitch_training_scale < 0.0:
            raise ValueError("NGSGD: backstitch_training_scale must be >= 0")
        if backstitch_training_scale > 0.0 and momentum != 0.0:
            raise ValueError("NGSGD: backstitch training is incompatible with momentum > 0 (as in Kaldi)")
        if backstitch_training_interval < 1 or orthonormal_every < 1:
            raise ValueError("NGSGD: backstitch_training_interval and orthonormal_every must be >= 1")
        defaults = dict(lr=lr, max_change=max_change, l2_regularize=l2_regularize,
                        learning_rate_factor=learning_rate_factor,
                        orthonormal_constraint=orthonormal_constraint, name="")
        super().__init__(params, defaults)
        for group in self.param_groups:  # per-group overrides too
            for name in ("lr", "max_change", "l2_regularize", "learning_rate_factor",
                         "orthonormal_constraint"):
                _check_finite(name, group[name], group.get("name") or None)
            if group["lr"] < 0 or group["max_change"] < 0 or group["l2_regularize"] < 0:
                raise ValueError("NGSGD: parameter group %r: lr, max_change and l2_regularize "
                                 "must be >= 0" % (group.get("name") or "",))
        self.momentum = float(momentum)
        self.max_param_change = float(max_param_change)
        self.l2_regularize_factor = float(l2_regularize_factor)
        self.backstitch_training_scale = float(backstitch_training_scale)
        self.backstitch_training_interval = int(backstitch_training_interval)
        self.orthonormal_every = int(orthonormal_every)
        self.maximize = bool(maximize)
        self.num_steps = 0  # minibatches processed (Kaldi's num_minibatches_processed_)
        self.num_skipped = 0  # updates skipped because of a non-finite change
        self.num_max_change_global_applied = 0
        self.num_max_change_per_group_applied = [0] * len(self.param_groups)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("max_change", 0.75)
            group.setdefault("l2_regularize", 0.0)
            group.setdefault("learning_rate_factor", 1.0)
            group.setdefault("orthonormal_constraint", 0.0)
            group.setdefault("name", "")

    # ------------------------------------------------------------------ NG state
    def _ng_layers(self):
        """(flat parameter index, layer) for every parameter that is an NG layer's weight."""
        out, i = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                m = natural_gradient_owner(p)
                if m is not None:
                    out.append((i, m))
                i += 1
        return out

    def freeze_natural_gradient(self, frozen: bool = True) -> None:
        """Freeze or unfreeze the preconditioners of every NG layer this optimizer updates."""
        for _, m in self._ng_layers():
            m.freeze_natural_gradient(frozen)

    _SCALARS = ("momentum", "max_param_change", "l2_regularize_factor",
                "backstitch_training_scale", "backstitch_training_interval",
                "orthonormal_every", "maximize", "num_steps", "num_skipped",
                "num_max_change_global_applied", "num_max_change_per_group_applied")

    def state_dict(self) -> Dict[str, Any]:
        """torch's optimizer state plus ``ngsgd``: the natural-gradient preconditioner state of
        every NG layer (keyed by flat parameter index) and this optimizer's counters."""
        sd = super().state_dict()
        sd["ngsgd"] = {
            "preconditioners": {i: m.natural_gradient_state_dict() for i, m in self._ng_layers()},
            "settings": {k: getattr(self, k) for k in self._SCALARS},
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ng = state_dict.pop("ngsgd", None)
        super().load_state_dict(state_dict)
        if ng is None:
            return
        by_rank = ng.get("preconditioners_by_rank")
        if by_rank is not None:  # written by comm_hooks.gather_ngsgd_state_dict
            rank = 0
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                rank = torch.distributed.get_rank()
            if rank >= len(by_rank):
                # resumed on more ranks than were saved: start this rank from another rank's
                # estimate (the trajectory then differs from an uninterrupted run)
                warnings.warn(f"NGSGD.load_state_dict: checkpoint has preconditioner state for "
                              f"{len(by_rank)} ranks; rank {rank} uses rank "
                              f"{rank % len(by_rank)}'s")
            precs = by_rank[rank % len(by_rank)]
        else:
            precs = ng["preconditioners"]
        layers = dict(self._ng_layers())
        if set(int(k) for k in precs) != set(layers):
            raise ValueError("NGSGD.load_state_dict: natural-gradient layers differ from the "
                             f"checkpoint's (expected parameter indexes {sorted(layers)}, "
                             f"got {sorted(int(k) for k in precs)})")
        for k, v in precs.items():
            layers[int(k)].load_natural_gradient_state_dict(v)
        for k, v in ng.get("settings", {}).items():
            if k in self._SCALARS:
                setattr(self, k, list(v) if isinstance(v, list) else v)

    # ------------------------------------------------------------------ stepping
    def is_backstitch_step(self) -> bool:
        """Whether the next :meth:`step` does backstitch (two passes over the minibatch)."""
        return (self.backstitch_training_scale > 0.0 and
                self.num_steps % self.backstitch_training_interval == 0)

    @torch.no_grad()
    def shrink_(self, value: float) -> None:
        """Multiply every parameter by ``value`` (Kaldi's per-iteration proportional shrink,
        see :meth:`KaldiLRScheduler.shrink_value`)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.mul_(value)

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None,
             num_sequences: int = 1):
        """Update the parameters from their ``.grad``.

        Args:
          closure:
            Zeroes the gradients, evaluates the loss and calls backward.  Required when this
            step does backstitch (:meth:`is_backstitch_step`); it is then called twice.
          num_sequences:
            Sequences in the minibatch (S in the l2 term; Kaldi's GetNumNvalues).
        Returns:
          The loss returned by the (last) closure call, or None.
        """
        loss = None
        if self.is_backstitch_step():
            if closure is None:
                raise ValueError("NGSGD.step: backstitch training needs a closure "
                                 "(it evaluates the minibatch twice)")
            b = self.backstitch_training_scale
            self.freeze_natural_gradient(True)
            try:
                with torch.enable_grad():
                    loss = closure()
            finally:
                self.freeze_natural_gradient(False)
            self._update(max_change_scale=b, scale=-b, l2_scale=0.0, constrain=True)
            with torch.enable_grad():
                loss = closure()
            self._update(max_change_scale=1.0 + b, scale=1.0 + b,
                         l2_scale=num_sequences * self.l2_regularize_factor / (1.0 + b),
                         constrain=False)
        else:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._update(max_change_scale=1.0, scale=1.0 - self.momentum,
                         l2_scale=num_sequences * self.l2_regularize_factor, constrain=True)
        self.num_steps += 1
        return loss

    @torch.no_grad()
    def _update(self, max_change_scale: float, scale: float, l2_scale: float,
                constrain: bool) -> bool:
        groups = self.param_groups
        if len(self.num_max_change_per_group_applied) != len(groups):
            self.num_max_change_per_group_applied = [0] * len(groups)
        deltas, params = [], []
        for group in groups:
            ps, ds = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("NGSGD does not support sparse gradients")
                st = self.state[p]
                buf = st.get("delta")
                lr = group["lr"] * group["learning_rate_factor"]
                g = p.grad if self.maximize else -p.grad
                if buf is None or self.momentum == 0.0:
                    buf = g.mul(lr)
                else:
                    buf.add_(g, alpha=lr)
                if l2_scale != 0.0 and group["l2_regularize"] != 0.0:
                    buf.add_(p, alpha=-2.0 * l2_scale * lr * group["l2_regularize"])
                if self.momentum != 0.0:
                    st["delta"] = buf
                ps.append(p)
                ds.append(buf)
            params.append(ps)
            deltas.append(ds)
        ok = ngsgd(params, deltas, [g["max_change"] for g in groups], self.max_param_change,
                   max_change_scale, scale, self.num_max_change_per_group_applied)
        if ok is None:
            self.num_skipped += 1
        else:
            if ok:
                self.num_max_change_global_applied += 1
        if self.momentum != 0.0:
            for ds in deltas:
                for d in ds:
                    if ok is not None:
                        d.mul_(self.momentum)
                    else:  # a skipped step must not leave NaN/inf in the momentum buffer
                        d.zero_()
        if constrain and ok is not None and self.num_steps % self.orthonormal_every == 0:
            for group in groups:
                c = group["orthonormal_constraint"]
                if c != 0.0:
                    for p in group["params"]:
                        if p.dim() >= 2:
                            constrain_orthonormal_(p.data, c)
        return ok is not None


def _check_finite(name: str, v, group: Optional[str] = None) -> None:
    try:
        ok = math.isfinite(float(v))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError("NGSGD: %s%s must be a finite number, got %r"
                         % (name, "" if group is None else " of group %r" % group, v))


@torch.no_grad()
def ngsgd(params: List[List[torch.Tensor]], deltas: List[List[torch.Tensor]],
          max_changes: List[float], max_param_change: float, max_change_scale: float,
          scale: float, num_applied: Optional[List[int]] = None) -> Optional[bool]:
    """Apply Kaldi's ``UpdateNnetWithMaxChange``: ``p += scale * f_c * delta`` per component c.

    Args:
      params:
        One list of parameters per component.
      deltas:
        The matching parameter changes (already times the learning rate).
      max_changes:
        Max-change per component (0 = none).
      max_param_change:
        Global max-change (0 = none).
      max_change_scale:
        Multiplies every max-change (backstitch uses alpha and 1 + alpha).
      scale:
        Multiplies the change (1 - momentum, or -alpha / 1 + alpha for backstitch).
      num_applied:
        If given, per-component counters incremented when that component's limit is active.
    Returns:
      None if the change was not finite and nothing was applied; otherwise whether the global
      max-change was active.
    """
    sq = []
    for ds in deltas:
        if ds:
            # squared norms summed in float64 (vector_norm upcasts inside its reduction:
            # no float64 copies of the deltas)
            sq.append(torch.stack([torch.linalg.vector_norm(d, dtype=torch.float64).square()
                                   for d in ds]).sum())
        else:
            sq.append(None)
    have = [s for s in sq if s is not None]
    vals = iter(torch.stack(have).tolist() if have else [])  # one transfer for all components
    norms = [next(vals) if s is not None else 0.0 for s in sq]
    factors = []
    total_sq = 0.0
    for c, (n2, mc) in enumerate(zip(norms, max_changes)):
        n = math.sqrt(n2) if n2 >= 0 else float("nan")
        f = 1.0
        if mc != 0.0 and n * abs(scale) > mc * max_change_scale:
            f = mc * max_change_scale / (n * abs(scale))
            if num_applied is not None:
                num_applied[c] += 1
        factors.append(f)
        total_sq += f * f * n2
    param_delta = math.sqrt(total_sq) * abs(scale) if total_sq >= 0 else float("nan")
    if not math.isfinite(param_delta):
        warnings.warn("NGSGD: infinite or NaN parameter change, will not apply (update skipped)")
        return None
    global_applied = False
    if max_param_change != 0.0 and param_delta > max_param_change * max_change_scale:
        scale *= max_param_change * max_change_scale / param_delta
        global_applied = True
    for ps, ds, f in zip(params, deltas, factors):
        for p, d in zip(ps, ds):
            p.add_(d.to(p.dtype), alpha=scale * f)
    return global_applied


def kaldi_num_jobs(it: int, num_iters: int, num_jobs_initial: int, num_jobs_final: int,
                   num_jobs_step: int = 1) -> int:
    """Kaldi's ``get_current_num_jobs``: jobs for iteration ``it`` (linear ramp, rounded)."""
    ideal = float(num_jobs_initial) + (num_jobs_final - num_jobs_initial) * float(it) / num_iters
    if ideal < num_jobs_step:
        return int(0.5 + ideal)
    return int(0.5 + ideal / num_jobs_step) * num_jobs_step


def kaldi_learning_rate(it: int, num_jobs: int, num_iters: int, num_archives_processed: float,
                        num_archives_to_process: float, initial_effective_lrate: float,
                        final_effective_lrate: float) -> float:
    """Kaldi's ``get_learning_rate``: ``num_jobs`` times the effective rate, which decays
    exponentially from initial to final with the number of archives processed."""
    if it + 1 >= num_iters:
        eff = final_effective_lrate
    else:
        eff = initial_effective_lrate * math.exp(
            num_archives_processed * math.log(final_effective_lrate / initial_effective_lrate)
            / num_archives_to_process)
    return num_jobs * eff


class KaldiLRScheduler(LRScheduler):
    """The learning-rate schedule of Kaldi's ``steps/nnet3/chain/train.py``.

    Iteration ``i`` (one call of :meth:`step` per iteration; an iteration can be one minibatch
    or Kaldi's "one archive per job") gets ``lr = num_jobs(i) * initial * (final/initial) **
    (archives_processed(i) / archives_to_process)``, and exactly ``num_jobs * final`` on the
    last iteration.  ``num_jobs(i)`` ramps from ``num_jobs_initial`` to ``num_jobs_final``
    (Kaldi's get_current_num_jobs); archives_processed(i) is the sum of num_jobs over earlier
    iterations.  Under DDP with gradient averaging, num_jobs is the world size.
    Every group gets this lr (its learning_rate_factor is applied by :class:`NGSGD`).

    Args:
      optimizer:
        The optimizer.
      num_iters:
        Number of iterations.
      initial_effective_lrate, final_effective_lrate:
        Kaldi's --trainer.optimization.{initial,final}-effective-lrate.
      num_jobs_initial, num_jobs_final:
        Kaldi's --trainer.optimization.num-jobs-{initial,final} (final defaults to initial).
      num_archives_to_process:
        Default: the sum of num_jobs over all iterations.
      proportional_shrink:
        Kaldi's --trainer.optimization.proportional-shrink (see :meth:`shrink_value`).
    """

    def __init__(self, optimizer: Optimizer, num_iters: int, initial_effective_lrate: float,
                 final_effective_lrate: float, num_jobs_initial: int = 1,
                 num_jobs_final: Optional[int] = None, num_jobs_step: int = 1,
                 num_archives_to_process: Optional[float] = None,
                 proportional_shrink: float = 0.0, last_epoch: int = -1):
        if num_iters < 1:
            raise ValueError(f"KaldiLRScheduler: num_iters must be >= 1, got {num_iters}")
        if not (initial_effective_lrate > 0 and final_effective_lrate > 0):
            raise ValueError("KaldiLRScheduler: effective learning rates must be > 0")
        self.num_iters = int(num_iters)
        self.initial_effective_lrate = float(initial_effective_lrate)
        self.final_effective_lrate = float(final_effective_lrate)
        self.num_jobs_initial = int(num_jobs_initial)
        self.num_jobs_final = int(num_jobs_final if num_jobs_final is not None else num_jobs_initial)
        self.num_jobs_step = int(num_jobs_step)
        self.proportional_shrink = float(proportional_shrink)
        jobs = [kaldi_num_jobs(i, self.num_iters, self.num_jobs_initial, self.num_jobs_final,
                               self.num_jobs_step) for i in range(self.num_iters)]
        self._processed = [0]
        for j in jobs[:-1]:
            self._processed.append(self._processed[-1] + j)
        self._jobs = jobs
        self.num_archives_to_process = float(num_archives_to_process
                                             if num_archives_to_process is not None else sum(jobs))
        super().__init__(optimizer, last_epoch)

    def lr_at(self, it: int) -> float:
        """The learning rate of iteration ``it`` (clamped to the last iteration)."""
        it = min(max(it, 0), self.num_iters - 1)
        return kaldi_learning_rate(it, self._jobs[it], self.num_iters, self._processed[it],
                                   self.num_archives_to_process, self.initial_effective_lrate,
                                   self.final_effective_lrate)

    def num_jobs_at(self, it: int) -> int:
        return self._jobs[min(max(it, 0), self.num_iters - 1)]

    def get_lr(self) -> List[float]:
        lr = self.lr_at(self.last_epoch)
        return [lr for _ in self.optimizer.param_groups]

    def shrink_value(self) -> float:
        """Kaldi's per-iteration shrink ``1 - proportional_shrink * lr`` (apply it with
        :meth:`NGSGD.shrink_` at the start of the iteration)."""
        v = 1.0 - self.proportional_shrink * self.lr_at(self.last_epoch)
        if v <= 0.5:
            raise ValueError(f"proportional_shrink={self.proportional_shrink} is too large, "
                             f"it gives shrink-value={v}")
        return v
