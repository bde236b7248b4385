"""The denominator forward-backward as fused Triton kernels, one launch per frame, replayed
as one CUDA graph per minibatch shape (the GPU path of :mod:`pkwrap.chain.denominator`).

The recursion is the one of :mod:`pkwrap.chain.denominator` (Kaldi's
DenominatorComputation). Buffers, for S sequences, T frames, N states, P pdfs::

    e      [T][P][S]    exp(clamp(x, -30, 30)), sequence fastest (coalesced gathers)
    alpha  [T+1][N][S]  alpha(t) *before* the leaky term; alpha'(t)_i = alpha(t)_i + l pi_i c(t)
                        is formed where it is read
    c      [T+1][S]     c(t) = sum_i alpha(t)_i
    bd     [T+1][N][S]  beta'(t) of the backward pass ("beta dash", before the leaky term)
    d      [T+1][S]     d(t) = sum_i pi_i bd(t)_i, so beta(t)_j = bd(t)_j + l d(t)
    gam    [T][P][S]    occupation posteriors times post_scale

Every sum over arcs is cut into rows of at most CHUNK arcs that share the state (or pdf)
they are summed into; a program gathers BLOCK_ROWS such rows for a block of sequences at
once (one [rows][CHUNK][S] gather, no loop, so long arc lists do not hold up a launch) and
adds each row's sum into its target with an atomic add. Forward frame t (one launch)::

    alpha(t+1)_j = sum_{arcs i->j, pdf p, prob q} alpha'(t)_i q e[t][p] / c(t)
    c(t+1)       = sum_j alpha(t+1)_j

Backward frame t (one launch; the first programs take rows of arcs by source state, the
others rows of arcs by pdf, both reading beta(t+1))::

    bd(t)_i     = sum_{arcs i->j, pdf p, prob q} q e[t][p] / c(t) beta(t+1)_j
    d(t)        = sum_i pi_i bd(t)_i
    gam[t][p]   = post_scale e[t][p] / c(t) sum_{arcs i->j with pdf p} alpha'(t)_i q beta(t+1)_j

with bd(T) = 1 / tot and d(T) = sum(pi) / tot, tot = sum_i alpha'(T)_i. Results equal the
C++ kernel and the torch path to float32 rounding; the atomic sums make the last bits
depend on the order in which programs finish, so GPU runs are not bitwise repeatable.

On the CPU (tests) the same kernels run in Triton's interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Optional, Tuple

import numpy as np
import torch

logger = logging.getLogger("pkwrap.chain")

try:  # Triton comes with CUDA builds of torch; CPU builds may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None

__all__ = ["available", "TritonDenominator"]

# A program sums BLOCK_ROWS rows of at most CHUNK arcs each (a state's arcs are cut into
# such rows) for BLOCK_S sequences, as one [BLOCK_ROWS][CHUNK][BLOCK_S] gather: no loop,
# so no program waits on a long arc list. Triton's interpreter (CPU tests) pays per
# program, so it takes larger blocks.
CHUNK = 8
BLOCK_ROWS = 64 if os.environ.get("TRITON_INTERPRET") == "1" else 8


def available() -> bool:
    """Whether Triton can be imported (the kernels then run on CUDA, or interpreted)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _rows(key_ptr, start_ptr, count_ptr, first, n_rows, BLOCK_R: tl.constexpr,
              CHUNK: tl.constexpr):
        """Rows first..first+BLOCK_R-1: their target, mask, and [R][C] arc positions and mask."""
        r = first + tl.arange(0, BLOCK_R)
        rmask = r < n_rows
        key = tl.load(key_ptr + r, mask=rmask, other=0)
        start = tl.load(start_ptr + r, mask=rmask, other=0)
        cnt = tl.load(count_ptr + r, mask=rmask, other=0)
        k = tl.arange(0, CHUNK)
        am = rmask[:, None] & (k[None, :] < cnt[:, None])
        return key, rmask, start[:, None] + k[None, :], am

    @triton.jit(do_not_specialize=["t"])
    def _forward_frame(alpha_ptr, c_ptr, e_ptr, init_ptr, vkey_ptr, vstart_ptr, vcount_ptr,
                       arc_src_ptr, arc_pdf_ptr, arc_prob_ptr, t, N, S, P, n_rows, leaky,
                       BLOCK_R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr):
        pid = tl.program_id(0)
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = s < S
        j, rmask, arc, am = _rows(vkey_ptr, vstart_ptr, vcount_ptr, pid * BLOCK_R, n_rows,
                                  BLOCK_R, CHUNK)
        i = tl.load(arc_src_ptr + arc, mask=am, other=0)
        p = tl.load(arc_pdf_ptr + arc, mask=am, other=0)
        q = tl.load(arc_prob_ptr + arc, mask=am, other=0.0)
        pi = tl.load(init_ptr + i, mask=am, other=0.0)
        t64 = t.to(tl.int64)
        c_t = tl.load(c_ptr + t64 * S + s, mask=smask, other=1.0)
        m3 = am[:, :, None] & smask[None, None, :]  # [R][C][S]
        a = tl.load(alpha_ptr + t64 * N * S + i[:, :, None] * S + s[None, None, :], mask=m3,
                    other=0.0)
        ee = tl.load(e_ptr + t64 * P * S + p[:, :, None] * S + s[None, None, :], mask=m3,
                     other=0.0)
        v = (a + leaky * pi[:, :, None] * c_t[None, None, :]) * (q[:, :, None] * ee)
        part = tl.sum(v, axis=1) / c_t[None, :]  # [R][S]
        m2 = rmask[:, None] & smask[None, :]
        tl.atomic_add(alpha_ptr + (t64 + 1) * N * S + j[:, None] * S + s[None, :], part, mask=m2)
        tl.atomic_add(c_ptr + (t64 + 1) * S + s, tl.sum(part, axis=0), mask=smask)

    @triton.jit(do_not_specialize=["t"])
    def _backward_frame(alpha_ptr, c_ptr, e_ptr, init_ptr, bd_ptr, d_ptr, gam_ptr,
                        skey_ptr, sstart_ptr, scount_ptr, sarc_dst_ptr, sarc_pdf_ptr, sarc_prob_ptr,
                        pkey_ptr, pstart_ptr, pcount_ptr, parc_src_ptr, parc_dst_ptr, parc_prob_ptr,
                        t, N, S, P, n_state_rows, n_state_programs, n_pdf_rows, leaky, post_scale,
                        BLOCK_R: tl.constexpr, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr):
        pid = tl.program_id(0)
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = s < S
        t64 = t.to(tl.int64)
        c_t = tl.load(c_ptr + t64 * S + s, mask=smask, other=1.0)
        d_next = tl.load(d_ptr + (t64 + 1) * S + s, mask=smask, other=0.0)
        bd_next = bd_ptr + (t64 + 1) * N * S
        if pid < n_state_programs:
            # bd(t)_i over the arcs leaving i
            i, rmask, arc, am = _rows(skey_ptr, sstart_ptr, scount_ptr, pid * BLOCK_R,
                                      n_state_rows, BLOCK_R, CHUNK)
            j = tl.load(sarc_dst_ptr + arc, mask=am, other=0)
            p = tl.load(sarc_pdf_ptr + arc, mask=am, other=0)
            q = tl.load(sarc_prob_ptr + arc, mask=am, other=0.0)
            m3 = am[:, :, None] & smask[None, None, :]
            b = tl.load(bd_next + j[:, :, None] * S + s[None, None, :], mask=m3, other=0.0)
            ee = tl.load(e_ptr + t64 * P * S + p[:, :, None] * S + s[None, None, :], mask=m3,
                         other=0.0)
            v = (q[:, :, None] * ee) * (b + leaky * d_next[None, None, :])
            part = tl.sum(v, axis=1) / c_t[None, :]
            m2 = rmask[:, None] & smask[None, :]
            tl.atomic_add(bd_ptr + t64 * N * S + i[:, None] * S + s[None, :], part, mask=m2)
            pi = tl.load(init_ptr + i, mask=rmask, other=0.0)
            tl.atomic_add(d_ptr + t64 * S + s, tl.sum(pi[:, None] * part, axis=0), mask=smask)
        else:
            # gam[t][p] over the arcs carrying pdf p
            p, rmask, arc, am = _rows(pkey_ptr, pstart_ptr, pcount_ptr,
                                      (pid - n_state_programs) * BLOCK_R, n_pdf_rows, BLOCK_R,
                                      CHUNK)
            i = tl.load(parc_src_ptr + arc, mask=am, other=0)
            j = tl.load(parc_dst_ptr + arc, mask=am, other=0)
            q = tl.load(parc_prob_ptr + arc, mask=am, other=0.0)
            pi = tl.load(init_ptr + i, mask=am, other=0.0)
            m3 = am[:, :, None] & smask[None, None, :]
            a = tl.load(alpha_ptr + t64 * N * S + i[:, :, None] * S + s[None, None, :], mask=m3,
                        other=0.0)
            b = tl.load(bd_next + j[:, :, None] * S + s[None, None, :], mask=m3, other=0.0)
            v = (a + leaky * pi[:, :, None] * c_t[None, None, :]) * q[:, :, None] \
                * (b + leaky * d_next[None, None, :])
            m2 = rmask[:, None] & smask[None, :]
            ee = tl.load(e_ptr + t64 * P * S + p[:, None] * S + s[None, :], mask=m2, other=0.0)
            g = tl.sum(v, axis=1) * ee / c_t[None, :] * post_scale
            tl.atomic_add(gam_ptr + t64 * P * S + p[:, None] * S + s[None, :], g, mask=m2)


