"""An nnet3 network (Kaldi's ``Nnet``) as a torch module, and its model files.

A model file is, in Kaldi's binary or text form (``src/nnet3/nnet-nnet.cc``,
``am-nnet-simple.cc``)::

    [<TransitionModel> ... </TransitionModel>]        final.mdl only
    <Nnet3> \\n                                        then the config lines as plain text
    input-node name=input dim=40                       (in both modes), ended by an
    component-node name=X component=X input=DESC       empty line
    dim-range-node name=Y input-node=X dim-offset=0 dim=40
    output-node name=output input=DESC objective=linear
    \\n
    <NumComponents> K  (<ComponentName> NAME <XComponent> ... </XComponent>) x K
    </Nnet3>
    [<LeftContext> l <RightContext> r <Priors> vector]  final.mdl only (AmNnetSimple)

:class:`Nnet3` evaluates the graph over frames, nodes in dependency order (networks with
recurrence, a node needing itself at an earlier frame, are refused). By default through a
compiled plan (:mod:`pkwrap.nnet3.plan`, cached per input shape): every node is computed
at exactly the set of frames the requested outputs need, as Kaldi does, with the
descriptor reads fixed in advance and Kaldi's layer patterns (affine/TDNN + ReLU +
batchnorm + TDNN-F bypass) run by the fused training kernels of :mod:`pkwrap.nn.tdnnf`.
:meth:`Nnet3.compute_generic` (``compiled = False``, and networks the plan does not handle)
computes every node over the interval of frames its readers need, each component node
from its input descriptor (:mod:`pkwrap.nnet3.descriptor`) over that interval widened by
the component's own time context.
"""
from __future__ import annotations

import gzip
import math
import os
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from pkwrap.kaldi.hmm import TransitionModel
from pkwrap.kaldi.io import KaldiFormatError, KaldiReader, KaldiWriter, write_kaldi_object
from pkwrap.kaldi.matrix import read_vector, write_vector
from pkwrap.nnet3.components import Component, component_from_config, read_component
from pkwrap.nnet3.descriptor import INF, Descriptor, DescriptorError, parse_descriptor

__all__ = ["Nnet3", "Node", "read_nnet3", "write_nnet3", "parse_config_line",
           "nnet3_from_config"]

_KEY = re.compile(r"(?:^|\s)([A-Za-z][\w-]*)=")


def parse_config_line(line: str) -> Tuple[str, "OrderedDict[str, str]"]:
    """Split a Kaldi config line ``first-word key=value key=value ...``.

    Values may contain spaces (descriptors such as ``Append(a, b)``): a value runs up
    to the next ``key=``. Comments (``#``) are removed.

    Returns:
      ``(first_word, {key: value})``.
    """
    line = line.split("#", 1)[0].strip()
    if not line:
        return "", OrderedDict()
    parts = line.split(None, 1)
    head, rest = parts[0], parts[1] if len(parts) > 1 else ""
    keys = list(_KEY.finditer(rest))
    out = OrderedDict()
    if keys and rest[:keys[0].start()].strip():
        raise ValueError("bad config line (text before the first key=value): %r" % line)
    if not keys and rest.strip():
        raise ValueError("bad config line (no key=value): %r" % line)
    for i, m in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(rest)
        key = m.group(1)
        if key in out:
            raise ValueError("config line has %s= twice: %r" % (key, line))
        out[key] = rest[m.end():end].strip()
    return head, out


class Node:
    """A network node.

    Args:
      kind: ``input``, ``component``, ``dim-range`` or ``output``.
      name: node name.
      dim: input-node dim / dim-range dim.
      component: the component's name (component nodes).
      descriptor: input descriptor (component and output nodes).
      source, offset: dim-range source node and first dim.
      objective: output node objective type (``linear`` / ``quadratic``).
    """

    __slots__ = ("kind", "name", "dim", "component", "descriptor", "source", "offset",
                 "objective")

    def __init__(self, kind, name, dim=None, component=None, descriptor=None, source=None,
                 offset=0, objective="linear"):
        self.kind, self.name, self.dim = kind, name, dim
        self.component, self.descriptor = component, descriptor
        self.source, self.offset, self.objective = source, offset, objective

    def config_line(self, dims: Optional[Tuple[int, int]] = None) -> str:
        """The line as Kaldi's ``GetConfigLines`` writes it; ``dims`` = (input, output)
        dims adds them as ``nnet3-info`` does."""
        if self.kind == "input":
            return "input-node name=%s dim=%d" % (self.name, self.dim)
        if self.kind == "component":
            return "component-node name=%s component=%s input=%s%s" % (
                self.name, self.component, self.descriptor,
                " input-dim=%d output-dim=%d" % dims if dims else "")
        if self.kind == "dim-range":
            return "dim-range-node name=%s input-node=%s dim-offset=%d dim=%d" % (
                self.name, self.source, self.offset, self.dim)
        return "output-node name=%s input=%s%s objective=%s" % (
            self.name, self.descriptor, " dim=%d" % dims[1] if dims else "", self.objective)

    def depends(self) -> List[str]:
        if self.kind in ("component", "output"):
            return self.descriptor.node_names()
        if self.kind == "dim-range":
            return [self.source]
        return []


