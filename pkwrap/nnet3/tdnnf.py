r"""TDNN-F chain models (Kaldi's mini_librispeech ``tdnn_1j`` family) as nnet3 networks.

:class:`TDNNFModel` is an :class:`~pkwrap.nnet3.Nnet3` whose graph is written from its
constructor arguments as the nnet3 config lines that Kaldi's ``xconfig_to_configs.py``
makes of a ``tdnn_1j`` xconfig (:func:`tdnnf_config`): the same component and node names
as Kaldi's ``final.config`` (``tdnn1.affine``, ``tdnnf2.linear``, ``tdnnf2.noop``,
``prefinal-chain.linear``, ``output.affine``, ...), the same component types and training
settings (l2-regularize, learning-rate-factor, max-change, orthonormal-constraint). There
is no second implementation of its layers: the components, the evaluation plan with its
fused training kernels, Kaldi I/O and nnet3-compute are those every Kaldi network uses.

The network (``input`` of dim F)::

    [idct] -> batchnorm0 -> [spec-augment] -> [delta (+-2 frames) -> batchnorm]
    -> tdnn1 (affine, ReLU, batchnorm) -> one TDNN-F layer per time stride
    -> prefinal-l (semi-orthogonal linear)
    -> prefinal-chain -> output                          (chain, no softmax)
    -> prefinal-xent -> output-xent -> log-softmax        (with the xent head)

Factorized layer (TDNN-F, Povey et al., Interspeech 2018) ``tdnnfN`` with time stride s:

.. math::

   h = W_1 [x(t-s); x(t)], \quad
   y = \mathrm{BN}(\mathrm{ReLU}(W_2 [h(t); h(t+s)] + b_2)) + \beta\, x(t),

``tdnnfN.linear`` (TdnnComponent, no bias, orthonormal-constraint -1), ``tdnnfN.affine``
(TdnnComponent), ``tdnnfN.relu``, ``tdnnfN.batchnorm`` and ``tdnnfN.noop`` reading
``Sum(Scale(beta, x), tdnnfN.batchnorm)`` (bypass scale :math:`\beta` = 0.66). Stride 0
means the single offset 0 in both halves. Prefinal layer ``prefinal-X``: affine -> ReLU ->
batchnorm1 -> linear (semi-orthogonal) -> batchnorm2. Batch normalization is Kaldi's
BatchNormComponent (no learned scale or offset, epsilon 1e-3). The output layers start
at zero (param-stddev=0 bias-stddev=0), and get half the layers' l2; the xent output
has learning-rate-factor 5.

Frame subsampling f (3 for chain models): ``forward(x)`` returns output frames ``l, l+f,
...`` of an input ``[B][T][F]`` with frames ``t = 0..T-1``, ``T_out = (T - l - r - 1) // f
+ 1`` (l = r = 2 (delta) + sum of the strides), and, as Kaldi, computes every layer only at
the frames those outputs need (:mod:`pkwrap.nnet3.plan`). Output frame j depends on
input frames ``j f .. j f + l + r``.

State dict: the components' tensors in config order (``components.<i>.weight``, ``.bias``,
a batchnorm's ``count``, ``stats_mean``, ``stats_var``), as for any :class:`Nnet3`; the
hand-built TDNNFModel of pkwrap before this module (keys ``tdnn1.weight``,
``tdnnfs.0.linear.weight``, ...) had another layout, and its checkpoints do not load.

Why a subclass of :class:`~pkwrap.nnet3.Nnet3` and not a function returning one: the
constructor arguments are the model's description (egs/digits saves them as
``model.json`` and rebuilds the model from them), ``TDNNFModel.tdnn_1j(...)`` and
``isinstance(m, TDNNFModel)`` keep working, and the arguments stay readable on the
module (``num_pdfs``, ``feat_dim``, ``time_strides``, ...). The subclass adds nothing to
the computation: no forward, no layers, only the construction.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from pkwrap.kaldi.io import KaldiFormatError
from pkwrap.nnet3.nnet import Nnet3, _parse_config

__all__ = ["TDNNFModel", "tdnnf_config", "SPEC_AUGMENT_DEFAULTS"]

#: the ``spec_augment`` keys of :class:`TDNNFModel` and Kaldi's defaults
#: (``spec-augment-layer``; as :class:`pkwrap.nn.SpecAugment`'s arguments)
SPEC_AUGMENT_DEFAULTS = {"freq_max_proportion": 0.5, "time_zeroed_proportion": 0.2,
                         "time_mask_max_frames": 20, "freq_max_regions": 1}


def _spec_augment_options(spec: Optional[Dict]) -> Optional[Dict]:
    if not spec:
        return None
    unknown = sorted(set(spec) - set(SPEC_AUGMENT_DEFAULTS))
    if unknown:
        raise ValueError("TDNNFModel: unknown spec_augment option(s) %s (known: %s)"
                         % (", ".join(unknown), ", ".join(SPEC_AUGMENT_DEFAULTS)))
    o = dict(SPEC_AUGMENT_DEFAULTS, **spec)
    if not (0 < o["freq_max_proportion"] < 1 and 0 < o["time_zeroed_proportion"] < 1
            and o["time_mask_max_frames"] >= 1 and o["freq_max_regions"] >= 1):
        raise ValueError("TDNNFModel: spec_augment needs 0 < freq_max_proportion < 1, "
                         "0 < time_zeroed_proportion < 1, time_mask_max_frames >= 1, "
                         "freq_max_regions >= 1, got %s" % o)
    if int(o["time_mask_max_frames"] * (1 - o["time_zeroed_proportion"])
           / o["time_zeroed_proportion"]) < 1:
        raise ValueError("TDNNFModel: spec_augment time_mask_max_frames=%d with "
                         "time_zeroed_proportion=%g leaves no kept segment"
                         % (o["time_mask_max_frames"], o["time_zeroed_proportion"]))
    return o


def tdnnf_config(num_pdfs: int, feat_dim: int = 40, tdnn_dim: int = 768,
                 tdnnf_dim: int = 768, bottleneck_dim: int = 96,
                 time_strides: Sequence[int] = (1, 1, 1, 0, 3, 3, 3, 3, 3, 3, 3, 3),
                 prefinal_dim: int = 192, prefinal_big_dim: int = 768,
                 bypass_scale: float = 0.66, use_idct: bool = True, use_delta: bool = True,
                 l2_regularize: float = 0.03, xent_head: bool = True,
                 spec_augment: Optional[Dict] = None, dropout: bool = False) -> str:
    """The nnet3 config lines of a :class:`TDNNFModel` (its arguments; see there), as
    ``xconfig_to_configs.py`` expands the tdnn_1j xconfig into ``final.config``
    (``nnet3-init`` reads them; the ``idct`` component gets random parameters there,
    :class:`TDNNFModel` sets Kaldi's idct matrix)."""
    L = []
    line = L.append
    hidden = " max-change=0.75 l2-regularize=%g" % l2_regularize
    out_opts = " max-change=1.5 l2-regularize=%g" % (l2_regularize / 2)
    orth = " orthonormal-constraint=-1"

    def node(name, inp):
        line("component-node name=%s component=%s input=%s" % (name, name, inp))

    def affine(name, typ, i, o, opts, inp):
        line("component name=%s type=%s input-dim=%d output-dim=%d%s" % (name, typ, i, o, opts))
        node(name, inp)

    def relu(name, dim, inp):
        line("component name=%s type=RectifiedLinearComponent dim=%d self-repair-scale=1e-05"
             % (name, dim))
        node(name, inp)

    def bn(name, dim, inp):
        line("component name=%s type=BatchNormComponent dim=%d target-rms=1 epsilon=0.001"
             % (name, dim))
        node(name, inp)

    F_ = feat_dim
    line("input-node name=input dim=%d" % F_)
    prev = "input"
    if use_idct:
        affine("idct", "FixedAffineComponent", F_, F_, "", prev)
        prev = "idct"
    bn("batchnorm0", F_, prev)
    prev = "batchnorm0"
    sa = _spec_augment_options(spec_augment)
    if sa is not None:
        line("component name=spec-augment.freq-mask type=GeneralDropoutComponent dim=%d "
             "specaugment-max-proportion=%g%s" % (
                 F_, sa["freq_max_proportion"], " specaugment-max-regions=%d"
                 % sa["freq_max_regions"] if sa["freq_max_regions"] > 1 else ""))
        node("spec-augment.freq-mask", prev)
        line("component name=spec-augment.time-mask type=SpecAugmentTimeMaskComponent "
             "dim=%d zeroed-proportion=%g time-mask-max-frames=%d"
             % (F_, sa["time_zeroed_proportion"], sa["time_mask_max_frames"]))
        node("spec-augment.time-mask", "spec-augment.freq-mask")
        prev = "spec-augment.time-mask"
    in_dim = F_
    if use_delta:  # Kaldi's delta-layer: [x(t), x(t+1) - x(t-1), x(t-2) + x(t+2) - 2 x(t)]
        for k in (1, 2):
            line("dim-range-node name=%s_copy%d input-node=%s dim=%d dim-offset=0"
                 % (prev, k, prev, F_))
        line("component name=%s_2 type=NoOpComponent dim=%d" % (prev, 3 * F_))
        node("%s_2" % prev, "Append(%s, Sum(Offset(Scale(-1.0, %s_copy1), -1), "
             "Offset(%s, 1)), Sum(Offset(%s, -2), Sum(Offset(%s, 2), "
             "Scale(-2.0, %s_copy2))))" % ((prev,) * 6))
        line("component name=delta type=BatchNormComponent dim=%d target-rms=1 "
             "epsilon=0.001" % (3 * F_))
        line("component-node name=delta component=delta input=%s_2" % prev)
        prev, in_dim = "delta", 3 * F_
    affine("tdnn1.affine", "NaturalGradientAffineComponent", in_dim, tdnn_dim, hidden, prev)
    relu("tdnn1.relu", tdnn_dim, "tdnn1.affine")
    bn("tdnn1.batchnorm", tdnn_dim, "tdnn1.relu")
    prev, dim = "tdnn1.batchnorm", tdnn_dim
    for i, s in enumerate(time_strides):
        n = "tdnnf%d" % (i + 2)
        affine(n + ".linear", "TdnnComponent", dim, bottleneck_dim,
               hidden + orth + " use-bias=false time-offsets=%s" % ("-%d,0" % s if s else "0"),
               prev)
        affine(n + ".affine", "TdnnComponent", bottleneck_dim, tdnnf_dim,
               hidden + " time-offsets=%s" % ("0,%d" % s if s else "0"), n + ".linear")
        relu(n + ".relu", tdnnf_dim, n + ".affine")
        bn(n + ".batchnorm", tdnnf_dim, n + ".relu")
        out = n + ".batchnorm"
        if dropout:  # Kaldi's tdnnf-layer with dropout: continuous, one mask per sequence
            line("component name=%s.dropout type=GeneralDropoutComponent dim=%d "
                 "dropout-proportion=0.5 continuous=true" % (n, tdnnf_dim))
            node(n + ".dropout", out)
            out = n + ".dropout"
        line("component name=%s.noop type=NoOpComponent dim=%d" % (n, tdnnf_dim))
        node(n + ".noop", "Sum(Scale(%g, %s), %s)" % (bypass_scale, prev, out)
             if bypass_scale != 0 else out)
        prev, dim = n + ".noop", tdnnf_dim
    affine("prefinal-l", "LinearComponent", dim, prefinal_dim, hidden + orth, prev)
    heads = [("prefinal-chain", "output", "")]
    if xent_head:
        heads.append(("prefinal-xent", "output-xent", " learning-rate-factor=5"))
    for pre, out, lrf in heads:
        affine(pre + ".affine", "NaturalGradientAffineComponent", prefinal_dim,
               prefinal_big_dim, hidden, "prefinal-l")
        relu(pre + ".relu", prefinal_big_dim, pre + ".affine")
        bn(pre + ".batchnorm1", prefinal_big_dim, pre + ".relu")
        affine(pre + ".linear", "LinearComponent", prefinal_big_dim, prefinal_dim,
               hidden + orth, pre + ".batchnorm1")
        bn(pre + ".batchnorm2", prefinal_dim, pre + ".linear")
        affine(out + ".affine", "NaturalGradientAffineComponent", prefinal_dim, num_pdfs,
               out_opts + lrf + " param-stddev=0.0 bias-stddev=0.0", pre + ".batchnorm2")
        if xent_head and out == "output-xent":
            line("component name=output-xent.log-softmax type=LogSoftmaxComponent dim=%d"
                 % num_pdfs)
            node("output-xent.log-softmax", "output-xent.affine")
            line("output-node name=output-xent input=output-xent.log-softmax "
                 "objective=linear")
        else:
            line("output-node name=output input=output.affine objective=linear")
    return "\n".join(L) + "\n"


class TDNNFModel(Nnet3):
    """A TDNN-F chain model like Kaldi's mini_librispeech ``tdnn_1j`` (without i-vectors),
    as an :class:`~pkwrap.nnet3.Nnet3` (see the module docstring).

    Args:
      num_pdfs:
        Output dimension P (number of pdf-ids).
      feat_dim:
        Input feature dimension F (40 MFCCs in 1j).
      tdnn_dim:
        Output dimension of tdnn1.
      tdnnf_dim:
        Dimension of the TDNN-F layers.
      bottleneck_dim:
        Bottleneck of the TDNN-F layers.
      time_strides:
        One time stride per TDNN-F layer (1j: 1,1,1,0,3,3,3,3,3,3,3,3); its length is the
        number of TDNN-F layers.
      prefinal_dim:
        small-dim of prefinal-l and the prefinal layers (1j: 192).
      prefinal_big_dim:
        big-dim of the prefinal layers (1j: 768).
      bypass_scale:
        TDNN-F bypass scale (0.66).
      frame_subsampling_factor:
        Output frame rate divisor f (3 for chain models).
      use_idct:
        Start with Kaldi's fixed idct-layer (lifter 22); needs MFCC input.
      use_delta:
        Append delta and delta-delta features (Kaldi's delta-layer) after batchnorm0.
      l2_regularize:
        Per-layer l2 of the hidden layers (0.03 in 1j); output layers get half of it.
      xent_head:
        Build the xent head (``prefinal-xent``, ``output-xent``, learning-rate factor 5).
      spec_augment:
        Kaldi's ``spec-augment-layer`` after batchnorm0, in training only: a dict of
        :data:`SPEC_AUGMENT_DEFAULTS`' keys (missing ones take Kaldi's defaults); None:
        none.
      dropout:
        Put Kaldi's dropout in every TDNN-F layer, as the xconfig ``tdnnf-layer`` with a
        dropout proportion does: a ``GeneralDropoutComponent`` (``continuous=true``: each
        dimension of a sequence scaled by ``1 - 2p + 4pu``, u uniform) after the batchnorm,
        named ``tdnnfN.dropout``. Its proportion is set during training by a schedule
        (:func:`pkwrap.train.chain_train.dropout_proportions`); evaluation is unaffected.

    The random initial parameters are drawn from torch's global generator (seed it with
    ``torch.manual_seed`` for the same model on every rank). The ReLUs carry Kaldi's
    self-repair-scale 1e-05 (written to Kaldi model files, for Kaldi's own training);
    pkwrap's training does not apply the self-repair term (it changes only training, not
    the network function).

    ``forward(x)`` with x ``[B][T][F]`` returns ``{"output": [B][T_out][P],
    "output-xent": [B][T_out][P]}`` (the latter with the xent head; log-softmax), as every
    :class:`~pkwrap.nnet3.Nnet3`. Attributes: the constructor arguments,
    ``left_context``, ``right_context``, ``frame_subsampling_factor``.
    """

    def __init__(self, num_pdfs: int, feat_dim: int = 40, tdnn_dim: int = 768,
                 tdnnf_dim: int = 768, bottleneck_dim: int = 96,
                 time_strides: Sequence[int] = (1, 1, 1, 0, 3, 3, 3, 3, 3, 3, 3, 3),
                 prefinal_dim: int = 192, prefinal_big_dim: int = 768,
                 bypass_scale: float = 0.66, frame_subsampling_factor: int = 3,
                 use_idct: bool = True, use_delta: bool = True, l2_regularize: float = 0.03,
                 xent_head: bool = True, spec_augment: Optional[Dict] = None,
                 dropout: bool = False):
        if num_pdfs <= 0 or feat_dim <= 0:
            raise ValueError(f"TDNNFModel: bad num_pdfs={num_pdfs} or feat_dim={feat_dim}")
        if frame_subsampling_factor < 1:
            raise ValueError("TDNNFModel: frame_subsampling_factor must be >= 1")
        strides = [int(s) for s in time_strides]
        if any(s < 0 for s in strides):
            raise ValueError(f"TDNNFModel: time strides must be >= 0, got {list(time_strides)}")
        if tdnn_dim != tdnnf_dim and strides and bypass_scale != 0:
            raise ValueError("TDNNFModel: tdnn_dim must equal tdnnf_dim when there is a bypass")
        args = dict(num_pdfs=num_pdfs, feat_dim=feat_dim, tdnn_dim=tdnn_dim,
                    tdnnf_dim=tdnnf_dim, bottleneck_dim=bottleneck_dim, time_strides=strides,
                    prefinal_dim=prefinal_dim, prefinal_big_dim=prefinal_big_dim,
                    bypass_scale=bypass_scale, use_idct=use_idct, use_delta=use_delta,
                    l2_regularize=l2_regularize, xent_head=xent_head,
                    spec_augment=_spec_augment_options(spec_augment), dropout=bool(dropout))
        config = tdnnf_config(**args)
        # the initial parameters come from torch's global generator (torch.manual_seed), in
        # config order with the distributions of Kaldi's config defaults (the draws of
        # pkwrap's earlier hand-built TDNNFModel: the same seed gives the same model); the
        # idct matrix, set below, takes none of them
        lines = config.split("\n")
        is_idct = [ln.startswith("component name=idct ") for ln in lines]
        comps: list = []
        try:
            _parse_config([ln for ln, i in zip(lines, is_idct) if i], "TDNNFModel", "config",
                          comps, torch.Generator())
            nodes = _parse_config([ln for ln, i in zip(lines, is_idct) if not i], "TDNNFModel",
                                  "config", comps, None)
        except KaldiFormatError as e:
            raise ValueError(str(e)) from None
        super().__init__(nodes, comps, name="TDNNFModel")
        self.__dict__.update(args)
        self.frame_subsampling_factor = int(frame_subsampling_factor)
        self._config = config
        if use_idct:
            from pkwrap.nn.tdnnf import compute_idct_matrix
            c = self.component("idct")
            with torch.no_grad():
                c.weight.copy_(compute_idct_matrix(feat_dim, 22.0))
                c.bias.zero_()

    @classmethod
    def tdnn_1j(cls, num_pdfs: int, feat_dim: int = 40) -> "TDNNFModel":
        """Kaldi's mini_librispeech tdnn_1j network without i-vectors (5,024,134 parameters
        for 2051 pdfs, context 29/29)."""
        return cls(num_pdfs, feat_dim=feat_dim)

    def nnet3_config(self) -> str:
        """The config lines the network was built from (:func:`tdnnf_config`: component
        and node lines, as Kaldi's ``final.config``; ``nnet3-init`` reads them)."""
        return self._config
