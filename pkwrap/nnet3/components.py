"""nnet3 components: Kaldi's layer types as torch modules, read and written in Kaldi's format.

A component in a model file is ``<ComponentName> NAME <XComponent> <Field> value ...
</XComponent>``. Every field is kept in file order in :attr:`Component.fields` (token
without the brackets -> value), so writing a component back gives Kaldi's bytes. Fields
that are trained or accumulated live as torch tensors instead:

==================================  ==========================  ===============================
field                               attribute                   kind
==================================  ==========================  ===============================
``LinearParams`` / ``Params``       ``weight`` ``[out][in]``    parameter
``BiasParams``                      ``bias`` ``[out]``          parameter (None when empty)
``Scales``, ``Offsets`` (ScaleAnd-  ``scales``, ``offsets``     parameters
Offset)
BatchNorm ``Count``, ``StatsMean``,  ``count``, ``stats_mean``,   buffers
``StatsVar``                        ``stats_var``
==================================  ==========================  ===============================

``forward(x)`` maps ``[B][L_in][D_in]`` (frames in time order) to ``[B][L_out][D_out]``
where ``L_out = L_in - (context[1] - context[0])``: only TdnnComponent and
TimeHeightConvolutionComponent look at other frames (``context`` = the smallest and largest
time offset); the rest work frame by frame. In eval mode every component computes what
Kaldi's ``nnet3-compute`` does (``SetBatchnormTestMode``, ``SetDropoutTestMode``).

The value kinds of the fields (Kaldi's ``Write`` functions, nnet-*-component.cc):
``i`` int32, ``f`` float (a double when the file has 8 bytes; kept), ``b`` bool, ``v``
vector, ``m`` matrix, ``iv`` int vector, ``ip`` int-pair vector, ``2i``/``2f`` two
numbers, ``flag`` a token with no value, ``conv`` a nested ``<ConvolutionModel>``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Type

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pkwrap.kaldi.io import KaldiFormatError, KaldiReader, KaldiWriter
from pkwrap.kaldi.matrix import read_matrix, read_vector, write_matrix, write_vector
from pkwrap.ngsgd import OnlineNaturalGradient
from pkwrap.nn.natural import _NaturalAffineFunction, _NaturalGradientMixin
from pkwrap.nn.spec_augment import spec_augment_freq_mask, spec_augment_time_mask

__all__ = ["Component", "COMPONENT_TYPES", "read_component", "FIELD_KINDS"]

FIELD_KINDS: Dict[str, str] = {
    "Dim": "i", "BlockDim": "i", "InputDim": "i", "OutputDim": "i", "Epsilon": "f",
    "TargetRms": "f", "TestMode": "b", "Count": "f", "StatsMean": "v", "StatsVar": "v",
    "ValueAvg": "v", "DerivAvg": "v", "OderivRms": "v", "OderivCount": "f",
    "NumDimsSelfRepaired": "f", "NumDimsProcessed": "f", "SelfRepairLowerThreshold": "f",
    "SelfRepairUpperThreshold": "f", "SelfRepairScale": "f", "LearningRate": "f",
    "LearningRateFactor": "f", "MaxChange": "f", "L2Regularize": "f", "IsGradient": "b",
    "LinearParams": "m", "BiasParams": "v", "Params": "m", "RankIn": "i", "RankOut": "i",
    "UpdatePeriod": "i", "NumSamplesHistory": "f", "Alpha": "f", "Rank": "i",
    "RankInOut": "2i", "AlphaInOut": "2f", "OrthonormalConstraint": "f",
    "UseNaturalGradient": "b", "TimeOffsets": "iv", "ColumnMap": "iv", "BackpropScale": "f",
    "DropoutProportion": "f", "DropoutPerFrame": "b", "TimePeriod": "i",
    "SpecAugmentMaxProportion": "f", "SpecAugmentMaxRegions": "i", "ZeroedProportion": "f",
    "TimeMaskMaxFrames": "i", "MaxMemoryMb": "f", "NumMinibatchesHistory": "f",
    "Model": "conv", "Scales": "v", "Offsets": "v", "AddLogStddev": "b", "Continuous": "flag",
}
_TYPE_KINDS = {
    "GeneralDropoutComponent": {"TestMode": "flag"},
    "SpecAugmentTimeMaskComponent": {"TestMode": "flag"},
}
_CONV_FIELDS = (("NumFiltersIn", "i"), ("NumFiltersOut", "i"), ("HeightIn", "i"),
                ("HeightOut", "i"), ("HeightSubsampleOut", "i"), ("Offsets", "ip"),
                ("RequiredTimeOffsets", "iv"))


# ----------------------------------------------------------------------------- values
class _Num(float):
    """A float read from an 8-byte binary double (written back as a double)."""


def _read_int_pairs(r: KaldiReader) -> np.ndarray:
    if r.binary:
        start = r.pos
        sz = r.take(1, "int-pair vector")[0]
        if sz != 4:
            raise r.error("expected an int-pair vector of 4-byte elements, got %d" % sz, start)
        n = int(np.frombuffer(r.take(4, "int-pair vector size"), "<i4")[0])
        return r.take_array("<i4", 2 * n, "int pairs").reshape(n, 2).astype(np.int32)
    r.skip_ws()
    if r.peek() != 91:
        raise r.error("expected '[' to start an int-pair vector")
    r.pos += 1
    pairs = []
    while True:
        w = r._word("int pair")
        if w == "]":
            break
        try:
            a, b = w.split(",")
            pairs.append((int(a), int(b)))
        except ValueError:
            raise r.error("bad int pair %r" % w[:40]) from None
    return np.array(pairs, dtype=np.int32).reshape(-1, 2)


def _write_int_pairs(w: KaldiWriter, v: np.ndarray) -> None:
    v = np.asarray(v, dtype=np.int32).reshape(-1, 2)
    if w.binary:
        w.write(b"\x04" + np.int32(len(v)).astype("<i4").tobytes() + v.astype("<i4").tobytes())
    else:
        w.write(("[ " + "".join("%d,%d " % (a, b) for a, b in v) + "]\n").encode())


def _read_num(r: KaldiReader, what: str) -> float:
    if r.binary and r.peek() == 8:
        return _Num(r.read_float(what))
    return r.read_float(what)


def _write_num(w: KaldiWriter, v: float) -> None:
    if isinstance(v, _Num):
        w.write_double(v)
    else:
        w.write_float(v)


def _read_value(r: KaldiReader, kind: str, tok: str):
    if kind == "i":
        return r.read_int32(tok)
    if kind == "f":
        return _read_num(r, tok)
    if kind == "b":
        return r.read_bool()
    if kind == "v":
        return read_vector(r)
    if kind == "m":
        return read_matrix(r)
    if kind == "iv":
        return r.read_int_vector(what=tok)
    if kind == "ip":
        return _read_int_pairs(r)
    if kind == "2i":
        return (r.read_int32(tok), r.read_int32(tok))
    if kind == "2f":
        return (_read_num(r, tok), _read_num(r, tok))
    if kind == "flag":
        return True
    if kind == "conv":
        tok2 = r.read_token()
        if tok2 != "<ConvolutionModel>":
            raise r.error("expected <ConvolutionModel>, got %r" % tok2)
        model = OrderedDict()
        for name, k in _CONV_FIELDS:
            r.expect_token("<%s>" % name)
            model[name] = _read_value(r, k, name)
        r.expect_token("</ConvolutionModel>")
        return model
    raise ValueError("unknown field kind %r" % kind)


def _write_value(w: KaldiWriter, kind: str, v) -> None:
    if kind == "i":
        w.write_int32(v)
    elif kind == "f":
        _write_num(w, v)
    elif kind == "b":
        w.write_bool(v)
    elif kind == "v":
        write_vector(w, np.asarray(v))
    elif kind == "m":
        write_matrix(w, np.asarray(v))
    elif kind == "iv":
        w.write_int_vector(v)
    elif kind == "ip":
        _write_int_pairs(w, v)
    elif kind == "2i":
        w.write_int32(v[0])
        w.write_int32(v[1])
    elif kind == "2f":
        _write_num(w, v[0])
        _write_num(w, v[1])
    elif kind == "flag":
        pass
    elif kind == "conv":
        w.write_token("<ConvolutionModel>")
        for name, k in _CONV_FIELDS:
            w.write_token("<%s>" % name)
            _write_value(w, k, v[name])
        w.write_token("</ConvolutionModel>")
    else:
        raise ValueError("unknown field kind %r" % kind)


# ----------------------------------------------------------------------------- base
COMPONENT_TYPES: Dict[str, Type["Component"]] = {}


def _field_property(field: str, default: float, doc: str) -> property:
    """A float training setting stored in the component's file field ``<field>``
    (``default`` when the file has none; set through ``_set_field``)."""
    def get(self) -> float:
        return float(self.fields.get(field, default))

    def set_(self, v: float) -> None:
        self._set_field(field, float(v))
    return property(get, set_, doc=doc)


def _register(cls):
    COMPONENT_TYPES[cls.TYPE] = cls
    return cls


class Component(nn.Module):
    """Base class: one Kaldi nnet3 component.

    Args:
      name: the component's name in the network.
      fields: the fields in file order (token without ``<>`` -> value).
    """

    TYPE = ""
    #: the frame ``t`` of the first input row in the current forward call (set by Nnet3)
    first_frame = 0
    #: fields held as tensors: field -> attribute; parameters unless listed in BUFFERS
    TENSORS: Dict[str, str] = {}
    BUFFERS: Tuple[str, ...] = ()

    def __init__(self, name: str, fields: "OrderedDict[str, object]"):
        super().__init__()
        self.name = name
        self.fields = OrderedDict(fields)
        self._kinds = dict(FIELD_KINDS, **_TYPE_KINDS.get(self.TYPE, {}))
        for field, attr in self.TENSORS.items():
            if field not in self.fields:
                continue
            a = np.asarray(self.fields[field])
            if a.size == 0:
                continue
            t = torch.from_numpy(np.array(a, dtype=np.float32))
            if attr in self.BUFFERS:
                self.register_buffer(attr, t)
            else:
                setattr(self, attr, nn.Parameter(t))
            self.fields[field] = _TensorRef(attr, a.dtype)
        self.check()

    # -- helpers
    def need(self, field: str):
        if field not in self.fields:
            raise ValueError("%s %s: missing <%s>" % (self.TYPE, self.name, field))
        return self.fields[field]

    def check(self) -> None:
        """Raise ValueError when the fields are inconsistent."""

    @property
    def input_dim(self) -> int:
        return int(self.need("Dim"))

    @property
    def output_dim(self) -> int:
        return self.input_dim

    @property
    def context(self) -> Tuple[int, int]:
        """(smallest, largest) time offset the component reads; (0, 0) frame by frame."""
        return (0, 0)

    @property
    def required_context(self) -> Tuple[int, int]:
        """The offsets that must be computable for an output frame to be (Kaldi's
        required time offsets); the others read zeros where not computable."""
        return self.context

    @property
    def is_updatable(self) -> bool:
        return "LearningRate" in self.fields

    # -- Kaldi's per-component training settings, read by pkwrap.optim.kaldi_param_groups
    #    and NGSGD (learning_rate_factor, max_change, l2_regularize, orthonormal_constraint);
    #    they live in the fields, so they are saved with the model.
    _COMMON_ORDER = ("LearningRateFactor", "IsGradient", "MaxChange", "L2Regularize",
                     "LearningRate")
    #: the field after which Kaldi writes <OrthonormalConstraint>, by type
    _ORTHO_AFTER = {"NaturalGradientAffineComponent": "RankOut", "LinearComponent": "Params",
                    "AffineComponent": "BiasParams"}

    def _set_field(self, field: str, value) -> None:
        """Set a field, inserting it where Kaldi's Write puts it when it is new."""
        f = self.fields
        if field in f:
            f[field] = value
            return
        items = list(f.items())
        if field in self._COMMON_ORDER:
            rank = self._COMMON_ORDER.index(field)
            pos = sum(1 for k, _ in items if k in self._COMMON_ORDER[:rank])
        elif field == "OrthonormalConstraint" and self._ORTHO_AFTER.get(self.TYPE) in f:
            pos = [k for k, _ in items].index(self._ORTHO_AFTER[self.TYPE]) + 1
        else:
            raise ValueError("%s %s has no <%s> to set" % (self.TYPE, self.name, field))
        items.insert(pos, (field, value))
        self.fields = OrderedDict(items)

    learning_rate_factor = _field_property("LearningRateFactor", 1.0,
                                           "Kaldi's learning-rate-factor.")
    max_change = _field_property("MaxChange", 0.0, "Kaldi's max-change (0: none).")
    l2_regularize = _field_property("L2Regularize", 0.0, "Kaldi's l2-regularize.")
    orthonormal_constraint = _field_property("OrthonormalConstraint", 0.0,
                                             "Kaldi's orthonormal-constraint (0: none).")

    def training_options(self) -> Dict[str, float]:
        """Kaldi's per-component training settings (present only when in the file):
        learning_rate, learning_rate_factor, max_change, l2_regularize,
        orthonormal_constraint."""
        out = {}
        for key, field in (("learning_rate", "LearningRate"),
                           ("learning_rate_factor", "LearningRateFactor"),
                           ("max_change", "MaxChange"), ("l2_regularize", "L2Regularize"),
                           ("orthonormal_constraint", "OrthonormalConstraint")):
            if field in self.fields:
                out[key] = float(self.fields[field])
        return out

    def extra_repr(self) -> str:
        return "%s %s, %d -> %d" % (self.TYPE, self.name, self.input_dim, self.output_dim)

    # -- I/O
    def write(self, w: KaldiWriter) -> None:
        """Write ``<XComponent> fields </XComponent>`` (the name is the caller's)."""
        w.write_token("<%s>" % self.TYPE)
        for tok, v in self.fields.items():
            w.write_token("<%s>" % tok)
            if isinstance(v, _TensorRef):
                t = getattr(self, v.attr)
                a = t.detach().cpu().numpy().astype(v.dtype)
                _write_value(w, "m" if a.ndim == 2 else "v", a)
            else:
                _write_value(w, self._kinds.get(tok, "f"), v)
        w.write_token("</%s>" % self.TYPE)

    def scale_params(self, alpha: float) -> None:
        """Kaldi's ``Component::Scale`` (``nnet3-copy --scale``): trainable parameters
        times ``alpha``; the counts of accumulated statistics too (their averages stay)."""
        with torch.no_grad():
            if self.is_updatable:
                for p in self.parameters(recurse=False):
                    p.mul_(alpha)
            for k in ("Count", "OderivCount"):
                if k in self.fields and not isinstance(self.fields[k], _TensorRef):
                    v = self.fields[k]
                    self.fields[k] = type(v)(v * alpha) if isinstance(v, _Num) else v * alpha
            if hasattr(self, "count") and isinstance(self.count, torch.Tensor):
                self.count.mul_(alpha)

    def set_learning_rate(self, lr: float) -> None:
        """Kaldi's ``SetUnderlyingLearningRate``: ``<LearningRate>`` = lr times the
        component's learning-rate-factor."""
        self.fields["LearningRate"] = lr * float(self.fields.get("LearningRateFactor", 1.0))

    def set_learning_rate_factor(self, factor: float) -> None:
        """Set ``<LearningRateFactor>`` (Kaldi's ``set-learning-rate-factor`` edit)."""
        self.learning_rate_factor = factor


