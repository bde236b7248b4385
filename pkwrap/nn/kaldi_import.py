"""Kaldi nnet3 models in torch: :func:`load_kaldi_nnet3`.

``load_kaldi_nnet3(path)`` reads any nnet3 model file (raw nnet or ``final.mdl``, binary
or text, plain or gzipped) with :func:`pkwrap.nnet3.read_nnet3` and returns the
:class:`pkwrap.nnet3.Nnet3` module that evaluates its graph; :func:`save_kaldi_nnet3`
writes such a module back for Kaldi.

``load_kaldi_nnet3(model, path)`` (the older form) copies a ``tdnn_1j``-shaped model's
parameters into a :class:`pkwrap.nn.TDNNFModel` instead (the same reader; the component
name of each layer is ``TDNNFModel.nnet3_layers()``, the names of the model's own nnet3
config; the field mapping lives here):

=======================================  ==========================================================
``idct`` FixedAffineComponent            ``model.idct`` (its bias must be 0)
BatchNormComponent                       ``KaldiBatchNorm`` statistics (Count, StatsMean, StatsVar)
NaturalGradientAffineComponent           ``NaturalAffine`` weight (LinearParams) and bias
TdnnComponent                            ``TDNN`` weight (LinearParams, offset blocks), bias; the
                                         TimeOffsets must match
LinearComponent                          ``NaturalAffine(bias=False)`` weight (Params)
=======================================  ==========================================================
"""
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch

from pkwrap.kaldi.hmm import TransitionModel
from pkwrap.nn.tdnnf import KaldiBatchNorm, TDNNFModel

# pkwrap.nnet3's components use pkwrap.nn's natural-gradient layers, so pkwrap.nnet3 is
# imported when used (importing it here would be circular).

__all__ = ["read_nnet3_text_components", "load_kaldi_nnet3", "save_kaldi_nnet3"]


def read_nnet3_text_components(path: Union[str, Path]) -> Dict[str, dict]:
    """The components of an nnet3 model file as plain values.

    Args:
      path: any nnet3 model file (text or binary, ``.gz`` allowed).
    Returns:
      ``{name: {"type": "TdnnComponent", "Key": value, ...}}`` where values are numpy arrays
      (vectors 1-D, matrices 2-D), numbers, bools or dicts (the ConvolutionModel).
    """
    from pkwrap.nnet3.components import _TensorRef
    from pkwrap.nnet3.nnet import read_nnet3
    nnet = read_nnet3(path)
    comps = {}
    for c in nnet.components:
        fields = {"type": c.TYPE}
        for k, v in c.fields.items():
            if isinstance(v, _TensorRef):
                v = getattr(c, v.attr).detach().cpu().numpy()
            fields[k] = v
        if c.TYPE == "BatchNormComponent":
            fields["Count"] = float(c.count)
        comps[c.name] = fields
    return comps


def save_kaldi_nnet3(model, path: Union[str, Path], binary: bool = True,
                     trans_model: Optional[TransitionModel] = None) -> None:
    """Write an :class:`~pkwrap.nnet3.Nnet3` as a Kaldi model file.

    Every component is written with all its fields (learning rates, max-change, l2,
    orthonormal constraint, natural-gradient options, batchnorm statistics) and its current
    parameters, so Kaldi's programs read it and ``nnet3-chain-train`` can continue training.

    Args:
      model: the network (e.g. from :func:`load_kaldi_nnet3`, possibly changed in torch).
      path: output file.
      binary: Kaldi binary (default) or text form.
      trans_model: write a ``final.mdl`` (transition model + nnet + priors) with this
        transition model; None writes a raw nnet.
    """
    from pkwrap.nnet3.nnet import Nnet3, write_nnet3
    if not isinstance(model, Nnet3):
        raise TypeError("save_kaldi_nnet3: expected a pkwrap.nnet3.Nnet3, got %s"
                        % type(model).__name__)
    priors = model.priors if trans_model is not None else None
    write_nnet3(model, path, binary=binary, trans_model=trans_model, priors=priors)


