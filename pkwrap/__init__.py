"""pkwrap: LF-MMI (chain) acoustic-model training for PyTorch, compatible with Kaldi.

Public names are imported lazily so that ``import pkwrap`` stays cheap and a missing
optional dependency only matters when the feature that needs it is used.

  pkwrap.kaldi   Kaldi file formats (FSTs, chain egs, tables, tree/topology)
  pkwrap.chain   LF-MMI objective: DenominatorGraph, ChainOptions, ChainLoss
  pkwrap.ngsgd   Kaldi's OnlineNaturalGradient
  pkwrap.nn      NG layers, natural_gradient(model), TDNNFModel, the fused TDNN-F kernels
  pkwrap.nnet3   Kaldi nnet3 networks (TDNNFModel is one), model files, nnet3-compute
  pkwrap.optim   NG-SGD optimizer and Kaldi's learning-rate schedule
  pkwrap.train   torchrun training loop, checkpoints, TensorBoard, diagnostics
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "ChainLoss": "pkwrap.chain",
    "ChainOptions": "pkwrap.chain",
    "DenominatorGraph": "pkwrap.chain",
    "chain_loss": "pkwrap.chain",
    "denominator_logprob": "pkwrap.chain",
    "OnlineNaturalGradient": "pkwrap.ngsgd",
    "NGSGD": "pkwrap.optim",
    "KaldiLRScheduler": "pkwrap.optim",
    "NaturalAffine": "pkwrap.nn",
    "TDNNFModel": "pkwrap.nn",
    "natural_gradient": "pkwrap.nn",
    "read_chain_egs": "pkwrap.kaldi",
    "read_fst": "pkwrap.kaldi",
}

__all__ = sorted(_LAZY) + ["kaldi", "chain", "ngsgd", "nn", "optim", "train"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("kaldi", "chain", "ngsgd", "nn", "optim", "train"):
        return importlib.import_module("pkwrap." + name)
    raise AttributeError("module 'pkwrap' has no attribute %r" % name)