class Nnet3(nn.Module):
    """A Kaldi nnet3 network.

    Args:
      nodes: the nodes in config order.
      components: the components in file order.
      name: where it came from (for error messages).

    Attributes:
      components: ``nn.ModuleList`` in file order; :meth:`component` finds one by name.
      trans_model, priors: set when read from a ``final.mdl`` (else None).
      frame_subsampling_factor: forward() keeps every f-th output frame (default 1); in
        training only those frames (and what they need) are computed.
      compiled: evaluate through cached plans (:mod:`pkwrap.nnet3.plan`, default True);
        False: :meth:`compute_generic` for every call.
    """

    compiled = True

    def __init__(self, nodes: Sequence[Node], components: Sequence[Component],
                 name: str = "<nnet3>"):
        super().__init__()
        self.name = name
        self.nodes: "OrderedDict[str, Node]" = OrderedDict()
        for n in nodes:
            if n.name in self.nodes:
                raise ValueError("%s: node %r defined twice" % (name, n.name))
            self.nodes[n.name] = n
        self.components = nn.ModuleList(components)
        self.trans_model: Optional[TransitionModel] = None
        self.priors: Optional[np.ndarray] = None
        #: forward() keeps every f-th output frame (chain training: 3)
        self.frame_subsampling_factor = 1
        #: evaluate through compiled plans (:mod:`pkwrap.nnet3.plan`); False: interval
        #: evaluation (:meth:`compute_generic`) for every call
        self.compiled = True
        self._setup()

    # ------------------------------------------------------------------ structure
    def _setup(self) -> None:
        name = self.name
        # the graph may have changed: drop the cached plans and contexts
        for k in ("_plans", "_context_cache", "_avail_key", "_avail_cache"):
            self.__dict__.pop(k, None)
        self._comp_index = {c.name: i for i, c in enumerate(self.components)}
        if len(self._comp_index) != len(self.components):
            raise ValueError("%s: two components with the same name" % name)
        for n in self.nodes.values():
            if n.kind == "component" and n.component not in self._comp_index:
                raise ValueError("%s: node %s uses undefined component %r"
                                 % (name, n.name, n.component))
            for d in n.depends():
                if d not in self.nodes:
                    raise ValueError("%s: node %s reads undefined node %r" % (name, n.name, d))
                if self.nodes[d].kind == "output":
                    raise ValueError("%s: node %s reads output node %r" % (name, n.name, d))
        # dependency order
        order, state = [], {}

        def visit(k, path):
            s = state.get(k)
            if s == 2:
                return
            if s == 1:
                raise ValueError("%s: the graph has a cycle through %s (recurrent networks "
                                 "are not supported)" % (name, " -> ".join(path + [k])))
            state[k] = 1
            for d in self.nodes[k].depends():
                visit(d, path + [k])
            state[k] = 2
            order.append(k)

        for k in self.nodes:
            visit(k, [])
        self._order = order
        self._dims: Dict[str, int] = {}
        for k in order:
            n = self.nodes[k]
            if n.kind == "input":
                self._dims[k] = n.dim
            elif n.kind == "dim-range":
                src = self._dims[n.source]
                if n.offset < 0 or n.dim <= 0 or n.offset + n.dim > src:
                    raise ValueError("%s: dim-range-node %s: dims %d..%d outside %s (dim %d)"
                                     % (name, k, n.offset, n.offset + n.dim, n.source, src))
                self._dims[k] = n.dim
            else:
                try:
                    d = n.descriptor.dim(self._dims.__getitem__)
                except DescriptorError as e:
                    raise ValueError("%s: node %s: %s" % (name, k, e)) from None
                if n.kind == "component":
                    c = self.component(n.component)
                    if c.input_dim != d:
                        raise ValueError("%s: component-node %s: input dim %d, component %s "
                                         "(%s) expects %d" % (name, k, d, c.name, c.TYPE,
                                                              c.input_dim))
                    d = c.output_dim
                self._dims[k] = d

    def component(self, name: str) -> Component:
        """The component called ``name``."""
        try:
            return self.components[self._comp_index[name]]
        except KeyError:
            raise KeyError("%s: no component %r" % (self.name, name)) from None

    def named_components(self):
        return [(c.name, c) for c in self.components]

    @property
    def input_names(self) -> List[str]:
        return [k for k, n in self.nodes.items() if n.kind == "input"]

    @property
    def output_names(self) -> List[str]:
        return [k for k, n in self.nodes.items() if n.kind == "output"]

    def node_dim(self, name: str) -> int:
        return self._dims[name]

    def input_dim(self, name: str = "input") -> int:
        n = self.nodes.get(name)
        return n.dim if n is not None and n.kind == "input" else -1

    def output_dim(self, name: str = "output") -> int:
        n = self.nodes.get(name)
        return self._dims[name] if n is not None and n.kind == "output" else -1

    def config_lines(self, include_dim: bool = False) -> List[str]:
        """The config section (``include_dim``: with dims, as ``nnet3-info`` prints it)."""
        out = []
        for k, n in self.nodes.items():
            dims = None
            if include_dim and n.kind in ("component", "output"):
                dims = (n.descriptor.dim(self._dims.__getitem__), self._dims[k])
            out.append(n.config_line(dims))
        return out

    def num_parameters(self) -> int:
        """Trainable parameters (what ``nnet3-info`` counts: not FixedAffine)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ computability
    def _avail(self, inputs: Dict[str, Tuple[float, float]]) -> Dict[str, Tuple[float, float]]:
        av: Dict[str, Tuple[float, float]] = {}
        for k in self._order:
            n = self.nodes[k]
            if n.kind == "input":
                av[k] = inputs.get(k, (INF, -INF))
            elif n.kind == "dim-range":
                av[k] = av[n.source]
            else:
                a = n.descriptor.avail(av.__getitem__)
                if n.kind == "component" and a[0] <= a[1]:
                    lo, hi = self.component(n.component).required_context
                    a = (a[0] - lo, a[1] - hi)
                av[k] = a
        return av

    def _contexts(self, output: str) -> Tuple[int, int]:
        """:meth:`context`, cached (forward asks for it every call)."""
        cache = self.__dict__.setdefault("_context_cache", {})
        if output not in cache:
            cache[output] = self.context(output)
        return cache[output]

    def context(self, output: str = "output") -> Tuple[int, int]:
        """(left, right) context of ``output``: the frames before and after an output
        frame its computation reads from the input nodes (i-vectors at any frame)."""
        if output not in self.nodes or self.nodes[output].kind != "output":
            raise KeyError("%s: no output node %r" % (self.name, output))
        # as Kaldi's ComputeSimpleNnetContext: the largest context over the input start
        # frames 0..modulus-1 (with Round or Switch, t mod the modulus matters)
        big = 100000
        left = right = 0
        for shift in range(self.modulus()):
            inputs = {k: (shift, big + shift) if k == "input" else (0, big)
                      for k in self.input_names}
            lo, hi = self._avail(inputs)[output]
            if lo > hi:
                raise ValueError("%s: output %s is not computable from the inputs"
                                 % (self.name, output))
            left, right = max(left, lo - shift), max(right, big + shift - hi)
        return int(left), int(right)

    def modulus(self) -> int:
        """Kaldi's shift-invariance modulus: lcm of Round moduli and Switch sizes."""
        m = 1

        def walk(d: Descriptor):
            nonlocal m
            if d.op == "Round":
                m = m * d.args[0] // math.gcd(m, d.args[0])
            elif d.op == "Switch":
                m = m * len(d.parts) // math.gcd(m, len(d.parts))
            for p in d.parts:
                walk(p)

        for n in self.nodes.values():
            if n.descriptor is not None:
                walk(n.descriptor)
        return m

    # ------------------------------------------------------------------ evaluation
    def _plan(self, inputs: Dict[str, Tuple[int, int]],
              outputs: Dict[str, Tuple[int, int, int]]):
        """The cached :class:`~pkwrap.nnet3.plan.Plan` for inputs ``name -> (t0, length)``
        and outputs ``name -> (first, last, step)``, or None (interval evaluation)."""
        key = (tuple(sorted(inputs.items())), tuple(sorted(outputs.items())))
        cache = self.__dict__.setdefault("_plans", {})
        if key not in cache:
            from pkwrap.nnet3.plan import compile_plan
            if len(cache) > 64:
                cache.clear()
            cache[key] = compile_plan(
                self, {k: np.arange(t0, t0 + n) for k, (t0, n) in inputs.items()},
                {k: np.arange(a, b + 1, s) for k, (a, b, s) in outputs.items()})
        return cache[key]

    def compute(self, inputs: Dict[str, Tuple[int, torch.Tensor]],
                outputs: Dict[str, Tuple[int, int]]) -> Dict[str, torch.Tensor]:
        """Evaluate output nodes over frame ranges.

        With :attr:`compiled` (the default) through a cached evaluation plan
        (:mod:`pkwrap.nnet3.plan`: each node only at the frames needed), else (or for
        networks the plan does not handle) by :meth:`compute_generic`.

        Args:
          inputs: node name -> ``(t0, x)``, ``x`` of shape ``[B][L][D]`` holding frames
            ``t0 .. t0+L-1`` (an i-vector for ``ReplaceIndex(ivector, t, 0)``: ``(0,
            iv[:, None])``).
          outputs: output name -> ``(first, last)`` frame wanted.
        Returns:
          output name -> ``[B][last-first+1][D_out]``.
        Raises:
          ValueError: unknown node, wrong dim, or frames that are not computable from the
            inputs given.
        """
        out = self._compute_compiled(inputs, outputs, 1) if self.compiled else None
        return out if out is not None else self.compute_generic(inputs, outputs)

    def _compute_compiled(self, inputs, outputs, step: int):
        """:meth:`compute` of every ``step``-th frame of each output range through a cached
        plan, or None when the plan does not handle this network."""
        self._check_request(inputs, outputs)
        plan = self._plan({k: (t0, x.shape[1]) for k, (t0, x) in inputs.items()},
                          {k: (a, b, step) for k, (a, b) in outputs.items()})
        if plan is None:
            return None
        return plan.run(self, {k: x for k, (t0, x) in inputs.items() if k in plan.inputs})

    def _check_request(self, inputs, outputs) -> Dict[str, Tuple[float, float]]:
        """Names, dims and computability of a :meth:`compute` request; returns the frames
        each node can be computed at."""
        avail_in = {}
        for k, (t0, x) in inputs.items():
            n = self.nodes.get(k)
            if n is None or n.kind != "input":
                raise ValueError("%s: no input node %r" % (self.name, k))
            if x.dim() != 3 or x.shape[2] != n.dim:
                raise ValueError("%s: input %s must be [B][L][%d], got %s"
                                 % (self.name, k, n.dim, tuple(x.shape)))
            avail_in[k] = (t0, t0 + x.shape[1] - 1)
        key = tuple(sorted(avail_in.items()))
        if self.__dict__.get("_avail_key") != key:
            self._avail_cache = self._avail(avail_in)
            self._avail_key = key
        av = self._avail_cache
        for k, (a, b) in outputs.items():
            n = self.nodes.get(k)
            if n is None or n.kind != "output":
                raise ValueError("%s: no output node %r" % (self.name, k))
            lo, hi = av[k]
            if not (lo <= a and b <= hi):
                raise ValueError("%s: output %s frames %d..%d are not computable from the "
                                 "inputs given (computable: %s..%s)" % (self.name, k, a, b,
                                                                       lo, hi))
        return av

    def compute_generic(self, inputs: Dict[str, Tuple[int, torch.Tensor]],
                        outputs: Dict[str, Tuple[int, int]]) -> Dict[str, torch.Tensor]:
        """:meth:`compute` by interval evaluation: every node over the interval of frames
        its readers need, each descriptor interpreted per call (the reference the compiled
        plan is tested against; it computes every frame of an interval, also those a
        subsampled output does not need)."""
        av = self._check_request(inputs, outputs)
        like = next(iter(inputs.values()))[1] if inputs else None
        need: Dict[str, List[int]] = {}

        def add(k, a, b):
            r = need.get(k)
            if r is None:
                need[k] = [a, b]
            else:
                r[0], r[1] = min(r[0], a), max(r[1], b)

        for k, (a, b) in outputs.items():
            add(k, a, b)
        for k in reversed(self._order):
            if k not in need:
                continue
            n = self.nodes[k]
            a, b = need[k]
            if n.kind in ("output", "component"):
                lo, hi = self._input_context(n)
                self._input_descriptor(n).request(a + lo, b + hi, add, av.__getitem__)
            elif n.kind == "dim-range":
                add(n.source, a, b)
        values: Dict[str, Tuple[int, torch.Tensor]] = {}

        def value(k, a, b):
            t0, v = values[k]
            if a < t0 or b - t0 >= v.shape[1]:
                raise RuntimeError("%s: node %s frames %d..%d requested, %d..%d computed"
                                   % (self.name, k, a, b, t0, t0 + v.shape[1] - 1))
            return v[:, a - t0:b - t0 + 1]

        for k, (t0, x) in inputs.items():
            values[k] = (t0, x)
        result = {}
        for k in self._order:
            if k not in need or self.nodes[k].kind == "input":
                continue
            n = self.nodes[k]
            a, b = need[k]
            if n.kind == "dim-range":
                values[k] = (a, value(n.source, a, b)[..., n.offset:n.offset + n.dim])
                continue
            comp = self.component(n.component) if n.kind == "component" else None
            lo, hi = self._input_context(n)
            x = self._input_descriptor(n).evaluate(a + lo, b + hi, value, av.__getitem__, like,
                                                   self._dims.__getitem__)
            if comp is not None:
                comp.first_frame = a + lo
                y = comp(x)
            else:
                y = x
            values[k] = (a, y)
            if n.kind == "output":
                result[k] = y
        return {k: result[k][:, a - need[k][0]:b - need[k][0] + 1]
                for k, (a, b) in outputs.items()}

    def num_output_frames(self, num_input_frames: int, output: Optional[str] = None) -> int:
        """The frames :meth:`forward` returns for an input of ``num_input_frames`` frames:
        ``(T - 1 - left - right) // f + 1``, 0 when T is not more than the context."""
        l, r = self._contexts(output or self._main_output())
        n = num_input_frames - l - r
        return 0 if n <= 0 else (n - 1) // self.frame_subsampling_factor + 1

    @property
    def left_context(self) -> int:
        """Input frames before an ``output`` frame that its computation reads."""
        return self.context(self._main_output())[0]

    @property
    def right_context(self) -> int:
        return self.context(self._main_output())[1]

    def _main_output(self) -> str:
        return "output" if "output" in self.output_names else self.output_names[0]

    def _input_context(self, n: Node) -> Tuple[int, int]:
        """Frames of a node's input read around its own: the component's time offsets."""
        return self.component(n.component).context if n.kind == "component" else (0, 0)

    def _input_descriptor(self, n: Node) -> Descriptor:
        """The node's descriptor; for a component with optional time offsets (not all
        required), wrapped in IfDefined: frames that cannot be computed read zeros."""
        if n.kind == "component":
            c = self.component(n.component)
            if c.required_context != c.context:
                return Descriptor("IfDefined", [n.descriptor])
        return n.descriptor

    def forward(self, x: torch.Tensor, ivector: Optional[torch.Tensor] = None,
                output: Union[None, str, Sequence[str]] = None):
        """All computable output frames of a chunk with its context (chain training).

        Output frames are ``left, left + f, left + 2f, ...`` up to ``T-1-right``, with
        ``f`` = :attr:`frame_subsampling_factor` (1 unless set; Kaldi's chain egs ask for
        every third frame).

        Args:
          x: ``[B][T][D]`` input features, frames ``t = 0..T-1`` (the chunk with the left
            and right context included, as in chain egs).
          ivector: ``[B][D_iv]``, the i-vector given at ``t = 0`` (for networks with an
            ``ivector`` input; ``ReplaceIndex(ivector, t, 0)`` spreads it to all frames).
          output: an output name, or several (a tuple of tensors comes back); None: all
            output nodes as a dict ``{name: tensor}`` (``output``, ``output-xent``, as
            pkwrap.train expects).
        Returns:
          ``[B][T_out][D_out]`` per output, ``T_out = (T - 1 - left - right) // f + 1``.
        """
        names = self.output_names if output is None else \
            [output] if isinstance(output, str) else list(output)
        inputs = {"input": (0, x)}
        if ivector is not None:
            inputs["ivector"] = (0, ivector.reshape(ivector.shape[0], 1, -1))
        reqs = {}
        for k in names:
            l, r = self._contexts(k)
            if x.shape[1] <= l + r:
                raise ValueError("%s: %d input frames, output %s needs more than %d (left + "
                                 "right context)" % (self.name, x.shape[1], k, l + r))
            reqs[k] = (l, x.shape[1] - 1 - r)
        f = self.frame_subsampling_factor
        # only the output frames kept are computed (and what they need)
        out = self._compute_compiled(inputs, reqs, f) if self.compiled else None
        if out is None:
            out = {k: v[:, ::f] if f > 1 else v
                   for k, v in self.compute_generic(inputs, reqs).items()}
        if output is None:
            return out
        return out[output] if isinstance(output, str) else tuple(out[k] for k in names)

    # ------------------------------------------------------------------ edits
    def apply_edits(self, text: str) -> None:
        """Kaldi's ``--edits`` / ``--edits-config`` directives, one per line (or separated
        by ``;``): ``rename-node old-name= new-name=``, ``remove-output-nodes name=``,
        ``remove-orphans``, ``remove-orphan-nodes``, ``remove-orphan-components``,
        ``set-learning-rate [name=] learning-rate=``, ``set-learning-rate-factor [name=]
        learning-rate-factor=``, ``set-dropout-proportion [name=] proportion=``. Names are
        patterns with ``*`` and ``?``.

        Raises:
          ValueError: an unknown directive or a missing / unused value.
        """
        import fnmatch
        for line in text.replace(";", "\n").split("\n"):
            head, kv = parse_config_line(line)
            if not head:
                continue

            def take(k, conv=str, default=None):
                if k not in kv:
                    if default is None:
                        raise ValueError("edit %r needs %s=" % (line.strip(), k))
                    return default
                v = kv.pop(k)
                try:
                    return conv(v)
                except ValueError:
                    raise ValueError("edit %r: bad %s=%s" % (line.strip(), k, v)) from None

            if head == "rename-node":
                self.rename_node(take("old-name"), take("new-name"))
            elif head == "remove-output-nodes":
                self.remove_output_nodes([take("name")])
                if not self.output_names:
                    raise ValueError("edit %r: all outputs were removed" % line.strip())
            elif head in ("remove-orphans", "remove-orphan-nodes", "remove-orphan-components"):
                self.remove_orphans(nodes=head != "remove-orphan-components",
                                    components=head != "remove-orphan-nodes")
            elif head in ("set-learning-rate", "set-learning-rate-factor"):
                pat = take("name", default="*")
                key = head[4:]
                value = take(key, float)
                for c in self.components:
                    if c.is_updatable and fnmatch.fnmatchcase(c.name, pat):
                        if key == "learning-rate":
                            c.set_learning_rate(value)
                        else:
                            c.set_learning_rate_factor(value)
            elif head == "set-dropout-proportion":
                pat = take("name", default="*")
                value = take("proportion", float)
                for c in self.components:
                    if "DropoutProportion" in c.fields and fnmatch.fnmatchcase(c.name, pat):
                        c.fields["DropoutProportion"] = value
            else:
                raise ValueError("edit directive %r is not supported" % head)
            if kv:
                raise ValueError("edit %r: unused values %s" % (line.strip(), dict(kv)))

    def scale(self, alpha: float) -> None:
        """``nnet3-copy --scale``: trainable parameters times ``alpha``; statistics
        (batchnorm and nonlinearity counts) too, which leaves their means unchanged."""
        for c in self.components:
            c.scale_params(alpha)

    def rename_node(self, old: str, new: str) -> None:
        """``nnet3-copy --edits='rename-node old-name=OLD new-name=NEW'``."""
        if old not in self.nodes:
            raise ValueError("%s: rename-node: no node %r" % (self.name, old))
        if new in self.nodes:
            raise ValueError("%s: rename-node: node %r exists" % (self.name, new))
        nodes = OrderedDict()
        for k, n in self.nodes.items():
            if k == old:
                n.name = new
            if n.descriptor is not None:
                n.descriptor.rename(old, new)
            if n.source == old:
                n.source = new
            nodes[n.name] = n
        self.nodes = nodes
        self._setup()

    def remove_output_nodes(self, names: Sequence[str]) -> None:
        """Remove output nodes (names may use ``*`` / ``?`` wildcards)."""
        import fnmatch
        keep = OrderedDict((k, n) for k, n in self.nodes.items()
                           if not (n.kind == "output" and any(fnmatch.fnmatchcase(k, p)
                                                              for p in names)))
        self.nodes = keep
        self._setup()

    def remove_orphans(self, nodes: bool = True, components: bool = True) -> None:
        """Remove nodes no output uses (input nodes stay), then components no node uses
        (``remove-orphans``; ``remove-orphan-nodes`` / ``-components`` do one part)."""
        if nodes:
            used = set()
            stack = list(self.output_names)
            while stack:
                k = stack.pop()
                if k in used:
                    continue
                used.add(k)
                stack.extend(self.nodes[k].depends())
            self.nodes = OrderedDict((k, n) for k, n in self.nodes.items()
                                     if k in used or n.kind == "input")
        if components:
            comps = {n.component for n in self.nodes.values() if n.kind == "component"}
            self.components = nn.ModuleList([c for c in self.components if c.name in comps])
        self._setup()