class _TensorRef:
    """A field whose value lives in a tensor attribute (dtype: as stored in the file)."""

    __slots__ = ("attr", "dtype")

    def __init__(self, attr: str, dtype):
        self.attr = attr
        self.dtype = np.dtype(dtype)


def read_component(r: KaldiReader, name: str) -> Component:
    """Read one component body (after ``<ComponentName> name``).

    Raises:
      KaldiFormatError: unknown component type or field, naming it and the file.
    """
    start = r.pos
    tok = r.read_token()
    if not (tok.startswith("<") and tok.endswith(">")):
        raise r.error("component %s: expected a component type token, got %r"
                      % (name, tok[:40]), start)
    typ = tok[1:-1]
    cls = COMPONENT_TYPES.get(typ)
    if cls is None:
        raise r.error("component %s: unsupported component type %s" % (name, typ), start)
    kinds = dict(FIELD_KINDS, **_TYPE_KINDS.get(typ, {}))
    end = "</%s>" % typ
    fields = OrderedDict()
    while True:
        p = r.pos
        t = r.read_token()
        if t == end:
            break
        if t == tok and not fields:
            continue
        f = t[1:-1] if t.startswith("<") and t.endswith(">") else None
        if f is None or f not in kinds:
            raise r.error("component %s (%s): unknown field %r" % (name, typ, t[:40]), p)
        fields[f] = _read_value(r, kinds[f], t)
    try:
        return cls(name, fields)
    except ValueError as e:
        raise KaldiFormatError("%s: %s" % (r.name, e)) from None


