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
Fisher-estimate update per 4 steps, as in steady-state training).  ``--rounds R`` repeats
the whole interleaved sequence R times and reports medians: each setting's s/step is the
median of its R means, and each ratio (vs Kaldi, vs the baseline, NG overhead) the median
of the R same-round ratios, which a shared machine's drifting speed affects least.

Workers run with OMP_WAIT_POLICY=PASSIVE unless it is set, and keep freed memory for reuse
as pkwrap.train's Trainer does (``pkwrap.train.keep_freed_memory``; PKWRAP_KEEP_FREED_MEMORY=0
turns it off).

``--baseline DIR`` also runs every setting with the pkwrap of another checkout (e.g. a
``git worktree`` of an older commit; copy the built ``pkwrap/_pkwrap*.so`` into it) first on
its PYTHONPATH, interleaved with this checkout's, and prints the ratios, so that
before/after comparisons come from one run on the same (shared, noisy) machine.

``--kaldi DIR`` also runs real Kaldi ``nnet3-chain-train`` (CPU) on the same work, in the
same invocation, right after each of our settings (same threads, NG on/off), and prints
Kaldi's s/minibatch next to ours with the same-run ratio. DIR is a Kaldi ``src`` dir
(binaries in its ``nnet3bin/`` and ``chainbin/``) or a dir holding the binaries; it needs
``nnet3-init`` and ``nnet3-chain-train`` (``nnet3-info`` too, for the parameter check), of
any CPU or CUDA build (run with ``--use-gpu=no``). In a temp dir the bench
  * makes the model with ``nnet3-init`` from ``tests/fixtures/kaldi/bench/tdnn_1j.final.config``
    (idct.mat path fixed, learning-rate 0.002 on the updatable components); for "no NG" the
    same config with ``NaturalGradientAffineComponent`` -> ``AffineComponent`` and
    ``use-natural-gradient=false`` on the ``TdnnComponent``/``LinearComponent`` lines (same
    parameters, plain SGD updates);
  * writes, with pkwrap's own chain-egs writer, one merged minibatch: the same 64 x 206
    N(0,1) input frames as ours (t = -29..176, n-major) and the same synthetic numerator
    (labels pdf+1, as Kaldi's supervision has), output indexes t = 0,3,..,147 (t-major);
  * feeds warmup+steps copies of it to ``nnet3-chain-train --use-gpu=no
    --leaky-hmm-coefficient=0.1 --xent-regularize=0.1 --max-param-change=2.0
    --print-interval=1 <model> den.fst ark:- <out>`` on its stdin, with OMP_NUM_THREADS and
    OPENBLAS_NUM_THREADS set to the thread count. Kaldi reads minibatch k+1 only after it has
    trained on minibatch k, and each minibatch (2.6 MB) is far larger than the pipe, so the
    moment our write of minibatch k returns is the moment Kaldi starts on it; the last one
    ends when Kaldi prints its totals. Start-up and model I/O fall outside, and Kaldi's
    s/minibatch is the mean of the same steps as ours (after --warmup, the next --steps).
Checks printed: Kaldi's parameter count (nnet3-info) next to ours, and the chain objective
of the first minibatch, which must equal ours (both output layers start at zero, so it
depends only on the numerator, the den.fst and the frames).

Usage:
  python3 bench/bench_train_step.py [--steps 4] [--warmup 11] [--threads 1,2]
                                    [--baseline DIR] [--kaldi DIR]
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
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
    try:  # as pkwrap.train.Trainer does on the CPU (absent in older checkouts)
        from pkwrap.train import keep_freed_memory
        keep_freed_memory()
    except ImportError:
        pass
    from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
    from pkwrap.nn import TDNNFModel, scale_batchnorm_stats
    from pkwrap.optim import NGSGD, kaldi_param_groups
    from pkwrap.train.context import probe_model_context
    from pkwrap.train.data import ChainBatch
    from pkwrap.train.diagnostics import compute_chain_loss

    torch.manual_seed(0)
    model = TDNNFModel.tdnn_1j(P, feat_dim=F)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
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


# ---------------------------------------------------------------- real Kaldi (--kaldi DIR)
KALDI_UPDATABLE = ("NaturalGradientAffineComponent", "TdnnComponent", "LinearComponent")


def kaldi_binary(kaldi_dir: Path, name: str, required: bool = True):
    """``name`` in DIR, DIR/chainbin or DIR/nnet3bin (DIR a Kaldi src dir or a bin dir)."""
    for sub in ("", "chainbin", "nnet3bin"):
        p = kaldi_dir / sub / name
        if p.is_file() and os.access(p, os.X_OK):
            return p
    if not required:
        return None
    sys.exit("--kaldi %s: no executable %s there or in its chainbin/ or nnet3bin/"
             % (kaldi_dir, name))


def kaldi_config(natural: bool, idct: Path, lr: float = 0.002) -> str:
    """tdnn_1j.final.config with the idct matrix's path fixed and learning-rate ``lr`` on the
    updatable components; ``natural=False`` turns natural gradient off everywhere
    (NaturalGradientAffineComponent -> AffineComponent, which has the same parameters and
    does plain SGD; use-natural-gradient=false on TdnnComponent and LinearComponent)."""
    out = []
    for line in (BENCH / "tdnn_1j.final.config").read_text().splitlines():
        line = re.sub(r"matrix=\S*idct\.mat", "matrix=%s" % idct, line)
        m = re.search(r"\btype=(\w+)", line)
        if line.startswith("component ") and m and m.group(1) in KALDI_UPDATABLE:
            line = line.rstrip() + " learning-rate=%g" % lr
            if not natural:
                if m.group(1) == "NaturalGradientAffineComponent":
                    line = line.replace("type=NaturalGradientAffineComponent",
                                        "type=AffineComponent")
                else:
                    line += " use-natural-gradient=false"
        out.append(line)
    return "\n".join(out) + "\n"


def kaldi_minibatch(left_context: int, right_context: int, fss: int = 3) -> bytes:
    """One merged chain minibatch in Kaldi's binary egs format (the bytes after the key),
    written by pkwrap.kaldi.chain_egs: our worker's N(0,1) features (S x t_in x F) as
    input rows n-major with t = -left_context .. 3(T-1)+right_context, output indexes
    t-major at t = 0, 3, .., 3(T-1), and our bench's numerator (labels pdf+1)."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch
    from pkwrap.kaldi.chain_egs import ChainEgsWriter, NnetChainExample
    t_in = left_context + fss * (T - 1) + right_context + 1
    feats = torch.randn(S, t_in, F, generator=torch.Generator().manual_seed(1))
    n, t = np.meshgrid(np.arange(S), np.arange(-left_context, t_in - left_context),
                       indexing="ij")
    in_idx = np.stack([n.ravel(), t.ravel(), np.zeros(n.size, np.int64)], 1).astype(np.int32)
    t, n = np.meshgrid(np.arange(T) * fss, np.arange(S), indexing="ij")
    out_idx = np.stack([n.ravel(), t.ravel(), np.zeros(n.size, np.int64)], 1).astype(np.int32)
    eg = NnetChainExample(inputs={"input": feats.reshape(S * t_in, F)},
                          input_indexes={"input": in_idx}, output_name="output",
                          output_indexes=out_idx, supervision=numerator(S, T, P))
    with tempfile.TemporaryDirectory() as d:
        with ChainEgsWriter("ark:%s/eg.ark" % d) as w:
            w.write("mb", eg)
        data = (Path(d) / "eg.ark").read_bytes()
    assert data.startswith(b"mb ")
    return data[3:]


def kaldi_prepare(kaldi_dir: Path, tmp: Path) -> dict:
    """Models (NG on and off) with nnet3-init, nnet3-info's parameter count and context,
    and the minibatch bytes."""
    shutil.copy(BENCH / "tdnn_1j.idct.mat", tmp / "idct.mat")
    prep = {"train": kaldi_binary(kaldi_dir, "nnet3-chain-train"), "tmp": tmp}
    init = kaldi_binary(kaldi_dir, "nnet3-init")
    for natural in (True, False):
        cfg = tmp / ("ng%d.config" % natural)
        cfg.write_text(kaldi_config(natural, tmp / "idct.mat"))
        raw = tmp / ("ng%d.raw" % natural)
        out = subprocess.run([str(init), "--srand=0", str(cfg), str(raw)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit("nnet3-init failed:\n" + out.stderr[-3000:])
        prep["raw%d" % natural] = raw
    info = kaldi_binary(kaldi_dir, "nnet3-info", required=False)
    prep["params"], lc, rc = None, 29, 29
    if info:
        for natural in (True, False):
            out = subprocess.run([str(info), str(prep["raw%d" % natural])],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit("nnet3-info failed:\n" + out.stderr[-3000:])
            txt = out.stdout
            params = int(re.search(r"^num-parameters: (\d+)", txt, re.M).group(1))
            lc = int(re.search(r"^left-context: (\d+)", txt, re.M).group(1))
            rc = int(re.search(r"^right-context: (\d+)", txt, re.M).group(1))
            prep["params%d" % natural] = params
            if natural:
                prep["params"], prep["context"] = params, (lc, rc)
                prep["ng_components"] = len(re.findall(r"type=NaturalGradientAffine", txt))
            else:
                prep["plain_affine"] = len(re.findall(r"type=AffineComponent", txt))
                prep["ng_off"] = len(re.findall(r"use-natural-gradient=false", txt))
    prep["eg"] = kaldi_minibatch(lc, rc)
    prep["input_frames"] = lc + 3 * (T - 1) + rc + 1
    return prep


KALDI_OBJF = re.compile(r"Average objective function for 'output' for minibatches "
                        r"(\d+)-\d+ is (\S+)")


def kaldi_worker(prep: dict, threads: int, natural: bool, steps: int, warmup: int) -> dict:
    """Kaldi's nnet3-chain-train on warmup+steps copies of the minibatch, fed on its stdin;
    per-minibatch seconds from when each write returns (Kaldi reads minibatch k+1 only after
    training on k) to the next, the last to Kaldi's final totals."""
    n = warmup + steps
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    out_raw = prep["tmp"] / "out.raw"
    cmd = [str(prep["train"]), "--use-gpu=no", "--srand=0", "--print-interval=1",
           "--leaky-hmm-coefficient=0.1", "--xent-regularize=0.1", "--max-param-change=2.0",
           "--momentum=0.0", str(prep["raw%d" % natural]), str(BENCH / "den.fst"), "ark:-",
           str(out_raw)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    lines = []

    def read_stderr():
        for line in proc.stderr:
            lines.append((time.perf_counter(), line.decode(errors="replace")))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    starts = []
    try:
        for k in range(n):
            proc.stdin.write(b"mb%d " % k + prep["eg"])
            proc.stdin.flush()
            starts.append(time.perf_counter())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    rc = proc.wait()
    reader.join()
    log = "".join(line for _, line in lines)
    ends = [t for t, line in lines if "Overall average objective function" in line]
    if rc != 0 or len(starts) != n or not ends:
        sys.exit("nnet3-chain-train failed (rc %d):\n%s\n%s" % (rc, " ".join(cmd), log[-3000:]))
    bounds = starts + [ends[0]]
    times = [bounds[k + 1] - bounds[k] for k in range(n)]
    objf = {int(m.group(1)): float(m.group(2)) for m in KALDI_OBJF.finditer(log)}
    overall = re.search(r"Overall average objective function for 'output' is (\S+)", log)
    return {"threads": threads, "natural_gradient": natural, "times": times[warmup:],
            "all_times": times, "mean_s": statistics.mean(times[warmup:]),
            # Kaldi prints minibatch k's objf while on k+1: none for the last one
            "objf_per_frame": [objf.get(k, float("nan")) for k in range(n - 1)],
            "objf_mean": float(overall.group(1)) if overall else float("nan")}

def _merge_rounds(per_round: list) -> list:
    """One result per setting from its results in every round: s/step the median of the
    rounds' means (``round_means`` keeps them), times and objective values concatenated."""
    if not per_round or not per_round[0]:
        return []
    merged = []
    for rs in zip(*per_round):
        m = dict(rs[0])
        m["round_means"] = [r["mean_s"] for r in rs]
        m["mean_s"] = statistics.median(m["round_means"])
        m["times"] = [t for r in rs for t in r["times"]]
        merged.append(m)
    return merged


def _ratio(a: dict, b: dict) -> float:
    """a's time over b's: the median of the same-round ratios."""
    return statistics.median(x / y for x, y in zip(a["round_means"], b["round_means"]))


def _name(r: dict) -> str:
    """A setting's row label, e.g. 'NG-SGD, 2 threads'."""
    return "%s, %d thread%s" % ("NG-SGD" if r["natural_gradient"] else "no NG", r["threads"],
                                "s" if r["threads"] > 1 else "")


def _tag(r: dict) -> str:
    """A setting's short tag, e.g. 'ng/2t'."""
    return "%s/%dt" % ("ng" if r["natural_gradient"] else "plain", r["threads"])


def _print_ng_overheads(results: list, label: str, suffix: str = "") -> None:
    """Natural gradient's cost per thread count: NG time over no-NG time, same run."""
    for r in results:
        if r["natural_gradient"]:
            plain = [q for q in results if not q["natural_gradient"] and
                     q["threads"] == r["threads"]]
            if plain:
                print("%s (%d thread%s, same run): %+.0f%%%s"
                      % (label, r["threads"], "s" if r["threads"] > 1 else "",
                         100 * (_ratio(r, plain[0]) - 1), suffix))


def _times_line(label: str, results: list) -> str:
    """One line of every step's time per setting."""
    return label + ": " + "; ".join(
        "%s: %s" % (_tag(r), ", ".join("%.3f" % t for t in r["times"])) for r in results)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per setting")
    ap.add_argument("--warmup", type=int, default=11, help="untimed steps first")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="also time the pkwrap of this checkout (before/after ratios)")
    ap.add_argument("--kaldi", default=None, metavar="DIR",
                    help="also time real Kaldi nnet3-chain-train from this Kaldi src (or "
                         "bin) dir on the same work, interleaved with ours")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the whole interleaved sequence this many times; s/step is "
                         "then the median of the rounds' means and every ratio the median "
                         "of the rounds' same-round ratios (robust to a shared machine's "
                         "drifting speed)")
    ap.add_argument("--ng-only", action="store_true",
                    help="only the NG-SGD settings (no 'no NG' rows)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        threads, natural = args.worker.split(",")
        print(json.dumps(worker(int(threads), natural == "1", args.steps, args.warmup)))
        return
    settings = [(int(t), True) for t in args.threads.split(",")]
    if not args.ng_only:
        settings += [(int(t), False) for t in args.threads.split(",")]
    roots = [ROOT] + ([Path(args.baseline).resolve()] if args.baseline else [])
    rounds = []  # per round: (ours, baseline's, Kaldi's), each a list over the settings
    kaldi_tmp = tempfile.TemporaryDirectory(prefix="bench_kaldi_") if args.kaldi else None
    kaldi = kaldi_prepare(Path(args.kaldi).resolve(), Path(kaldi_tmp.name)) if args.kaldi else None
    for _ in range(max(1, args.rounds)):
        results, base_results, kaldi_results = [], [], []
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
            if kaldi and root == roots[-1]:  # Kaldi right after our run(s) of this setting
                kaldi_results.append(kaldi_worker(kaldi, threads, natural, args.steps,
                                                  args.warmup))
        rounds.append((results, base_results, kaldi_results))
    if kaldi_tmp:
        kaldi_tmp.cleanup()
    results, base_results, kaldi_results = (_merge_rounds([rd[k] for rd in rounds])
                                            for k in range(3))
    frames = S * T
    r0 = results[0]
    print("model: TDNNFModel.tdnn_1j(%d): %d parameters; minibatch %d x %d frames (%d x %d "
          "outputs, %d input frames per sequence)" % (P, r0["params"], S, 3 * T, S, T,
                                                       r0["input_frames"]))
    print("%-26s %10s %12s %16s %14s" % ("setting", "s/step", "frames/s", "Kaldi frames/s",
                                         "vs Kaldi"))
    for r in results:
        name = _name(r)
        fps = frames / r["mean_s"]
        k = KALDI_S_PER_MB.get(r["threads"])
        kaldi_fps = frames / k if k and r["natural_gradient"] else float("nan")
        print("%-26s %10.3f %12.0f %16.0f %13.2fx" % (name, r["mean_s"], fps, kaldi_fps,
                                                      fps / kaldi_fps))
    _print_ng_overheads(results, "natural gradient overhead", " (Kaldi: +14%)")
    if base_results:
        print("baseline %s:" % roots[1])
        print("%-26s %10s %12s %18s" % ("setting", "s/step", "frames/s", "speed-up vs base"))
        for r, b in zip(results, base_results):
            print("%-26s %10.3f %12.0f %17.2fx" % (_name(r), b["mean_s"], frames / b["mean_s"],
                                                   _ratio(b, r)))
    if kaldi:
        print_kaldi(args.kaldi, kaldi, results, kaldi_results)
    print(_times_line("per-step times", results + base_results))
    if kaldi_results:
        print(_times_line("Kaldi per-minibatch times", kaldi_results))

def print_kaldi(kaldi_dir: str, kaldi: dict, results: list, kaldi_results: list) -> None:
    """Kaldi's same-run figures next to ours."""
    frames = S * T
    print("Kaldi nnet3-chain-train, same run (%s): model from tdnn_1j.final.config: %s "
          "parameters (ours %d), context %s, %d input frames per sequence"
          % (kaldi_dir, kaldi["params"] if kaldi["params"] is not None else "?",
             results[0]["params"],
             "%d/%d" % kaldi["context"] if "context" in kaldi else "?",
             kaldi["input_frames"]))
    if kaldi.get("params0") is not None:
        print("Kaldi no-NG model: %d parameters; %d AffineComponent, %d components with "
              "use-natural-gradient=false (NG model: %d NaturalGradientAffineComponent)"
              % (kaldi["params0"], kaldi["plain_affine"], kaldi["ng_off"],
                 kaldi["ng_components"]))
    print("%-26s %10s %14s %12s %14s %26s" % ("setting", "s/step", "Kaldi s/mb", "frames/s",
                                              "Kaldi frames/s", "pkwrap vs Kaldi (same run)"))
    for r, k in zip(results, kaldi_results):
        print("%-26s %10.3f %14.3f %12.0f %14.0f %25.2fx"
              % (_name(r), r["mean_s"], k["mean_s"], frames / r["mean_s"], frames / k["mean_s"],
                 _ratio(k, r)))
    _print_ng_overheads(kaldi_results, "Kaldi natural gradient overhead")
    for r, k in zip(results, kaldi_results):
        print("chain objf per frame, %s: ours first %.4f, mean of all %d steps %.4f; "
              "Kaldi first %.4f, mean %.4f"
              % (_tag(r), r["objf_per_frame"][0], len(r["objf_per_frame"]),
                 statistics.mean(r["objf_per_frame"]), k["objf_per_frame"][0],
                 k["objf_mean"]))

if __name__ == "__main__":
    main()