# ----------------------------------------------------------------------------- files
def _read_bytes(path) -> Tuple[bytes, str]:
    if isinstance(path, (bytes, bytearray)):
        data, name = bytes(path), "<bytes>"
    elif hasattr(path, "read"):
        data, name = path.read(), getattr(path, "name", "<stream>")
    elif isinstance(path, str) and (path == "-" or path.rstrip().endswith("|")):
        from pkwrap.kaldi.table import open_input_buffer
        name = path
        try:
            data = bytes(open_input_buffer(path))
        except OSError as e:
            raise KaldiFormatError("%s: %s" % (name, e)) from None
    else:
        name = os.fspath(path)
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as e:
            raise KaldiFormatError("%s: cannot read: %s" % (name, e.strerror)) from None
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if not data:
        raise KaldiFormatError("%s: empty file, expected an nnet3 model" % name)
    return data, name


def _descriptor(text: str) -> Descriptor:
    """A config line's descriptor, in Kaldi's normal form (what Kaldi keeps and writes)."""
    return parse_descriptor(text).normalized()


def _parse_config(lines: Sequence[str], name: str, where: str,
                  components: Optional[list] = None,
                  generator: Optional[torch.Generator] = None) -> List[Node]:
    """Nodes (and, if ``components`` is a list, new components appended to it) from
    config lines."""
    nodes: List[Node] = []
    for i, line in enumerate(lines):
        try:
            head, kv = parse_config_line(line)
        except ValueError as e:
            raise KaldiFormatError("%s: %s line %d: %s" % (name, where, i + 1, e)) from None
        if not head:
            continue

        def get(k, conv=str):
            if k not in kv:
                raise KaldiFormatError("%s: %s line %d: %s has no %s=: %r"
                                       % (name, where, i + 1, head, k, line))
            try:
                return conv(kv[k])
            except (ValueError, DescriptorError) as e:
                raise KaldiFormatError("%s: %s line %d: %s=%s: %s"
                                       % (name, where, i + 1, k, kv[k], e)) from None

        if head == "input-node":
            nodes.append(Node("input", get("name"), dim=get("dim", int)))
        elif head == "component-node":
            nodes.append(Node("component", get("name"), component=get("component"),
                              descriptor=get("input", _descriptor)))
        elif head == "dim-range-node":
            nodes.append(Node("dim-range", get("name"), source=get("input-node"),
                              offset=get("dim-offset", int), dim=get("dim", int)))
        elif head == "output-node":
            obj = kv.get("objective", "linear")
            if obj not in ("linear", "quadratic"):
                raise KaldiFormatError("%s: %s line %d: unknown objective %r"
                                       % (name, where, i + 1, obj))
            nodes.append(Node("output", get("name"), descriptor=get("input", _descriptor),
                              objective=obj))
        elif head == "component" and components is not None:
            try:
                components.append(component_from_config(line.split("#", 1)[0].strip(), kv,
                                                        generator))
            except ValueError as e:
                raise KaldiFormatError("%s: %s line %d: %s" % (name, where, i + 1, e)) \
                    from None
        else:
            raise KaldiFormatError("%s: %s line %d: unknown config line type %r"
                                   % (name, where, i + 1, head))
    return nodes


