"""The chain training loop: one object a recipe's train.py drives under torchrun.

One step on rank r (W ranks, DDP)::

    x, supervision  = minibatch p + r of the epoch's plan          (pkwrap.train.data)
    chain, xent     = model(x[:, rows the model's context needs])  (pkwrap.train.context)
    loss            = ChainLoss(chain, supervision, xent, deriv_weights).loss
                    = -(objf + l2_term) - xent_regularize * xent_objf      (reduction "sum")
    backward        (NG-SGD preconditions in backward; DDP averages gradients over ranks)
    optimizer.step(); scheduler.step(); p += W

As in Kaldi, the objective is a *sum* over frames (Kaldi's learning rates assume it)
and the W jobs' updates are averaged (Kaldi averages the jobs' models; DDP averages
their gradients, the same to first order).

Checkpoints every ``checkpoint_every`` steps and at the end hold everything needed to
continue bitwise-identically: model, optimizer (NG state included), scheduler, sampler
position, the RNG states of every rank, step and epoch (pkwrap.train.checkpoint). On
start, the newest checkpoint that verifies is loaded; so under
``torchrun --max-restarts=K`` a killed worker costs at most ``checkpoint_every`` steps.
Restarting with another number of workers continues at the same global data position;
each rank takes its own saved RNG state if there was one, else one seeded from
``(seed, step, rank)``.
"""
from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpt
from .context import ModelContext, probe_model_context
from .data import (ChainMinibatchSampler, EgsSource, PlannedEgs, check_egs_for_model,
                   dataset_structures, make_loader)
from .diagnostics import (COMBINE_MODES, average_state_dicts, combine_models,
                          compute_chain_loss, compute_prob, compute_prob_log_lines,
                          is_batchnorm, scale_batchnorm_stats)
from .dist import (DistInfo, all_gather_object, all_reduce_sum, barrier, broadcast_object,
                   setup_distributed)
from .host_memory import keep_freed_memory
from .metrics import ObjfTracker, make_summary_writer, setup_logger
from .model_io import save_model

__all__ = ["TrainConfig", "Trainer"]


@dataclass
class TrainConfig:
    """Training settings (Kaldi's train.py option in brackets where there is one).

    Args:
      exp_dir: experiment dir: ``checkpoints/``, ``log/train.<rank>.log``,
        ``tensorboard/``, ``final.pt``.
      num_epochs: passes over the egs (``--trainer.num-epochs``).
      minibatch_size: Kaldi rule string (``--trainer.num-chunk-per-minibatch``), e.g.
        ``"128"`` or ``"256=64/512=32"``.
      diagnostic_minibatch_size: rule for compute-prob and combination minibatches;
        Kaldi's train.py merges those egs with ``--minibatch-size=1:64`` so that no eg
        is left out (a training rule such as ``"8:32"`` would drop small groups).
      seed: seed of the egs permutations and of the RNGs (``--srand``).
      shuffle: draw a new egs permutation each epoch.
      frame_shift: rotate frame shifts over minibatches as train.py does.
      apply_deriv_weights: use the egs' deriv weights (``--chain.apply-deriv-weights``).
      checkpoint_every: steps between checkpoints (0: only at epoch ends).
      keep_last: checkpoints kept besides the best (by valid objective).
      valid_every: steps between compute-prob diagnostics (0: at epoch ends only).
      log_every: steps between train log lines / TensorBoard points.
      max_steps: stop after this many steps in all (None: run all epochs).
      num_workers: DataLoader workers per rank.
      combine_last: at the end, combine up to this many last checkpoints as
        ``combine_mode`` says (0 or 1: no combination).
      combine_mode: ``"valid"``: nnet3-chain-combine's choice, the running average of
        the newest checkpoints that is best on the valid egs, its batchnorm statistics
        then re-estimated on them; ``"average"``: the plain average of all
        ``combine_last``, batchnorm statistics averaged too (icefall's ``--avg``), for a
        model meant for other speech than its valid egs (on those the last model tends
        to win).
      egs_left_context: frames before t=0 in the egs (only for egs without indexes).
      input_name: the features input of the egs.
      progress_bar: tqdm bar on rank 0.
      tensorboard: write TensorBoard on rank 0.
      batchnorm_stats_scale: after every step, scale the statistics of Kaldi batchnorm
        layers (pkwrap.nnet3's BatchNormComponent) by this, as nnet3-chain-train does (0.8).
      model_averaging_period: 0: gradients are allreduced every step (DDP, with the
        ``comm_hook`` given). N > 0: Kaldi's own scheme instead, local steps and the
        parameters averaged every N steps (``comm_hooks.kaldi_model_averaging``), and
        also before every checkpoint, so that a checkpoint holds the model every rank
        has.
      find_unused_parameters: DDP's option, for models with parameters that some
        steps do not use.
      keep_freed_memory: on the CPU, have malloc keep freed memory for reuse
        (:func:`pkwrap.train.keep_freed_memory`: no page faults on every step's
        buffers; the process keeps its peak heap).
      max_failed_fraction: abort training when more than this fraction of the steps so
        far were skipped (a step is skipped, by every rank together, when the minibatch
        of any rank failed: a non-finite objective or gradient, skipped as Kaldi skips
        it); checked every ``log_every`` steps (10 when 0), once at least
        ``min_minibatches_before_abort`` minibatches (over all ranks) were done.
      min_minibatches_before_abort: see ``max_failed_fraction``.
    """

    exp_dir: str
    num_epochs: int = 1
    minibatch_size: str = "128"
    diagnostic_minibatch_size: str = "1:64"
    seed: int = 0
    shuffle: bool = True
    frame_shift: bool = True
    apply_deriv_weights: bool = True
    checkpoint_every: int = 100
    keep_last: int = 3
    valid_every: int = 0
    log_every: int = 10
    max_steps: Optional[int] = None
    num_workers: int = 0
    combine_last: int = 0
    combine_mode: str = "valid"
    egs_left_context: Optional[int] = None
    input_name: str = "input"
    progress_bar: bool = True
    tensorboard: bool = True
    batchnorm_stats_scale: float = 0.8
    model_averaging_period: int = 0
    find_unused_parameters: bool = False
    keep_freed_memory: bool = True
    max_failed_fraction: float = 0.1
    min_minibatches_before_abort: int = 20

    def __post_init__(self):
        if self.combine_mode not in COMBINE_MODES:
            raise ValueError("TrainConfig.combine_mode must be 'valid' or 'average', got %r"
                             % (self.combine_mode,))
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise ValueError("TrainConfig.max_failed_fraction must be in [0, 1], got %r"
                             % self.max_failed_fraction)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(
        model, nn.parallel.DistributedDataParallel) else model