# ----------------------------------------------------------------------------- affine family
class _AffineBase(Component):
    """``y = W x + b`` with ``W = LinearParams [out][in]``, ``b = BiasParams [out]``."""

    TENSORS = {"LinearParams": "weight", "BiasParams": "bias"}

    def check(self):
        if not hasattr(self, "weight") or not isinstance(self.weight, torch.Tensor):
            raise ValueError("%s %s: missing <LinearParams>" % (self.TYPE, self.name))
        if getattr(self, "bias", None) is not None and self.bias.shape[0] != self.weight.shape[0]:
            raise ValueError("%s %s: bias dim %d != output dim %d" % (
                self.TYPE, self.name, self.bias.shape[0], self.weight.shape[0]))

    @property
    def input_dim(self):
        return self.weight.shape[1]

    @property
    def output_dim(self):
        return self.weight.shape[0]

    def _natural(self) -> bool:
        """Whether this forward call should precondition the gradient (training with
        autograd, Kaldi's use-natural-gradient on)."""
        return (self.training and torch.is_grad_enabled() and self.weight.requires_grad
                and getattr(self, "preconditioner_in", None) is not None
                and self.use_natural_gradient)

    def _affine(self, x, x_sqnorm: Optional[float] = None):
        """``x W^T + b``; with natural gradient (Kaldi's OnlineNaturalGradient on the input
        rows and output derivatives, pkwrap.nn.NaturalAffine's backward) in training.
        ``x_sqnorm``: the squared norm of x when the caller has it (saves a pass)."""
        b = getattr(self, "bias", None)
        if self._natural():
            self._register_owner()
            y = _NaturalAffineFunction.apply(x.reshape(-1, x.shape[-1]), self.weight, b, self,
                                             x_sqnorm)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        return F.linear(x, self.weight, b)

    def forward(self, x):
        return self._affine(x)

    def _init_preconditioners(self, rank_in, rank_out, update_period, num_samples_history,
                              alpha_in, alpha_out, num_minibatches_history=0.0) -> None:
        self.preconditioner_in = OnlineNaturalGradient(max(1, int(rank_in)), int(update_period),
                                                       float(num_samples_history),
                                                       float(num_minibatches_history),
                                                       float(alpha_in))
        self.preconditioner_out = OnlineNaturalGradient(max(1, int(rank_out)),
                                                        int(update_period),
                                                        float(num_samples_history),
                                                        float(num_minibatches_history),
                                                        float(alpha_out))
        # an optimizer made before the first forward finds the layer of each weight
        # (NGSGD's state of a checkpoint is loaded before training resumes)
        if getattr(self, "use_natural_gradient", False):
            self._register_owner()


@_register
class FixedAffineComponent(_AffineBase):
    TYPE = "FixedAffineComponent"

    def __init__(self, name, fields):
        super().__init__(name, fields)
        self.weight.requires_grad_(False)
        if getattr(self, "bias", None) is not None:
            self.bias.requires_grad_(False)


@_register
class AffineComponent(_AffineBase):
    TYPE = "AffineComponent"


@_register
class NaturalGradientAffineComponent(_NaturalGradientMixin, _AffineBase):
    """Affine with natural-gradient training (RankIn, RankOut, UpdatePeriod,
    NumSamplesHistory, Alpha)."""

    TYPE = "NaturalGradientAffineComponent"

    def check(self):
        super().check()
        f = self.fields
        self.use_natural_gradient = True
        self._init_preconditioners(f.get("RankIn", 20), f.get("RankOut", 80),
                                   f.get("UpdatePeriod", 4), f.get("NumSamplesHistory", 2000.0),
                                   f.get("Alpha", 4.0), f.get("Alpha", 4.0))


@_register
class LinearComponent(_NaturalGradientMixin, _AffineBase):
    """``y = W x`` with ``W = Params [out][in]``; natural gradient when UseNaturalGradient."""

    TYPE = "LinearComponent"
    TENSORS = {"Params": "weight"}

    def check(self):
        if not hasattr(self, "weight"):
            raise ValueError("%s %s: missing <Params>" % (self.TYPE, self.name))
        f = self.fields
        self.use_natural_gradient = bool(f.get("UseNaturalGradient", True))
        ri, ro = f.get("RankInOut", (20, 80))
        self._init_preconditioners(ri, ro, f.get("UpdatePeriod", 4),
                                   f.get("NumSamplesHistory", 2000.0), f.get("Alpha", 4.0),
                                   f.get("Alpha", 4.0))


@_register
class TdnnComponent(_NaturalGradientMixin, _AffineBase):
    """``y(t) = W [x(t+o_1); ...; x(t+o_K)] + b``: W is ``[out][K*in]`` with column
    blocks in the order of ``TimeOffsets``."""

    TYPE = "TdnnComponent"

    def check(self):
        super().check()
        offs = np.atleast_1d(self.need("TimeOffsets"))
        if len(offs) == 0 or self.weight.shape[1] % len(offs):
            raise ValueError("TdnnComponent %s: %d time offsets do not divide input dim %d"
                             % (self.name, len(offs), self.weight.shape[1]))
        self.offsets = [int(o) for o in offs]
        f = self.fields
        self.use_natural_gradient = bool(f.get("UseNaturalGradient", True))
        ri, ro = f.get("RankInOut", (20, 80))
        ai, ao = f.get("AlphaInOut", (4.0, 4.0))
        self._init_preconditioners(ri, ro, 4, f.get("NumSamplesHistory", 2000.0), ai, ao)

    @property
    def input_dim(self):
        return self.weight.shape[1] // len(self.offsets)

    @property
    def context(self):
        return (min(self.offsets), max(self.offsets))

    def forward(self, x):
        lo, hi = self.context
        L = x.shape[1] - (hi - lo)
        d = self.input_dim
        if self._natural():  # precondition the spliced input, as Kaldi does
            return self._affine(torch.cat([x[:, o - lo:o - lo + L] for o in self.offsets], -1))
        out = None
        for k, o in enumerate(self.offsets):
            part = F.linear(x[:, o - lo:o - lo + L], self.weight[:, k * d:(k + 1) * d])
            out = part if out is None else out + part
        if getattr(self, "bias", None) is not None:
            out = out + self.bias
        return out