def nnet3_from_config(config, existing: Optional[Nnet3] = None, srand: int = 0,
                      name: str = "<config>") -> Nnet3:
    """A new network from a Kaldi config (``nnet3-init [existing.raw] final.config``).

    ``component name=X type=Y ...`` lines make components with Kaldi's defaults and random
    parameters; node lines (input-node, component-node, dim-range-node, output-node)
    make the graph, descriptors in Kaldi's normal form. With ``existing``, its nodes and
    components come first; a node defined again is replaced (at the new line's place),
    as is a component of the same name.

    Args:
      config: the config text (or a file name).
      existing: a network to add to (not modified).
      srand: seed of the random parameters.
      name: used in error messages.
    Returns:
      the :class:`Nnet3`.
    Raises:
      KaldiFormatError: naming the file and line.
    """
    if isinstance(config, (str, os.PathLike)) and "\n" not in str(config):
        name = os.fspath(config)
        try:
            with open(name) as f:
                config = f.read()
        except OSError as e:
            raise KaldiFormatError("%s: cannot read: %s" % (name, e.strerror)) from None
        except UnicodeDecodeError as e:
            raise KaldiFormatError("%s: not UTF-8 text (offset %d)" % (name, e.start)) from None
    g = torch.Generator().manual_seed(srand)
    new_comps: list = []
    lines = config.split("\n")
    new_nodes = _parse_config(lines, name, "config", new_comps, g)
    nodes = OrderedDict()
    comps = OrderedDict()
    if existing is not None:
        import copy
        ex = copy.deepcopy(existing)
        for n in ex.nodes.values():
            nodes[n.name] = n
        for c in ex.components:
            comps[c.name] = c
    seen = set()
    for n in new_nodes:
        if n.name in seen:
            raise KaldiFormatError("%s: node %s is defined twice" % (name, n.name))
        seen.add(n.name)
        nodes.pop(n.name, None)
        nodes[n.name] = n
    for c in new_comps:
        if c.name in comps and c.name in {x.name for x in new_comps[:new_comps.index(c)]}:
            raise KaldiFormatError("%s: component %s is defined twice" % (name, c.name))
        comps[c.name] = c
    for what in ("input", "output"):  # Kaldi's Nnet::Check: both kinds of node
        if not any(n.kind == what for n in nodes.values()):
            raise KaldiFormatError("%s: the network has no %s node (%s)" % (
                name, what, "an empty config" if not nodes else
                "nodes: %s" % ", ".join(list(nodes)[:8])))
    try:
        return Nnet3(list(nodes.values()), list(comps.values()), name=name)
    except ValueError as e:
        raise KaldiFormatError(str(e)) from None


