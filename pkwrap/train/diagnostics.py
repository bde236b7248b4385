"""Kaldi's diagnostics: compute-prob, model combination, batchnorm stats.

**compute-prob** (``nnet3-chain-compute-prob``): the chain objective of a model on a set
of egs, with batchnorm and dropout in test mode, summed over minibatches and divided by
the total weight::

    objf/frame = sum_b (num_logprob_weighted_b - den_logprob_weighted_b) / sum_b w_b S_b T_b

printed as Kaldi prints it: ``Overall log-probability for 'output' is X per frame,
over N frames.`` (``X + L = Z`` when there is an l2 term), and for ``'output-xent'``
``sum(xent_output * num_post) / weight``.

**combine** (``nnet3-chain-combine``): models ``M_1 .. M_n`` oldest first. Start with
the last, ``A_1 = M_n``; add the others newest first as a running average
``A_k = ((k-1) A_{k-1} + M_{n-k+1}) / k``; evaluate the objective on the valid egs after
every ``ceil(n / max_objective_evaluations)`` additions and at the last; return the
average with the best objective (the last model alone if none is better); with
``select="average"``, the average of all ``n`` whatever its objective (icefall's
``--avg``: for models that will meet other data than the valid egs, which favour the
last model). As in Kaldi,
evaluation uses dropout in test mode and, by default, batchnorm in *training* mode
(minibatch statistics). Parameters and floating buffers are averaged; integer buffers
come from the newest model. Batchnorm statistics of the result are then recomputed.

**batchnorm stats** (``RecomputeStats``): running statistics of every batchnorm module
are reset and re-estimated as plain averages over the given egs, dropout in test mode.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .context import ModelContext, call_model, select_model_input, split_model_output
from .metrics import ObjfTracker, kaldi_objf_line

__all__ = [
    "compute_chain_loss",
    "compute_prob",
    "compute_prob_log_lines",
    "combine_models",
    "COMBINE_MODES",
    "average_state_dicts",
    "recompute_batchnorm_stats",
    "test_mode",
    "is_batchnorm",
]

log = logging.getLogger("pkwrap.train")

# how combine_models chooses: Kaldi's best running average on the valid egs, or the plain
# average of all the models
COMBINE_MODES = ("valid", "average")

_warned_no_shift = False
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout)


def scale_batchnorm_stats(m: nn.Module, scale: float) -> bool:
    """Scale a Kaldi-style batchnorm's accumulated statistics (Kaldi's
    ``ScaleBatchnormStats``; 0 forgets them) through its ``scale_stats`` (pkwrap.nnet3's
    BatchNormComponent, which TDNNFModel uses too). Returns False when ``m`` keeps no
    such statistics."""
    if hasattr(m, "scale_stats"):
        m.scale_stats(scale)
        return True
    return False


def is_batchnorm(m: nn.Module) -> bool:
    """Torch batchnorm, or a module that says so (``is_batchnorm = True`` or a class name
    containing "BatchNorm", as pkwrap.nnet3's BatchNormComponent)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or \
        bool(getattr(m, "is_batchnorm", False)) or "BatchNorm" in type(m).__name__


def _is_dropout(m: nn.Module) -> bool:
    return isinstance(m, _DROPOUT_TYPES) or bool(getattr(m, "is_dropout", False)) or \
        "Dropout" in type(m).__name__ or "SpecAugment" in type(m).__name__


@contextlib.contextmanager
def test_mode(model: nn.Module, batchnorm_test_mode: bool = True,
              dropout_test_mode: bool = True):
    """Set Kaldi's test modes for the duration; restores modes and batchnorm stats.

    With ``batchnorm_test_mode=False`` batchnorm uses minibatch statistics (train mode)
    and its running statistics are put back afterwards, so evaluation changes nothing.
    """
    modes = {m: m.training for m in model.modules()}
    saved = {}
    try:
        model.eval()
        for m in model.modules():
            if is_batchnorm(m):
                if not batchnorm_test_mode:
                    saved[m] = copy.deepcopy(m.state_dict())
                    m.train()
            elif _is_dropout(m) and not dropout_test_mode:
                m.train()
        yield model
    finally:
        for m, sd in saved.items():
            m.load_state_dict(sd)
        for m, tr in modes.items():
            m.training = tr


def compute_chain_loss(model: nn.Module, ctx: ModelContext, loss_fn: nn.Module, batch,
                       apply_deriv_weights: bool = True):
    """Forward one :class:`~pkwrap.train.data.ChainBatch` and its chain loss.

    Args:
      model: the acoustic model (or its DDP wrapper).
      ctx: its :class:`ModelContext`.
      loss_fn: ``pkwrap.chain.ChainLoss`` (or an object with its forward signature).
      batch: the minibatch (on the model's device).
      apply_deriv_weights: pass the egs' deriv_weights to the loss (Kaldi's
        ``--apply-deriv-weights``, default true in chain training).
    Returns:
      The loss result (``.loss``, ``.objf``, ``.l2_term``, ``.weight``, ``.xent_objf``...).
    """
    t = batch.frames_per_sequence
    try:
        x, off = select_model_input(batch.feats, ctx, batch.egs_left_context, t,
                                    batch.frame_shift)
    except ValueError:
        if batch.frame_shift == 0:
            raise
        # egs with exactly the model's context leave no room for the shift: train unshifted
        global _warned_no_shift
        if not _warned_no_shift:
            _warned_no_shift = True
            log.warning("egs have no spare context for frame shift %d (model context %d/%d, "
                        "egs left context %d): frame shifts are not applied; make egs with "
                        "one more frame of context on each side, as Kaldi's train.py does",
                        batch.frame_shift, ctx.left_context, ctx.right_context,
                        batch.egs_left_context)
        x, off = select_model_input(batch.feats, ctx, batch.egs_left_context, t, 0)
    chain, xent = split_model_output(_forward(model, ctx, x, batch))
    if chain.shape[1] - off < t:
        raise ValueError("model gave %d output frames for %d input frames; %d expected"
                         % (chain.shape[1], x.shape[1], t + off))
    if off != 0 or chain.shape[1] != t:  # a full-range slice would still cost a
        chain = chain[:, off:off + t]    # zero-fill + copy of the gradient in backward
        if xent is not None:
            xent = xent[:, off:off + t]
    dw = batch.deriv_weights if apply_deriv_weights else None
    return loss_fn(chain, batch.supervision, xent_output=xent, deriv_weights=dw)


_warned_unused_ivector = False


def _forward(model: nn.Module, ctx: ModelContext, x: torch.Tensor, batch):
    """The model on the minibatch's input rows ``x``, with the egs' i-vectors when the
    model reads them (``ctx.ivector_dim``); i-vectors that the model does not read are
    reported once, a model that needs them and egs without them are an error."""
    global _warned_unused_ivector
    iv = getattr(batch, "ivector", None)
    dim = int(getattr(ctx, "ivector_dim", 0) or 0)
    if dim > 0:
        if iv is None:
            raise ValueError("the model reads an ivector input (dim %d) but the egs have "
                             "none (minibatch %s); make egs with --online-ivector-dir"
                             % (dim, getattr(batch, "index", "?")))
        if iv.shape[-1] != dim:
            raise ValueError("the egs' ivector input has dim %d, the model's %d"
                             % (iv.shape[-1], dim))
        return call_model(model, x, dim, iv.to(x.dtype))
    if iv is not None and not _warned_unused_ivector:
        _warned_unused_ivector = True
        log.warning("the egs have an ivector input (dim %d) that the model does not "
                    "consume; it is ignored", iv.shape[-1])
    return model(x)


@torch.no_grad()
def compute_prob(model: nn.Module, ctx: ModelContext, loss_fn: nn.Module,
                 batches: Iterable, device=None, batchnorm_test_mode: bool = True,
                 dropout_test_mode: bool = True, reduce: bool = True) -> ObjfTracker:
    """``nnet3-chain-compute-prob``: summed objective parts over ``batches``.

    Args:
      model, ctx, loss_fn: as for :func:`compute_chain_loss`.
      batches: iterable of ChainBatch (this rank's share when distributed).
      device: where to move the batches (default: the model's device).
      batchnorm_test_mode, dropout_test_mode: Kaldi's test modes (both true in
        compute-prob).
      reduce: sum the result over ranks.
    Returns:
      An :class:`ObjfTracker` (``per_frame("objf")`` is Kaldi's printed number).
    """
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    tracker = ObjfTracker()
    # no autograd: as nnet3-chain-compute-prob (no --compute-deriv), the loss then skips the
    # denominator's backward pass and the forward keeps no graph
    with test_mode(model, batchnorm_test_mode, dropout_test_mode), torch.no_grad():
        for batch in batches:
            res = compute_chain_loss(model, ctx, loss_fn, batch.to(device),
                                     apply_deriv_weights=False)
            tracker.add_result(res, batch.num_output_frames, xent=ctx.has_xent)
    return tracker.reduce(device) if reduce else tracker


def compute_prob_log_lines(tracker: ObjfTracker, output_name: str = "output") -> List[str]:
    """Kaldi's two log lines (xent first, as nnet3-chain-compute-prob prints them)."""
    lines = []
    w = tracker.get("weight", 0.0)
    if "xent_objf" in tracker:
        lines.append(kaldi_objf_line(output_name + "-xent", tracker.per_frame("xent_objf"), w))
    l2 = tracker.get("l2_term", 0.0)
    if l2 != 0.0:
        o, l = tracker.per_frame("objf"), tracker.per_frame("l2_term")
        lines.append("Overall log-probability for '%s' is %g + %g = %g per frame, over %g "
                     "frames." % (output_name, o, l, o + l, w))
    else:
        lines.append(kaldi_objf_line(output_name, tracker.per_frame("objf"), w))
    return lines


def average_state_dicts(sds: Sequence[Dict[str, torch.Tensor]],
                        weights: Optional[Sequence[float]] = None) -> Dict[str, torch.Tensor]:
    """Weighted average of floating tensors; other entries from the last state dict."""
    if not sds:
        raise ValueError("no state dicts to average")
    if weights is None:
        weights = [1.0 / len(sds)] * len(sds)
    out = {}
    for k, v in sds[-1].items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            acc = torch.zeros_like(v, dtype=torch.float64)
            for sd, w in zip(sds, weights):
                if k not in sd or sd[k].shape != v.shape:
                    raise ValueError("state dicts differ at %r" % k)
                acc += w * sd[k].to(torch.float64)
            out[k] = acc.to(v.dtype)
        else:
            out[k] = v
    return out


def combine_models(model: nn.Module, state_dicts: Sequence[Dict[str, torch.Tensor]],
                   ctx: ModelContext, loss_fn: nn.Module, valid_batches: Sequence,
                   max_objective_evaluations: int = 30, batchnorm_test_mode: bool = False,
                   dropout_test_mode: bool = True, recompute_stats: bool = True,
                   logger: Optional[logging.Logger] = None, select: str = "valid"):
    """``nnet3-chain-combine``: best running average of the last models (module docstring).

    Args:
      model: a module of the right architecture; it ends up holding the result.
      state_dicts: model state dicts, oldest first.
      ctx, loss_fn: as for :func:`compute_prob`.
      valid_batches: ChainBatch es (a list: it is iterated once per evaluation).
      max_objective_evaluations: Kaldi's option of that name.
      batchnorm_test_mode, dropout_test_mode: Kaldi's defaults (false, true).
      recompute_stats: re-estimate batchnorm stats of the result on ``valid_batches``.
      logger: where Kaldi's log lines go (default ``pkwrap.train``).
      select: ``"valid"`` (Kaldi's: the running average of best valid objective) or
        ``"average"`` (the average of all the models).
    Returns:
      ``(num_combined, init_objf, best_objf)``; with ``"average"``, ``best_objf`` is the
      average's objective.
    """
    logger = logger or log
    if select not in COMBINE_MODES:
        raise ValueError("combine_models: select must be 'valid' or 'average', got %r"
                         % (select,))
    if not state_dicts:
        raise ValueError("combine_models: no models")
    valid_batches = list(valid_batches)
    if not valid_batches:
        raise ValueError("combine_models: no validation egs")
    rev = list(reversed(state_dicts))
    n = len(rev)

    def objf_of(sd):
        model.load_state_dict(sd)
        tr = compute_prob(model, ctx, loss_fn, valid_batches,
                          batchnorm_test_mode=batchnorm_test_mode,
                          dropout_test_mode=dropout_test_mode)
        v = tr.per_frame("objf")
        return v if math.isfinite(v) else -math.inf

    avg = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in rev[0].items()}
    init_objf = best_objf = objf_of(avg)
    best, best_n = avg, 1
    logger.info("objective function using the last model is %g", init_objf)
    if select == "average":
        if n > 1:
            best, best_n = average_state_dicts(state_dicts), n
            best_objf = objf_of(best)
        logger.info("Averaging the last %d nnets, objective function changed from %g to %g",
                    best_n, init_objf, best_objf)
    else:
        num_to_add = (n + max_objective_evaluations - 1) // max_objective_evaluations
        for k in range(1, n):
            avg = average_state_dicts([avg, rev[k]], [k / (k + 1.0), 1.0 / (k + 1.0)])
            if (k - 1) % num_to_add == num_to_add - 1 or k == n - 1:
                objf = objf_of(avg)
                logger.info("Combining last %d models, objective function is %g", k + 1, objf)
                if objf > best_objf:
                    best_objf, best, best_n = objf, avg, k + 1
        logger.info("Combining %d nnets, objective function changed from %g to %g",
                    best_n, init_objf, best_objf)
    model.load_state_dict(best)
    if recompute_stats:
        recompute_batchnorm_stats(model, ctx, valid_batches)
    return best_n, init_objf, best_objf


