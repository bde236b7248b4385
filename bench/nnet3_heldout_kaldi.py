#!/usr/bin/env python3
"""Held-out check of pkwrap's nnet3 support against real Kaldi on random networks (issue 11's
bar), for developers with a Kaldi build (CI has none; the committed fixtures cover CI).

For each of ``--num`` random networks (seeded): a config mixing the components and
descriptors of Kaldi's TDNN / TDNN-F / CNN-TDNN recipes (Affine, NaturalGradientAffine,
Linear, Tdnn, TimeHeightConvolution, FixedAffine, BatchNorm, RectifiedLinear, Sigmoid,
Tanh, Normalize, LogSoftmax, NoOp, GeneralDropout, Dropout, SpecAugmentTimeMask,
ScaleAndOffset, Permute, ElementwiseProduct; Append, Offset, ReplaceIndex, Sum, Scale,
Const, IfDefined, Round, Switch, Failover, dim-range nodes), with an ``ivector`` input,
an ``output`` of 64 pdfs and sometimes an ``output-xent``:

1. Kaldi's ``nnet3-init`` makes the model (pkwrap's ``nnet3-init`` must accept the same
   config and give the same number of parameters and the same context);
2. Kaldi's and pkwrap's ``nnet3-compute`` on it, in three modes (online i-vectors every 10
   frames in one chunk with frame subsampling 3; 50-frame chunks with extra context;
   utterance i-vectors): max abs difference;
3. pkwrap loads it, perturbs every parameter and batchnorm statistic, writes it (binary or
   text, raw or a final.mdl with a transition model, at random); Kaldi's ``nnet3-info``
   reads it; Kaldi's ``nnet3-compute`` of the written file is compared with pkwrap's;
4. Kaldi's ``nnet3-chain-train`` trains the written model on one minibatch of 4 real chain
   egs (tests/fixtures/kaldi_recipe_egs_small: 40-dim input and i-vector, 64 pdfs) when the
   model's context fits the egs' (12/12).

Prints one line per network and a summary; exits 1 if any comparison fails.

Usage:
  python3 bench/nnet3_heldout_kaldi.py --kaldi-src /path/to/kaldi/src [--num 20] [--seed 1]
      [--keep DIR]
"""
import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EGS = ROOT / "tests" / "fixtures" / "kaldi_recipe_egs_small"
UTT_LENS = {"u1": 47, "u2": 95, "u3": 146}
TOL = 1e-3


# ----------------------------------------------------------------------------- networks
class _Net:
    def __init__(self, rng, workdir: Path):
        self.rng = rng
        self.lines = ["input-node name=input dim=40", "input-node name=ivector dim=40"]
        self.dims = {}
        self.n = 0
        self.workdir = workdir
        self.used = set()

    def name(self, kind):
        self.n += 1
        return "%s%d" % (kind, self.n)

    def comp(self, kind, typ, opts, inp, out_dim):
        k = self.name(kind)
        self.lines.append("component name=%s type=%s %s" % (k, typ, opts))
        self.lines.append("component-node name=%s component=%s input=%s" % (k, k, inp))
        self.dims[k] = out_dim
        self.used.add(typ)
        return k

    def matrix_file(self, rows, cols):
        p = self.workdir / ("mat%d.txt" % self.n)
        m = self.rng.normal(0, 0.3, (rows, cols))
        with open(p, "w") as f:
            f.write(" [\n" + "\n".join("  " + " ".join("%.6f" % v for v in r) for r in m)
                    + " ]\n")
        return p.name