def _set(param: torch.Tensor, value: np.ndarray, what: str) -> None:
    value = np.asarray(value)
    if value.size != param.numel():
        raise ValueError(f"load_kaldi_nnet3: {what}: Kaldi has {value.shape}, "
                         f"the model expects {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(torch.from_numpy(value.reshape(tuple(param.shape))).to(param.dtype))


def load_kaldi_nnet3(model_or_path, path: Union[str, Path, None] = None):
    """Load a Kaldi nnet3 model.

    ``load_kaldi_nnet3(path)``: the network of any model file as a torch module.
    ``load_kaldi_nnet3(model, path)``: copy a Kaldi TDNN-F's parameters and batch-norm
    statistics into ``model``, a :class:`TDNNFModel` of the same structure (layer dims,
    time strides, delta, idct); every parameter of ``model`` must be set by the file.

    Args:
      model_or_path: the model file, or the :class:`TDNNFModel` to fill.
      path: the model file (second form).
    Returns:
      the :class:`pkwrap.nnet3.Nnet3` (``trans_model``/``priors`` set for a ``final.mdl``),
      or ``model`` filled.
    """
    if path is None:
        from pkwrap.nnet3.nnet import read_nnet3
        return read_nnet3(model_or_path)
    model = model_or_path
    comps = read_nnet3_text_components(path)
    done = set()

    def get(name, typ):
        if name not in comps:
            raise ValueError(f"load_kaldi_nnet3: {path} has no component {name!r}")
        c = comps[name]
        if c["type"] not in typ:
            raise ValueError(f"load_kaldi_nnet3: component {name!r} is a {c['type']}, expected {typ}")
        return c

    def batchnorm(name, bn):
        c = get(name, ("BatchNormComponent",))
        if int(c["Dim"]) != bn.dim or int(c.get("BlockDim", c["Dim"])) != bn.dim:
            raise ValueError(f"load_kaldi_nnet3: {name}: dim/block-dim {c['Dim']}/{c.get('BlockDim')}"
                             f", model has {bn.dim}")
        bn.epsilon = float(c["Epsilon"])
        bn.target_rms = float(c["TargetRms"])
        bn.set_stats(float(c["Count"]), c["StatsMean"], c["StatsVar"])

    def affine(name, layer, offsets=None):
        c = get(name, ("NaturalGradientAffineComponent", "TdnnComponent", "LinearComponent",
                       "AffineComponent"))
        if c["type"] == "TdnnComponent":
            offs = tuple(int(o) for o in np.atleast_1d(c["TimeOffsets"]))
            if offs != tuple(layer.time_offsets):
                raise ValueError(f"load_kaldi_nnet3: {name}: time offsets {offs}, model has "
                                 f"{layer.time_offsets}")
        w = c["Params"] if c["type"] == "LinearComponent" else c["LinearParams"]
        _set(layer.weight, w, name + " linear params")
        bias = c.get("BiasParams")
        if layer.bias is not None:
            _set(layer.bias, bias, name + " bias")
        elif bias is not None and np.size(bias):
            raise ValueError(f"load_kaldi_nnet3: {name} has a bias, the model's layer has none")
        done.update(id(p) for p in layer.parameters(recurse=False))

    if model.use_idct:
        c = get("idct", ("FixedAffineComponent",))
        if np.any(np.asarray(c.get("BiasParams", [])) != 0):
            raise ValueError("load_kaldi_nnet3: idct has a non-zero bias, not supported")
        _set(model.idct, c["LinearParams"], "idct")
    # the component names are those of the model's own nnet3 config (TDNNFModel.nnet3_layers)
    for name, layer in model.nnet3_layers():
        if isinstance(layer, KaldiBatchNorm):
            batchnorm(name, layer)
        else:
            affine(name, layer)
    if f"tdnnf{len(model.tdnnfs) + 2}.linear" in comps:
        raise ValueError(f"load_kaldi_nnet3: {path} has more TDNN-F layers than the model "
                         f"({len(model.tdnnfs)})")
    missing = [n for n, p in model.named_parameters() if id(p) not in done]
    if missing:
        raise ValueError(f"load_kaldi_nnet3: parameters not set from {path}: {missing}")
    return model
