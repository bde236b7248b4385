"""A compiled evaluation plan of an :class:`~pkwrap.nnet3.Nnet3`: what Kaldi's
``nnet3`` compiler does for a computation request, done once per input shape.

Given the frames ``t`` supplied for each input node and the frames wanted from each output
node, :class:`Plan` works out, once, the **set** of frames every node must be computed at
(Kaldi computes exactly these: with frame subsampling 3, the layers after the last
time-stride-1 layer run at a third of the frames, and a layer with offsets (-1, 0) under
one with (0, 1) runs at two of every three frames), and turns every input descriptor into
a small tree of reads whose row indices are fixed: a read of regularly spaced rows is a
strided slice (no copy), others an ``index_select``. Running the plan is then a walk over
precomputed steps, without descriptor interpretation or interval arithmetic per call.

Because each node is computed at the frames Kaldi computes it at, training-mode batch
normalization sees the rows Kaldi's sees (the interval evaluation of
:meth:`Nnet3.compute_generic` computes every frame between the first and last needed one).

Fused training steps: a natural-gradient affine, linear or TDNN component followed by
RectifiedLinear and BatchNorm (or by BatchNorm only), optionally followed by the TDNN-F
bypass ``Sum(Scale(a, x), bn)``, runs as one autograd node with the C++ kernels of
:mod:`pkwrap.nn.tdnnf` (:class:`pkwrap.nn.TDNNFModel` is one such network), when every
intermediate node has that one reader. The squared norms of the rows it writes are passed
on to the natural-gradient layer that reads them next. Elsewhere (evaluation, no grad,
another device or dtype) the same steps run component by component.

Supported: descriptors made of node, Append, Sum, Scale, Offset, ReplaceIndex, Const,
Round and Switch; components that work frame by frame, TdnnComponent, and
TimeHeightConvolutionComponent whose time offsets are all required (the xconfig default; it
gets the rows at each time offset, as Kaldi's convolution computation does). Networks with
IfDefined / Failover or with optional convolution time offsets (those read zeros where not
computable) use the interval evaluation instead (:func:`compile_plan` returns None for them).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["Plan", "compile_plan", "Unsupported"]


class Unsupported(Exception):
    """The network uses something the plan does not handle (use interval evaluation)."""


# ----------------------------------------------------------------------------- row selection
class _Sel:
    """Rows ``pos`` (numpy ints, in order) of a ``[B][N][...]`` tensor along dim 1: the whole
    tensor, a slice ``start:stop:step`` or an index tensor."""

    __slots__ = ("kind", "a", "b", "c", "idx", "n", "dev_idx")

    def __init__(self, pos: np.ndarray, n_src: int):
        pos = np.asarray(pos, dtype=np.int64)
        self.n = len(pos)
        self.idx = None
        self.dev_idx = None  # idx on the device of the last call (a GPU: copied once)
        if self.n == n_src and (n_src == 0 or (pos[0] == 0 and
                                               (np.diff(pos) == 1).all())):
            self.kind = "all"
            return
        if self.n == 1:
            self.kind, self.a, self.b, self.c = "slice", int(pos[0]), int(pos[0]) + 1, 1
            return
        d = np.diff(pos)
        if self.n > 1 and d[0] > 0 and (d == d[0]).all():
            self.kind, self.a, self.b, self.c = "slice", int(pos[0]), int(pos[-1]) + 1, int(d[0])
            return
        self.kind = "index"
        self.idx = torch.from_numpy(pos)

    @property
    def regular(self) -> Optional[Tuple[int, int]]:
        """(first row, step) when the rows are evenly spaced, else None."""
        if self.kind == "all":
            return (0, 1)
        if self.kind == "slice":
            return (self.a, self.c)
        return None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "all":
            return t
        if self.kind == "slice":
            return t[:, self.a:self.b:self.c]
        idx = self.idx
        if t.device.type != "cpu":
            if self.dev_idx is None or self.dev_idx.device != t.device:
                self.dev_idx = self.idx.to(t.device)
            idx = self.dev_idx
        return t.index_select(1, idx)


def _positions(src: np.ndarray, times: np.ndarray, what: str) -> np.ndarray:
    pos = np.searchsorted(src, times)
    if len(times) and (pos.max() >= len(src) or (src[pos] != times).any()):
        raise RuntimeError("plan: %s: frames are missing (internal error)" % what)
    return pos


# ----------------------------------------------------------------------------- descriptor reads
class _Read:
    """A node's rows at fixed frames."""

    __slots__ = ("name", "sel")

    def __init__(self, name, sel):
        self.name, self.sel = name, sel

    def __call__(self, vals, like):
        return self.sel(vals[self.name])


