#!/usr/bin/env python3
"""Benchmark of the LF-MMI denominator and numerator (issue 2, item 4).

Setup (as Kaldi's tests/fixtures/kaldi/bench/timing.json): the bench den.fst (3359
states, 43251 arcs, 2051 pdfs), 64 sequences x 50 frames, nnet output 2*N(0,1),
leaky-HMM coefficient 0.1, denominator forward + backward (exp of the output
included, as in Kaldi's DenominatorComputation constructor).

Printed, all timed in this one process (the machine is shared: compare ratios):
  * the C++ kernel with 1 and 2 threads (median of --repeats runs),
  * pkwrap's torch backend (plain torch ops, the path CUDA tensors take),
  * a plain-PyTorch baseline: the same recursion with gather/index_add under
    autograd (forward recursion, loss.backward() for the posteriors),
  * the numerator (C++) on a synthetic supervision of the same size (3 states per
    frame, fully connected between frames: 9 arcs per frame, about twice the arc
    density of Kaldi's chain supervision in the fixtures),
  * the whole ChainLoss (den + num + derivative assembly), 1 thread,
  * peak resident memory added by each (Linux VmHWM over a first, untimed call;
    the C++ kernel keeps its per-thread buffers, so later calls add little),
  * Kaldi's own time from timing.json for reference.

Usage:
  python3 bench/bench_chain_loss.py [--repeats 5] [--baseline-repeats 1] [--skip-baseline]
                                    [--wait-idle 60]
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph  # noqa: E402
from pkwrap.chain.denominator import denominator_forward_backward  # noqa: E402
from pkwrap.chain.numerator import numerator_forward_backward  # noqa: E402
from pkwrap.kaldi.chain_egs import Supervision  # noqa: E402
from pkwrap.kaldi.fst import Fst  # noqa: E402

BENCH = ROOT / "tests" / "fixtures" / "kaldi" / "bench"


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _idle_fraction(dt=0.3):
    """Fraction of all CPUs' time spent idle over dt seconds (Linux /proc/stat)."""
    def read():
        v = [int(a) for a in open("/proc/stat").readline().split()[1:]]
        return v[3] + v[4], sum(v)
    try:
        i0, t0 = read()
        time.sleep(dt)
        i1, t1 = read()
    except OSError:
        return 1.0
    return (i1 - i0) / max(1, t1 - t0)


WAIT_IDLE = 0.0  # seconds to wait for idle CPUs before each timed call (--wait-idle)


def _wait_idle():
    deadline = time.time() + WAIT_IDLE
    while time.time() < deadline and _idle_fraction() < 0.85:
        pass


def timed(fn, repeats):
    """Median and min wall seconds over `repeats` calls, min process CPU seconds (all
    threads; the fairer figure on a loaded machine for 1 thread), peak RSS added (MiB)."""
    ts, cpu = [], []
    base = _rss_kib("VmRSS")
    _reset_peak()
    fn()  # warm-up (first-call allocations); its peak memory is the one reported
    peak = (_rss_kib("VmHWM") - base) / 1024.0
    for _ in range(repeats):
        _wait_idle()
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(ts), min(ts), min(cpu), peak


def plain_pytorch_denominator(g, x, leaky):
    """Baseline: the leaky-HMM recursion in plain torch, posteriors by autograd (on x's
    device; bench/gpu_check.py uses it on CUDA)."""
    a = g.torch_arrays(x.device)
    src, dst, pdf, prob, init = a["src"], a["dst"], a["pdf"], a["prob"], a["init"]
    S, T, P = x.shape
    N = g.num_states
    x = x.detach().requires_grad_()
    e = x.clamp(-30, 30).exp()
    alpha = init.expand(S, N)
    logp = torch.zeros(S, device=x.device)
    for t in range(T):
        c = alpha.sum(1, keepdim=True)
        alpha = (alpha + leaky * init * c) / c
        logp = logp + torch.log(c.squeeze(1))
        contrib = torch.gather(alpha, 1, src.expand(S, -1)) * prob * \
            torch.gather(e[:, t, :], 1, pdf.expand(S, -1))
        alpha = torch.zeros(S, N, device=x.device).index_add(1, dst, contrib)
    c = alpha.sum(1)
    logp = logp + torch.log(c * (1 + leaky))
    logp.sum().backward()
    return logp.detach(), x.grad


