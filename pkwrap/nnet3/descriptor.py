"""nnet3 descriptors: how a node's input is assembled from other nodes over time.

A descriptor maps an output frame ``t`` to rows of other nodes (Kaldi's
``src/nnet3/nnet-descriptor.h``). The grammar, with ``d`` a descriptor and ``node`` a node
name::

    d := node | Append(d, d, ...) | Sum(d, d, ...) | Offset(d, t_off[, x_off])
       | ReplaceIndex(d, t|x, value) | Scale(alpha, d) | Const(value, dim)
       | IfDefined(d) | Failover(d, d) | Round(d, t_modulus) | Switch(d, d, ...)

Meaning at frame ``t`` (``x`` is always 0 in the chain / TDNN setups handled here, so
``Offset``'s x-offset and ``ReplaceIndex(d, x, v)`` do not change anything):

==========================  =================================================================
``node``                    row ``t`` of that node
``Append(a, b, ...)``       the rows concatenated (dims add up)
``Sum(a, b, ...)``          the element-wise sum (defined where all parts are)
``Offset(d, o)``            ``d`` at ``t + o``
``ReplaceIndex(d, t, v)``   ``d`` at ``v`` for every ``t`` (``ReplaceIndex(ivector, t, 0)``: the
                            one i-vector row supplied with index ``t = 0``)
``Scale(a, d)``             ``a * d(t)``
``Const(v, n)``             an ``n``-dim row of ``v`` (defined everywhere)
``IfDefined(d)``            ``d(t)`` where ``d`` is computable, zeros elsewhere
``Failover(a, b)``          ``a(t)`` where ``a`` is computable, else ``b(t)``
``Round(d, m)``             ``d`` at ``m * floor(t / m)``
``Switch(d0, ..., dn-1)``   ``d_(t mod n)(t)``
==========================  =================================================================

Computability is tracked as one interval of frames per node (``[lo, hi]``, possibly
unbounded), which is exact for the non-recurrent networks Kaldi's TDNN / TDNN-F / CNN
recipes build.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["Descriptor", "parse_descriptor", "DescriptorError", "INF", "Interval"]

INF = math.inf
Interval = Tuple[float, float]  # [lo, hi], lo > hi means empty
EMPTY: Interval = (INF, -INF)
_NAMES = ("Append", "Sum", "Failover", "IfDefined", "Offset", "Switch", "Scale", "Const",
          "Round", "ReplaceIndex")
_TOKEN = re.compile(r"\s*([(),]|[^\s(),]+)")


class DescriptorError(ValueError):
    """A descriptor that cannot be parsed or used (unknown node or operator, bad args)."""


def _inter(a: Interval, b: Interval) -> Interval:
    return (max(a[0], b[0]), min(a[1], b[1]))


def _empty(a: Interval) -> bool:
    return a[0] > a[1]


def _fmt_num(v: float) -> str:
    return "%d" % v if float(v).is_integer() and abs(v) < 1e15 else "%g" % v


class Descriptor:
    """One node of a descriptor expression.

    Args:
      op: ``"node"`` or one of Append, Sum, Failover, IfDefined, Offset, Switch, Scale,
        Const, Round, ReplaceIndex.
      parts: the sub-descriptors.
      name: the node name (``op == "node"``).
      args: the numeric arguments (offset, scale, ...), as in the Kaldi syntax.
    """

    __slots__ = ("op", "parts", "name", "args")

    def __init__(self, op: str, parts=(), name: Optional[str] = None, args=()):
        self.op = op
        self.parts = list(parts)
        self.name = name
        self.args = tuple(args)

    # ------------------------------------------------------------------ text
    def __str__(self) -> str:
        op, p = self.op, self.parts
        if op == "node":
            return self.name
        if op in ("Append", "Sum", "Switch", "Failover"):
            return "%s(%s)" % (op, ", ".join(str(d) for d in p))
        if op == "IfDefined":
            return "IfDefined(%s)" % p[0]
        if op == "Offset":
            t, x = self.args
            return "Offset(%s, %d%s)" % (p[0], t, ", %d" % x if x else "")
        if op == "Scale":
            return "Scale(%s, %s)" % (_fmt_num(self.args[0]), p[0])
        if op == "Const":
            return "Const(%s, %d)" % (_fmt_num(self.args[0]), self.args[1])
        if op == "Round":
            return "Round(%s, %d)" % (p[0], self.args[0])
        if op == "ReplaceIndex":
            return "ReplaceIndex(%s, %s, %d)" % (p[0], self.args[0], self.args[1])
        raise DescriptorError("unknown descriptor operator %r" % op)

    __repr__ = __str__

    def copy(self) -> "Descriptor":
        return Descriptor(self.op, [d.copy() for d in self.parts], self.name, self.args)

    def normalized(self) -> "Descriptor":
        """Kaldi's normal form (``GeneralDescriptor::GetNormalizedDescriptor``), which is
        what Kaldi writes to model files: Append only at the top; Offset(Offset(x, a), b)
        = Offset(x, a+b); Offset(x, 0) = x; Offset/Round/ReplaceIndex/Switch moved inside
        Sum/Failover/IfDefined; Sum of more than 2 parts nested to the right; Scale moved
        down to the node (through Offset, ReplaceIndex, Round, Sum; Scale(a, Scale(b, x))
        = Scale(a*b, x)). The meaning is unchanged.

        Raises:
          DescriptorError: for the cases Kaldi cannot normalize either (Sum inside
            Switch, Scale of Append/Switch/Const/IfDefined/Failover).
        """
        n = self._num_terms()
        terms = [self._term(k) for k in range(n)]
        for i, t in enumerate(terms):
            while True:
                t, changed = _normalize_step(t)
                if not changed:
                    break
            terms[i] = t
        return terms[0] if n == 1 else Descriptor("Append", terms)

    def _num_terms(self) -> int:
        if self.op in ("node", "Const"):
            return 1
        if self.op == "Append":
            return sum(d._num_terms() for d in self.parts)
        ns = {d._num_terms() for d in self.parts}
        if len(ns) != 1:
            raise DescriptorError("%s: parts with different numbers of Append terms" % self)
        return ns.pop()

    def _term(self, k: int) -> "Descriptor":
        """The k-th Append term, with every Append below replaced by its k-th term."""
        if self.op in ("node", "Const"):
            return self.copy()
        if self.op == "Append":
            for d in self.parts:
                n = d._num_terms()
                if k < n:
                    return d._term(k)
                k -= n
            raise IndexError(k)
        return Descriptor(self.op, [d._term(k) for d in self.parts], self.name, self.args)

    def node_names(self) -> List[str]:
        """The nodes this descriptor reads, in order of first use."""
        out: List[str] = []
        self._nodes(out)
        return out

    def _nodes(self, out):
        if self.op == "node":
            if self.name not in out:
                out.append(self.name)
        for d in self.parts:
            d._nodes(out)

    def rename(self, old: str, new: str) -> None:
        """Rename a referenced node in place."""
        if self.op == "node" and self.name == old:
            self.name = new
        for d in self.parts:
            d.rename(old, new)

    # ------------------------------------------------------------------ dims
    def dim(self, node_dim: Callable[[str], int]) -> int:
        """Output dimension, given the dims of the nodes.

        Raises:
          DescriptorError: on Sum/Failover/Switch parts of different dims.
        """
        op = self.op
        if op == "node":
            return node_dim(self.name)
        if op == "Const":
            return int(self.args[1])
        dims = [d.dim(node_dim) for d in self.parts]
        if op == "Append":
            return sum(dims)
        if len(set(dims)) != 1:
            raise DescriptorError("%s: parts have different dims %s" % (self, dims))
        return dims[0]

    # ------------------------------------------------------------------ computability
    def avail(self, node_avail: Callable[[str], Interval]) -> Interval:
        """The frames ``t`` at which this descriptor is computable, as an interval.

        Args:
          node_avail: the computable interval of each node.
        Returns:
          ``(lo, hi)``; ``(-inf, inf)`` when always computable, ``lo > hi`` when never.
        """
        op, p = self.op, self.parts
        if op == "node":
            return node_avail(self.name)
        if op in ("Const", "IfDefined"):
            return (-INF, INF)
        if op in ("Append", "Sum", "Switch"):
            a = (-INF, INF)
            for d in p:
                a = _inter(a, d.avail(node_avail))
            return a
        if op == "Failover":
            a, b = p[0].avail(node_avail), p[1].avail(node_avail)
            if _empty(a):
                return b
            if _empty(b):
                return a
            return (min(a[0], b[0]), max(a[1], b[1]))
        a = p[0].avail(node_avail)
        if _empty(a):
            return EMPTY
        if op == "Offset":
            return (a[0] - self.args[0], a[1] - self.args[0])
        if op == "Scale":
            return a
        if op == "ReplaceIndex":
            if self.args[0] == "x":
                return a
            return (-INF, INF) if a[0] <= self.args[1] <= a[1] else EMPTY
        if op == "Round":
            m = self.args[0]
            lo = -INF if a[0] == -INF else m * math.ceil(a[0] / m)
            hi = INF if a[1] == INF else m * math.floor(a[1] / m) + m - 1
            return (lo, hi)
        raise DescriptorError("unknown descriptor operator %r" % op)

    # ------------------------------------------------------------------ requests
    def request(self, a: int, b: int, need: Callable[[str, int, int], None],
                node_avail: Callable[[str], Interval]) -> None:
        """Record the node frames needed to evaluate frames ``a..b``.

        Args:
          a, b: first and last frame wanted (``a <= b``).
          need: called as ``need(node, lo, hi)`` for every node range read.
          node_avail: the computable interval of each node (for IfDefined/Failover).
        """
        if a > b:
            return
        op, p = self.op, self.parts
        if op == "node":
            need(self.name, a, b)
        elif op == "Const":
            pass
        elif op in ("Append", "Sum", "Switch", "Scale"):
            for d in p:
                d.request(a, b, need, node_avail)
        elif op == "Offset":
            p[0].request(a + self.args[0], b + self.args[0], need, node_avail)
        elif op == "ReplaceIndex":
            if self.args[0] == "t":
                p[0].request(self.args[1], self.args[1], need, node_avail)
            else:
                p[0].request(a, b, need, node_avail)
        elif op == "Round":
            m = self.args[0]
            p[0].request(m * (a // m), m * (b // m), need, node_avail)
        elif op == "IfDefined":
            lo, hi = _inter((a, b), p[0].avail(node_avail))
            if lo <= hi:
                p[0].request(int(lo), int(hi), need, node_avail)
        elif op == "Failover":
            av = p[0].avail(node_avail)
            lo, hi = _inter((a, b), av)
            if lo <= hi:
                p[0].request(int(lo), int(hi), need, node_avail)
            if lo > hi or lo > a or hi < b:
                lo2, hi2 = _inter((a, b), p[1].avail(node_avail))
                if lo2 <= hi2:
                    p[1].request(int(lo2), int(hi2), need, node_avail)
        else:
            raise DescriptorError("unknown descriptor operator %r" % op)

    # ------------------------------------------------------------------ values
    def evaluate(self, a: int, b: int, value: Callable[[str, int, int], torch.Tensor],
                 node_avail: Callable[[str], Interval], like: torch.Tensor,
                 node_dim: Callable[[str], int]) -> torch.Tensor:
        """The descriptor's rows for frames ``a..b``.

        Args:
          a, b: first and last frame (``b >= a``).
          value: ``value(node, lo, hi)`` returns that node's rows, ``[B][hi-lo+1][D]``.
          node_avail: the computable interval of each node.
          like: a tensor giving batch size, dtype and device for constants/zeros.
          node_dim: the dim of each node.
        Returns:
          ``[B][b-a+1][dim]``.
        """
        op, p = self.op, self.parts
        n = b - a + 1
        if op == "node":
            return value(self.name, a, b)
        if op == "Append":
            return torch.cat([d.evaluate(a, b, value, node_avail, like, node_dim) for d in p],
                             dim=-1)
        if op == "Sum":
            out = p[0].evaluate(a, b, value, node_avail, like, node_dim)
            for d in p[1:]:
                out = out + d.evaluate(a, b, value, node_avail, like, node_dim)
            return out
        if op == "Scale":
            return self.args[0] * p[0].evaluate(a, b, value, node_avail, like, node_dim)
        if op == "Const":
            return like.new_full((like.shape[0], n, int(self.args[1])), float(self.args[0]))
        if op == "Offset":
            o = self.args[0]
            return p[0].evaluate(a + o, b + o, value, node_avail, like, node_dim)
        if op == "ReplaceIndex":
            if self.args[0] == "x":
                return p[0].evaluate(a, b, value, node_avail, like, node_dim)
            v = self.args[1]
            row = p[0].evaluate(v, v, value, node_avail, like, node_dim)
            return row.expand(row.shape[0], n, row.shape[2])
        if op == "Round":
            m = self.args[0]
            lo, hi = m * (a // m), m * (b // m)
            rows = p[0].evaluate(lo, hi, value, node_avail, like, node_dim)
            idx = torch.tensor([m * (t // m) - lo for t in range(a, b + 1)], device=rows.device)
            return rows.index_select(1, idx)
        if op == "Switch":
            vals = [d.evaluate(a, b, value, node_avail, like, node_dim) for d in p]
            k = len(vals)
            sel = torch.tensor([t % k for t in range(a, b + 1)], device=vals[0].device)
            out = vals[0].clone()
            for i in range(1, k):
                out[:, sel == i] = vals[i][:, sel == i]
            return out
        if op in ("IfDefined", "Failover"):
            dim = self.dim(node_dim)
            first = p[0]
            lo, hi = _inter((a, b), first.avail(node_avail))
            if op == "IfDefined":
                out = like.new_zeros((like.shape[0], n, dim))
            else:
                lo2, hi2 = _inter((a, b), p[1].avail(node_avail))
                out = like.new_zeros((like.shape[0], n, dim))
                # the second part only where the first does not cover (what request() asked)
                if lo2 <= hi2 and (lo > hi or lo > a or hi < b):
                    lo2, hi2 = int(lo2), int(hi2)
                    out[:, lo2 - a:hi2 - a + 1] = p[1].evaluate(lo2, hi2, value, node_avail,
                                                                like, node_dim)
            if lo <= hi:
                lo, hi = int(lo), int(hi)
                out[:, lo - a:hi - a + 1] = first.evaluate(lo, hi, value, node_avail, like,
                                                           node_dim)
            return out
        raise DescriptorError("unknown descriptor operator %r" % op)


def _normalize_step(d: Descriptor) -> Tuple[Descriptor, bool]:
    """One rewriting pass of :meth:`Descriptor.normalized` (top first, then the parts)."""
    op, p = d.op, d.parts
    if op == "Offset":
        c = p[0]
        if c.op == "Offset":
            return Descriptor("Offset", c.parts, args=(d.args[0] + c.args[0],
                                                     d.args[1] + c.args[1])), True
        if d.args == (0, 0):
            return c, True
    if op in ("Offset", "Switch", "Round", "ReplaceIndex"):
        c = p[0]
        if c.op in ("Sum", "Failover", "IfDefined"):
            if len(p) > 1:
                raise DescriptorError("%s: Sum(), Failover() or IfDefined() inside Switch() "
                                      "cannot be normalized" % d)
            return Descriptor(c.op, [Descriptor(op, [g], args=d.args) for g in c.parts],
                              args=c.args), True
    elif op == "Sum":
        if len(p) == 1:
            return p[0], True
        if len(p) > 2:
            return Descriptor("Sum", [p[0], Descriptor("Sum", p[1:])]), True
    elif op == "Scale":
        c, a = p[0], d.args[0]
        if c.op in ("Offset", "ReplaceIndex", "Round"):
            return Descriptor(c.op, [Descriptor("Scale", c.parts, args=(a,))], args=c.args), True
        if c.op == "Sum":
            return Descriptor("Sum", [Descriptor("Scale", [g], args=(a,)) for g in c.parts]), True
        if c.op == "Scale":
            return Descriptor("Scale", c.parts, args=(a * c.args[0],)), True
        if c.op != "node":
            raise DescriptorError("%s: cannot normalize Scale() of %s; push the Scale() "
                                  "inside" % (d, c.op))
    changed = False
    parts = []
    for c in p:
        if not changed:
            c, changed = _normalize_step(c)
        parts.append(c)
    return Descriptor(op, parts, d.name, d.args), changed


# ---------------------------------------------------------------------------- parsing
def _tokenize(text: str) -> List[str]:
    toks, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            break
        toks.append(m.group(1))
        pos = m.end()
    return toks


def parse_descriptor(text: str, node_names=None) -> Descriptor:
    """Parse a descriptor in Kaldi's config syntax.

    Args:
      text: e.g. ``"Append(Offset(input, -1), input, ReplaceIndex(ivector, t, 0))"``.
      node_names: if given, the names a bare word may refer to (others are an error).
    Returns:
      the :class:`Descriptor`.
    Raises:
      DescriptorError: naming the problem (unknown operator or node, bad argument).
    """
    toks = _tokenize(text)
    pos = [0]

    def peek():
        return toks[pos[0]] if pos[0] < len(toks) else None

    def take(expect=None):
        t = peek()
        if t is None:
            raise DescriptorError("descriptor %r: unexpected end" % text)
        if expect is not None and t != expect:
            raise DescriptorError("descriptor %r: expected %r, got %r" % (text, expect, t))
        pos[0] += 1
        return t

    def number(kind, what):
        t = take()
        try:
            return kind(t)
        except ValueError:
            raise DescriptorError("descriptor %r: %s: expected a number, got %r"
                                  % (text, what, t)) from None

    def parse() -> Descriptor:
        t = take()
        if t in "(),":
            raise DescriptorError("descriptor %r: unexpected %r" % (text, t))
        if peek() != "(":
            if t in _NAMES:
                raise DescriptorError("descriptor %r: %s needs arguments" % (text, t))
            if node_names is not None and t not in node_names:
                raise DescriptorError("descriptor %r: unknown node %r" % (text, t))
            return Descriptor("node", name=t)
        if t not in _NAMES:
            raise DescriptorError("descriptor %r: unknown descriptor type %r" % (text, t))
        take("(")
        if t in ("Append", "Sum", "Switch"):
            parts = [parse()]
            while peek() == ",":
                take(",")
                parts.append(parse())
            take(")")
            return Descriptor(t, parts)
        if t in ("IfDefined",):
            d = parse()
            take(")")
            return Descriptor(t, [d])
        if t == "Failover":
            d1 = parse()
            take(",")
            d2 = parse()
            take(")")
            return Descriptor(t, [d1, d2])
        if t == "Offset":
            d = parse()
            take(",")
            o = number(int, "Offset")
            x = 0
            if peek() == ",":
                take(",")
                x = number(int, "Offset")
            take(")")
            return Descriptor(t, [d], args=(o, x))
        if t == "Round":
            d = parse()
            take(",")
            m = number(int, "Round")
            if m < 1:
                raise DescriptorError("descriptor %r: Round modulus must be >= 1" % text)
            take(")")
            return Descriptor(t, [d], args=(m,))
        if t == "ReplaceIndex":
            d = parse()
            take(",")
            var = take()
            if var not in ("t", "x"):
                raise DescriptorError("descriptor %r: ReplaceIndex expects t or x, got %r"
                                      % (text, var))
            take(",")
            v = number(int, "ReplaceIndex")
            take(")")
            return Descriptor(t, [d], args=(var, v))
        if t == "Scale":
            s = number(float, "Scale")
            take(",")
            d = parse()
            take(")")
            return Descriptor(t, [d], args=(s,))
        # Const
        v = number(float, "Const")
        take(",")
        n = number(int, "Const")
        if n <= 0:
            raise DescriptorError("descriptor %r: Const dim must be > 0" % text)
        take(")")
        return Descriptor(t, args=(v, n))

    d = parse()
    if peek() is not None:
        raise DescriptorError("descriptor %r: junk after the end: %r" % (text, peek()))
    return d