@torch.no_grad()
def recompute_batchnorm_stats(model: nn.Module, ctx: ModelContext, batches: Iterable,
                              device=None) -> int:
    """Re-estimate every batchnorm's running statistics as plain averages over ``batches``.

    Torch batchnorm: ``reset_running_stats()`` and ``momentum=None`` (cumulative
    average) while the batches run in train mode, dropout in test mode. Kaldi batchnorm
    (pkwrap.nnet3's BatchNormComponent, count-weighted statistics): ``scale_stats(0)``,
    then the same. Other batchnorm modules are handled if they expose ``reset_running_stats()``.

    Returns:
      The number of batchnorm modules updated (0: nothing to do, no forward run).
    """
    bns = [m for m in model.modules() if is_batchnorm(m) and
           (hasattr(m, "reset_running_stats") or hasattr(m, "scale_stats"))]
    if not bns:
        return 0
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    momenta = {m: getattr(m, "momentum", None) for m in bns}
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for m in bns:
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
            else:  # Kaldi batchnorm: forget the statistics
                scale_batchnorm_stats(m, 0.0)
            if hasattr(m, "momentum"):
                m.momentum = None
            m.train()
        for batch in batches:
            batch = batch.to(device)
            t = batch.frames_per_sequence
            x, _ = select_model_input(batch.feats, ctx, batch.egs_left_context, t, 0)
            _forward(model, ctx, x, batch)
    finally:
        for m, mom in momenta.items():
            if hasattr(m, "momentum"):
                m.momentum = mom
        for m, tr in modes.items():
            m.training = tr
    return len(bns)
