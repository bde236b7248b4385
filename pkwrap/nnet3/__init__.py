"""Kaldi's nnet3 networks: model files, computation graph, and nnet3-compute.

* :mod:`pkwrap.nnet3.descriptor`: input descriptors (Append, Offset, ReplaceIndex, Sum,
  Scale, Const, IfDefined, Round, Switch, Failover): parsing and evaluation over frames.
* :mod:`pkwrap.nnet3.components`: the component types as torch modules, with their
  fields read and written in Kaldi's format (and built from ``component`` config lines);
  their training settings (learning-rate-factor, max-change, l2-regularize,
  orthonormal-constraint) are what :func:`pkwrap.optim.kaldi_param_groups` reads.
* :mod:`pkwrap.nnet3.nnet`: :class:`Nnet3`, the graph (input-, component-, dim-range- and
  output-nodes) as an ``nn.Module``; :func:`read_nnet3` / :func:`write_nnet3` for
  ``final.raw`` / ``final.mdl`` (binary or text, gzipped or not);
  :func:`nnet3_from_config` builds a new network from a config (``nnet3-init``).
* :mod:`pkwrap.nnet3.plan`: the compiled evaluation plan :class:`Nnet3` runs by default
  (cached per input shape): each node only at the frames Kaldi computes it at, descriptor
  reads precomputed as slices / index tensors, and in training the fused C++ kernels of
  :mod:`pkwrap.nn.tdnnf` for affine/TDNN + ReLU + batchnorm (+ TDNN-F bypass) chains.
* :mod:`pkwrap.nnet3.tdnnf`: :class:`TDNNFModel`, Kaldi's TDNN-F chain model (``tdnn_1j``
  family) as an :class:`Nnet3` built from its arguments (:func:`tdnnf_config`).
* :mod:`pkwrap.nnet3.compute`: :func:`nnet3_compute`, Kaldi's ``nnet3-compute`` on one
  utterance (chunking, online / utterance i-vectors, frame subsampling, edge padding).
"""
from pkwrap.nnet3.components import COMPONENT_TYPES, Component
from pkwrap.nnet3.compute import chunk_plan, nnet3_compute, online_ivector_row
from pkwrap.nnet3.descriptor import Descriptor, DescriptorError, parse_descriptor
from pkwrap.nnet3.nnet import (Nnet3, Node, nnet3_from_config, parse_config_line, read_nnet3,
                               write_nnet3)
from pkwrap.nnet3.tdnnf import TDNNFModel, tdnnf_config

__all__ = ["Component", "COMPONENT_TYPES", "Descriptor", "DescriptorError",
           "parse_descriptor", "Nnet3", "Node", "parse_config_line", "read_nnet3",
           "write_nnet3", "nnet3_from_config", "nnet3_compute", "online_ivector_row", "chunk_plan",
           "TDNNFModel", "tdnnf_config"]
