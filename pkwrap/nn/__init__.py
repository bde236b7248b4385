"""Neural-network layers with Kaldi nnet3 semantics, trained with natural-gradient SGD.

* :class:`NaturalAffine`, :class:`NaturalConv1d`: ``nn.Linear`` / ``nn.Conv1d`` whose weight
  gradients are preconditioned as Kaldi's NaturalGradientAffineComponent does.
* :func:`natural_gradient`: converts an existing model's Linear/Conv1d layers in place.
* :class:`TDNN`, :class:`TDNNF`, :class:`KaldiBatchNorm`, :class:`PrefinalLayer`,
  :class:`TDNNFModel` (``TDNNFModel.tdnn_1j(num_pdfs)``): Kaldi's TDNN-F chain model;
  :class:`SpecAugment`: Kaldi's training-only ``spec-augment-layer``;
  :func:`load_kaldi_nnet3` loads any Kaldi nnet3 model file as a :class:`pkwrap.nnet3.Nnet3`
  module (or, given a TDNNFModel, fills it); :func:`save_kaldi_nnet3` writes one back.
"""
from pkwrap.nn.natural import (NaturalAffine, NaturalConv1d, freeze_natural_gradient,
                               load_natural_gradient_state_dict, natural_gradient,
                               natural_gradient_modules, natural_gradient_owner,
                               natural_gradient_state_dict)
from pkwrap.nn.kaldi_import import (load_kaldi_nnet3, read_nnet3_text_components,
                                    save_kaldi_nnet3)
from pkwrap.nn.spec_augment import SpecAugment
from pkwrap.nn.tdnnf import (TDNN, TDNNF, KaldiBatchNorm, PrefinalLayer, TDNNFModel,
                             compute_idct_matrix, constrain_orthonormal, constrain_orthonormal_,
                             delta_features, scale_batchnorm_stats, splice)

__all__ = [
    "NaturalAffine", "NaturalConv1d", "natural_gradient", "natural_gradient_modules",
    "natural_gradient_owner", "natural_gradient_state_dict", "load_natural_gradient_state_dict",
    "freeze_natural_gradient", "TDNN", "TDNNF", "KaldiBatchNorm", "PrefinalLayer", "TDNNFModel",
    "compute_idct_matrix", "constrain_orthonormal", "constrain_orthonormal_", "delta_features",
    "scale_batchnorm_stats", "splice", "SpecAugment", "load_kaldi_nnet3",
    "read_nnet3_text_components", "save_kaldi_nnet3",
]
