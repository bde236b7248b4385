r"""DDP communication for NG-SGD: gradient allreduce with Kaldi's scaling, or Kaldi's own
periodic model averaging.

Kaldi trains with N jobs that each start from the same model, run NG-SGD on their own
minibatches with the learning rate :math:`\eta = N \eta_{eff}` (``KaldiLRScheduler`` with
``num_jobs = N``), and then average the models.  For one minibatch per job the averaged model
is

.. math::

   \theta + \frac{1}{N}\sum_{i=1}^{N} N \eta_{eff}\, \tilde g_i = \theta + \eta_{eff} \sum_i \tilde g_i,

where :math:`\tilde g_i` is job i's natural-gradient-preconditioned gradient, a **sum over the
frames** of its minibatch, preconditioned with job i's own Fisher estimates.  Under DDP the
:mod:`pkwrap.nn` layers precondition each rank's gradient inside ``backward`` (every rank keeps
its own preconditioner state, as every Kaldi job does), then :func:`ngsgd_hook` allreduces:

* ``average=True`` (default, DDP's usual division by the world size before the sum): the
  update is :math:`\eta \cdot \frac{1}{N}\sum_i \tilde g_i`; use :math:`\eta = N \eta_{eff}`, which
  is exactly Kaldi's rate for N jobs and keeps the size of one update, and so the meaning of
  max-change, what it is for one Kaldi job.
* ``average=False``: the plain sum over all frames of all ranks; use :math:`\eta = \eta_{eff}`.

Both give the same update.  Because the reduced gradient is identical on every rank and
:class:`pkwrap.optim.NGSGD` is deterministic (its orthonormal constraint too), parameters stay
identical across ranks; a non-finite gradient on any rank makes the sum non-finite everywhere,
so every rank skips the same update.  Relation to torch's hooks: this is
``default_hooks.allreduce_hook`` with a choice of scaling and a finiteness count; Kaldi's
own scheme (local steps, then parameter averaging every ``period`` steps) is
:func:`kaldi_model_averaging`, built from ``post_localSGD_hook`` with no gradient
communication after the warm-up plus ``PeriodicModelAverager``.

Each rank's preconditioner state is different, so a checkpoint must hold all of them for an
exact resume: :func:`gather_ngsgd_state_dict` (a collective) collects them and
``NGSGD.load_state_dict`` picks the entry of its rank.
"""
import logging
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
    PostLocalSGDState, post_localSGD_hook)
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

__all__ = ["NGSGDState", "ngsgd_hook", "kaldi_model_averaging", "gather_ngsgd_state_dict"]

logger = logging.getLogger(__name__)


class NGSGDState:
    """State of :func:`ngsgd_hook`.

    Args:
      process_group:
        Group to allreduce over (None = the default group).
      average:
        Divide by the group size before summing (use lr = world_size x effective lr, Kaldi's
        num_jobs scaling); False sums (use the effective lr).

    Example::

        >>> state = NGSGDState(process_group=None, average=True)
        >>> ddp_model.register_comm_hook(state, ngsgd_hook)
    """

    __slots__ = [
        # hyperparameters users set
        "process_group",  # where to reduce; None = WORLD (not saved by __getstate__)
        "average",  # divide by the world size (True) or keep the sum over all frames (False)
        # internal state
        "num_buckets",  # buckets reduced so far (for diagnostics)
        "num_nonfinite_buckets",  # reduced buckets that held inf/NaN (NGSGD will skip those steps)
        "_warned",  # log the first non-finite bucket only once
    ]

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, average: bool = True):
        if not isinstance(average, bool):
            raise ValueError(f"NGSGDState: average must be a bool, got {average!r}")
        self.process_group = process_group
        self.average = average
        self.num_buckets = 0
        self.num_nonfinite_buckets = 0
        self._warned = False

    def __getstate__(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if k != "process_group"}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.process_group = None
        for k, v in state.items():
            setattr(self, k, v)


def ngsgd_hook(state: NGSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Allreduce a bucket of natural-gradient-preconditioned gradients (see the module docstring).

    Args:
      state: an :class:`NGSGDState`.
      bucket: DDP's gradient bucket (one flat tensor).
    Returns:
      A future holding the reduced bucket.
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    tensor = bucket.buffer()
    if state.average:
        tensor.div_(dist.get_world_size(group))
    fut = dist.all_reduce(tensor, group=group, async_op=True).get_future()

    def _done(f):
        out = f.value()[0]
        state.num_buckets += 1
        if not bool(torch.isfinite(out).all()):
            state.num_nonfinite_buckets += 1
            if not state._warned:
                logger.warning("ngsgd_hook: non-finite reduced gradient (some rank had inf/NaN); "
                               "NGSGD will skip the update on every rank")
                state._warned = True
        return out

    return fut.then(_done)


def kaldi_model_averaging(ddp_model: torch.nn.parallel.DistributedDataParallel, period: int,
                          warmup_steps: int = 0,
                          process_group: Optional[dist.ProcessGroup] = None
                          ) -> PeriodicModelAverager:
    """Kaldi's parallel training: independent local steps, parameters averaged every ``period``.

    Registers ``post_localSGD_hook`` (gradients allreduced for the first ``warmup_steps`` steps,
    then not communicated at all) and returns a ``PeriodicModelAverager``; call
    ``averager.average_parameters(model.parameters())`` after every ``optimizer.step()``.
    Each rank's NG preconditioners see only its own data, as in Kaldi; use lr = world_size x
    effective lr (Kaldi's num_jobs scaling).

    Args:
      ddp_model: the DDP-wrapped model (no comm hook registered yet).
      period: average every this many steps (Kaldi: the minibatches of one archive).
      warmup_steps: steps of plain gradient allreduce before local steps start.
      process_group: group to average over (None = WORLD).
    Returns:
      The averager.
    """
    if period < 1:
        raise ValueError(f"kaldi_model_averaging: period must be >= 1, got {period}")
    state = PostLocalSGDState(process_group=process_group, subgroup=None,
                              start_localSGD_iter=warmup_steps,
                              post_local_gradient_allreduce=False)
    ddp_model.register_comm_hook(state, post_localSGD_hook)
    return PeriodicModelAverager(period=period, warmup_steps=warmup_steps,
                                 process_group=process_group)


def gather_ngsgd_state_dict(optimizer, process_group: Optional[dist.ProcessGroup] = None
                            ) -> Dict[str, Any]:
    """``optimizer.state_dict()`` with the preconditioner state of **every** rank.

    A collective: every rank of the group must call it.  Save the result from rank 0; on
    resume, ``NGSGD.load_state_dict`` gives each rank its own preconditioners back.

    Args:
      optimizer: a :class:`pkwrap.optim.NGSGD`.
      process_group: group (None = WORLD).
    Returns:
      The state dict, with ``sd["ngsgd"]["preconditioners_by_rank"]`` a list indexed by rank.
    """
    sd = optimizer.state_dict()
    mine = sd["ngsgd"]["preconditioners"]
    mine_cpu = {k: {io: {kk: (vv.cpu() if torch.is_tensor(vv) else vv) for kk, vv in st.items()}
                    for io, st in v.items()} for k, v in mine.items()}
    if dist.is_available() and dist.is_initialized():
        n = dist.get_world_size(process_group)
        gathered = [None] * n
        dist.all_gather_object(gathered, mine_cpu, group=process_group)
    else:
        gathered = [mine_cpu]
    sd["ngsgd"] = dict(sd["ngsgd"])
    sd["ngsgd"]["preconditioners_by_rank"] = gathered
    return sd
