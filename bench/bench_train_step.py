#!/usr/bin/env python3
"""Throughput of one full chain training step (issue 5, item 6).

Step = forward of the tdnn_1j-size TDNNFModel (40-dim input, tdnn1 768, 12 TDNN-F layers
768/96 with 1j's time strides, prefinal layers, 2051-pdf chain and xent heads; about 5.0M
parameters), ChainLoss (leaky-HMM 0.1, xent 0.1) on the bench den.fst, backward with
natural-gradient preconditioning (pkwrap.nn layers), NG-SGD update (max-change,
max-param-change 2) and the batchnorm stats scaling, i.e. pkwrap.train's step, on a
minibatch of 64 sequences x 150 frames (64 x 50 outputs at frame subsampling 3; 206 input
frames per sequence with the model's 29/29 context). Inputs are N(0,1) features and a
synthetic numerator (3 states per output frame, fully connected between frames).

Each setting runs in its own process (OMP_NUM_THREADS and torch threads set before
import): NG-SGD with 1 and 2 threads, and, as the in-run baseline, the same step with
natural gradient turned off (plain gradients, same optimizer). Kaldi's nnet3-chain-train
on this machine kind, same network and minibatch (tests/fixtures/kaldi/README.md):
3.21 s per minibatch on one thread (1000 output frames/s), 2.44 s with two; natural
gradient adds 14%.

Timing: after --warmup steps (default 11: Kaldi's preconditioners update on each of the
first 10 minibatches, then on every 4th), the mean of --steps steps (default 4, so one
Fisher-estimate update per 4 steps, as in steady-state training).

Workers run with OMP_WAIT_POLICY=PASSIVE unless it is set.

``--baseline DIR`` also runs every setting with the pkwrap of another checkout (e.g. a
``git worktree`` of an older commit; copy the built ``pkwrap/_pkwrap*.so`` into it) first on
its PYTHONPATH, interleaved with this checkout's, and prints the ratios, so that
before/after comparisons come from one run on the same (shared, noisy) machine.

Usage:
  python3 bench/bench_train_step.py [--steps 4] [--warmup 11] [--threads 1,2]
                                    [--baseline DIR]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tests" / "fixtures" / "kaldi" / "bench"
KALDI_S_PER_MB = {1: 3.21, 2: 2.44}
S, T, F, P = 64, 50, 40, 2051


def numerator(S, T, P, seed=0, k=3):
    """A chain supervision for S sequences of T frames: per frame k states, every state of
    frame t linked to every state of frame t+1 with a random pdf and weight; the sequences
    are concatenated (sequence 0 first) as merged Kaldi supervision is."""
    import numpy as np
    from pkwrap.kaldi.chain_egs import Supervision
    from pkwrap.kaldi.fst import Fst
    rng = np.random.default_rng(seed)
    frames = S * T
    arcs = []
    for j in range(k):
        arcs.append((0, int(rng.integers(P)) + 1, 0, float(rng.uniform(0, 1)), 1 + j))
    for tau in range(1, frames):
        for i in range(k):
            for j in range(k):
                lab = int(rng.integers(P)) + 1
                arcs.append((1 + (tau - 1) * k + i, lab, lab, float(rng.uniform(0, 1)),
                             1 + tau * k + j))
    arcs = [(a[0], a[1], a[1], a[3], a[4]) for a in arcs]
    fst = Fst.from_arcs(1 + frames * k, 0, arcs, {1 + (frames - 1) * k + j: 0.0 for j in range(k)})
    return Supervision(weight=1.0, num_sequences=S, frames_per_sequence=T, label_dim=P, fst=fst)


def worker(threads: int, natural: bool, steps: int, warmup: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
    from pkwrap.nn import TDNNFModel, scale_batchnorm_stats
    from pkwrap.optim import NGSGD, kaldi_param_groups
    from pkwrap.train.context import probe_model_context
    from pkwrap.train.data import ChainBatch
    from pkwrap.train.diagnostics import compute_chain_loss

    torch.manual_seed(0)
    model = TDNNFModel.tdnn_1j(P, feat_dim=F)
    n_params = sum(p.numel() for p in model.parameters())
    if not natural:
        for m in model.modules():
            if hasattr(m, "use_natural_gradient"):
                m.use_natural_gradient = False
    ctx = probe_model_context(model, F)
    t_in = ctx.num_input_frames(T)
    den = DenominatorGraph.from_fst(str(BENCH / "den.fst"), P)
    loss_fn = ChainLoss(den, ChainOptions(leaky_hmm_coefficient=0.1, xent_regularize=0.1))
    opt = NGSGD(kaldi_param_groups(model), lr=0.002, max_param_change=2.0)
    feats = torch.randn(S, t_in, F, generator=torch.Generator().manual_seed(1))
    batch = ChainBatch(feats, numerator(S, T, P), None, ctx.left_context)
    model.train()
    times, objf = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        res = compute_chain_loss(model, ctx, loss_fn, batch)
        res.loss.backward()
        opt.step(num_sequences=S)
        scale_batchnorm_stats(model, 0.8)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
        objf.append(res.objf / res.weight)
    import pkwrap
    return {"threads": threads, "natural_gradient": natural, "params": n_params,
            "pkwrap": str(Path(pkwrap.__file__).resolve().parents[1]),
            "input_frames": t_in, "times": times, "mean_s": statistics.mean(times),
            "objf_per_frame": objf}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per setting")
    ap.add_argument("--warmup", type=int, default=11, help="untimed steps first")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="also time the pkwrap of this checkout (before/after ratios)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        threads, natural = args.worker.split(",")
        print(json.dumps(worker(int(threads), natural == "1", args.steps, args.warmup)))
        return
    settings = [(int(t), True) for t in args.threads.split(",")]
    settings += [(int(t), False) for t in args.threads.split(",")]
    roots = [ROOT] + ([Path(args.baseline).resolve()] if args.baseline else [])
    results, base_results = [], []
    for (threads, natural), root in [(st, r) for st in settings for r in roots]:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        # threads that wait sleep instead of spinning: on a shared (or 2-core) machine a
        # spinning OpenMP thread steals the core its partner needs (2 threads: 9 s/step
        # spinning vs 1.6 s passive, measured here under load)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps),
                              "--warmup", str(args.warmup),
                              "--worker", "%d,%d" % (threads, natural)], env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit("worker failed:\n" + out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if Path(r["pkwrap"]) != root:
            sys.exit("worker imported pkwrap from %s, not %s" % (r["pkwrap"], root))
        (results if root == ROOT else base_results).append(r)
    frames = S * T
    r0 = results[0]
    print("model: TDNNFModel.tdnn_1j(%d): %d parameters; minibatch %d x %d frames (%d x %d "
          "outputs, %d input frames per sequence)" % (P, r0["params"], S, 3 * T, S, T,
                                                       r0["input_frames"]))
    print("%-26s %10s %12s %16s %14s" % ("setting", "s/step", "frames/s", "Kaldi frames/s",
                                         "vs Kaldi"))
    for r in results:
        name = "%s, %d thread%s" % ("NG-SGD" if r["natural_gradient"] else "no NG",
                                    r["threads"], "s" if r["threads"] > 1 else "")
        fps = frames / r["mean_s"]
        k = KALDI_S_PER_MB.get(r["threads"])
        kaldi_fps = frames / k if k and r["natural_gradient"] else float("nan")
        print("%-26s %10.3f %12.0f %16.0f %13.2fx" % (name, r["mean_s"], fps, kaldi_fps,
                                                      fps / kaldi_fps))
    for r in results:
        if r["natural_gradient"]:
            plain = [q for q in results if not q["natural_gradient"] and
                     q["threads"] == r["threads"]]
            if plain:
                print("natural gradient overhead (%d thread%s, same run): %+.0f%% (Kaldi: +14%%)"
                      % (r["threads"], "s" if r["threads"] > 1 else "",
                         100 * (r["mean_s"] / plain[0]["mean_s"] - 1)))
    if base_results:
        print("baseline %s:" % roots[1])
        print("%-26s %10s %12s %18s" % ("setting", "s/step", "frames/s", "speed-up vs base"))
        for r, b in zip(results, base_results):
            name = "%s, %d thread%s" % ("NG-SGD" if r["natural_gradient"] else "no NG",
                                        r["threads"], "s" if r["threads"] > 1 else "")
            print("%-26s %10.3f %12.0f %17.2fx" % (name, b["mean_s"], frames / b["mean_s"],
                                                   b["mean_s"] / r["mean_s"]))
    print("per-step times: " + "; ".join("%s/%dt: %s" % ("ng" if r["natural_gradient"] else
                                                        "plain", r["threads"],
                                                        ", ".join("%.3f" % t for t in r["times"]))
                                         for r in results + base_results))


if __name__ == "__main__":
    main()
