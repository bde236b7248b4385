#!/usr/bin/env python3
"""Loading speed of a large Kaldi ``final.mdl`` (issue 11's bar: a 20M-parameter binary
``final.mdl`` loads in under 2 s).

Builds, with :func:`pkwrap.nnet3.nnet3_from_config`, a TDNN-F chain network of the size of
Kaldi's largest TDNN-F recipes (Switchboard ``tdnn_7q``-like: i-vector input, tdnn1 of 1536,
15 TDNN-F layers 1536 / bottleneck 160 with time strides 1,1,1,0,3,...; prefinal layers 256
/ 1536; chain and xent outputs of 6000 pdfs; about 19.9M parameters), writes it as a binary
``final.mdl`` with a transition model (the kaldi_recipe fixture's, whose pdf count is not
checked against the network here), and times:

* ``load_kaldi_nnet3(final.mdl)``: parse Kaldi's binary format into an ``nn.Module``;
* the baseline, in the same process: ``torch.load`` of the same parameters and buffers
  saved with ``torch.save`` (a plain state dict: the cost of just reading the numbers).

Reports the median over ``--rounds`` of each and the ratio. Threads: 1 by default.

Usage: python3 bench/bench_nnet3_load.py [--rounds 5] [--threads 1] [--keep DIR]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRANS = ROOT / "tests" / "fixtures" / "kaldi_recipe_egs_small" / "kaldi" / "0.trans_mdl"


def config(pdfs=6000, dim=1536, bottleneck=160, prefinal=256,
           strides=(1, 1, 1, 0, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3)) -> str:
    """Config lines of the network, as xconfig_to_configs.py expands such an xconfig."""
    L = ["input-node name=input dim=40", "input-node name=ivector dim=100"]

    def ng(name, i, o, extra=""):
        L.append("component name=%s type=NaturalGradientAffineComponent input-dim=%d "
                 "output-dim=%d max-change=0.75 l2-regularize=0.01%s" % (name, i, o, extra))

    def relu_bn(prefix, d, inp):
        L.append("component name=%s.relu type=RectifiedLinearComponent dim=%d" % (prefix, d))
        L.append("component-node name=%s.relu component=%s.relu input=%s" % (prefix, prefix, inp))
        L.append("component name=%s.batchnorm type=BatchNormComponent dim=%d" % (prefix, d))
        L.append("component-node name=%s.batchnorm component=%s.batchnorm input=%s.relu"
                 % (prefix, prefix, prefix))
        return prefix + ".batchnorm"

    ng("tdnn1.affine", 3 * 40 + 100, dim)
    L.append("component-node name=tdnn1.affine component=tdnn1.affine "
             "input=Append(Offset(input, -1), input, Offset(input, 1), "
             "ReplaceIndex(ivector, t, 0))")
    prev = relu_bn("tdnn1", dim, "tdnn1.affine")
    for i, s in enumerate(strides, 2):
        n = "tdnnf%d" % i
        offs = "-%d,0" % s if s else "0"
        L.append("component name=%s.linear type=TdnnComponent input-dim=%d output-dim=%d "
                 "time-offsets=%s use-bias=false orthonormal-constraint=-1.0 "
                 "l2-regularize=0.01 max-change=0.75" % (n, dim, bottleneck, offs))
        L.append("component-node name=%s.linear component=%s.linear input=%s" % (n, n, prev))
        L.append("component name=%s.affine type=TdnnComponent input-dim=%d output-dim=%d "
                 "time-offsets=%s l2-regularize=0.01 max-change=0.75"
                 % (n, bottleneck, dim, offs.replace("-", "") if s else "0"))
        L.append("component-node name=%s.affine component=%s.affine input=%s.linear" % (n, n, n))
        bn = relu_bn(n, dim, n + ".affine")
        L.append("component name=%s.noop type=NoOpComponent dim=%d" % (n, dim))
        L.append("component-node name=%s.noop component=%s.noop input=Sum(Scale(0.66, %s), %s)"
                 % (n, n, prev, bn))
        prev = n + ".noop"
    L.append("component name=prefinal-l type=LinearComponent input-dim=%d output-dim=%d "
             "l2-regularize=0.01 orthonormal-constraint=-1.0 max-change=0.75" % (dim, prefinal))
    L.append("component-node name=prefinal-l component=prefinal-l input=%s" % prev)
    for head, out in (("prefinal-chain", "output"), ("prefinal-xent", "output-xent")):
        ng(head + ".affine", prefinal, dim)
        L.append("component-node name=%s.affine component=%s.affine input=prefinal-l"
                 % (head, head))
        b = relu_bn(head, dim, head + ".affine")
        L.append("component name=%s.linear type=LinearComponent input-dim=%d output-dim=%d "
                 "l2-regularize=0.01 orthonormal-constraint=-1.0 max-change=0.75"
                 % (head, dim, prefinal))
        L.append("component-node name=%s.linear component=%s.linear input=%s" % (head, head, b))
        L.append("component name=%s.batchnorm2 type=BatchNormComponent dim=%d"
                 % (head, prefinal))
        L.append("component-node name=%s.batchnorm2 component=%s.batchnorm2 input=%s.linear"
                 % (head, head, head))
        ng(out + ".affine", prefinal, pdfs, " param-stddev=0.0 bias-stddev=0.0")
        L.append("component-node name=%s.affine component=%s.affine input=%s.batchnorm2"
                 % (out, out, head))
        if out == "output":
            L.append("output-node name=output input=output.affine objective=linear")
        else:
            L.append("component name=output-xent.log-softmax type=LogSoftmaxComponent dim=%d"
                     % pdfs)
            L.append("component-node name=output-xent.log-softmax "
                     "component=output-xent.log-softmax input=output-xent.affine")
            L.append("output-node name=output-xent input=output-xent.log-softmax "
                     "objective=linear")
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", default=None, help="write the model here and keep it")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(a.threads)
    from pkwrap.nn import load_kaldi_nnet3, save_kaldi_nnet3
    from pkwrap.nnet3 import nnet3_from_config
    from pkwrap.kaldi.hmm import read_transition_model as read_tm

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(a.keep or tmp)
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        net = nnet3_from_config(config(), srand=0)
        t_init = time.perf_counter() - t0
        n_params = sum(p.numel() for p in net.parameters())
        mdl = d / "final.mdl"
        t0 = time.perf_counter()
        save_kaldi_nnet3(net, mdl, binary=True, trans_model=read_tm(str(TRANS)))
        t_save = time.perf_counter() - t0
        pt = d / "final_state.pt"
        torch.save(net.state_dict(), pt)
        del net
        print("network: %d parameters (%.1fM); final.mdl %.1f MB (nnet3_from_config %.1f s, "
              "save_kaldi_nnet3 %.1f s); %d thread(s)"
              % (n_params, n_params / 1e6, mdl.stat().st_size / 1e6, t_init, t_save, a.threads))
        loads, bases = [], []
        for r in range(a.rounds):
            t0 = time.perf_counter()
            m = load_kaldi_nnet3(mdl)
            loads.append(time.perf_counter() - t0)
            assert sum(p.numel() for p in m.parameters()) == n_params
            del m
            t0 = time.perf_counter()
            sd = torch.load(pt)
            bases.append(time.perf_counter() - t0)
            del sd
        lo, ba = statistics.median(loads), statistics.median(bases)
        print("load_kaldi_nnet3(final.mdl): median %.3f s over %d rounds (%s)"
              % (lo, a.rounds, " ".join("%.3f" % x for x in loads)))
        print("torch.load(state dict):      median %.3f s (%s)"
              % (ba, " ".join("%.3f" % x for x in bases)))
        print("ratio load_kaldi_nnet3 / torch.load: x%.2f; bar: under 2 s -> %s"
              % (lo / ba, "met" if lo < 2.0 else "NOT met"))


if __name__ == "__main__":
    main()
