#!/usr/bin/env python3
"""The measurement behind making TDNNFModel an nnet3 network (issue 11 item 3): the old
hand-built TDNNFModel forward + backward against the same network as a pkwrap.nnet3.Nnet3
through its compiled plan (``TDNNFModel.to_nnet3()``), in the same process, interleaved,
median of --rounds rounds (each the mean of --steps calls after --warmup calls of each),
1 thread, process CPU time (as bench/bench_nnet3_train.py).

It needs the old layout, which this branch removed (``to_nnet3`` and the tuple forward):
run it from a checkout before the change, e.g.

  git worktree add /tmp/pkwrap-old 6fcf02c && cp pkwrap/_pkwrap*.so /tmp/pkwrap-old/pkwrap/
  cd /tmp/pkwrap-old && python3 <this checkout>/bench/bench_tdnnf_old_vs_plan.py --config 1j

Configs: ``1j`` (TDNNFModel.tdnn_1j(2051), 5.0M parameters, 64 x 206 frames -> 50
outputs), ``digits`` (egs/digits/train.py's model, 60 pdfs, no xent head).
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, os.getcwd())
from pkwrap.train import keep_freed_memory  # noqa: E402
from pkwrap.nn import TDNNFModel  # noqa: E402

keep_freed_memory()
if not hasattr(TDNNFModel, "to_nnet3"):
    sys.exit("bench_tdnnf_old_vs_plan.py: %s has the unified TDNNFModel (an Nnet3 already): "
             "run this from a checkout of the old layout (see the docstring)"
             % os.path.dirname(sys.modules["pkwrap"].__file__))

ap = argparse.ArgumentParser()
ap.add_argument("--config", default="1j")
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--warmup", type=int, default=11)
ap.add_argument("--chunks", type=int, default=64)
ap.add_argument("--outputs", type=int, default=50)
a = ap.parse_args()
torch.manual_seed(0)
if a.config == "1j":
    m = TDNNFModel.tdnn_1j(2051)
else:  # egs/digits train.py's model (spec-augment off), 60 pdfs
    m = TDNNFModel(60, feat_dim=40, tdnn_dim=256, tdnnf_dim=256, bottleneck_dim=64,
                   time_strides=(1, 1, 1, 0, 3, 3, 3, 3), prefinal_dim=128, prefinal_big_dim=256,
                   use_idct=False, use_delta=True, l2_regularize=0.01, xent_head=False)
with torch.no_grad():
    for p in (m.output, getattr(m, "output_xent", None)):
        if p is not None:
            p.weight.normal_(0, 0.1)
m.train()
net = m.to_nnet3().train()
T_in = m.left_context + m.right_context + (a.outputs - 1) * 3 + 1
x = torch.randn(a.chunks, T_in, m.feat_dim, generator=torch.Generator().manual_seed(1))
print("config %s: %d params, %d x %d frames -> %d outputs" % (a.config, sum(p.numel() for p in m.parameters()), a.chunks, T_in, a.outputs))

def old():
    c, e = m(x)
    (c.sum() + (e.sum() if e is not None else 0)).backward()
    m.zero_grad(set_to_none=True)

def new():
    out = net(x)
    sum(v.sum() for v in out.values()).backward()
    net.zero_grad(set_to_none=True)

paths = {"old TDNNFModel": old, "Nnet3 plan": new}
res = {k: [] for k in paths}
for r in range(a.rounds):
    for k, fn in paths.items():
        for _ in range(a.warmup if r == 0 else 0):
            fn()
        t0 = time.process_time()
        for _ in range(a.steps):
            fn()
        res[k].append((time.process_time() - t0) / a.steps)
o, n = res["old TDNNFModel"], res["Nnet3 plan"]
print("old %s" % ["%.3f" % v for v in o])
print("new %s" % ["%.3f" % v for v in n])
print("fwd+bwd: old TDNNFModel %.3f s  Nnet3 plan %.3f s  plan/old ratio %.3f (median of %d same-round ratios)"
      % (statistics.median(o), statistics.median(n), statistics.median(b / c for c, b in zip(o, n)), a.rounds))
