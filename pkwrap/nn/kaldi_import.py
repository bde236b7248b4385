"""Import a Kaldi nnet3 TDNN-F model (text format) into :class:`pkwrap.nn.TDNNFModel`.

Kaldi's text nnet3 (``nnet3-copy --binary=false``) is the config part followed by
``<NumComponents> K`` and K blocks ``<ComponentName> NAME <Type> <Key> value ... </Type>``, where a
value is a token, a vector ``[ a b c ]`` or a matrix ``[\\n row\\n row ]`` (one line per row).
The components read here and what they fill (``tdnn_1j`` naming):

=======================================  ==========================================================
``idct`` FixedAffineComponent            ``model.idct`` (its bias must be 0)
BatchNormComponent                       ``KaldiBatchNorm`` statistics (Count, StatsMean, StatsVar)
NaturalGradientAffineComponent           ``NaturalAffine`` weight (LinearParams) and bias
TdnnComponent                            ``TDNN`` weight (LinearParams, offset blocks), bias; the
                                         TimeOffsets must match
LinearComponent                          ``NaturalAffine(bias=False)`` weight (Params)
=======================================  ==========================================================

Training-only state (learning rates, natural-gradient settings, ReLU statistics) is ignored.
"""
import gzip
import re
from pathlib import Path
from typing import Dict, Union

import numpy as np
import torch

from pkwrap.nn.tdnnf import TDNNFModel

__all__ = ["read_nnet3_text_components", "load_kaldi_nnet3"]

_COMPONENT = re.compile(r"<ComponentName>\s+(\S+)\s+<(\w+)>(.*?)</\2>", re.S)
_FIELD = re.compile(r"<(\w+)>\s*(\[[^\]]*\]|[^<\s]+(?:\s+[^<\s]+)*)?", re.S)


def _value(text: str):
    if text is None:
        return None
    text = text.strip()
    if text.startswith("["):
        body = text[1:-1]
        rows = [r.split() for r in body.strip().split("\n") if r.strip()]
        if len(rows) <= 1:
            return np.array(rows[0] if rows else [], dtype=np.float64)
        return np.array(rows, dtype=np.float64)
    parts = text.split()
    return parts[0] if len(parts) == 1 else parts


def read_nnet3_text_components(path: Union[str, Path]) -> Dict[str, dict]:
    """Parse the components of a text nnet3 model (plain or gzipped).

    Args:
      path: the file written by ``nnet3-copy --binary=false`` (``.gz`` allowed).
    Returns:
      ``{name: {"type": "TdnnComponent", "Key": value, ...}}`` where values are numpy arrays
      (vectors 1-D, matrices 2-D) or strings.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:2] == b"\x00B":
        raise ValueError(f"{path}: binary nnet3 model; convert it with nnet3-copy --binary=false")
    text = raw.decode("utf-8")
    if "<Nnet3>" not in text[:100]:
        raise ValueError(f"{path}: not a text nnet3 model (no <Nnet3> header)")
    comps = {}
    for m in _COMPONENT.finditer(text):
        name, typ, body = m.group(1), m.group(2), m.group(3)
        fields = {"type": typ}
        for f in _FIELD.finditer(body):
            fields[f.group(1)] = _value(f.group(2))
        comps[name] = fields
    if not comps:
        raise ValueError(f"{path}: no components found")
    return comps


def _set(param: torch.Tensor, value: np.ndarray, what: str) -> None:
    value = np.asarray(value)
    if value.size != param.numel():
        raise ValueError(f"load_kaldi_nnet3: {what}: Kaldi has {value.shape}, "
                         f"the model expects {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(torch.from_numpy(value.reshape(tuple(param.shape))).to(param.dtype))


def load_kaldi_nnet3(model: TDNNFModel, path: Union[str, Path]) -> TDNNFModel:
    """Copy the parameters and batch-norm statistics of a Kaldi TDNN-F model into ``model``.

    ``model`` must have the same structure (layer dims, time strides, delta, idct) as the Kaldi
    network; every parameter of ``model`` must be set by the file.

    Args:
      model: the :class:`TDNNFModel` to fill.
      path: Kaldi text nnet3 model (``final.txt`` or ``final.txt.gz``).
    Returns:
      ``model``.
    """
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
    batchnorm("batchnorm0", model.batchnorm0)
    if model.use_delta:
        batchnorm("delta", model.delta_batchnorm)
    affine("tdnn1.affine", model.tdnn1)
    batchnorm("tdnn1.batchnorm", model.tdnn1_batchnorm)
    for k, layer in enumerate(model.tdnnfs):
        n = f"tdnnf{k + 2}"
        affine(n + ".linear", layer.linear)
        affine(n + ".affine", layer.affine)
        batchnorm(n + ".batchnorm", layer.batchnorm)
    if f"tdnnf{len(model.tdnnfs) + 2}.linear" in comps:
        raise ValueError(f"load_kaldi_nnet3: {path} has more TDNN-F layers than the model "
                         f"({len(model.tdnnfs)})")
    affine("prefinal-l", model.prefinal_l)
    heads = [("prefinal-chain", "output", model.prefinal_chain, model.output)]
    if model.xent_head:
        heads.append(("prefinal-xent", "output-xent", model.prefinal_xent, model.output_xent))
    for pre, out, pl, ol in heads:
        affine(pre + ".affine", pl.affine)
        batchnorm(pre + ".batchnorm1", pl.batchnorm1)
        affine(pre + ".linear", pl.linear)
        batchnorm(pre + ".batchnorm2", pl.batchnorm2)
        affine(out + ".affine", ol)
    missing = [n for n, p in model.named_parameters() if id(p) not in done]
    if missing:
        raise ValueError(f"load_kaldi_nnet3: parameters not set from {path}: {missing}")
    return model
