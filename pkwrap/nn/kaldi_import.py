"""Kaldi nnet3 models in torch: :func:`load_kaldi_nnet3`.

``load_kaldi_nnet3(path)`` reads any nnet3 model file (raw nnet or ``final.mdl``, binary
or text, plain or gzipped) with :func:`pkwrap.nnet3.read_nnet3` and returns the
:class:`pkwrap.nnet3.Nnet3` module that evaluates its graph; :func:`save_kaldi_nnet3`
writes such a module back for Kaldi. (A TDNNFModel is such a module already:
``pkwrap.nn.TDNNFModel`` is a :class:`pkwrap.nnet3.Nnet3`.)
"""
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from pkwrap.kaldi.hmm import TransitionModel

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


def load_kaldi_nnet3(path: Union[str, Path]):
    """Load a Kaldi nnet3 model file (raw nnet or ``final.mdl``, binary or text, plain or
    gzipped) as the torch module of its network.

    Returns:
      the :class:`pkwrap.nnet3.Nnet3` (``trans_model``/``priors`` set for a ``final.mdl``).
    Raises:
      KaldiFormatError: naming the file and what is wrong.
      TypeError: given a model to fill (the older ``load_kaldi_nnet3(model, path)``: the
        loaded network is the model now).
    """
    if isinstance(path, torch.nn.Module):
        raise TypeError("load_kaldi_nnet3(path) returns the model: filling a given model "
                        "(load_kaldi_nnet3(model, path)) is no longer supported")
    from pkwrap.nnet3.nnet import read_nnet3
    return read_nnet3(path)