def synthetic_supervision(S, T, P, seed=0, states_per_frame=3):
    rng = np.random.default_rng(seed)
    K = states_per_frame
    F = S * T
    arcs = [(0, int(1 + rng.integers(P)), 0, float(rng.uniform(0, 2)), 1 + k) for k in range(K)]
    for tau in range(1, F):
        for i in range(K):
            for k in range(K):
                lab = int(1 + rng.integers(P))
                arcs.append((1 + (tau - 1) * K + i, lab, lab, float(rng.uniform(0, 2)),
                             1 + tau * K + k))
    arcs = [(a[0], a[1], a[1], a[3], a[4]) for a in arcs]
    num_states = 1 + F * K
    finals = {1 + (F - 1) * K + k: 0.0 for k in range(K)}
    fst = Fst.from_arcs(num_states, 0, arcs, finals)
    return Supervision(weight=1.0, num_sequences=S, frames_per_sequence=T, label_dim=P, fst=fst)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch-repeats", type=int, default=1)
    ap.add_argument("--baseline-repeats", type=int, default=1)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--num-sequences", type=int, default=64)
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each timed call wait up to this long for the CPUs to be "
                         ">= 85%% idle (the machine is shared)")
    args = ap.parse_args()
    global WAIT_IDLE
    WAIT_IDLE = args.wait_idle

    S, T, P, leaky = args.num_sequences, args.frames, 2051, 0.1
    g = DenominatorGraph.from_fst(BENCH / "den.fst", P)
    print("graph: %r" % g)
    print("minibatch: %d sequences x %d frames, leaky %.2g; host cpus %d" % (S, T, leaky, os.cpu_count()))
    x = 2.0 * torch.randn(S, T, P, generator=torch.Generator().manual_seed(0))
    g.native()  # build once, outside the timings

    kaldi = json.loads((BENCH / "timing.json").read_text())
    k_med = kaldi["seconds_median"]
    print("Kaldi DenominatorComputation (timing.json, 1 thread): median %.3f s" % k_med)
    rows = []

    res = {}
    for nt in (1, 2):
        med, mn, cpu, peak = timed(
            lambda: denominator_forward_backward(g, x, leaky, num_threads=nt), args.repeats)
        res["cpp%d" % nt] = med
        rows.append(("den C++ %d thread%s" % (nt, "s" if nt > 1 else ""), med, mn, cpu, peak))

    nthreads = torch.get_num_threads()
    torch.set_num_threads(1)
    med, mn, cpu, peak = timed(lambda: denominator_forward_backward(g, x, leaky, backend="torch"),
                               args.torch_repeats)
    res["torch"] = med
    rows.append(("den torch path (1 thread)", med, mn, cpu, peak))
    if not args.skip_baseline:
        med, mn, cpu, peak = timed(lambda: plain_pytorch_denominator(g, x, leaky),
                                   args.baseline_repeats)
        res["baseline"] = med
        rows.append(("den plain PyTorch autograd (1 thread)", med, mn, cpu, peak))
    torch.set_num_threads(nthreads)

    sup = synthetic_supervision(S, T, P)
    buf = torch.zeros(S, T, P)
    med, mn, cpu, peak = timed(lambda: numerator_forward_backward(sup, x, buf, backend="cpp"),
                               args.repeats)
    res["num"] = med
    rows.append(("num C++ (%d arcs)" % sup.fst.num_arcs, med, mn, cpu, peak))

    crit = ChainLoss(g, ChainOptions(leaky_hmm_coefficient=leaky), num_threads=1)
    xg = x.clone().requires_grad_()

    def full():
        xg.grad = None
        crit(xg, sup).loss.backward()
    med, mn, cpu, peak = timed(full, args.repeats)
    rows.append(("ChainLoss fwd+bwd C++ 1 thread", med, mn, cpu, peak))

    # Consistency of the paths timed above.
    a = denominator_forward_backward(g, x, leaky, num_threads=1)
    b = denominator_forward_backward(g, x, leaky, backend="torch")
    print("check: C++ vs torch logprob max diff %.2e, posterior max diff %.2e, ok=%s"
          % (float((a.logprob - b.logprob).abs().max()), float((a.post - b.post).abs().max()), a.ok))

    print()
    print("%-40s %10s %10s %10s %10s" % ("what", "median s", "min s", "min cpu s", "peak MiB"))
    for name, med, mn, cpu, peak in rows:
        print("%-40s %10.4f %10.4f %10.4f %10.1f" % (name, med, mn, cpu, peak))
    print()
    print("speed-up of C++ 1 thread over Kaldi (timing.json): %.1fx by median wall time, "
          "%.1fx by CPU time (goal >= 5x)" % (k_med / res["cpp1"], k_med / rows[0][3]))
    print("2 threads vs 1 thread (median wall): %.2fx" % (res["cpp1"] / res["cpp2"]))
    print("torch path vs C++ 1 thread: %.1fx slower" % (res["torch"] / res["cpp1"]))
    if "baseline" in res:
        print("plain PyTorch baseline vs C++ 1 thread: %.1fx slower; vs torch path: %.1fx slower"
              % (res["baseline"] / res["cpp1"], res["baseline"] / res["torch"]))
    print("numerator / denominator (1 thread): %.1f%% (goal <= 10%%)" % (100 * res["num"] / res["cpp1"]))


if __name__ == "__main__":
    main()