class _ConvNaturalFunction(torch.autograd.Function):
    """``y = P W^T + b`` over the patch rows P ``[N][K*F_in]`` of a convolution, with the
    gradient of the parameters preconditioned as Kaldi's
    ``TimeHeightConvolutionComponent::UpdateNaturalGradient`` does it: the plain gradient
    ``[dW | db]`` (``[F_out][K*F_in + 1]``, the bias as a last column) has its rows
    preconditioned by the input preconditioner, then its columns (the rows of its transpose)
    by the output preconditioner, and is multiplied by the product of the two scales. (An
    affine layer instead preconditions every input row and output-derivative row.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, comp):
        ctx.comp = comp
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        comp = ctx.comp
        g = g.contiguous()
        grad_x = g @ weight if ctx.needs_input_grad[0] else None
        m = torch.cat([g.t() @ x, g.sum(0)[:, None]], dim=1)
        m, s_in = comp.preconditioner_in.precondition_directions(m, in_place=True)
        mt, s_out = comp.preconditioner_out.precondition_directions(m.t().contiguous(),
                                                                    in_place=True)
        mt.mul_((s_in * s_out).to(mt.dtype))
        grad_w = mt[:-1].t().to(weight.dtype)
        grad_b = mt[-1].to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


@_register
class TimeHeightConvolutionComponent(_NaturalGradientMixin, _AffineBase):
    """2-D convolution over (time, height); features are ``height * num_filters`` with the
    filter index fastest. Output ``y[t][h][g] = b[g] + sum_k sum_f W[g][k*F_in + f]
    x[t + dt_k][h * s + dh_k][f]`` over the offsets ``(dt_k, dh_k)``, ``s`` =
    height-subsample-out; heights outside ``[0, H_in)`` are zero (padding), and so are
    frames of non-required time offsets that are not computable.

    Training uses Kaldi's natural gradient for convolutions (``UseNaturalGradient``, on by
    default): see :class:`_ConvNaturalFunction`; the preconditioners forget with
    ``NumMinibatchesHistory`` (a time constant in minibatches, 4 by default) and update on
    every minibatch, as Kaldi's do."""

    TYPE = "TimeHeightConvolutionComponent"

    def check(self):
        super().check()
        m = self.need("Model")
        self.nf_in, self.nf_out = int(m["NumFiltersIn"]), int(m["NumFiltersOut"])
        self.h_in, self.h_out = int(m["HeightIn"]), int(m["HeightOut"])
        self.sub = int(m["HeightSubsampleOut"])
        self.offs = [(int(a), int(b)) for a, b in np.asarray(m["Offsets"]).reshape(-1, 2)]
        self.required = [int(t) for t in np.atleast_1d(m["RequiredTimeOffsets"])]
        if self.weight.shape != (self.nf_out, len(self.offs) * self.nf_in):
            raise ValueError("TimeHeightConvolutionComponent %s: params %s, expected %s"
                             % (self.name, tuple(self.weight.shape),
                                (self.nf_out, len(self.offs) * self.nf_in)))
        if getattr(self, "bias", None) is None:
            raise ValueError("TimeHeightConvolutionComponent %s: missing <BiasParams>"
                             % self.name)
        f = self.fields
        self.use_natural_gradient = bool(f.get("UseNaturalGradient", True))
        ri, ro = f.get("RankInOut", (min(80, (self.weight.shape[1] + 2) // 2),
                                     min(80, (self.nf_out + 1) // 2)))
        ai, ao = f.get("AlphaInOut", (4.0, 4.0))
        nmh = float(f.get("NumMinibatchesHistory", 4.0))
        if not 1.0 < nmh < 1.0e6:
            raise ValueError("TimeHeightConvolutionComponent %s: <NumMinibatchesHistory> %g "
                             "is not in (1, 1e6)" % (self.name, nmh))
        # Kaldi's convolution: update period 1, forgetting by minibatches
        self._init_preconditioners(ri, ro, 1, 2000.0, ai, ao, num_minibatches_history=nmh)

    @property
    def input_dim(self):
        return self.h_in * self.nf_in

    @property
    def output_dim(self):
        return self.h_out * self.nf_out

    @property
    def time_offsets(self) -> List[int]:
        """The distinct time offsets of the filter, ascending."""
        return sorted({a for a, _ in self.offs})

    @property
    def context(self):
        ts = self.time_offsets
        return (ts[0], ts[-1])

    @property
    def required_context(self):
        ts = self.required or self.time_offsets
        return (min(ts), max(ts))

    def forward(self, x):
        lo, hi = self.context
        L = x.shape[1] - (hi - lo)
        return self.convolve([x[:, dt - lo:dt - lo + L] for dt in self.time_offsets])

    def convolve(self, xs: List[torch.Tensor]) -> torch.Tensor:
        """The output at L frames t from ``xs[i]``, ``[B][L][H_in * F_in]``: the input at
        frames ``t + time_offsets[i]``."""
        B, L = xs[0].shape[:2]
        hs = [dh for _, dh in self.offs]
        pad_lo = max(0, -min(hs))
        pad_hi = max(0, self.sub * (self.h_out - 1) + max(hs) - (self.h_in - 1))
        xp = {dt: F.pad(x.reshape(B, L, self.h_in, self.nf_in), (0, 0, pad_lo, pad_hi))
              for dt, x in zip(self.time_offsets, xs)}
        span = self.sub * (self.h_out - 1) + 1
        patches = torch.cat([xp[dt][:, :, pad_lo + dh:pad_lo + dh + span:self.sub]
                             for dt, dh in self.offs], dim=-1)  # [B][L][H_out][K*F_in]
        if self._natural():
            self._register_owner()
            y = _ConvNaturalFunction.apply(patches.reshape(-1, patches.shape[-1]),
                                           self.weight, self.bias, self)
        else:
            y = F.linear(patches, self.weight, self.bias)
        return y.reshape(B, L, self.h_out * self.nf_out)


# ----------------------------------------------------------------------------- normalization
@_register
class BatchNormComponent(Component):
    """Eval: ``y = (x - StatsMean) * TargetRms / sqrt(StatsVar + Epsilon)`` per block of
    ``BlockDim`` (the stats are per position in the block). Train: the minibatch's mean
    and variance instead, accumulated into the stats (count-weighted)."""

    TYPE = "BatchNormComponent"
    TENSORS = {"StatsMean": "stats_mean", "StatsVar": "stats_var"}
    BUFFERS = ("stats_mean", "stats_var")

    def check(self):
        self.dim = int(self.need("Dim"))
        self.block_dim = int(self.fields.get("BlockDim", self.dim))
        if self.dim % self.block_dim:
            raise ValueError("BatchNormComponent %s: block-dim %d does not divide dim %d"
                             % (self.name, self.block_dim, self.dim))
        count = float(self.fields.get("Count", 0.0))
        self.register_buffer("count", torch.tensor(count, dtype=torch.float64))
        if not hasattr(self, "stats_mean"):
            self.register_buffer("stats_mean", torch.zeros(self.block_dim))
            self.register_buffer("stats_var", torch.zeros(self.block_dim))

    def kaldi_written_stats(self) -> Tuple[np.ndarray, np.ndarray]:
        """StatsMean, StatsVar as Kaldi writes them: its Read keeps ``sum = mean * count``
        and ``sumsq = (var + mean^2) * count`` in double, its Write gives back
        ``float(sum) * float(1/count)`` and ``float(sumsq) * float(1/count) - mean^2`` in
        float (so a Kaldi copy can move the last bit; this reproduces it)."""
        c = float(self.count)
        m = self.stats_mean.detach().cpu().double().numpy()
        v = self.stats_var.detach().cpu().double().numpy()
        if c == 0:  # Kaldi's sums are zero then, and written unscaled
            return np.zeros(len(m), np.float32), np.zeros(len(v), np.float32)
        inv = np.float32(1.0 / c)
        mean = (m * c).astype(np.float32) * inv
        var = ((v + m * m) * c).astype(np.float32) * inv - mean * mean
        return mean, var

    def write(self, w):
        count = float(self.count)
        f = self.fields
        f["Count"] = _Num(count)  # a double in Kaldi's BatchNormComponent
        for k in ("StatsMean", "StatsVar"):
            f.pop(k, None)
        f["StatsMean"], f["StatsVar"] = self.kaldi_written_stats()  # always written
        super().write(w)

    @property
    def epsilon(self) -> float:
        return float(self.fields.get("Epsilon", 1e-3))

    @property
    def target_rms(self) -> float:
        return float(self.fields.get("TargetRms", 1.0))

    @torch.no_grad()
    def add_stats(self, n: int, row_sum: torch.Tensor, row_sumsq: torch.Tensor) -> None:
        """Accumulate ``n`` training rows given their sum and sum of squares (``[block_dim]``,
        float64), as Kaldi's StoreStats does (what the fused kernels of
        :mod:`pkwrap.nn.tdnnf` report)."""
        c = float(self.count)
        tot = c + n
        m0 = self.stats_mean.double()
        s = m0 * c + row_sum.to(m0.device)
        sq = (self.stats_var.double() + m0 * m0) * c + row_sumsq.to(m0.device)
        mean = s / tot
        self.stats_mean.copy_(mean)
        self.stats_var.copy_(sq / tot - mean * mean)
        self.count.fill_(tot)

    @torch.no_grad()
    def scale_stats(self, scale: float) -> None:
        """Kaldi's ``ScaleBatchnormStats``: the statistics' count times ``scale`` (their
        sums too, so mean and variance stay; 0 resets them). ``nnet3-chain-train`` does
        this with 0.8 after every minibatch, and so does pkwrap.train for every module
        with a ``scale_stats``."""
        self.count.mul_(scale)
        if scale == 0:
            self.stats_mean.zero_()
            self.stats_var.zero_()

    def forward(self, x):
        shape = x.shape
        if self.training and self.block_dim == self.dim and x.shape[-1] == self.dim:
            # the fused C++ kernels of pkwrap.nn.tdnnf (CPU float32)
            from pkwrap.nn.tdnnf import _ReluBatchNormFunction, _fused_ok
            if _fused_ok(x) and x.numel() >= 2 * self.dim:
                return _ReluBatchNormFunction.apply(x.contiguous(), None, self, False, 0.0,
                                                    None)
        rows = x.reshape(-1, self.block_dim)
        rms = self.target_rms
        eps = self.epsilon
        if self.training:
            mean = rows.mean(0)
            var = rows.var(0, unbiased=False)
            with torch.no_grad():
                n = rows.shape[0]
                c = float(self.count)
                tot = c + n
                new_mean = (self.stats_mean.double() * c + mean.double() * n) / tot
                new_m2 = ((self.stats_var.double() + self.stats_mean.double() ** 2) * c
                          + (var.double() + mean.double() ** 2) * n) / tot
                self.stats_mean.copy_(new_mean)
                self.stats_var.copy_(new_m2 - new_mean ** 2)
                self.count.fill_(tot)
        else:
            if float(self.count) <= 0:
                raise RuntimeError("BatchNormComponent %s: eval mode needs statistics "
                                   "(Count is 0)" % self.name)
            mean, var = self.stats_mean, self.stats_var
        scale = rms * torch.rsqrt(var + eps)
        return ((rows - mean) * scale).reshape(shape)


@_register
class NormalizeComponent(Component):
    """Per block: ``y = x / sqrt(max(|x|^2 / (D * TargetRms^2), 2^-66))``; with
    AddLogStddev one more column per block, ``log(TargetRms) - log(scale)``."""

    TYPE = "NormalizeComponent"

    @property
    def input_dim(self):
        return int(self.need("InputDim"))

    @property
    def output_dim(self):
        extra = self.input_dim // self._block() if self.fields.get("AddLogStddev") else 0
        return self.input_dim + extra

    def _block(self):
        return int(self.fields.get("BlockDim", self.input_dim))

    def forward(self, x):
        bd = self._block()
        rms = float(self.fields.get("TargetRms", 1.0))
        xb = x.reshape(*x.shape[:-1], -1, bd)
        p = (xb * xb).sum(-1, keepdim=True) / (bd * rms * rms)
        f = p.clamp(min=2.0 ** -66).rsqrt()
        y = xb * f
        if self.fields.get("AddLogStddev"):
            y = torch.cat([y, math.log(rms) - torch.log(f)], dim=-1)
        return y.reshape(*x.shape[:-1], -1)


# ----------------------------------------------------------------------------- nonlinearities
class _Elementwise(Component):
    def forward(self, x):
        return self.fn(x)


def _float_avg(avg, count: float) -> np.ndarray:
    """``float(avg * count) * float(1 / count)``: an average through Kaldi's double sum."""
    a = np.asarray(avg, dtype=np.float64)
    if count == 0:
        return (a * 0).astype(np.float32)
    return (a * count).astype(np.float32) * np.float32(1.0 / count)


class _Nonlinear(_Elementwise):
    """Kaldi's NonlinearComponent: the statistics ValueAvg, DerivAvg (over Count frames)
    and OderivRms (over OderivCount) are kept as sums in double by Kaldi's Read; ``write``
    gives them back through the same float arithmetic as Kaldi's Write."""

    def write(self, w):
        f = self.fields
        saved = {k: f[k] for k in ("ValueAvg", "DerivAvg", "OderivRms") if k in f}
        try:
            c = float(f.get("Count", 0.0))
            for k in ("ValueAvg", "DerivAvg"):
                if k in f:
                    f[k] = _float_avg(f[k], c)
            if "OderivRms" in f:
                rms = np.asarray(f["OderivRms"], dtype=np.float64)
                ms = _float_avg(rms * rms, float(f.get("OderivCount", 0.0)))
                f["OderivRms"] = np.sqrt(np.maximum(ms, np.float32(0)))
            super().write(w)
        finally:
            f.update(saved)


@_register
class RectifiedLinearComponent(_Nonlinear):
    TYPE = "RectifiedLinearComponent"
    fn = staticmethod(torch.relu)


@_register
class SigmoidComponent(_Nonlinear):
    TYPE = "SigmoidComponent"
    fn = staticmethod(torch.sigmoid)


@_register
class TanhComponent(_Nonlinear):
    TYPE = "TanhComponent"
    fn = staticmethod(torch.tanh)


@_register
class LogSoftmaxComponent(_Nonlinear):
    TYPE = "LogSoftmaxComponent"

    @staticmethod
    def fn(x):
        return torch.log_softmax(x, dim=-1)


@_register
class SoftmaxComponent(_Nonlinear):
    TYPE = "SoftmaxComponent"

    @staticmethod
    def fn(x):
        return torch.softmax(x, dim=-1)


@_register
class NoOpComponent(_Elementwise):
    """Identity (its input descriptor does the work)."""

    TYPE = "NoOpComponent"

    @staticmethod
    def fn(x):
        return x


# ----------------------------------------------------------------------------- dropout family
@_register
class DropoutComponent(Component):
    """Eval: ``y = (1 - p) x`` (Kaldi's test mode scales instead of the training mask);
    train: each element (each frame with DropoutPerFrame) kept with probability
    ``1 - p``, zeroed otherwise, without rescaling."""

    TYPE = "DropoutComponent"

    def forward(self, x):
        p = float(self.fields.get("DropoutProportion", 0.0))
        if not self.training:
            return x * (1.0 - p)
        shape = x.shape[:-1] + (1,) if self.fields.get("DropoutPerFrame") else x.shape
        mask = (torch.rand(shape, device=x.device) >= p).to(x.dtype)
        return x * mask


@_register
class GeneralDropoutComponent(Component):
    """Eval (Kaldi's test mode): identity. Train, one mask row of ``BlockDim`` values per
    sequence (per sequence and ``t // TimePeriod`` when TimePeriod > 0), applied to every
    block of the row:

    * SpecAugmentMaxProportion ``m`` > 0 (SpecAugment's frequency mask, drawn by
      :func:`pkwrap.nn.spec_augment.spec_augment_freq_mask`): ``k`` uniform in
      ``0..round(m * BlockDim)`` consecutive bins from a uniform start are zeroed, wrapping
      around; with SpecAugmentMaxRegions ``r`` > 1, ``r - 1`` times a random half of the
      (circular) spectrum has its first quarter swapped with its mirror image;
    * otherwise dropout: ``u ~ U(0, 1)``, mask ``(u > p) / (1 - p)`` (Continuous:
      ``1 - 2p + 4p u``).

    The first frame of the input is :attr:`first_frame` (set by :class:`Nnet3`); when
    the rows are not consecutive frames, :attr:`frames` has the frame of each.
    """

    TYPE = "GeneralDropoutComponent"
    #: the frame ``t`` of each input row, when set (else ``first_frame``, +1, ...)
    frames = None

    def _mask_row(self, bd: int) -> torch.Tensor:
        """One dropout mask row (not spec-augment)."""
        f = self.fields
        p = float(f.get("DropoutProportion", 0.5))
        u = torch.rand(bd)
        if f.get("Continuous"):
            return u * (4 * p) + (1 - 2 * p)
        return (u > p).float() / (1 - p)

    def forward(self, x):
        f = self.fields
        if not self.training or f.get("TestMode") or (
                float(f.get("DropoutProportion", 0.5)) == 0
                and float(f.get("SpecAugmentMaxProportion", 0.0)) == 0):
            return x
        B, L, D = x.shape
        bd = int(f.get("BlockDim", D))
        period = int(f.get("TimePeriod", 0))
        if period > 0:
            ts = [int(t) for t in self.frames] if self.frames is not None else \
                [t + self.first_frame for t in range(L)]
            groups = [t // period for t in ts]
        else:
            groups = [0] * L
        uniq = sorted(set(groups))
        m = float(f.get("SpecAugmentMaxProportion", 0.0))
        if m != 0:  # the frequency mask of pkwrap.nn.SpecAugment, one row per group
            masks = spec_augment_freq_mask(B * len(uniq), bd, m,
                                           int(f.get("SpecAugmentMaxRegions", 1)))
            masks = masks.view(B, len(uniq), bd)
        else:
            masks = torch.stack([torch.stack([self._mask_row(bd) for _ in uniq])
                                 for _ in range(B)])  # [B][G][bd]
        idx = torch.tensor([uniq.index(g) for g in groups])
        mask = masks[:, idx].to(x.device, x.dtype)  # [B][L][bd]
        return (x.reshape(B, L, -1, bd) * mask.unsqueeze(2)).reshape(B, L, D)


@_register
class SpecAugmentTimeMaskComponent(Component):
    """Eval: identity. Train (SpecAugment's time mask, drawn by
    :func:`pkwrap.nn.spec_augment.spec_augment_time_mask`), per sequence: alternating kept
    and zeroed spans of frames, kept spans ``1..floor(M (1-z) / z)`` frames, zeroed spans
    ``1..M`` frames (uniform; M = TimeMaskMaxFrames, z = ZeroedProportion); the first span
    is a kept one with probability z."""

    TYPE = "SpecAugmentTimeMaskComponent"

    def forward(self, x):
        z = float(self.fields.get("ZeroedProportion", 0.25))
        if not self.training or self.fields.get("TestMode") or z == 0:
            return x
        B, L, D = x.shape
        # the time mask of pkwrap.nn.SpecAugment
        mask = spec_augment_time_mask(B, L, z, int(self.fields.get("TimeMaskMaxFrames", 10)))
        return x * mask[:, :, None].to(x.device, x.dtype)


# ----------------------------------------------------------------------------- reshaping
@_register
class PermuteComponent(Component):
    """``y[:, j] = x[:, ColumnMap[j]]``."""

    TYPE = "PermuteComponent"

    def check(self):
        cm = np.asarray(self.need("ColumnMap"), dtype=np.int64)
        if sorted(cm.tolist()) != list(range(len(cm))):
            raise ValueError("PermuteComponent %s: ColumnMap is not a permutation" % self.name)
        self.register_buffer("column_map", torch.from_numpy(cm), persistent=False)

    @property
    def input_dim(self):
        return len(self.column_map)

    def forward(self, x):
        return x.index_select(-1, self.column_map)


@_register
class ElementwiseProductComponent(Component):
    """Input ``k * OutputDim`` dims: the product of its k consecutive slices."""

    TYPE = "ElementwiseProductComponent"

    @property
    def input_dim(self):
        return int(self.need("InputDim"))

    @property
    def output_dim(self):
        return int(self.need("OutputDim"))

    def forward(self, x):
        d = self.output_dim
        y = x[..., :d]
        for k in range(1, self.input_dim // d):
            y = y * x[..., k * d:(k + 1) * d]
        return y


@_register
class ScaleAndOffsetComponent(Component):
    """``y = x * Scales + Offsets``, Scales/Offsets of block dim, repeated over ``Dim``."""

    TYPE = "ScaleAndOffsetComponent"
    TENSORS = {"Scales": "scales", "Offsets": "offsets"}

    def forward(self, x):
        bd = self.scales.shape[0]
        xb = x.reshape(*x.shape[:-1], -1, bd)
        return (xb * self.scales + self.offsets).reshape(x.shape)


# ----------------------------------------------------------------------------- from a config
def _load_matrix(path: str) -> np.ndarray:
    from pkwrap.kaldi.io import KaldiReader
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError("cannot read matrix %s: %s" % (path, e.strerror)) from None
    r = KaldiReader(data, name=path)
    r.read_header()
    return np.asarray(read_matrix(r), dtype=np.float32)


class _Cfg:
    """A component config line's values, consumed one by one (unused ones are an error)."""

    def __init__(self, line: str, kv: Dict[str, str]):
        self.line, self.kv = line, dict(kv)

    def get(self, key, conv=str, default=None, required=False):
        if key not in self.kv:
            if required:
                raise ValueError("component config needs %s=: %s" % (key, self.line))
            return default
        v = self.kv.pop(key)
        try:
            if conv is bool:
                if v.lower() not in ("true", "false"):
                    raise ValueError(v)
                return v.lower() == "true"
            return conv(v)
        except ValueError:
            raise ValueError("component config: bad %s=%s: %s" % (key, v, self.line)) from None

    def ints(self, key, required=False):
        v = self.get(key, required=required)
        if v is None:
            return None
        try:
            return [int(x) for x in v.split(",")]
        except ValueError:
            raise ValueError("component config: bad %s=%s: %s" % (key, v, self.line)) from None

    def done(self):
        if self.kv:
            raise ValueError("component config: unused values %s: %s"
                             % (" ".join("%s=%s" % kv for kv in self.kv.items()), self.line))


def _learning_rates(c: _Cfg) -> "OrderedDict[str, object]":
    """UpdatableComponent's common fields in Kaldi's order (only non-default ones)."""
    f = OrderedDict()
    lr = c.get("learning-rate", float, 0.001)
    lrf = c.get("learning-rate-factor", float, 1.0)
    mc = c.get("max-change", float, 0.0)
    l2 = c.get("l2-regularize", float, 0.0)
    if min(lr, lrf, mc, l2) < 0:
        raise ValueError("negative learning rate / factor / max-change / l2: %s" % c.line)
    if lrf != 1.0:
        f["LearningRateFactor"] = lrf
    if mc > 0:
        f["MaxChange"] = mc
    if l2 > 0:
        f["L2Regularize"] = l2
    f["LearningRate"] = lr
    return f


def _randn(g, *shape) -> np.ndarray:
    return torch.randn(*shape, generator=g).numpy().astype(np.float32)


def _affine_params(c: _Cfg, g, param_stddev=None, bias_default=1.0):
    mat = c.get("matrix")
    if mat is not None:
        m = _load_matrix(mat)
        w, b = m[:, :-1], m[:, -1].copy()
        for k, n in (("input-dim", w.shape[1]), ("output-dim", w.shape[0])):
            if c.get(k, int, n) != n:
                raise ValueError("%s does not match matrix %s: %s" % (k, mat, c.line))
        return w, b
    i, o = c.get("input-dim", int, required=True), c.get("output-dim", int, required=True)
    ps = c.get("param-stddev", float, 1.0 / math.sqrt(i) if param_stddev is None
               else param_stddev)
    bs = c.get("bias-stddev", float, bias_default)
    bm = c.get("bias-mean", float, 0.0)
    return _randn(g, o, i) * np.float32(ps), _randn(g, o) * np.float32(bs) + np.float32(bm)


def _init_ng_affine(c, g):
    f = _learning_rates(c)
    w, b = _affine_params(c, g)
    oc = c.get("orthonormal-constraint", float, 0.0)
    nsh, alpha = c.get("num-samples-history", float, 2000.0), c.get("alpha", float, 4.0)
    ri, ro = c.get("rank-in", int, -1), c.get("rank-out", int, -1)
    up = c.get("update-period", int, 4)
    f["LinearParams"], f["BiasParams"] = w, b
    f["RankIn"] = ri if ri >= 0 else min(20, (w.shape[1] + 1) // 2)
    f["RankOut"] = ro if ro >= 0 else min(80, (w.shape[0] + 1) // 2)
    if oc != 0:
        f["OrthonormalConstraint"] = oc
    f["UpdatePeriod"], f["NumSamplesHistory"], f["Alpha"] = up, nsh, alpha
    return f


def _init_affine(c, g):
    f = _learning_rates(c)
    w, b = _affine_params(c, g)
    oc = c.get("orthonormal-constraint", float, 0.0)
    f["LinearParams"], f["BiasParams"] = w, b
    if oc != 0:
        f["OrthonormalConstraint"] = oc
    return f


def _init_linear(c, g):
    f = _learning_rates(c)
    mat = c.get("matrix")
    if mat is not None:
        w = _load_matrix(mat)
        for k, n in (("input-dim", w.shape[1]), ("output-dim", w.shape[0])):
            if c.get(k, int, n) != n:
                raise ValueError("%s does not match matrix %s: %s" % (k, mat, c.line))
    else:
        i, o = c.get("input-dim", int, required=True), c.get("output-dim", int, required=True)
        w = _randn(g, o, i) * np.float32(c.get("param-stddev", float, 1.0 / math.sqrt(i)))
    nsh, alpha = c.get("num-samples-history", float, 2000.0), c.get("alpha", float, 4.0)
    ri, ro = c.get("rank-in", int, -1), c.get("rank-out", int, -1)
    up = c.get("update-period", int, 4)
    ng = c.get("use-natural-gradient", bool, True)
    oc = c.get("orthonormal-constraint", float, 0.0)
    f["Params"] = w
    if oc != 0:
        f["OrthonormalConstraint"] = oc
    f["UseNaturalGradient"] = ng
    f["RankInOut"] = (ri if ri >= 0 else min(20, (w.shape[1] + 1) // 2),
                      ro if ro >= 0 else min(80, (w.shape[0] + 1) // 2))
    f["Alpha"], f["NumSamplesHistory"], f["UpdatePeriod"] = alpha, nsh, up
    return f


def _init_tdnn(c, g):
    f = _learning_rates(c)
    offs = c.ints("time-offsets", required=True)
    i, o = c.get("input-dim", int, required=True), c.get("output-dim", int, required=True)
    if len(set(offs)) != len(offs):
        raise ValueError("repeated time-offsets: %s" % c.line)
    oc = c.get("orthonormal-constraint", float, 0.0)
    ps = c.get("param-stddev", float, 1.0 / math.sqrt(i * len(offs)))
    bs, bm = c.get("bias-stddev", float, 1.0), c.get("bias-mean", float, 0.0)
    use_bias = c.get("use-bias", bool, True)
    ng = c.get("use-natural-gradient", bool, True)
    ri, ro = c.get("rank-in", int, -1), c.get("rank-out", int, -1)
    ai, ao = c.get("alpha-in", float, 4.0), c.get("alpha-out", float, 4.0)
    nsh = c.get("num-samples-history", float, 2000.0)
    f["TimeOffsets"] = np.array(offs, dtype=np.int32)
    f["LinearParams"] = _randn(g, o, i * len(offs)) * np.float32(ps)
    f["BiasParams"] = (_randn(g, o) * np.float32(bs) + np.float32(bm)) if use_bias \
        else np.zeros(0, np.float32)
    f["OrthonormalConstraint"] = oc
    f["UseNaturalGradient"] = ng
    f["NumSamplesHistory"] = nsh
    f["AlphaInOut"] = (ai, ao)
    f["RankInOut"] = (ri if ri >= 0 else min(20, (i * len(offs) + 1) // 2),
                      ro if ro >= 0 else min(80, (o + 1) // 2))
    return f


def _init_conv(c, g):
    f = _learning_rates(c)
    m = OrderedDict()
    for k, key in (("NumFiltersIn", "num-filters-in"), ("NumFiltersOut", "num-filters-out"),
                   ("HeightIn", "height-in"), ("HeightOut", "height-out")):
        m[k] = c.get(key, int, required=True)
    m["HeightSubsampleOut"] = c.get("height-subsample-out", int, 1)
    req = c.ints("required-time-offsets")
    mem = c.get("max-memory-mb", float, 200.0)
    offs_s = c.get("offsets")
    if offs_s is not None:
        try:
            offs = sorted({tuple(int(x) for x in o.split(",")) for o in offs_s.split(";")})
        except ValueError:
            raise ValueError("bad offsets=%s: %s" % (offs_s, c.line)) from None
    else:
        hs, ts = c.ints("height-offsets", True), c.ints("time-offsets", True)
        offs = [(t, h) for t in ts for h in hs]
    m["Offsets"] = np.array(offs, dtype=np.int32).reshape(-1, 2)
    m["RequiredTimeOffsets"] = np.array(req if req is not None
                                        else sorted({t for t, _ in offs}), dtype=np.int32)
    hmax = m["HeightSubsampleOut"] * (m["HeightOut"] - 1)
    if not any(0 <= h + dh < m["HeightIn"] for h in (0, hmax) for _, dh in offs):
        raise ValueError("convolution heights do not fit: %s" % c.line)
    nfi, nfo = m["NumFiltersIn"], m["NumFiltersOut"]
    ps = c.get("param-stddev", float, 1.0 / math.sqrt(nfi * len(offs)))
    bs = c.get("bias-stddev", float, 0.0)
    init_unit = c.get("init-unit", bool, False)
    ng = c.get("use-natural-gradient", bool, True)
    ri, ro = c.get("rank-in", int, -1), c.get("rank-out", int, -1)
    ai, ao = c.get("alpha-in", float, 4.0), c.get("alpha-out", float, 4.0)
    nmh = c.get("num-minibatches-history", float, 4.0)
    if init_unit:
        if nfi != nfo or (0, 0) not in offs:
            raise ValueError("init-unit needs num-filters-in == num-filters-out and offset "
                             "(0,0): %s" % c.line)
        w = np.zeros((nfo, nfi * len(offs)), np.float32)
        k = offs.index((0, 0))
        w[:, k * nfi:(k + 1) * nfi] = np.eye(nfi, dtype=np.float32)
    else:
        w = _randn(g, nfo, nfi * len(offs)) * np.float32(ps)
    f["Model"], f["LinearParams"] = m, w
    f["BiasParams"] = _randn(g, nfo) * np.float32(bs)
    f["MaxMemoryMb"], f["UseNaturalGradient"], f["NumMinibatchesHistory"] = mem, ng, nmh
    f["AlphaInOut"] = (ai, ao)
    f["RankInOut"] = (ri if ri >= 0 else min(80, (w.shape[1] + 2) // 2),
                      ro if ro >= 0 else min(80, (nfo + 1) // 2))
    return f


def _init_fixed_affine(c, g):
    mat = c.get("matrix")
    if mat is not None:
        m = _load_matrix(mat)
    else:
        i, o = c.get("input-dim", int, required=True), c.get("output-dim", int, required=True)
        m = _randn(g, o, i + 1)
    return OrderedDict([("LinearParams", m[:, :-1].copy()), ("BiasParams", m[:, -1].copy())])


def _init_batchnorm(c, g):
    dim = c.get("dim", int, required=True)
    bd = c.get("block-dim", int, dim)
    eps, rms = c.get("epsilon", float, 1e-3), c.get("target-rms", float, 1.0)
    tm = c.get("test-mode", bool, False)
    if dim <= 0 or bd <= 0 or dim % bd or eps <= 0 or rms <= 0:
        raise ValueError("bad batchnorm dims/epsilon/target-rms: %s" % c.line)
    return OrderedDict([("Dim", dim), ("BlockDim", bd), ("Epsilon", eps), ("TargetRms", rms),
                        ("TestMode", tm), ("Count", _Num(0.0))])


def _init_nonlinear(c, g):
    dim = c.get("dim", int, required=True)
    bd = c.get("block-dim", int, dim)
    if dim <= 0 or bd <= 0 or dim % bd:
        raise ValueError("bad dim/block-dim: %s" % c.line)
    lo = c.get("self-repair-lower-threshold", float)
    up = c.get("self-repair-upper-threshold", float)
    sc = c.get("self-repair-scale", float, 0.0)
    f = OrderedDict([("Dim", dim)])
    if bd != dim:
        f["BlockDim"] = bd
    empty = np.zeros(0, np.float32)
    f.update([("ValueAvg", empty), ("DerivAvg", empty), ("Count", _Num(0.0)),
              ("OderivRms", empty), ("OderivCount", _Num(0.0)),
              ("NumDimsSelfRepaired", _Num(0.0)), ("NumDimsProcessed", _Num(0.0))])
    if lo is not None:
        f["SelfRepairLowerThreshold"] = lo
    if up is not None:
        f["SelfRepairUpperThreshold"] = up
    if sc != 0:
        f["SelfRepairScale"] = sc
    return f


def _init_general_dropout(c, g):
    dim = c.get("dim", int, required=True)
    f = OrderedDict([("Dim", dim), ("BlockDim", c.get("block-dim", int, dim)),
                     ("TimePeriod", c.get("time-period", int, 0)),
                     ("DropoutProportion", c.get("dropout-proportion", float, 0.5))])
    sp = c.get("specaugment-max-proportion", float, 0.0)
    sr = c.get("specaugment-max-regions", int, 1)
    cont, tm = c.get("continuous", bool, False), c.get("test-mode", bool, False)
    if sp != 0:
        f["SpecAugmentMaxProportion"] = sp
        if sr != 1:
            f["SpecAugmentMaxRegions"] = sr
    if tm:
        f["TestMode"] = True
    if cont:
        f["Continuous"] = True
    return f


def _init_time_mask(c, g):
    f = OrderedDict([("Dim", c.get("dim", int, required=True)),
                     ("ZeroedProportion", c.get("zeroed-proportion", float, 0.25)),
                     ("TimeMaskMaxFrames", c.get("time-mask-max-frames", int, 10))])
    if c.get("test-mode", bool, False):
        f["TestMode"] = True
    return f


def _init_dropout(c, g):
    return OrderedDict([("Dim", c.get("dim", int, required=True)),
                        ("DropoutProportion", c.get("dropout-proportion", float, required=True)),
                        ("DropoutPerFrame", c.get("dropout-per-frame", bool, False)),
                        ("TestMode", c.get("test-mode", bool, False))])


def _init_noop(c, g):
    return OrderedDict([("Dim", c.get("dim", int, required=True)),
                        ("BackpropScale", c.get("backprop-scale", float, 1.0))])


def _init_permute(c, g):
    return OrderedDict([("ColumnMap", np.array(c.ints("column-map", True), dtype=np.int32))])


def _init_elementwise_product(c, g):
    return OrderedDict([("InputDim", c.get("input-dim", int, required=True)),
                        ("OutputDim", c.get("output-dim", int, required=True))])


def _init_normalize(c, g):
    i = c.get("dim", int)
    if i is None:
        i = c.get("input-dim", int, required=True)
    f = OrderedDict([("InputDim", i)])
    bd = c.get("block-dim", int, i)
    if i <= 0 or bd <= 0 or i % bd:
        raise ValueError("bad dim/block-dim: %s" % c.line)
    if bd != i:
        f["BlockDim"] = bd
    f["TargetRms"] = c.get("target-rms", float, 1.0)
    f["AddLogStddev"] = c.get("add-log-stddev", bool, False)
    return f


def _init_scale_and_offset(c, g):
    f = _learning_rates(c)
    dim = c.get("dim", int, required=True)
    ng = c.get("use-natural-gradient", bool, True)
    bd = c.get("block-dim", int, dim)
    rank = c.get("rank", int, 20)
    if dim <= 0 or bd <= 0 or dim % bd:
        raise ValueError("bad dim/block-dim: %s" % c.line)
    f["Dim"] = dim
    f["Scales"] = np.ones(bd, np.float32)
    f["Offsets"] = np.zeros(bd, np.float32)
    f["UseNaturalGradient"] = ng
    f["Rank"] = rank
    return f


_INIT = {
    "NaturalGradientAffineComponent": _init_ng_affine, "AffineComponent": _init_affine,
    "LinearComponent": _init_linear, "TdnnComponent": _init_tdnn,
    "TimeHeightConvolutionComponent": _init_conv, "FixedAffineComponent": _init_fixed_affine,
    "BatchNormComponent": _init_batchnorm, "RectifiedLinearComponent": _init_nonlinear,
    "SigmoidComponent": _init_nonlinear, "TanhComponent": _init_nonlinear,
    "LogSoftmaxComponent": _init_nonlinear, "SoftmaxComponent": _init_nonlinear,
    "GeneralDropoutComponent": _init_general_dropout,
    "SpecAugmentTimeMaskComponent": _init_time_mask, "DropoutComponent": _init_dropout,
    "NoOpComponent": _init_noop, "PermuteComponent": _init_permute,
    "ElementwiseProductComponent": _init_elementwise_product,
    "NormalizeComponent": _init_normalize, "ScaleAndOffsetComponent": _init_scale_and_offset,
}


def component_from_config(line: str, kv: Dict[str, str],
                          generator: Optional[torch.Generator] = None) -> Component:
    """A new component from a ``component name=X type=Y key=value ...`` config line, with
    Kaldi's defaults (``InitFromConfig``) and random parameters drawn as Kaldi does
    (normal, scaled by param-stddev / bias-stddev; the values differ from Kaldi's RNG).

    Args:
      line: the whole line (for messages).
      kv: its key=value pairs.
      generator: torch RNG for the random parameters.
    Raises:
      ValueError: unknown type, missing or unused values (naming the line).
    """
    c = _Cfg(line, kv)
    name, typ = c.get("name", required=True), c.get("type", required=True)
    init = _INIT.get(typ)
    if init is None:
        raise ValueError("unsupported component type %s: %s" % (typ, line))
    fields = init(c, generator)
    c.done()
    return COMPONENT_TYPES[typ](name, fields)