def _scale_kaldi_batchnorm_stats(model: nn.Module, scale: float) -> None:
    for m in model.modules():
        if is_batchnorm(m):
            scale_batchnorm_stats(m, scale)


def _ng_stats(model: nn.Module) -> Dict[str, float]:
    """Statistics of the natural-gradient preconditioners (pkwrap.ngsgd) of the NG layers.

    ``scale_{mean,min,max}``: the scales of the last preconditioning (Kaldi's "scale",
    sqrt(|X|^2 / |X_hat|^2)), where the preconditioner records one (``last_scale``);
    ``rho_mean``: mean of rho_t (the Fisher estimate's floor term); ``floored``: eigenvalues
    floored and ``reorthogonalized``: re-orthogonalizations in the last update.
    """
    scales: List[float] = []
    rhos: List[float] = []
    floored = reorth = 0
    n = 0
    for m in model.modules():
        for name in ("preconditioner_in", "preconditioner_out"):
            pre = getattr(m, name, None)
            if pre is None or not hasattr(pre, "rho_t"):
                continue
            n += 1
            v = getattr(pre, "last_scale", None)
            if v is not None and math.isfinite(float(v)):
                scales.append(float(v))
            r = float(pre.rho_t)
            if r > -1e9:  # -1e10 = not initialized yet
                rhos.append(r)
            floored += int(getattr(pre, "last_num_floored", 0) or 0)
            reorth += int(bool(getattr(pre, "last_reorthogonalized", False)))
    out: Dict[str, float] = {}
    if n == 0:
        return out
    if scales:
        out.update(scale_mean=sum(scales) / len(scales), scale_min=min(scales),
                   scale_max=max(scales))
    if rhos:
        out["rho_mean"] = sum(rhos) / len(rhos)
    out["floored"] = float(floored)
    out["reorthogonalized"] = float(reorth)
    return out