def _read_nnet(r: KaldiReader) -> Nnet3:
    r.expect_token("<Nnet3>")
    buf = r.buf
    if r.pos < r.end and buf[r.pos] == 13:
        r.pos += 1
    if r.pos >= r.end or buf[r.pos] != 10:
        raise r.error("expected a newline after <Nnet3>")
    r.pos += 1
    end = bytes(buf[r.pos:r.end]).find(b"\n\n")
    if end < 0:
        raise r.error("unterminated config section (no empty line)")
    text = bytes(buf[r.pos:r.pos + end]).decode("utf-8", errors="replace")
    r.pos += end + 2
    nodes = _parse_config(text.split("\n"), r.name, "config")
    r.expect_token("<NumComponents>")
    n = r.read_int32("<NumComponents>")
    if not 0 <= n < 100000:
        raise r.error("bad number of components %d" % n)
    comps = []
    for _ in range(n):
        r.expect_token("<ComponentName>")
        cname = r.read_token()
        comps.append(read_component(r, cname))
    r.expect_token("</Nnet3>")
    try:
        return Nnet3(nodes, comps, name=r.name)
    except ValueError as e:
        msg = str(e)
        raise KaldiFormatError(msg if msg.startswith(r.name) else "%s: %s" % (r.name, msg)) \
            from None


