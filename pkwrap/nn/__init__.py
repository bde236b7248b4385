"""Neural-network layers with Kaldi nnet3 semantics, trained with natural-gradient SGD.

* :class:`NaturalAffine`, :class:`NaturalConv1d`: ``nn.Linear`` / ``nn.Conv1d`` whose weight
  gradients are preconditioned as Kaldi's NaturalGradientAffineComponent does.
* :func:`natural_gradient`: converts an existing model's Linear/Conv1d layers in place.
* :class:`TDNNFModel` (``TDNNFModel.tdnn_1j(num_pdfs)``): Kaldi's TDNN-F chain model, an
  nnet3 network built from its arguments (:mod:`pkwrap.nnet3.tdnnf`; the same class);
  :class:`SpecAugment`: Kaldi's training-only ``spec-augment-layer`` for any model;
  :func:`load_kaldi_nnet3` loads any Kaldi nnet3 model file as a :class:`pkwrap.nnet3.Nnet3`
  module; :func:`save_kaldi_nnet3` writes one back.
* :mod:`pkwrap.nn.tdnnf`: the fused training kernels every nnet3 network's plan uses, and
  :func:`constrain_orthonormal_` / :func:`scale_batchnorm_stats` of Kaldi's update rules.
"""
from pkwrap.nn.natural import (NaturalAffine, NaturalConv1d, freeze_natural_gradient,
                               load_natural_gradient_state_dict, natural_gradient,
                               natural_gradient_modules, natural_gradient_owner,
                               natural_gradient_state_dict)
from pkwrap.nn.kaldi_import import (load_kaldi_nnet3, read_nnet3_text_components,
                                    save_kaldi_nnet3)
from pkwrap.nn.spec_augment import SpecAugment
from pkwrap.nn.tdnnf import (compute_idct_matrix, constrain_orthonormal,
                             constrain_orthonormal_, scale_batchnorm_stats)

__all__ = [
    "NaturalAffine", "NaturalConv1d", "natural_gradient", "natural_gradient_modules",
    "natural_gradient_owner", "natural_gradient_state_dict", "load_natural_gradient_state_dict",
    "freeze_natural_gradient", "TDNNFModel", "compute_idct_matrix", "constrain_orthonormal",
    "constrain_orthonormal_", "scale_batchnorm_stats", "SpecAugment", "load_kaldi_nnet3",
    "read_nnet3_text_components", "save_kaldi_nnet3",
]


def __getattr__(name):
    # TDNNFModel is a pkwrap.nnet3 network, and pkwrap.nnet3's components are built on this
    # package's layers: it is imported on first use (the same class, not a copy)
    if name == "TDNNFModel":
        from pkwrap.nnet3.tdnnf import TDNNFModel
        return TDNNFModel
    raise AttributeError("module 'pkwrap.nn' has no attribute %r" % name)