class Trainer:
    """Chain training under torchrun (or in one plain process).

    Args:
      model: ``[B][T_in][F] -> [B][T_out][P]`` (or ``(chain, xent)``); on ``dist.device``.
      loss_fn: ``pkwrap.chain.ChainLoss`` (reduction "sum"), on the same device.
      optimizer: e.g. ``pkwrap.optim``'s NG-SGD optimizer or any torch optimizer,
        built on ``model``'s parameters.
      train_data: an :class:`~pkwrap.train.data.EgsSource`, e.g.
        :class:`~pkwrap.train.stream.StreamingEgs` (a Kaldi egs dir streamed), or a
        map-style dataset, which is wrapped in a
        :class:`~pkwrap.train.data.PlannedEgs` with the config's minibatch rule, seed and
        shuffling: an :class:`~pkwrap.train.data.EgsDataset` (Kaldi egs in memory) or a
        dataset of ``(key, chain_example)`` made on the fly, e.g.
        ``pkwrap.chain.egs.ChainEgsDataset`` (its ``set_epoch`` is called at every epoch;
        see :func:`~pkwrap.train.data.dataset_structures`).
      config: :class:`TrainConfig`.
      scheduler: LR scheduler stepped once per step (e.g. Kaldi's schedule).
      valid_data, train_diag_data: egs for compute-prob (Kaldi's valid_diagnostic and
        train_diagnostic egs).
      dist_info: from :func:`pkwrap.train.setup_distributed` (default: set up here).
      comm_hook: ``(state, hook)`` registered on the DDP model (e.g. the NG-SGD hook of
        ``pkwrap.train.comm_hooks``); None: DDP's default allreduce (mean).
      feat_dim: feature dim (default: from the first eg).
      model_context: skip probing and use this.
      after_step: ``f(model, step)`` called on every rank after each optimizer step
        (after the batchnorm stats scaling), e.g. for custom constraints.
      model_spec: ``{"factory": "package.module:callable", "kwargs": {...}}`` that
        rebuilds the model; stored in checkpoints and final.pt so that
        ``pkwrap.train.load_model`` and the CLIs can load them.
      before_step: ``f(trainer, batch)`` called on every rank before each step (e.g. a
        per-iteration schedule: learning rate, diagnostics, models per iteration, as
        ``pkwrap.train.chain_train`` does); returning False ends training there (the
        batch is not trained on; to keep the data position before it, the hook rewinds
        the source, e.g. :meth:`StreamingEgs.restart_iteration` at an iteration's start).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer, train_data,
                 config: TrainConfig, scheduler=None, valid_data=None, train_diag_data=None,
                 dist_info: Optional[DistInfo] = None, comm_hook=None,
                 feat_dim: Optional[int] = None, model_context: Optional[ModelContext] = None,
                 after_step: Optional[Callable[[nn.Module, int], None]] = None,
                 model_spec: Optional[Dict[str, Any]] = None,
                 before_step: Optional[Callable[["Trainer", Any], Any]] = None):
        self.cfg = config
        self.averager = None
        self.after_step = after_step
        self.before_step = before_step
        self.stopped = False
        self.model_spec = model_spec
        self.dist = dist_info if dist_info is not None else setup_distributed()
        self.device = self.dist.device
        if self.device.type == "cpu" and config.keep_freed_memory:
            keep_freed_memory()
        self.raw_model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_data = train_data
        self.valid_data = valid_data
        self.train_diag_data = train_diag_data
        self.ckpt_dir = os.path.join(config.exp_dir, "checkpoints")
        self.log = setup_logger(os.path.join(config.exp_dir, "log"), self.dist.rank)
        if isinstance(train_data, EgsSource):
            self.data = train_data
        else:
            self.data = PlannedEgs(train_data, config.minibatch_size, shuffle=config.shuffle,
                                   seed=config.seed, frame_shift=config.frame_shift,
                                   input_name=config.input_name,
                                   egs_left_context=config.egs_left_context,
                                   num_workers=config.num_workers)
        if feat_dim is None:
            feat_dim = self.data.feat_dim(config.input_name)
        self.ctx = model_context or probe_model_context(model, feat_dim, device=self.device)
        self.log.info("model context: left %d right %d, frame subsampling %d%s%s",
                      self.ctx.left_context, self.ctx.right_context,
                      self.ctx.frame_subsampling_factor, " (padded)" if self.ctx.padded else "",
                      ", xent output" if self.ctx.has_xent else "")
        if isinstance(self.data, PlannedEgs):
            self.data.frame_subsampling_factor = self.ctx.frame_subsampling_factor
        elif self.data.frame_subsampling_factor != self.ctx.frame_subsampling_factor:
            raise ValueError("the egs source has frame subsampling factor %d, the model %d"
                             % (self.data.frame_subsampling_factor,
                                self.ctx.frame_subsampling_factor))
        self.data.bind(self.dist.rank, self.dist.world_size, self.device)
        if isinstance(self.data, PlannedEgs):
            # before any step, and from data every rank holds: the same answer on every
            # rank (streamed egs are checked at their first minibatch)
            check_egs_for_model(self.data.dataset, self.ctx, config.input_name,
                                config.egs_left_context, self.log, "training")
        if self.dist.world_size > 1:
            kw = {} if self.device.type == "cpu" else {"device_ids": [self.device]}
            # buffers (batchnorm statistics) are averaged over ranks at checkpoints, not
            # overwritten by rank 0's on every forward (see sync_buffers); newer torch
            # names that option forward_sync_buffers (broadcast_buffers is deprecated)
            if "forward_sync_buffers" in inspect.signature(
                    nn.parallel.DistributedDataParallel.__init__).parameters:
                kw["forward_sync_buffers"] = False
            else:
                kw["broadcast_buffers"] = False
            self.model = nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=config.find_unused_parameters, **kw)
            if config.model_averaging_period > 0:
                if comm_hook is not None:
                    raise ValueError("model_averaging_period and comm_hook exclude each other")
                from .comm_hooks import kaldi_model_averaging
                self.averager = kaldi_model_averaging(self.model,
                                                      config.model_averaging_period)
            elif comm_hook is not None:
                state, hook = comm_hook
                self.model.register_comm_hook(state, hook)
        else:
            self.model = model
        self.step = 0
        self.epoch = 0
        self.valid_objf: Dict[int, float] = {}
        # Non-finite minibatches (as of the last check, _count_failures): ``skipped`` is
        # the number of failed minibatches over all ranks (a minibatch whose own objective
        # or gradient was not finite), ``skipped_steps`` the steps not applied because
        # of them (every rank skips such a step: with W ranks, one failed minibatch
        # discards the other W-1 minibatches of that step too)
        self.skipped = 0
        self.skipped_steps = 0
        self._failed_local = 0  # this rank's failed minibatches since the last check
        self._skipped_local = 0  # steps this rank did not apply since the last check
        self.tb = None
        self._resumed_from: Optional[str] = None
        self._last_saved_step = -1

    @property
    def sampler(self) -> Optional[ChainMinibatchSampler]:
        """The minibatch plan when training on a map-style dataset (else None)."""
        return getattr(self.data, "sampler", None)

    # --- checkpoints ------------------------------------------------------------------
    def _optimizer_state_dict(self) -> Dict[str, Any]:
        """The optimizer's state; NG-SGD preconditioners differ per rank (each rank
        preconditions its own gradients), so those of every rank are gathered (collective)."""
        if hasattr(self.optimizer, "is_backstitch_step"):  # pkwrap.optim.NGSGD
            from .comm_hooks import gather_ngsgd_state_dict
            sd = gather_ngsgd_state_dict(self.optimizer)
            del sd["ngsgd"]["preconditioners"]  # this rank's, also in the list
            return sd
        return self.optimizer.state_dict()

    def _load_optimizer_state_dict(self, sd: Dict[str, Any]) -> None:
        ng = sd.get("ngsgd") if isinstance(sd, dict) else None
        if isinstance(ng, dict) and "preconditioners_by_rank" in ng:
            by_rank = ng["preconditioners_by_rank"]
            # another number of workers: rank r continues from rank r mod (old size)
            mine = by_rank[self.dist.rank % len(by_rank)]
            sd = dict(sd)
            sd["ngsgd"] = {k: v for k, v in ng.items() if k != "preconditioners_by_rank"}
            sd["ngsgd"]["preconditioners"] = mine
        self.optimizer.load_state_dict(sd)

    def state_dict(self, optimizer_state: Optional[Dict[str, Any]] = None,
                   data_states: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        """The checkpoint dict. ``data_states``: the data position of every rank (rank
        order; default: this rank's); ``"sampler"`` keeps rank 0's."""
        if data_states is None:
            data_states = [self.data.state_dict()]
        return {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": optimizer_state if optimizer_state is not None
            else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "sampler": data_states[0],
            "data": data_states,
            "step": self.step,
            "epoch": self.epoch,
            "skipped": self.skipped,
            "skipped_steps": self.skipped_steps,
            "valid_objf": dict(self.valid_objf),
            "model_context": asdict(self.ctx),
            "model_spec": self.model_spec,
            "config": asdict(self.cfg),
        }

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Average the floating buffers (batchnorm statistics) over ranks (collective).

        Each rank accumulates statistics of its own minibatches; Kaldi's model averaging
        averages them, and so does this, before checkpoints, diagnostics and the end.
        """
        if self.dist.world_size == 1:
            return
        bufs = [b for b in _unwrap(self.model).buffers() if b.is_floating_point()]
        if not bufs:
            return
        flat = torch.cat([b.detach().reshape(-1).double() for b in bufs])
        all_reduce_sum(flat)
        flat /= self.dist.world_size
        i = 0
        for b in bufs:
            n = b.numel()
            b.copy_(flat[i:i + n].view_as(b).to(b.dtype))
            i += n

    def _count_failures(self) -> None:
        """Add every rank's failed minibatches to ``skipped`` and the skipped steps to
        ``skipped_steps`` (collective, at the same steps on every rank); abort when more
        than ``max_failed_fraction`` of the steps were skipped."""
        t = torch.tensor([float(self._failed_local)], dtype=torch.float64, device=self.device)
        self.skipped += int(all_reduce_sum(t).item())
        # every rank skips the same steps (the gradient allreduce carries the failure);
        # with local steps (model averaging) a step lost on any rank counts
        n = torch.tensor([float(self._skipped_local)], dtype=torch.float64, device=self.device)
        if self.dist.world_size > 1:
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
        self.skipped_steps += int(n.item())
        self._failed_local = self._skipped_local = 0
        total = self.step * self.dist.world_size
        if (total >= self.cfg.min_minibatches_before_abort
                and self.skipped_steps > self.cfg.max_failed_fraction * self.step):
            raise RuntimeError(
                "training aborted at step %d: %d of %d steps skipped (%d of %d minibatches "
                "over %d rank(s) had a non-finite objective or gradient), more than "
                "max_failed_fraction=%g; check the egs and the learning rate"
                % (self.step, self.skipped_steps, self.step, self.skipped, total,
                   self.dist.world_size, self.cfg.max_failed_fraction))

    def save(self) -> Optional[str]:
        """Checkpoint now (collective: every rank must call it)."""
        self._count_failures()
        if self.averager is not None:  # local steps since the last average: average now
            from torch.distributed.algorithms.model_averaging.utils import average_parameters
            average_parameters(iter(_unwrap(self.model).parameters()), dist.group.WORLD)
        self.sync_buffers()
        rngs = all_gather_object(ckpt.get_rng_state())
        data_states = all_gather_object(self.data.state_dict())
        opt_sd = self._optimizer_state_dict()
        path = None
        if self.dist.is_main:
            st = self.state_dict(opt_sd, data_states)
            st["rng"] = rngs
            st["world_size"] = self.dist.world_size
            path = ckpt.save_checkpoint(ckpt.checkpoint_path(self.ckpt_dir, self.step), st)
            ckpt.apply_retention(self.ckpt_dir, self.cfg.keep_last, self.valid_objf)
            self.log.info("wrote checkpoint %s", path)
        barrier()
        self._last_saved_step = self.step
        return path

    def resume(self) -> bool:
        """Load the newest valid checkpoint, if any (collective). Returns True if loaded."""
        path = None
        if self.dist.is_main and os.path.isdir(self.ckpt_dir):
            path, _ = ckpt.find_latest_checkpoint(self.ckpt_dir)
        path = broadcast_object(path)
        if path is None:
            return False
        # every rank reads the file where it can see it (shared exp dir); a node without
        # it (no shared filesystem) gets rank 0's copy over the process group
        visible = all_gather_object(os.path.isfile(path))
        if all(visible):
            st = ckpt.load_checkpoint(path)
        else:
            st = broadcast_object(ckpt.load_checkpoint(path) if self.dist.is_main else None)
        _unwrap(self.model).load_state_dict(st["model"])
        self._load_optimizer_state_dict(st["optimizer"])
        if self.scheduler is not None and st.get("scheduler") is not None:
            self.scheduler.load_state_dict(st["scheduler"])
        self.step = int(st["step"])
        self.epoch = int(st["epoch"])
        self.skipped = int(st.get("skipped", 0))
        self.skipped_steps = int(st.get("skipped_steps", self.skipped))
        self.valid_objf = {int(k): float(v) for k, v in st.get("valid_objf", {}).items()}
        by_rank = st.get("data") or [st["sampler"]]
        try:
            note = self.data.load_state_dict(by_rank[self.dist.rank % len(by_rank)])
        except ValueError as e:  # e.g. the egs dir changed since the checkpoint
            raise ValueError("%s: cannot resume from this checkpoint: %s; to train on the "
                             "data as it is now from the start, remove %s (or use another "
                             "exp dir)" % (path, e, self.ckpt_dir)) from None
        if note:
            self.log.info("checkpoint was written by %s workers, now %d: %s",
                          st.get("world_size"), self.dist.world_size, note)
        if self.data.epoch < self.epoch < self.cfg.num_epochs:
            # saved at the end of the run's last epoch; this run has more epochs
            self.data.set_epoch(self.epoch)
        rngs = st.get("rng") or []
        if st.get("world_size") == self.dist.world_size and self.dist.rank < len(rngs):
            ckpt.set_rng_state(rngs[self.dist.rank])
        else:
            self._seed_rngs(self.cfg.seed * 1000003 + self.step * 101 + self.dist.rank)
            self.log.info("checkpoint was written by %s workers, now %d: RNGs reseeded",
                          st.get("world_size"), self.dist.world_size)
        self._resumed_from = path
        self._last_saved_step = self.step
        self.log.info("resumed from %s (step %d, epoch %d, %s)", path, self.step,
                      self.epoch, self.data.describe_position())
        return True

    @staticmethod
    def _seed_rngs(seed: int) -> None:
        import random
        import numpy as np
        torch.manual_seed(seed)
        np.random.seed(seed % (2 ** 32))
        random.seed(seed)

    # --- diagnostics --------------------------------------------------------------------
    def _batches_of(self, data, rank_share: bool = True) -> List:
        """All minibatches of ``data`` in order, this rank's share (i % W == rank)."""
        s = ChainMinibatchSampler(dataset_structures(data, self.cfg.input_name,
                                                     self.ctx.frame_subsampling_factor),
                                  self.cfg.diagnostic_minibatch_size,
                                  self.ctx.frame_subsampling_factor, shuffle=False,
                                  rank=0, world_size=1, frame_shift=False)
        loader = make_loader(data, s, self.cfg.input_name, self.cfg.egs_left_context)
        out = []
        for i, b in enumerate(loader):
            if not rank_share or i % self.dist.world_size == self.dist.rank:
                out.append(b)
        return out

    def diagnostics(self) -> Dict[str, float]:
        """compute-prob on the valid and train-diagnostic egs; logs Kaldi's lines."""
        res = {}
        self.sync_buffers()
        rng = ckpt.get_rng_state()  # diagnostics must not move the training RNGs
        try:
            for name, data in (("valid", self.valid_data), ("train_diag", self.train_diag_data)):
                if data is None:
                    continue
                tr = compute_prob(_unwrap(self.model), self.ctx, self.loss_fn,
                                  self._batches_of(data), device=self.device)
                for line in compute_prob_log_lines(tr):
                    self.log.info("compute_prob %s step %d: %s", name, self.step, line)
                if self.tb is not None:
                    tr.write_summary(self.tb, name + "/", self.step)
                res[name] = tr.per_frame("objf")
        finally:
            ckpt.set_rng_state(rng)
        if "valid" in res:
            self.valid_objf[self.step] = res["valid"]
        return res

    # --- training -----------------------------------------------------------------------
    def _train_step(self, batch):
        model, opt = self.model, self.optimizer
        model.train()
        batch = batch.to(self.device)
        box = {}

        def closure():
            opt.zero_grad(set_to_none=True)
            res = compute_chain_loss(model, self.ctx, self.loss_fn, batch,
                                     self.cfg.apply_deriv_weights)
            loss = res.loss
            if not getattr(res, "ok", True):
                # A failed minibatch (Kaldi's rule: objective -10/frame, no derivative) is
                # skipped by every rank together: its NaN gradient reaches the gradient
                # allreduce, so every rank's optimizer sees a non-finite change and skips
                # (no extra collective; a host-side flag the loss already computed).
                loss = loss * float("nan")
            loss.backward()
            box["res"] = res
            return res.loss

        is_ngsgd = hasattr(opt, "is_backstitch_step")
        skipped_before = getattr(opt, "num_skipped", 0)
        want_change = self.cfg.log_every > 0 and (self.step + 1) % self.cfg.log_every == 0
        before = [p.detach().clone() for p in model.parameters()] if want_change else None
        if is_ngsgd and opt.is_backstitch_step():
            # backstitch evaluates the minibatch twice through the closure
            opt.step(closure, num_sequences=batch.num_sequences)
            grad_norm = self._grad_norm()
        else:
            closure()
            grad_norm = self._grad_norm()
            if is_ngsgd:
                opt.step(num_sequences=batch.num_sequences)  # skips non-finite changes itself
            elif math.isfinite(grad_norm):
                opt.step()
            else:  # every rank sees the same (all-reduced) gradient, so all skip together
                opt.zero_grad(set_to_none=True)
        res = box["res"]
        # this rank's minibatch failed (its own objective), or the step was not applied
        # (a non-finite gradient after the allreduce: some rank's minibatch failed)
        own_ok = bool(math.isfinite(float(res.loss.detach()))) and bool(getattr(res, "ok", True))
        applied = math.isfinite(grad_norm) and getattr(opt, "num_skipped", 0) == skipped_before
        if self.dist.world_size == 1 or self.averager is not None:
            own_ok = own_ok and applied  # the gradient is this rank's own
        ok = (own_ok, applied)
        if self.averager is not None:
            # average after steps N, 2N, ... (global step count, so restarts keep the phase)
            self.averager.step = self.step + 1
            self.averager.average_parameters(model.parameters())
        if self.scheduler is not None:
            self.scheduler.step()
        if self.cfg.batchnorm_stats_scale != 1.0:
            _scale_kaldi_batchnorm_stats(_unwrap(model), self.cfg.batchnorm_stats_scale)
        if self.after_step is not None:
            self.after_step(_unwrap(model), self.step + 1)
        change = None
        if before is not None:
            change = float(torch.stack([(p.detach() - b).double().pow(2).sum() for b, p in
                                        zip(before, model.parameters())]).sum().sqrt())
        return res, ok, grad_norm, change

    def _grad_norm(self) -> float:
        sq = [p.grad.detach().double().pow(2).sum() for p in self.model.parameters()
              if p.grad is not None]
        return float(torch.stack(sq).sum().sqrt()) if sq else 0.0

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self) -> nn.Module:
        """Run (or continue) training; returns the trained (unwrapped) model."""
        cfg = self.cfg
        resumed = self.resume()
        if self.dist.is_main and cfg.tensorboard:
            # after a restart, drop the points the dead run logged after its checkpoint
            self.tb = make_summary_writer(os.path.join(cfg.exp_dir, "tensorboard"),
                                          purge_step=self.step + 1 if resumed else None)
        if not resumed:
            self._seed_rngs(cfg.seed * 1000003 + self.dist.rank)
            self.data.set_epoch(0)
        # steps still to do from the data position (the number of workers may have
        # changed since the checkpoint); None when the source cannot know before reading
        total_steps: Optional[int] = self.step
        if self.epoch < cfg.num_epochs:
            left = [self.data.steps_left()] + [self.data.steps_per_epoch(e) for e in
                                               range(self.epoch + 1, cfg.num_epochs)]
            total_steps = None if None in left else self.step + sum(left)
        if cfg.max_steps is not None:
            total_steps = cfg.max_steps if total_steps is None else min(total_steps,
                                                                        cfg.max_steps)
        bar = None
        if self.dist.is_main and cfg.progress_bar:
            try:
                from tqdm import tqdm
                bar = tqdm(total=total_steps, initial=self.step if total_steps is None
                           else min(self.step, total_steps),
                           desc="train", dynamic_ncols=True)
            except ImportError:  # pragma: no cover
                bar = None
        tracker = ObjfTracker()
        t0 = time.time()
        max_steps = cfg.max_steps if cfg.max_steps is not None else float("inf")
        while self.step < max_steps and self.epoch < cfg.num_epochs and not self.stopped:
            for batch in self.data.batches():
                if self.before_step is not None and self.before_step(self, batch) is False:
                    self.stopped = True
                    break
                res, ok, grad_norm, change = self._train_step(batch)
                self.step += 1
                self.data.step_done()
                own_ok, applied = ok
                if not own_ok:
                    self._failed_local += 1
                    self.log.warning("step %d: non-finite objective or gradient "
                                     "(minibatch %d): skipped", self.step, batch.index)
                if not applied:
                    self._skipped_local += 1
                    if own_ok:
                        self.log.warning("step %d: skipped on every rank (another rank's "
                                         "minibatch gave a non-finite objective or "
                                         "gradient)", self.step)
                if self.step % (cfg.log_every or 10) == 0:
                    self._count_failures()
                tracker.add_result(res, batch.num_output_frames, xent=self.ctx.has_xent)
                if bar is not None:
                    bar.update(1)
                if cfg.log_every > 0 and self.step % cfg.log_every == 0:
                    self._log_train(tracker, grad_norm, change, time.time() - t0)
                    tracker, t0 = ObjfTracker(), time.time()
                if cfg.valid_every > 0 and self.step % cfg.valid_every == 0:
                    self.diagnostics()
                if cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0:
                    self.save()
                if self.step >= max_steps:
                    break
            if self.stopped:
                break
            if self.data.epoch_finished():
                self.log.info("finished epoch %d at step %d", self.epoch, self.step)
                self.epoch += 1
                if self.epoch < cfg.num_epochs:
                    self.data.set_epoch(self.epoch)
                if cfg.valid_every == 0 and (self.valid_data is not None
                                             or self.train_diag_data is not None):
                    self.diagnostics()
                if self._last_saved_step != self.step:
                    self.save()
        if bar is not None:
            bar.close()
        if tracker.get("minibatches", 0):
            self._log_train(tracker, None, None, time.time() - t0)
        if self._last_saved_step != self.step:
            self.save()
        model = _unwrap(self.model)
        if cfg.combine_last > 1 and (self.valid_data is not None
                                     or cfg.combine_mode == "average"):
            self.combine()
        if self.dist.is_main:
            final = os.path.join(cfg.exp_dir, "final.pt")
            save_model(final, model, self.model_spec, self.ctx, step=self.step)
            self.log.info("wrote %s after %d steps (%d skipped minibatches; %d steps "
                          "skipped)", final, self.step, self.skipped, self.skipped_steps)
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        barrier()
        return model

    def combine(self) -> None:
        """nnet3-chain-combine over the last ``combine_last`` checkpoints (collective)."""
        paths = [p for _, p in ckpt.list_checkpoints(self.ckpt_dir)][-self.cfg.combine_last:]
        sds = []
        for p in paths:
            try:
                sds.append(ckpt.load_checkpoint(p)["model"])
            except ckpt.CheckpointError as e:
                self.log.warning("combine: skipping %s", e)
        if len(sds) < 2:
            return
        model = _unwrap(self.model)
        if self.valid_data is None:  # "average" needs no valid egs: no objective to show
            model.load_state_dict(average_state_dicts(sds))
            self.log.info("combined the last %d of %d checkpoints (average)", len(sds),
                          len(sds))
            return
        n, a, b = combine_models(model, sds, self.ctx, self.loss_fn,
                                 self._batches_of(self.valid_data, rank_share=True),
                                 logger=self.log, select=self.cfg.combine_mode,
                                 recompute_stats=self.cfg.combine_mode == "valid")
        if self.cfg.combine_mode == "valid":
            self.sync_buffers()  # statistics were recomputed on each rank's share
        self.log.info("combined the last %d of %d checkpoints (%s): valid objf %g -> %g",
                      n, len(sds), self.cfg.combine_mode, a, b)

    def _log_train(self, tracker: ObjfTracker, grad_norm, change, secs) -> None:
        tr = tracker.reduce(self.device)
        fps = tr.get("frames", 0.0) / secs if secs > 0 else float("nan")
        ng = _ng_stats(_unwrap(self.model))
        self.log.info("step %d epoch %d: %s, lr %.4g, grad-norm %s, param-change %s, "
                      "%.0f frames/s, %d skipped (%d steps)", self.step, self.epoch, tr,
                      self._lr(), "%.4g" % grad_norm if grad_norm is not None else "-",
                      "%.4g" % change if change is not None else "-", fps, self.skipped,
                      self.skipped_steps)
        if self.tb is None:
            return
        tr.write_summary(self.tb, "train/", self.step)
        self.tb.add_scalar("train/learning_rate", self._lr(), self.step)
        if grad_norm is not None:
            self.tb.add_scalar("train/grad_norm", grad_norm, self.step)
        if change is not None:
            self.tb.add_scalar("train/param_change", change, self.step)
        self.tb.add_scalar("train/frames_per_second", fps, self.step)
        self.tb.add_scalar("train/skipped_minibatches", self.skipped, self.step)
        self.tb.add_scalar("train/skipped_steps", self.skipped_steps, self.step)
        for k, v in ng.items():
            self.tb.add_scalar("train/ng_" + k, v, self.step)