def read_nnet3(path) -> Nnet3:
    """Read a raw nnet3 (``final.raw``) or an acoustic model (``final.mdl``: transition
    model, nnet, ``<LeftContext>``/``<RightContext>``/``<Priors>``), binary or text,
    plain or gzipped.

    Args:
      path: file name (or Kaldi rxfilename: ``-``, ``command |``), bytes, or a binary
        stream.
    Returns:
      the :class:`Nnet3`, with ``trans_model`` and ``priors`` set for a ``final.mdl``.
    Raises:
      KaldiFormatError: naming the file and what is wrong (e.g. an unsupported component
        type or descriptor).
    """
    data, name = _read_bytes(path)
    r = KaldiReader(data, name=name)
    r.read_header()
    tm = None
    if r.peek_token() == ord("T"):
        tm = TransitionModel._read(r)
    nnet = _read_nnet(r)
    if tm is not None:
        nnet.trans_model = tm
        r.expect_token("<LeftContext>")
        r.read_int32("<LeftContext>")
        r.expect_token("<RightContext>")
        r.read_int32("<RightContext>")
        r.expect_token("<Priors>")
        nnet.priors = read_vector(r)
    return nnet


def write_nnet3(nnet: Nnet3, path=None, binary: bool = True,
                trans_model: Optional[TransitionModel] = None,
                priors: Optional[np.ndarray] = None) -> Optional[bytes]:
    """Write ``nnet`` as Kaldi's ``nnet3-copy`` (raw) or, with ``trans_model``, as
    ``nnet3-am-copy`` (``final.mdl``) does.

    Args:
      nnet: the network.
      path: file name or binary stream; None returns the bytes.
      binary: Kaldi binary (default) or text.
      trans_model: write an acoustic model with this transition model.
      priors: the AmNnetSimple priors (default: empty).
    """
    def body(w: KaldiWriter) -> None:
        if trans_model is not None:
            trans_model._write(w)
        w.write_token("<Nnet3>")
        w.write(b"\n" + "".join(l + "\n" for l in nnet.config_lines()).encode() + b"\n")
        w.write_token("<NumComponents>")
        w.write_int32(len(nnet.components))
        w.newline()
        for c in nnet.components:
            w.write_token("<ComponentName>")
            w.write_token(c.name)
            c.write(w)
            w.newline()
        w.write_token("</Nnet3>")
        if trans_model is not None:
            l, r = nnet.context("output") if "output" in nnet.nodes else (0, 0)
            w.write_token("<LeftContext>")
            w.write_int32(l)
            w.write_token("<RightContext>")
            w.write_int32(r)
            w.write_token("<Priors>")
            write_vector(w, np.asarray(priors if priors is not None else np.zeros(0),
                                       dtype=np.float32))

    if path == "-":
        path = __import__("sys").stdout.buffer
    return write_kaldi_object(path, body, binary)  # a file: complete or not at all