class _Cat:
    __slots__ = ("parts",)

    def __init__(self, parts):
        self.parts = parts

    def __call__(self, vals, like):
        return torch.cat([p(vals, like) for p in self.parts], dim=-1)


class _Add:
    __slots__ = ("parts",)

    def __init__(self, parts):
        self.parts = parts

    def __call__(self, vals, like):
        out = self.parts[0](vals, like)
        for p in self.parts[1:]:
            out = out + p(vals, like)
        return out


class _Mul:
    __slots__ = ("alpha", "part")

    def __init__(self, alpha, part):
        self.alpha, self.part = alpha, part

    def __call__(self, vals, like):
        return self.alpha * self.part(vals, like)


class _Const:
    __slots__ = ("value", "dim", "n")

    def __init__(self, value, dim, n):
        self.value, self.dim, self.n = value, dim, n

    def __call__(self, vals, like):
        return like.new_full((like.shape[0], self.n, self.dim), self.value)


class _Expand:
    """One row repeated for ``n`` frames."""

    __slots__ = ("part", "n")

    def __init__(self, part, n):
        self.part, self.n = part, n

    def __call__(self, vals, like):
        row = self.part(vals, like)
        return row.expand(row.shape[0], self.n, row.shape[2])


class _Pick:
    """Rows of a computed tensor (Round, Switch)."""

    __slots__ = ("part", "sel")

    def __init__(self, part, sel):
        self.part, self.sel = part, sel

    def __call__(self, vals, like):
        return self.sel(self.part(vals, like))


