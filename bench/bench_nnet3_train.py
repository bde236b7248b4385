#!/usr/bin/env python3
"""Training speed of a Kaldi nnet3 model in pkwrap (issue 11 item 3, issue 15): the
compiled evaluation plan (pkwrap.nnet3.plan, the default) against the interval evaluation
(``Nnet3.compiled = False``), in the same process, interleaved.

Model: the kaldi_recipe fixture's ``exp/chain/tdnn/0.mdl`` (tdnn_1k-like: i-vector, idct,
batchnorm, spec-augment, delta, TDNN-F layers of time stride 1/0/3, prefinal layers, chain
and xent outputs; 495k parameters), frame subsampling 3, training mode. Minibatch: 64
chunks of 164 input frames (N(0,1) features, N(0,1) i-vectors): 48 output frames each.

Two measurements per path, each the median over ``--rounds`` of the mean of ``--steps``
timed calls after ``--warmup`` calls:

* ``fwd+bwd``: forward of both outputs and backward of the sum of their elements;
* ``step``: a full NG-SGD step as chain training does it: forward, ``pkwrap.chain.ChainLoss``
  (leaky-HMM 0.1, xent 0.1) on the fixture's den.fst with a synthetic numerator (3 states
  per output frame, as bench/bench_train_step.py), backward, ``pkwrap.optim.NGSGD`` step
  (max-param-change 2) and the batchnorm statistics scaled by 0.8.

The process keeps freed memory for reuse, as pkwrap.train's Trainer does
(``pkwrap.train.keep_freed_memory``; PKWRAP_KEEP_FREED_MEMORY=0 turns it off). The two
paths use separate copies of the model (same start). Threads: ``--threads``
(default 1; set before torch starts its pools). With one thread the times are the
process's CPU time (``time.process_time``), which other work on a shared machine does not
inflate; with more, wall time.

Usage:
  python3 bench/bench_nnet3_train.py [--rounds 5] [--steps 3] [--warmup 2] [--threads 1]
                                     [--model PATH] [--den PATH]
"""
import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = Path("/work/shared/fixtures/kaldi_recipe/exp/chain/tdnn")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=str(RECIPE / "0.mdl"))
    ap.add_argument("--den", default=str(RECIPE / "den.fst"))
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--frames", type=int, default=164)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch
    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(ROOT))
    from pkwrap.train import keep_freed_memory
    keep_freed_memory()  # as pkwrap.train's Trainer does on the CPU (both paths)
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_train_step import numerator
    from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
    from pkwrap.nn import load_kaldi_nnet3
    from pkwrap.nnet3.components import BatchNormComponent
    from pkwrap.optim import NGSGD, kaldi_param_groups

    base = load_kaldi_nnet3(a.model)
    base.frame_subsampling_factor = 3
    base.train()
    S = a.chunks
    g = torch.Generator().manual_seed(1)
    x = torch.randn(S, a.frames, base.input_dim("input"), generator=g)
    iv = torch.randn(S, base.input_dim("ivector"), generator=g)
    P = base.output_dim("output")
    l, r = base.context("output")
    T = (a.frames - 1 - l - r) // 3 + 1
    sup = numerator(S, T, P)
    den = DenominatorGraph.from_fst(a.den, P)
    print("model %s: %d parameters, context %d/%d; minibatch %d x %d frames -> %d outputs, "
          "%d thread(s)" % (a.model, sum(p.numel() for p in base.parameters()), l, r, S,
                            a.frames, T, a.threads))

    def setup(compiled):
        m = copy.deepcopy(base)
        m.compiled = compiled
        loss = ChainLoss(den, ChainOptions(leaky_hmm_coefficient=0.1, xent_regularize=0.1))
        opt = NGSGD(kaldi_param_groups(m), lr=0.002, max_param_change=2.0)
        return m, loss, opt

    paths = {"interval (old)": setup(False), "compiled plan": setup(True)}

    def fwd_bwd(m, loss, opt):
        out = m(x, iv)
        sum(v.sum() for v in out.values()).backward()
        m.zero_grad(set_to_none=True)

    def step(m, loss, opt):
        opt.zero_grad(set_to_none=True)
        out = m(x, iv)
        res = loss(out["output"], sup, xent_output=out["output-xent"])
        res.loss.backward()
        opt.step(num_sequences=S)
        with torch.no_grad():
            for c in m.components:
                if isinstance(c, BatchNormComponent):
                    c.count.mul_(0.8)

    # CPU time of this process (the machine may be shared: wall time is not ours alone)
    clock = time.process_time if a.threads == 1 else time.perf_counter
    res = {(k, w): [] for k in paths for w in ("fwd+bwd", "step")}
    for rnd in range(a.rounds):
        for what, fn in (("fwd+bwd", fwd_bwd), ("step", step)):
            for k, p in paths.items():
                for _ in range(a.warmup if rnd == 0 else 0):
                    fn(*p)
                t0 = clock()
                for _ in range(a.steps):
                    fn(*p)
                res[(k, what)].append((clock() - t0) / a.steps)
    for what in ("fwd+bwd", "step"):
        old = res[("interval (old)", what)]
        new = res[("compiled plan", what)]
        ratio = statistics.median(o / n for o, n in zip(old, new))
        print("%-8s  interval (old) %.3f s   compiled plan %.3f s   speed-up x%.2f "
              "(median of %d same-round ratios)" % (what, statistics.median(old),
                                                    statistics.median(new), ratio, a.rounds))


if __name__ == "__main__":
    main()
