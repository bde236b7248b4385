#!/usr/bin/env python3
"""Benchmark of natural-gradient SGD (issue 3, item 5).

Two measurements, each a ratio against a baseline timed in this same process (the machine is
shared: absolute times are noisy, ratios less so):

1. Convergence: steps to reach a target frame cross-entropy for a small TDNN-F (pkwrap.nn
   TDNNFModel, xent head) on synthetic data: frames labelled by a fixed random "teacher" TDNN-F
   (argmax of its output), so the task is learnable and has a known floor.  Compared: NGSGD
   with natural gradient (Kaldi's update: max-change, NG layers), the same optimizer with
   natural gradient turned off, and plain torch.optim.SGD; each at a few learning rates (the best
   one is reported), the same data order and initial model for all.
2. Overhead: one training step (forward + backward) of a 1536 -> 1536 affine layer on a
   6400-row minibatch, NaturalAffine vs the same layer with natural gradient off (same GEMM
   backend; nn.Linear shown too), averaged over a multiple of the update period (so 1 in 4
   steps also updates the Fisher estimates).  Goal: < 25% over plain backward.

Usage:
  python3 bench/bench_ngsgd.py [--threads 1] [--steps 400] [--targets 2.6 2.4 2.3]
                               [--overhead-reps 8] [--skip-convergence] [--skip-overhead]
                               [--tdnn-1j [--tdnn-1j-sequences 8]]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pkwrap.nn import NaturalAffine, TDNNFModel, natural_gradient_modules, scale_batchnorm_stats  # noqa: E402
from pkwrap.optim import NGSGD, kaldi_param_groups  # noqa: E402

FEAT, PDFS, B, T_IN = 20, 24, 8, 60


def small_model(seed):
    torch.manual_seed(seed)
    return TDNNFModel(PDFS, feat_dim=FEAT, tdnn_dim=96, tdnnf_dim=96, bottleneck_dim=24,
                      time_strides=(1, 1, 0, 3, 3), prefinal_dim=24, prefinal_big_dim=96,
                      use_idct=False)


def make_data(num_batches, seed=0):
    """Synthetic frames and labels.

    z ~ N(0, 1); the features are x = z M + 0.5 with a badly conditioned mixing M (scales 0.1
    to 10: the case natural gradient is for).  The label of output frame j (input frame
    l + 3 j) is the argmax of a fixed random linear "teacher" on z at frames -1, 0, +1 around
    it, so the task is learnable with the student's context.
    """
    g = torch.Generator().manual_seed(1000)
    mix = torch.randn(FEAT, FEAT, generator=g) * torch.logspace(-1, 1, FEAT)[None, :]
    teacher = torch.randn(3 * FEAT, PDFS, generator=g)
    lc = small_model(0).left_context
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(num_batches):
        z = torch.randn(B, T_IN, FEAT, generator=g)
        frames = torch.arange(lc, T_IN - lc, 3)
        ctx = torch.cat([z[:, frames - 1], z[:, frames], z[:, frames + 1]], dim=-1)
        data.append((z @ mix + 0.5, (ctx @ teacher).argmax(-1)))
    return data


def xent_loss(model, x, y):
    logp = model(x, output="output-xent")
    return -logp.gather(-1, y.unsqueeze(-1)).sum()  # sum over frames, as Kaldi


def eval_loss(model, data):
    with torch.no_grad():
        frames = sum(y.numel() for _, y in data)
        return sum(float(xent_loss(model, x, y)) for x, y in data) / frames


def run(kind, lr, train, valid, steps, targets):
    model = small_model(7)
    if kind == "ngsgd-no-ng":
        for _, m in natural_gradient_modules(model):
            m.use_natural_gradient = False
    if kind == "torch-sgd":
        for _, m in natural_gradient_modules(model):
            m.use_natural_gradient = False
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        opt = NGSGD(kaldi_param_groups(model), lr=lr)
    curve = []
    reached = {t: None for t in targets}
    for step in range(steps):
        x, y = train[step % len(train)]
        opt.zero_grad()
        loss = xent_loss(model, x, y)
        loss.backward()
        if kind == "torch-sgd":
            opt.step()
        else:
            opt.step(num_sequences=x.shape[0])
        scale_batchnorm_stats(model, 0.8)
        if (step + 1) % 10 == 0:
            v = eval_loss(model, valid)
            curve.append(v)
            for t in targets:
                if reached[t] is None and v <= t:
                    reached[t] = step + 1
            if not v == v:  # diverged
                break
    return reached, curve


def convergence(args):
    train = make_data(args.steps, seed=1)  # fresh data every step: no over-fitting
    valid = make_data(4, seed=2)
    targets = sorted(args.targets, reverse=True)
    print(f"== convergence: TDNN-F ({sum(p.numel() for p in small_model(7).parameters())} params), "
          f"{B} x {T_IN} input frames/minibatch, {PDFS} classes, loss summed over frames; "
          f"valid xent per frame every 10 steps; targets {targets}")
    grids = {"ngsgd": [1e-3, 3e-3, 1e-2], "ngsgd-no-ng": [1e-3, 3e-3, 1e-2],
             "torch-sgd": [3e-4, 1e-3, 3e-3, 1e-2]}
    best = {}
    for kind, lrs in grids.items():
        for lr in lrs:
            t0 = time.time()
            reached, curve = run(kind, lr, train, valid, args.steps, targets)
            final = curve[-1] if curve else float("nan")
            print(f"  {kind:12s} lr={lr:<7g} steps-to-target " +
                  " ".join(f"{t}:{reached[t]}" for t in targets) +
                  f"  final valid xent={final:.3f}  ({time.time() - t0:.1f}s)", flush=True)
            for t in targets:
                key = (reached[t] if reached[t] is not None else 10 ** 9, final)
                if (kind, t) not in best or key < best[(kind, t)][0]:
                    best[(kind, t)] = (key, lr, reached[t])
    print(f"  best learning rate per method and target (None = not reached in {args.steps} steps):")
    for t in targets:
        row = "  ".join(f"{kind}={best[(kind, t)][2]} (lr {best[(kind, t)][1]:g})" for kind in grids)
        print(f"    target {t}: {row}")
        a, b = best[("ngsgd", t)][2], best[("ngsgd-no-ng", t)][2]
        if a and b:
            print(f"      NG-SGD / same update without NG: {a / b:.2f}x the steps")


def overhead(args):
    N, D = 6400, 1536
    torch.manual_seed(0)
    x = torch.randn(N, D)
    g = torch.randn(N, D)
    torch_linear = nn.Linear(D, D)
    ng = NaturalAffine(D, D)
    # the baseline: the same layer with natural gradient off, so both use the same GEMMs
    # (pkwrap's oneDNN products; nn.Linear's are torch's MKL ones, shown for reference)
    plain = NaturalAffine(D, D)
    plain.use_natural_gradient = False
    with torch.no_grad():
        for m in (ng, plain):
            m.weight.copy_(torch_linear.weight)
            m.bias.copy_(torch_linear.bias)

    def step(layer):
        layer.weight.grad = layer.bias.grad = None
        xi = x.requires_grad_(True)
        y = layer(xi)
        y.backward(g)
        xi.grad = None

    # Warm-up.  The preconditioners update on each of their first 11 calls, then on 1 in 4:
    # bring NG to that steady state with cheap 640-row calls (its cost does not depend on
    # the values of its state), then one full-size step each.
    xs, gs = x[:640].clone(), g[:640].clone()
    for _ in range(11):
        ng.weight.grad = ng.bias.grad = None
        ng(xs.requires_grad_(True)).backward(gs)
    for layer in (plain, ng, torch_linear):
        step(layer)
    reps = max(4, args.overhead_reps // 4 * 4)  # a multiple of the update period
    t_plain, t_ng, t_torch = [], [], []
    for _ in range(reps):  # interleaved, so load changes hit both
        t0 = time.perf_counter()
        step(plain)
        t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        step(ng)
        t_ng.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        step(torch_linear)
        t_torch.append(time.perf_counter() - t0)
    mp, mn = statistics.mean(t_plain), statistics.mean(t_ng)
    print(f"== overhead: {D} -> {D} affine, {N} rows, forward+backward, {reps} steps each "
          f"(NG updates its estimate on 1 step in 4)")
    print(f"  nn.Linear     mean {statistics.mean(t_torch) * 1e3:8.1f} ms  "
          f"(median {statistics.median(t_torch) * 1e3:.1f}; torch's own GEMMs)")
    print(f"  NG off        mean {mp * 1e3:8.1f} ms  (median {statistics.median(t_plain) * 1e3:.1f})")
    print(f"  NaturalAffine mean {mn * 1e3:8.1f} ms  (median {statistics.median(t_ng) * 1e3:.1f})")
    print(f"  NG overhead: {100 * (mn / mp - 1):+.1f}% over the same layer with NG off "
          f"(goal < 25%)")


def overhead_tdnn_1j(args):
    """Whole tdnn_1j (5.0M parameters, 2051 pdfs) forward + backward, NG on vs off."""
    torch.manual_seed(0)
    model = TDNNFModel.tdnn_1j(2051)
    S = args.tdnn_1j_sequences
    x = torch.randn(S, 150 + 2 * model.left_context, 40)
    ng_layers = [m for _, m in natural_gradient_modules(model)]

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)
        chain, xent = out["output"], out["output-xent"]
        (chain.square().mean() - xent.mean()).backward()

    for _ in range(12):  # past the 11 initial updates of every preconditioner
        step()
    times = {True: [], False: []}
    for _ in range(args.overhead_reps // 4 * 4 or 4):
        for use in (False, True):
            for m in ng_layers:
                m.use_natural_gradient = use
            t0 = time.perf_counter()
            step()
            times[use].append(time.perf_counter() - t0)
    mp, mn = statistics.mean(times[False]), statistics.mean(times[True])
    print(f"== tdnn_1j ({sum(p.numel() for p in model.parameters())} params), {S} x 150 frames "
          f"(+ context), forward+backward")
    print(f"  natural gradient off: {mp * 1e3:.0f} ms   on: {mn * 1e3:.0f} ms   "
          f"NG overhead {100 * (mn / mp - 1):+.1f}%  (Kaldi nnet3-chain-train: +14% on a whole step)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--targets", type=float, nargs="+", default=[2.6, 2.4, 2.3])
    p.add_argument("--overhead-reps", type=int, default=8)
    p.add_argument("--skip-convergence", action="store_true")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--tdnn-1j", action="store_true",
                   help="also time the whole tdnn_1j network with and without NG (slow)")
    p.add_argument("--tdnn-1j-sequences", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if not args.skip_overhead:
        overhead(args)
    if args.tdnn_1j:
        overhead_tdnn_1j(args)
    if not args.skip_convergence:
        convergence(args)


if __name__ == "__main__":
    main()