def _first(net: _Net) -> str:
    """The first layer: the features spliced with the i-vector, as recipes do."""
    rng = net.rng
    c = rng.integers(4)
    iv = "ReplaceIndex(ivector, t, 0)"
    if c == 0:
        inp = "Append(Offset(input, -1), input, Offset(input, 1), %s)" % iv
        fn = net.matrix_file(48, 160 + 1)  # FixedAffine with a bias column, like lda.mat
        return net.comp("lda", "FixedAffineComponent", "matrix=%s" % fn, inp, 48)
    if c == 1:
        inp = "Append(input, Scale(0.5, %s))" % iv
        return net.comp("affine", "NaturalGradientAffineComponent",
                        "input-dim=80 output-dim=48 max-change=0.75", inp, 48)
    if c == 2:
        bn = net.comp("bn", "BatchNormComponent", "dim=40 target-rms=1.0", "input", 40)
        sa = net.comp("specaug", "SpecAugmentTimeMaskComponent",
                      "dim=40 zeroed-proportion=0.2 time-mask-max-frames=10", bn, 40)
        inp = "Append(%s, %s)" % (sa, iv)
        return net.comp("tdnn", "TdnnComponent", "input-dim=80 output-dim=48 time-offsets=-1,0,1",
                        inp, 48)
    # a CNN front end: features as height 40 x 1 filter, the i-vector as 40 x 1 more:
    # heights of 2 filters (interleaved by a Permute, as Kaldi's combine-feature-maps-layer)
    perm = ",".join(str(v) for h in range(40) for v in (h, 40 + h))
    pm = net.comp("combine", "PermuteComponent", "column-map=%s" % perm,
                  "Append(input, %s)" % iv, 80)
    return net.comp("conv", "TimeHeightConvolutionComponent",
                    "num-filters-in=2 num-filters-out=3 height-in=40 height-out=20 "
                    "height-subsample-out=2 height-offsets=-1,0,1 time-offsets=-1,0,1 "
                    "max-change=0.5", pm, 60)


