"""Models saved with the recipe to rebuild them, and the library side of the CLIs
``nnet3-chain-compute-prob`` and ``nnet3-chain-combine``.

A pkwrap model file is a verified checkpoint (:mod:`pkwrap.train.checkpoint`) holding::

    model          state_dict
    model_spec     {"factory": "package.module:callable", "kwargs": {...}}  (optional)
    model_context  the ModelContext found when training (optional)

:func:`load_model` rebuilds the module by calling ``factory(**kwargs)`` and loading the
state dict; without a spec the caller passes the factory (the CLIs' ``--model-factory``
and ``--model-kwargs``). Training checkpoints (``ckpt-*.pt``) and ``final.pt`` written
by :class:`pkwrap.train.Trainer` are model files in this sense.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from . import checkpoint as ckpt
from .context import ModelContext, probe_model_context

__all__ = ["save_model", "load_model", "resolve_factory", "compute_prob_on_egs",
           "combine_model_files"]

log = logging.getLogger("pkwrap.train")


def resolve_factory(spec: Union[str, Callable]) -> Callable:
    """``"package.module:attr"`` (or ``"package.module.attr"``) to the callable."""
    if callable(spec):
        return spec
    if ":" in spec:
        mod, attr = spec.split(":", 1)
    else:
        mod, _, attr = spec.rpartition(".")
    if not mod or not attr:
        raise ValueError("model factory %r: expected 'package.module:callable'" % spec)
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError("model factory %r: cannot import %s: %s" % (spec, mod, e))
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError("model factory %r: %s has no attribute %r" % (spec, mod, part))
        obj = getattr(obj, part)
    return obj


def save_model(path: str, model: nn.Module, model_spec: Optional[Dict[str, Any]] = None,
               model_context: Optional[ModelContext] = None, **extra) -> str:
    """Write ``model`` (atomically) with what :func:`load_model` needs to rebuild it."""
    import dataclasses
    st = {"model": model.state_dict(), "model_spec": model_spec}
    if model_context is not None:
        st["model_context"] = dataclasses.asdict(model_context)
    st.update(extra)
    return ckpt.save_checkpoint(path, st)


def load_model(path: str, factory: Union[str, Callable, None] = None,
               kwargs: Optional[Dict[str, Any]] = None, map_location="cpu"
               ) -> Tuple[nn.Module, Optional[ModelContext]]:
    """Rebuild a model from a pkwrap model file or training checkpoint.

    Args:
      path: the file.
      factory, kwargs: override / supply the file's ``model_spec``.
      map_location: torch.load's.
    Returns:
      ``(model, context_or_None)``.
    """
    st = ckpt.load_checkpoint(path, map_location)
    if "model" not in st:
        raise ckpt.CheckpointError("%s holds no model state dict" % path)
    spec = st.get("model_spec") or {}
    factory = factory if factory is not None else spec.get("factory")
    if factory is None:
        raise ValueError("%s has no model_spec: pass the model factory "
                         "(--model-factory package.module:callable)" % path)
    kw = dict(spec.get("kwargs") or {}) if kwargs is None else dict(kwargs)
    model = resolve_factory(factory)(**kw)
    missing, unexpected = model.load_state_dict(st["model"], strict=False)
    if missing or unexpected:
        raise ValueError("%s does not fit the model built by %s(%s): missing %s, unexpected %s"
                         % (path, factory, kw, missing[:5], unexpected[:5]))
    ctx = st.get("model_context")
    return model, (ModelContext(**ctx) if ctx else None)


def _egs_batches(egs_rspecifier: Union[str, Sequence[str]], ctx: ModelContext,
                 minibatch_size: str, egs_left_context: Optional[int] = None) -> List:
    from .data import ChainMinibatchSampler, EgsDataset, make_loader
    data = EgsDataset.from_kaldi(egs_rspecifier)
    s = ChainMinibatchSampler(data.structures, minibatch_size, ctx.frame_subsampling_factor,
                              shuffle=False, rank=0, world_size=1, frame_shift=False)
    return list(make_loader(data, s, egs_left_context=egs_left_context))


def _loss(den_fst: str, num_pdfs: int, chain_options):
    """The chain loss over ``den_fst`` for egs whose label dimension is ``num_pdfs``."""
    from pkwrap.chain import ChainLoss, DenominatorGraph
    try:
        graph = DenominatorGraph.from_fst(den_fst, num_pdfs)
    except ValueError as e:
        if "outside [1, num_pdfs" in str(e):
            raise ValueError("%s does not fit the egs, whose label dimension (LabelDim) is "
                             "%d: %s" % (den_fst, num_pdfs, e)) from None
        raise
    return ChainLoss(graph, chain_options)


def compute_prob_on_egs(model: nn.Module, den_fst: str, egs_rspecifier, chain_options,
                        feat_dim: Optional[int] = None, minibatch_size: str = "1",
                        ctx: Optional[ModelContext] = None):
    """``nnet3-chain-compute-prob``: the model's objective on chain egs.

    Every eg of the archive is one minibatch (Kaldi's valid/train-diagnostic egs are
    merged by nnet3-chain-merge-egs beforehand); ``minibatch_size`` merges them here.

    Returns:
      ``(tracker, log_lines)`` (see :func:`pkwrap.train.diagnostics.compute_prob`).
    """
    from .diagnostics import compute_prob, compute_prob_log_lines
    if ctx is None:
        if feat_dim is None:
            raise ValueError("compute_prob_on_egs: give feat_dim or ctx")
        ctx = probe_model_context(model, feat_dim)
    batches = _egs_batches(egs_rspecifier, ctx, minibatch_size)
    loss = _loss(den_fst, _num_pdfs(batches), chain_options)
    tr = compute_prob(model, ctx, loss, batches, reduce=False)
    return tr, compute_prob_log_lines(tr)


def _num_pdfs(batches) -> int:
    if not batches:
        raise ValueError("no chain examples")
    return int(batches[0].supervision.label_dim)


def combine_model_files(den_fst: str, model_paths: Sequence[str], egs_rspecifier, out_path: str,
                        chain_options, factory=None, kwargs=None,
                        max_objective_evaluations: int = 30, batchnorm_test_mode: bool = False,
                        dropout_test_mode: bool = True, minibatch_size: str = "1"
                        ) -> Tuple[int, float, float]:
    """``nnet3-chain-combine``: average of the last n models with the best objective on the
    egs, batchnorm stats recomputed, written to ``out_path``.

    Returns:
      ``(num_combined, objf_of_last_model, best_objf)``.
    """
    from .diagnostics import combine_models
    if not model_paths:
        raise ValueError("nnet3-chain-combine: no models")
    model, ctx = load_model(model_paths[-1], factory, kwargs)
    spec = ckpt.load_checkpoint(model_paths[-1]).get("model_spec")
    if ctx is None:
        raise ValueError("%s has no model_context" % model_paths[-1])
    sds = [ckpt.load_checkpoint(p)["model"] for p in model_paths]
    batches = _egs_batches(egs_rspecifier, ctx, minibatch_size)
    loss = _loss(den_fst, _num_pdfs(batches), chain_options)
    res = combine_models(model, sds, ctx, loss, batches, max_objective_evaluations,
                         batchnorm_test_mode, dropout_test_mode, recompute_stats=True)
    if spec is None and factory is not None:
        spec = {"factory": factory if isinstance(factory, str) else None, "kwargs": kwargs or {}}
    save_model(out_path, model, spec, ctx)
    return res