def _request(d, times: np.ndarray, add) -> None:
    """Record the node frames that descriptor ``d`` reads at ``times``."""
    if len(times) == 0:
        return
    op, p = d.op, d.parts
    if op == "node":
        add(d.name, times)
    elif op == "Const":
        pass
    elif op in ("Append", "Sum", "Scale"):
        for c in p:
            _request(c, times, add)
    elif op == "Offset":
        _request(p[0], times + d.args[0], add)
    elif op == "ReplaceIndex":
        _request(p[0], np.array([d.args[1]]) if d.args[0] == "t" else times, add)
    elif op == "Round":
        m = d.args[0]
        _request(p[0], np.unique(m * (times // m)), add)
    elif op == "Switch":
        k = len(p)
        for i, c in enumerate(p):
            _request(c, times[times % k == i], add)
    else:
        raise Unsupported(op)


def _compile(d, times: np.ndarray, node_times: Dict[str, np.ndarray], dims):
    """The read tree of descriptor ``d`` at ``times``."""
    op, p = d.op, d.parts
    n = len(times)
    if op == "node":
        src = node_times[d.name]
        return _Read(d.name, _Sel(_positions(src, times, d.name), len(src)))
    if op == "Const":
        return _Const(float(d.args[0]), int(d.args[1]), n)
    if op == "Append":
        return _Cat([_compile(c, times, node_times, dims) for c in p])
    if op == "Sum":
        return _Add([_compile(c, times, node_times, dims) for c in p])
    if op == "Scale":
        return _Mul(float(d.args[0]), _compile(p[0], times, node_times, dims))
    if op == "Offset":
        return _compile(p[0], times + d.args[0], node_times, dims)
    if op == "ReplaceIndex":
        if d.args[0] == "x":
            return _compile(p[0], times, node_times, dims)
        return _Expand(_compile(p[0], np.array([d.args[1]]), node_times, dims), n)
    if op == "Round":
        m = d.args[0]
        r = m * (times // m)
        u = np.unique(r)
        return _Pick(_compile(p[0], u, node_times, dims), _Sel(np.searchsorted(u, r), len(u)))
    if op == "Switch":
        k = len(p)
        parts, order = [], []
        for i, c in enumerate(p):
            sel = np.nonzero(times % k == i)[0]
            if len(sel):
                parts.append(_compile(c, times[sel], node_times, dims))
                order.append(sel)
        perm = np.argsort(np.concatenate(order), kind="stable")
        return _Pick(_CatRows(parts), _Sel(perm, n))
    raise Unsupported(op)


class _CatRows:
    __slots__ = ("parts",)

    def __init__(self, parts):
        self.parts = parts

    def __call__(self, vals, like):
        return torch.cat([q(vals, like) for q in self.parts], dim=1)


def _plain_node(d) -> Optional[str]:
    return d.name if d.op == "node" else None


# ----------------------------------------------------------------------------- the plan
class _Step:
    """Compute one node (or a fused group ending at ``name``)."""

    __slots__ = ("kind", "name", "comp", "reads", "offsets", "fused", "sq_reads", "times",
                 "src", "spliced")

    def __init__(self, kind, name, comp=None, reads=None, times=None):
        self.kind, self.name, self.comp, self.reads = kind, name, comp, reads
        self.times = times
        self.offsets = None
        self.fused = None
        self.sq_reads = None
        self.src = None
        #: (first row, end row, relative offsets) of the source when a TDNN's spliced
        #: rows are consecutive source rows at fixed shifts (no spliced copy needed)
        self.spliced = None


class _Fused:
    """affine -> [relu] -> batchnorm [-> Sum(Scale(a, bypass), bn)] of one natural-gradient
    component; the node names of each stage (for the unfused fallback)."""

    __slots__ = ("affine", "relu", "bn", "bn_comp", "relu_comp", "sum", "bypass", "scale",
                 "bypass_sel", "sum_read")

    def __init__(self):
        self.relu = self.relu_comp = self.sum = self.bypass = self.bypass_sel = None
        self.sum_read = None
        self.scale = 0.0


class Plan:
    """The steps computing the wanted output frames from the given input frames.

    Args:
      nnet: the network.
      inputs: input node -> the frames supplied (``t0, t0+1, ..., t0+L-1``).
      outputs: output node -> the frames wanted (increasing).
    Raises:
      Unsupported: for what only interval evaluation handles.
      ValueError: an output frame that is not computable from the inputs.
    """

    def __init__(self, nnet, inputs: Dict[str, np.ndarray], outputs: Dict[str, np.ndarray]):
        from pkwrap.nnet3.components import (BatchNormComponent, RectifiedLinearComponent,
                                             TdnnComponent, NoOpComponent,
                                             TimeHeightConvolutionComponent)
        from pkwrap.nn.natural import _NaturalGradientMixin
        nodes = nnet.nodes
        need: Dict[str, List[np.ndarray]] = {}

        def add(k, t):
            need.setdefault(k, []).append(np.asarray(t, dtype=np.int64))

        for k, t in outputs.items():
            add(k, t)
        offsets: Dict[str, List[int]] = {}
        for k in reversed(nnet._order):
            if k not in need:
                continue
            n = nodes[k]
            t = np.unique(np.concatenate(need[k]))
            need[k] = [t]
            if n.kind == "dim-range":
                add(n.source, t)
            elif n.kind == "output":
                _request(n.descriptor, t, add)
            elif n.kind == "component":
                c = nnet.component(n.component)
                if isinstance(c, TdnnComponent):
                    offs = list(c.offsets)
                elif isinstance(c, TimeHeightConvolutionComponent) and \
                        set(c.required or c.time_offsets) == set(c.time_offsets):
                    offs = c.time_offsets  # (optional offsets read zeros: interval evaluation)
                elif c.context == (0, 0):
                    offs = [0]
                else:
                    raise Unsupported(c.TYPE)
                offsets[k] = offs
                _request(n.descriptor, np.unique(np.concatenate([t + o for o in offs])), add)
        times: Dict[str, np.ndarray] = {}
        for k, v in need.items():
            times[k] = v[0] if len(v) == 1 else np.unique(np.concatenate(v))
        for k, n in nodes.items():
            if n.kind == "input" and k in times:
                if k not in inputs:
                    raise ValueError("%s: input %s is needed but not given" % (nnet.name, k))
                have = inputs[k]
                t = times[k]
                if t[0] < have[0] or t[-1] > have[-1]:
                    raise ValueError("%s: frames %d..%d of input %s are needed, %d..%d given"
                                     % (nnet.name, t[0], t[-1], k, have[0], have[-1]))
                times[k] = np.asarray(have, dtype=np.int64)
        self.times = times
        self.inputs = [k for k in inputs if k in times]
        self.outputs = list(outputs)
        # the readers of each node (to find fusable chains)
        readers: Dict[str, List[str]] = {}
        for k in nnet._order:
            if k in times:
                for d in nodes[k].depends():
                    readers.setdefault(d, []).append(k)

        def only_reader(k):
            r = readers.get(k, [])
            return r[0] if len(r) == 1 else None

        dims = nnet._dims
        steps: List[_Step] = []
        skip = set()
        for k in nnet._order:
            if k not in times or nodes[k].kind == "input" or k in skip:
                continue
            n = nodes[k]
            t = times[k]
            if n.kind == "dim-range":
                src = times[n.source]
                st = _Step("dim-range", k, reads=_Read(n.source, _Sel(
                    _positions(src, t, n.source), len(src))))
                st.offsets = (n.offset, n.dim)
                steps.append(st)
                continue
            if n.kind == "output":
                steps.append(_Step("output", k, reads=_compile(n.descriptor, t, times, dims)))
                continue
            c = nnet.component(n.component)
            offs = offsets[k]
            if len(offs) > 1 or offs[0]:
                reads = [_compile(n.descriptor, t + o, times, dims) for o in offs]
            else:
                reads = [_compile(n.descriptor, t, times, dims)]
            st = _Step("component", k, comp=n.component, reads=reads, times=t)
            if isinstance(c, TimeHeightConvolutionComponent):
                st.kind = "convolution"
                steps.append(st)
                continue
            # the squared norms of the input rows, when the input is a plain node whose
            # writer may leave them (a fused step)
            src = _plain_node(n.descriptor)
            if src is not None:
                st.sq_reads = [r.sel for r in reads]
                st.src = src
                if isinstance(c, TdnnComponent) and len(reads) > 1:
                    st.spliced = _spliced_rows([r.sel for r in reads])
            fz = self._fusable(nnet, k, c, readers, only_reader, times, _NaturalGradientMixin,
                               RectifiedLinearComponent, BatchNormComponent, NoOpComponent)
            if fz is not None:
                st.fused = fz
                for x in (fz.relu, fz.bn, fz.sum):
                    if x is not None:
                        skip.add(x)
                st.kind = "fused"
            steps.append(st)
        self.steps = steps

    @staticmethod
    def _fusable(nnet, k, c, readers, only_reader, times, NG, Relu, BN, NoOp):
        """The fused chain starting at component node k, or None."""
        if not isinstance(c, NG) or not hasattr(c, "weight"):
            return None
        nodes = nnet.nodes

        def comp_reading(name, cls):
            r = only_reader(name)
            if r is None or nodes[r].kind != "component" or \
                    _plain_node(nodes[r].descriptor) != name:
                return None
            rc = nnet.component(nodes[r].component)
            return (r, rc) if isinstance(rc, cls) else None

        fz = _Fused()
        fz.affine = k
        nxt = comp_reading(k, Relu)
        if nxt is not None:
            fz.relu, fz.relu_comp = nxt[0], nxt[1].name
            nxt = comp_reading(nxt[0], BN)
        else:
            nxt = comp_reading(k, BN)
        if nxt is None:
            return None
        bn = nxt[1]
        if bn.block_dim != bn.dim or bn.dim != c.output_dim:
            return None
        fz.bn, fz.bn_comp = nxt[0], bn.name
        # the TDNN-F bypass: NoOp(Sum(Scale(a, x), bn)) reading bn only there
        r = only_reader(fz.bn)
        if r is not None and nodes[r].kind == "component" and \
                isinstance(nnet.component(nodes[r].component), NoOp):
            d = nodes[r].descriptor
            if d.op == "Sum" and len(d.parts) == 2:
                a, b = d.parts
                if _plain_node(b) != fz.bn:
                    a, b = b, a
                if _plain_node(b) == fz.bn and a.op in ("node", "Scale"):
                    scale, x = (1.0, a) if a.op == "node" else (float(a.args[0]), a.parts[0])
                    if x.op == "node" and x.name != fz.bn and \
                            np.array_equal(times[r], times[fz.bn]):
                        src = times[x.name]
                        sel = _Sel(_positions(src, times[r], x.name), len(src))
                        if sel.regular is not None and sel.n > 0:
                            fz.sum, fz.bypass, fz.scale, fz.bypass_sel = r, x.name, scale, sel
                            fz.sum_read = _compile(d, times[r], times, nnet._dims)
        return fz

    # ------------------------------------------------------------------ running
    def run(self, nnet, values: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Evaluate; ``values``: input node -> ``[B][len(frames)][D]``."""
        from pkwrap.nn.natural import row_sqnorm
        vals = dict(values)
        like = next(iter(values.values()))
        out = {}
        for st in self.steps:
            if st.kind == "dim-range":
                o, d = st.offsets
                vals[st.name] = st.reads(vals, like)[..., o:o + d]
                continue
            if st.kind == "output":
                out[st.name] = vals[st.name] = st.reads(vals, like)
                continue
            comp = nnet.component(st.comp)
            if st.kind == "convolution":
                vals[st.name] = comp.convolve([r(vals, like) for r in st.reads])
                continue
            if st.spliced is not None and st.kind != "fused":
                y = _spliced_tdnn(comp, vals[st.src], st.spliced)
                if y is not None:
                    vals[st.name] = y
                    continue
            x = st.reads[0](vals, like) if len(st.reads) == 1 else \
                torch.cat([r(vals, like) for r in st.reads], dim=-1)
            sq = None
            if st.sq_reads is not None:
                fq = row_sqnorm(vals[st.src])
                if fq is not None:
                    sq = float(sum(s(fq).sum() for s in st.sq_reads))
            if st.kind == "fused" and _run_fused(nnet, st, comp, x, vals):
                continue
            y = self._component(comp, st, x, sq)
            if st.kind == "fused":  # the fallback: the chain's components one by one
                fz = st.fused
                vals[st.name] = y
                if fz.relu is not None:
                    y = nnet.component(fz.relu_comp)(y)
                    vals[fz.relu] = y
                y = nnet.component(fz.bn_comp)(y)
                vals[fz.bn] = y
                if fz.sum is not None:
                    vals[fz.sum] = fz.sum_read(vals, like)
                continue
            vals[st.name] = y
        return out

    @staticmethod
    def _component(comp, st, x, sq):
        if hasattr(comp, "_affine"):
            return comp._affine(x, sq)
        comp.first_frame = int(st.times[0])
        if not hasattr(type(comp), "frames"):
            return comp(x)
        comp.frames = st.times
        try:
            return comp(x)
        finally:
            comp.frames = None


def _spliced_rows(sels) -> Optional[Tuple[int, int, Tuple[int, ...]]]:
    """(a, b, rel) when the rows read at offset k are source rows ``a + rel_k + j``
    (j < J, rel_0 = 0 < rel_1 < ...): the TDNN is then a product with shifted views of
    the source rows ``a .. b-1``."""
    regs = [s.regular for s in sels]
    if any(r is None or r[1] != 1 for r in regs) or len({s.n for s in sels}) != 1:
        return None
    a = regs[0][0]
    rel = tuple(r[0] - a for r in regs)
    if any(y <= x for x, y in zip(rel, rel[1:])):
        return None
    return a, a + rel[-1] + sels[0].n, rel


def _spliced_tdnn(comp, src: torch.Tensor, spliced) -> Optional[torch.Tensor]:
    """A TdnnComponent on consecutive source rows through the spliced-product kernel of
    :mod:`pkwrap.nn.tdnnf` (training, CPU float32, input at least as wide as the output:
    the TDNN-F linear halves), or None."""
    from pkwrap.nn.natural import row_sqnorm
    from pkwrap.nn.tdnnf import _SplicedLinearFunction, _fused_ok
    w = comp.weight
    if not (comp.training and torch.is_grad_enabled() and w.requires_grad
            and comp.input_dim >= comp.output_dim and src.dim() == 3
            and _fused_ok(src, w, getattr(comp, "bias", None))):
        return None
    a, b, rel = spliced
    x = src if (a == 0 and b == src.shape[1]) else src[:, a:b]
    fq = row_sqnorm(src)
    if fq is not None and x is not src:
        fq = fq[:, a:b].contiguous()
    comp._register_owner()
    return _SplicedLinearFunction.apply(x.contiguous(), w, getattr(comp, "bias", None), comp,
                                        rel, fq)


def _run_fused(nnet, st, comp, x, vals) -> bool:
    """The fused training kernel for a chain (False: not applicable here)."""
    from pkwrap.nn.natural import set_row_sqnorm
    from pkwrap.nn.tdnnf import _AffineReluBatchNormFunction, _fused_ok
    fz = st.fused
    bn = nnet.component(fz.bn_comp)
    w, b = comp.weight, getattr(comp, "bias", None)
    bypass = vals[fz.bypass] if fz.bypass is not None else None
    if not (bn.training and torch.is_grad_enabled() and w.requires_grad and x.dim() == 3
            and _fused_ok(x, bypass, w, b)):
        return False
    B, J = x.shape[0], x.shape[1]
    if B * J < 2:
        return False
    comp._register_owner()
    if bypass is not None:
        p0, step = fz.bypass_sel.regular
        bmap = (B, J, bypass.shape[1], p0, step)
        bypass = bypass.contiguous()
        scale = fz.scale
    else:
        bmap, scale = (1, 1, 1, 0, 1), 0.0
    out, osq = _AffineReluBatchNormFunction.apply(
        x.reshape(B * J, x.shape[-1]).contiguous(), w, b, bypass, comp, bn, float(scale),
        bmap, True, fz.relu is not None)
    out = out.view(B, J, bn.dim)
    set_row_sqnorm(out, osq.view(B, J))
    vals[fz.sum if fz.sum is not None else fz.bn] = out
    return True


def compile_plan(nnet, inputs: Dict[str, np.ndarray],
                 outputs: Dict[str, np.ndarray]) -> Optional[Plan]:
    """A :class:`Plan`, or None when the network needs interval evaluation."""
    try:
        return Plan(nnet, inputs, outputs)
    except Unsupported:
        return None