def _layer(net: _Net, prev: str, prev2: str) -> str:
    rng = net.rng
    d = net.dims[prev]
    choice = rng.choice(["affine", "ngaffine", "linear", "tdnn", "conv", "bn", "relu", "sigmoid",
                         "tanh", "normalize", "noop", "gdropout", "dropout", "scaleoffset",
                         "permute", "product", "tdnnf", "dimrange", "sumconst", "round",
                         "switch", "failover", "ifdefined"])
    o = int(rng.choice([24, 32, 48]))
    if choice == "affine":
        return net.comp("affine", "AffineComponent", "input-dim=%d output-dim=%d" % (d, o), prev, o)
    if choice == "ngaffine":
        return net.comp("affine", "NaturalGradientAffineComponent",
                        "input-dim=%d output-dim=%d l2-regularize=0.01" % (d, o), prev, o)
    if choice == "linear":
        return net.comp("linear", "LinearComponent",
                        "input-dim=%d output-dim=%d orthonormal-constraint=-1" % (d, o), prev, o)
    if choice == "tdnn":
        offs = sorted(set(int(x) for x in rng.choice([-3, -2, -1, 0, 1, 2, 3],
                                                      size=int(rng.integers(1, 4)))))
        return net.comp("tdnn", "TdnnComponent", "input-dim=%d output-dim=%d time-offsets=%s"
                        % (d, o, ",".join(map(str, offs))), prev, o)
    if choice == "conv":
        f = int(rng.choice([x for x in (2, 3, 4) if d % x == 0] or [1]))
        h = d // f
        sub = int(rng.choice([1, 2])) if h % 2 == 0 else 1
        fo = int(rng.choice([2, 3]))
        ts = rng.choice(["-1,0,1", "-3,0,3", "0", "-1,0"])
        return net.comp("conv", "TimeHeightConvolutionComponent",
                        "num-filters-in=%d num-filters-out=%d height-in=%d height-out=%d "
                        "height-subsample-out=%d height-offsets=-1,0,1 time-offsets=%s"
                        % (f, fo, h, h // sub, sub, ts), prev, fo * (h // sub))
    if choice == "bn":
        b = int(rng.choice([x for x in (d, d // 2, d // 4) if x and d % x == 0]))
        return net.comp("bn", "BatchNormComponent", "dim=%d block-dim=%d target-rms=0.5"
                        % (d, b), prev, d)
    if choice in ("relu", "sigmoid", "tanh", "noop"):
        typ = {"relu": "RectifiedLinearComponent", "sigmoid": "SigmoidComponent",
               "tanh": "TanhComponent", "noop": "NoOpComponent"}[choice]
        return net.comp(choice, typ, "dim=%d" % d, prev, d)
    if choice == "normalize":
        logstd = bool(rng.integers(2))
        return net.comp("norm", "NormalizeComponent", "input-dim=%d target-rms=0.7 "
                        "add-log-stddev=%s" % (d, "true" if logstd else "false"), prev,
                        d + int(logstd))
    if choice == "gdropout":
        return net.comp("gdrop", "GeneralDropoutComponent", "dim=%d dropout-proportion=0.3 "
                        "continuous=true" % d, prev, d)
    if choice == "dropout":
        return net.comp("drop", "DropoutComponent", "dim=%d dropout-proportion=0.2" % d, prev, d)
    if choice == "scaleoffset":
        return net.comp("so", "ScaleAndOffsetComponent", "dim=%d" % d, prev, d)
    if choice == "permute":
        perm = ",".join(str(v) for v in rng.permutation(d))
        return net.comp("perm", "PermuteComponent", "column-map=%s" % perm, prev, d)
    if choice == "product" and d % 2 == 0:
        return net.comp("prod", "ElementwiseProductComponent", "input-dim=%d output-dim=%d"
                        % (d, d // 2), prev, d // 2)
    if choice == "tdnnf":  # linear (offset -s), affine (offset +s), relu, bn, bypass Sum
        s = int(rng.choice([1, 3, 0]))
        b = int(rng.choice([8, 16]))
        lin = net.comp("lin", "TdnnComponent", "input-dim=%d output-dim=%d time-offsets=%s "
                       "use-bias=false orthonormal-constraint=-1" % (d, b, "-%d,0" % s if s else "0"),
                       prev, b)
        aff = net.comp("aff", "TdnnComponent", "input-dim=%d output-dim=%d time-offsets=%s"
                       % (b, d, "0,%d" % s if s else "0"), lin, d)
        r = net.comp("relu", "RectifiedLinearComponent", "dim=%d" % d, aff, d)
        bn = net.comp("bn", "BatchNormComponent", "dim=%d" % d, r, d)
        return net.comp("noop", "NoOpComponent", "dim=%d" % d,
                        "Sum(Scale(0.66, %s), %s)" % (prev, bn), d)
    if choice == "dimrange" and d >= 16:
        k = net.name("range")
        off = int(rng.integers(0, d // 2))
        dim = d - off - int(rng.integers(0, d // 4))
        net.lines.append("dim-range-node name=%s input-node=%s dim-offset=%d dim=%d"
                         % (k, prev, off, dim))
        net.dims[k] = dim
        return k
    if choice == "sumconst":
        return net.comp("noop", "NoOpComponent", "dim=%d" % d,
                        "Sum(%s, Const(0.25, %d))" % (prev, d), d)
    if choice == "round":
        return net.comp("noop", "NoOpComponent", "dim=%d" % d, "Round(%s, 3)" % prev, d)
    if choice == "switch" and prev2 and net.dims[prev2] == d:
        return net.comp("noop", "NoOpComponent", "dim=%d" % d,
                        "Switch(%s, %s)" % (prev, prev2), d)
    if choice == "failover":
        return net.comp("noop", "NoOpComponent", "dim=%d" % d,
                        "Failover(Offset(%s, -4), %s)" % (prev, prev), d)
    if choice == "ifdefined" and prev2 and net.dims[prev2] == d:
        return net.comp("noop", "NoOpComponent", "dim=%d" % d,
                        "Sum(%s, IfDefined(Offset(%s, -3)))" % (prev, prev2), d)
    # an Append with an offset copy of the same node
    return net.comp("affine", "NaturalGradientAffineComponent", "input-dim=%d output-dim=%d"
                    % (2 * d, o), "Append(%s, Offset(%s, 2))" % (prev, prev), o)


def random_config(seed: int, workdir: Path) -> str:
    rng = np.random.default_rng(seed)
    net = _Net(rng, workdir)
    prev2 = None
    prev = _first(net)
    for _ in range(int(rng.integers(3, 8))):
        prev, prev2 = _layer(net, prev, prev2), prev
    d = net.dims[prev]
    out = net.comp("out", "NaturalGradientAffineComponent",
                   "input-dim=%d output-dim=64 param-stddev=0.05 max-change=1.5" % d, prev, 64)
    net.lines.append("output-node name=output input=%s objective=linear" % out)
    if rng.integers(2):
        x = net.comp("xent", "NaturalGradientAffineComponent", "input-dim=%d output-dim=64 "
                     "learning-rate-factor=5" % d, prev, 64)
        ls = net.comp("logsoftmax", "LogSoftmaxComponent", "dim=64", x, 64)
        net.lines.append("output-node name=output-xent input=%s objective=linear" % ls)
    return "\n".join(net.lines) + "\n", sorted(net.used)


# ----------------------------------------------------------------------------- running
def run(cmd, env, cwd):
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def read_ark(path):
    from pkwrap.kaldi.table import read_table
    return {k: np.asarray(v, dtype=np.float32) for k, v in read_table("ark:" + str(path)).items()}


def max_diff(a, b):
    if set(a) != set(b):
        return float("inf")
    worst = 0.0
    for k in a:
        if a[k].shape != b[k].shape:
            return float("inf")
        worst = max(worst, float(np.abs(a[k] - b[k]).max()))
    return worst


def info_context(text):
    lc = rc = None
    for line in text.splitlines():
        if line.startswith("left-context:"):
            lc = int(line.split()[1])
        if line.startswith("right-context:"):
            rc = int(line.split()[1])
        if line.startswith("num-parameters:"):
            n = int(line.split()[1])
    return lc, rc, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kaldi-src", required=True)
    ap.add_argument("--num", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from pkwrap.kaldi.hmm import read_transition_model
    from pkwrap.kaldi.table import TableWriter
    from pkwrap.nn import load_kaldi_nnet3, save_kaldi_nnet3
    # the perturbation of tests/fixtures/kaldi/nnet3_roundtrip (one definition)
    spec = importlib.util.spec_from_file_location(
        "roundtrip_make", ROOT / "tests" / "fixtures" / "kaldi" / "nnet3_roundtrip" / "make.py")
    roundtrip = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roundtrip)
    perturb = roundtrip.perturb
    K = Path(a.kaldi_src)
    kenv = dict(os.environ, PATH=os.pathsep.join(
        [str(K / d) for d in ("nnet3bin", "chainbin", "bin")] + [os.environ["PATH"]]))
    penv = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    py = [sys.executable]
    tmp = Path(a.keep or tempfile.mkdtemp(prefix="nnet3_heldout_"))
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed + 1000)
    with TableWriter("ark,scp:%s/feats.ark,%s/feats.scp" % (tmp, tmp), "matrix") as w:
        for u, n in UTT_LENS.items():
            w[u] = (rng.normal(0, 2, (n, 40))).astype(np.float32)
    with TableWriter("ark,scp:%s/online.ark,%s/online.scp" % (tmp, tmp), "matrix") as w:
        for u, n in UTT_LENS.items():
            w[u] = rng.normal(0, 1, ((n + 9) // 10, 40)).astype(np.float32)
    with TableWriter("ark,scp:%s/uttiv.ark,%s/uttiv.scp" % (tmp, tmp), "vector") as w:
        for u in UTT_LENS:
            w[u] = rng.normal(0, 1, 40).astype(np.float32)
    modes = [
        ("online_fsf3", ["--frame-subsampling-factor=3", "--frames-per-chunk=100000",
                         "--online-ivectors=scp:%s/online.scp" % tmp, "--online-ivector-period=10"]),
        ("online_chunk50_extra", ["--frame-subsampling-factor=3", "--frames-per-chunk=50",
                                  "--extra-left-context=7", "--extra-right-context=2",
                                  "--online-ivectors=scp:%s/online.scp" % tmp,
                                  "--online-ivector-period=10"]),
        ("utt_ivector_fsf1", ["--frame-subsampling-factor=1", "--frames-per-chunk=30",
                              "--ivectors=scp:%s/uttiv.scp" % tmp]),
    ]
    tm = read_transition_model(str(EGS / "kaldi" / "0.trans_mdl"))
    failures, rows, kinds = [], [], set()
    for i in range(a.num):
        seed = a.seed * 1000 + i
        d = tmp / ("net%03d" % i)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        cfg, used = random_config(seed, d)
        kinds.update(used)
        (d / "nnet.config").write_text(cfg)
        notes = []
        rc, out, err = run(["nnet3-init", "nnet.config", "init.raw"], kenv, d)
        if rc != 0:
            rows.append("net%03d: Kaldi's nnet3-init rejects the config (%s)"
                        % (i, err.strip().splitlines()[-1][:120] if err.strip() else rc))
            prc, _, perr = run(py + [str(ROOT / "scripts" / "nnet3-init"), "nnet.config",
                                     "p.raw"], penv, d)
            if prc == 0:
                failures.append("net%03d: pkwrap accepts a config Kaldi rejects" % i)
            continue
        _, kinfo, _ = run(["nnet3-info", "init.raw"], kenv, d)
        klc, krc, kn = info_context(kinfo)
        xent = "0.1" if "output-xent" in cfg else "0.0"

        def chain_train(src, dst):
            """One minibatch of 4 egs: (ok, objective per frame or error)."""
            rc, _, err = run(["nnet3-chain-train", "--use-gpu=no", "--xent-regularize=" + xent,
                              "--leaky-hmm-coefficient=0.1", src, str(EGS / "kaldi" / "den.fst"),
                              "ark:nnet3-chain-merge-egs --minibatch-size=4 ark:%s ark:- | "
                              "nnet3-chain-subset-egs --n=1 ark:- ark:- |"
                              % (EGS / "egs" / "cegs.1.ark"), dst], kenv, d)
            objf = [ln for ln in err.splitlines() if "log-prob-per-frame" in ln]
            if rc != 0:
                return False, err.strip()[-300:]
            return True, objf[-1].split("=")[-1] if objf else "?"

        # the model compared: trained by Kaldi for one minibatch (batchnorm statistics:
        # Kaldi's nnet3-compute of a model without them makes up random ones)
        fits = klc <= 12 and krc <= 12
        if fits:
            ok, why = chain_train("init.raw", "k.raw")
            if not ok:
                failures.append("net%03d: Kaldi nnet3-chain-train fails on its own init: %s"
                                % (i, why))
                continue
        elif "BatchNormComponent" in cfg:
            rows.append("net%03d: context %d/%d > the egs' 12: no batchnorm statistics, "
                        "skipped" % (i, klc, krc))
            continue
        else:
            shutil.copy(d / "init.raw", d / "k.raw")
        prc, pout, perr = run(py + [str(ROOT / "scripts" / "nnet3-init"), "nnet.config",
                                    "p_init.raw"], penv, d)
        if prc != 0:
            failures.append("net%03d: pkwrap nnet3-init fails: %s" % (i, perr.strip()[-200:]))
        else:
            m = load_kaldi_nnet3(d / "p_init.raw")
            pn = m.num_parameters()
            if pn != kn or m.context("output") != (klc, krc):
                failures.append("net%03d: pkwrap nnet3-init: %d params, context %s; Kaldi %d, "
                                "(%d, %d)" % (i, pn, m.context("output"), kn, klc, krc))
        diffs = []
        for tag, opts in modes:
            for model in ("k.raw",):
                kr = run(["nnet3-compute", "--use-gpu=no"] + opts +
                         [model, "scp:%s/feats.scp" % tmp, "ark:k_%s.ark" % tag], kenv, d)
                pr = run(py + [str(ROOT / "scripts" / "nnet3-compute")] + opts +
                         [model, "scp:%s/feats.scp" % tmp, "ark:p_%s.ark" % tag], penv, d)
                if kr[0] != 0:
                    notes.append("Kaldi nnet3-compute %s failed: %s" % (
                        tag, kr[2].strip().splitlines()[-1][:100]))
                    if pr[0] == 0:  # e.g. Failover after a convolution, utterance i-vector
                        notes.append("pkwrap computes it")
                    continue
                if pr[0] != 0:
                    failures.append("net%03d %s: pkwrap nnet3-compute fails: %s"
                                    % (i, tag, pr[2].strip()[-300:]))
                    continue
                diff = max_diff(read_ark(d / ("k_%s.ark" % tag)), read_ark(d / ("p_%s.ark" % tag)))
                diffs.append(diff)
                if not diff <= TOL:
                    failures.append("net%03d %s: max abs diff %.3g" % (i, tag, diff))
        # perturb, write, Kaldi reads
        model = load_kaldi_nnet3(d / "k.raw")
        perturb(model, seed)
        binary = bool(seed % 2)
        as_mdl = bool((seed // 2) % 2)
        wname = "w.mdl" if as_mdl else "w.raw"
        save_kaldi_nnet3(model, d / wname, binary=binary, trans_model=tm if as_mdl else None)
        rc, _, err = run(["nnet3-am-info" if as_mdl else "nnet3-info", wname], kenv, d)
        if rc != 0:
            failures.append("net%03d: Kaldi cannot read the written %s (%s): %s"
                            % (i, wname, "binary" if binary else "text", err.strip()[-200:]))
            rows.append("net%03d: write FAILED" % i)
            continue
        tag, opts = modes[0]
        kr = run(["nnet3-compute", "--use-gpu=no"] + opts +
                 [wname, "scp:%s/feats.scp" % tmp, "ark:kw.ark"], kenv, d)
        # pkwrap's forward of the perturbed module, through the same program code path
        pr = run(py + [str(ROOT / "scripts" / "nnet3-compute")] + opts +
                 [wname, "scp:%s/feats.scp" % tmp, "ark:pw.ark"], penv, d)
        wdiff = float("nan")
        if kr[0] == 0 and pr[0] == 0:
            wdiff = max_diff(read_ark(d / "kw.ark"), read_ark(d / "pw.ark"))
            if not wdiff <= TOL:
                failures.append("net%03d written: max abs diff %.3g" % (i, wdiff))
        elif kr[0] != 0:
            failures.append("net%03d written: Kaldi nnet3-compute fails: %s"
                            % (i, kr[2].strip()[-200:]))
        # one minibatch of nnet3-chain-train
        train = "skipped (context %d/%d > 12)" % (klc, krc)
        if fits:
            raw = wname
            if as_mdl:
                run(["nnet3-am-copy", "--raw=true", wname, "w_am.raw"], kenv, d)
                raw = "w_am.raw"
            ok, why = chain_train(raw, "t.raw")
            if not ok:
                failures.append("net%03d: Kaldi nnet3-chain-train rejects the written model: %s"
                                % (i, why))
                train = "FAILED"
            else:
                train = "ok (%s)" % why
        rows.append("net%03d: %d params, context %d/%d, compute diffs %s, written %s %s: diff "
                    "%.2g, chain-train %s%s" % (
                        i, kn, klc, krc, " ".join("%.1g" % x for x in diffs),
                        "binary" if binary else "text", "final.mdl" if as_mdl else "raw",
                        wdiff, train, ("; " + "; ".join(notes)) if notes else ""))
        print(rows[-1], flush=True)
    print("\ncomponent types used: %s" % ", ".join(sorted(kinds)))
    print("%d networks, %d failures" % (a.num, len(failures)))
    for f in failures:
        print("FAIL", f)
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