def _chunked_rows(key: np.ndarray, num_groups: int, chunk: int):
    """Arcs grouped by ``key`` (stable order) and cut into rows of at most ``chunk`` arcs.

    Returns:
      ``(order, row_key, row_start, row_count)``: the arc permutation, and for every row
      the group it belongs to, its first position in the permuted arcs and its size.
    """
    order = np.argsort(key, kind="stable")
    deg = np.bincount(key, minlength=num_groups).astype(np.int64)
    off = np.zeros(num_groups, dtype=np.int64)
    np.cumsum(deg[:-1], out=off[1:])
    nrow = (deg + chunk - 1) // chunk
    row_key = np.repeat(np.arange(num_groups), nrow)
    first = np.zeros(num_groups, dtype=np.int64)
    np.cumsum(nrow[:-1], out=first[1:])
    within = np.arange(row_key.size) - first[row_key]
    row_start = off[row_key] + within * chunk
    row_count = np.minimum(chunk, deg[row_key] - within * chunk)
    return order, row_key, row_start, row_count


class _GraphTables:
    """The den graph's arc lists for the three kernels' gathers, on one device."""

    def __init__(self, g, device):
        i32 = lambda a: torch.as_tensor(np.ascontiguousarray(a, dtype=np.int32)).to(device)
        f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32)).to(device)
        src = np.asarray(g.src, dtype=np.int64)
        dst = np.asarray(g.dst, dtype=np.int64)
        pdf = np.asarray(g.pdf, dtype=np.int64)
        prob = np.asarray(g.prob, dtype=np.float32)
        N, P = g.num_states, g.num_pdfs
        self.init = f32(g.initial_probs)
        self.init_sum = float(np.asarray(g.initial_probs, dtype=np.float64).sum())
        o, key, start, cnt = _chunked_rows(dst, N, CHUNK)  # forward: arcs into j
        self.f = [i32(key), i32(start), i32(cnt), i32(src[o]), i32(pdf[o]), f32(prob[o])]
        self.n_f_rows = len(key)
        o, key, start, cnt = _chunked_rows(src, N, CHUNK)  # backward: arcs out of i
        self.b = [i32(key), i32(start), i32(cnt), i32(dst[o]), i32(pdf[o]), f32(prob[o])]
        self.n_b_rows = len(key)
        o, key, start, cnt = _chunked_rows(pdf, P, CHUNK)  # posteriors: arcs of pdf p
        self.p = [i32(key), i32(start), i32(cnt), i32(src[o]), i32(dst[o]), f32(prob[o])]
        self.n_p_rows = len(key)


class _Plan:
    """Static buffers and (on CUDA) the captured graph of one (S, T, leaky, want_post)."""

    def __init__(self, N: int, P: int, S: int, T: int, device):
        f32 = dict(dtype=torch.float32, device=device)
        self.x = torch.empty(S, T, P, **f32)
        self.e = torch.empty(T, P, S, **f32)
        self.alpha = torch.empty(T + 1, N, S, **f32)
        self.c = torch.empty(T + 1, S, **f32)
        self.bd = torch.empty(T + 1, N, S, **f32)
        self.d = torch.empty(T + 1, S, **f32)
        self.gam = torch.empty(T, P, S, **f32)
        self.tot = torch.empty(S, dtype=torch.float64, device=device)
        self.graph = None


def device_key(device) -> torch.device:
    """``device`` with its index filled in (``cuda`` -> ``cuda:<current>``)."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


class TritonDenominator:
    """Runs the denominator forward-backward of one :class:`DenominatorGraph` with the
    kernels above; on CUDA each minibatch shape is captured once as a CUDA graph.

    Args:
      den_graph: the denominator graph.
      device: where the kernels run (a CUDA device; the CPU only under
        ``TRITON_INTERPRET=1``).
      use_cuda_graph: replay one captured CUDA graph per shape (default: on CUDA).
      max_plans: shapes kept (least recently used ones are dropped).
    """

    _lock = threading.Lock()

    def __init__(self, den_graph, device, use_cuda_graph: Optional[bool] = None,
                 max_plans: int = 4):
        if triton is None:
            raise RuntimeError("the triton denominator needs the 'triton' package")
        self.device = device_key(device)
        self.N, self.P = den_graph.num_states, den_graph.num_pdfs
        self.tables = _GraphTables(den_graph, self.device)
        if use_cuda_graph is None:
            use_cuda_graph = self.device.type == "cuda"
        self.use_cuda_graph = bool(use_cuda_graph)
        self.max_plans = int(max_plans)
        self._plans: "OrderedDict[tuple, _Plan]" = OrderedDict()

    # ----------------------------------------------------------------- launches
    def _block_s(self, S: int) -> int:
        return max(16, min(64, triton.next_power_of_2(S)))

    def _run(self, pl: _Plan, leaky: float, want_post: bool, post_scale: float) -> None:
        """All launches of one forward(-backward), reading pl.x; fills pl.alpha, pl.c,
        pl.tot and (want_post) pl.bd, pl.d, pl.gam."""
        tb = self.tables
        S, T, P = pl.x.shape
        N = self.N
        BS = self._block_s(S)
        gs = triton.cdiv(S, BS)
        torch.exp(pl.x.permute(1, 2, 0).clamp(-30.0, 30.0), out=pl.e)
        pl.alpha.zero_()  # the kernels add into rows of alpha, c, bd, d and gam
        pl.alpha[0].copy_(tb.init[:, None].expand(N, S))
        pl.c.zero_()
        pl.c[0].fill_(tb.init_sum)
        grid_f = (triton.cdiv(tb.n_f_rows, BLOCK_ROWS), gs)
        for t in range(T):
            _forward_frame[grid_f](pl.alpha, pl.c, pl.e, tb.init, *tb.f, t, N, S, P,
                                   tb.n_f_rows, leaky, BLOCK_R=BLOCK_ROWS, CHUNK=CHUNK,
                                   BLOCK_S=BS)
        # tot = sum_i alpha'(T)_i = c(T) + l c(T) sum(pi)
        torch.mul(pl.c[T].double(), 1.0 + leaky * tb.init_sum, out=pl.tot)
        if not want_post:
            return
        pl.bd.zero_()
        pl.bd[T].copy_((1.0 / pl.tot).to(torch.float32)[None, :].expand(N, S))
        pl.d.zero_()
        pl.d[T].copy_((tb.init_sum / pl.tot).to(torch.float32))
        pl.gam.zero_()
        n_sp = triton.cdiv(tb.n_b_rows, BLOCK_ROWS)
        grid_b = (n_sp + triton.cdiv(tb.n_p_rows, BLOCK_ROWS), gs)
        for t in range(T - 1, -1, -1):
            _backward_frame[grid_b](pl.alpha, pl.c, pl.e, tb.init, pl.bd, pl.d, pl.gam,
                                    *tb.b, *tb.p, t, N, S, P, tb.n_b_rows, n_sp, tb.n_p_rows,
                                    leaky, post_scale, BLOCK_R=BLOCK_ROWS, CHUNK=CHUNK,
                                    BLOCK_S=BS)

    def _plan(self, S: int, T: int, leaky: float, want_post: bool, post_scale: float) -> _Plan:
        key = (S, T, leaky, want_post, post_scale)
        pl = self._plans.get(key)
        if pl is not None:
            self._plans.move_to_end(key)
            return pl
        pl = _Plan(self.N, self.P, S, T, self.device)
        if self.use_cuda_graph:
            pl.x.normal_()  # warm-up (compiles the kernels) on finite data, then capture
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):
                self._run(pl, leaky, want_post, post_scale)
            torch.cuda.current_stream(self.device).wait_stream(s)
            try:
                g = torch.cuda.CUDAGraph()
                # thread_local: other threads (e.g. NCCL's watchdog) may use CUDA meanwhile
                with torch.cuda.graph(g, stream=s, capture_error_mode="thread_local"):
                    self._run(pl, leaky, want_post, post_scale)
                pl.graph = g
            except RuntimeError as e:  # run the same launches eagerly from now on
                logger.warning("den_triton: CUDA graph capture failed (%s); launching the "
                               "kernels one by one instead", str(e).splitlines()[0][:200])
                self.use_cuda_graph = False
                torch.cuda.synchronize(self.device)
        self._plans[key] = pl
        while len(self._plans) > self.max_plans:
            self._plans.popitem(last=False)
        return pl

    # ------------------------------------------------------------------- public
    def __call__(self, x: torch.Tensor, leaky: float, want_post: bool = True,
                 post_scale: float = 1.0) -> Tuple[torch.Tensor, Optional[torch.Tensor], bool]:
        """Forward(-backward) on ``x`` ``[S][T][P]`` (on this object's device).

        Returns:
          ``(logprob, post, ok)``: logprob float64 ``[S]``; post float32 ``[S][T][P]``
          (times post_scale) or None; ok as :class:`pkwrap.chain.denominator.DenResult`.
        """
        S, T, P = x.shape
        with self._lock:
            pl = self._plan(S, T, float(leaky), bool(want_post), float(post_scale))
            pl.x.copy_(x)
            if pl.graph is not None:
                pl.graph.replay()
            else:
                self._run(pl, float(leaky), bool(want_post), float(post_scale))
            log_scale = torch.log(pl.c[:T].double()).sum(0)
            logprob = torch.log(pl.tot) + log_scale
            checks = [logprob.sum()]
            post = None
            if want_post:
                post = torch.empty(S, T, P, dtype=torch.float32, device=x.device)
                post.copy_(pl.gam.permute(2, 0, 1))
                # Kaldi's frame-0 check: sum(alpha'(0) beta'(0)) and sum of gam(0), each ~ S
                a0 = pl.alpha[0].double() + float(leaky) * (self.tables.init.double()[:, None]
                                                            * pl.c[0].double()[None, :])
                checks.append((a0 * pl.bd[0].double()).sum())
                checks.append(pl.gam[0].double().sum() / (post_scale if post_scale else 1.0))
            host = torch.stack(checks).cpu().tolist()
        ok = bool(np.isfinite(host[0]))
        if want_post and post_scale:
            ok = ok and abs(host[1] - S) <= 2.0 and abs(host[2] - S) <= 2.0
        elif want_post:
            ok = ok and abs(host[1] - S) <= 2.0
        return logprob.clone(), post, ok


