#!/usr/bin/env python3
"""pkwrap on one GPU: correctness against the CPU and Kaldi, speed, and torchrun with nccl.

Run by ``bench/gpu_check.sh`` (which installs the package first) or directly from a
checkout whose C++ core is built. Prints one summary table at the end; every row is
PASS, FAIL, SKIP (with the reason) or INFO (a measurement). Exit status 1 if any row
failed. On a machine without CUDA it says so, runs the CPU half (the same checks and
timings on the CPU, the Triton kernels in Triton's interpreter) and reports every
CUDA row as SKIP, never as passed.

(a) correctness: ``pytest -m cuda`` on tests/test_cuda.py (ChainLoss on CUDA against
    Kaldi's objf and derivatives: regular, e2e, xent, l2, leaky; NG-SGD preconditioning
    against Kaldi's OnlineNaturalGradient traces; two tdnn_1j NG-SGD training steps on
    CUDA against the same steps on the CPU) and tests/test_den_triton.py (the Triton
    denominator against the C++ kernel); each test's recorded errors are shown.
(b) speed: denominator forward-backward on the bench den.fst (3359 states, 43251 arcs,
    2051 pdfs) for 64 x 150 and 128 x 150 frames (50 output frames at subsampling 3):
    the Triton kernels as ChainLoss uses them, against pkwrap's plain-torch backend and a
    plain-torch autograd baseline, in the same run, ms (median of rounds) and peak memory;
    one full tdnn_1j training step (forward, ChainLoss with xent, backward with
    natural-gradient preconditioning, NG-SGD update with max-change, batchnorm stats
    scaling: pkwrap.train's step) in output frames per second, and its peak memory.
(c) torchrun: ``torchrun --nproc_per_node=1`` trains tests/train_scripts/train_tiny.py on
    the device with its process group open (nccl on CUDA, gloo on the CPU), the worker
    SIGKILLs itself after step 5, torchrun restarts it, it resumes from the step-4
    checkpoint and must end where an uninterrupted run ends.

Usage:
  python3 bench/gpu_check.py [--quick] [--profile DIR] [--json FILE]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ROWS = []  # (section, check, status, detail)


def row(section, check, status, detail=""):
    ROWS.append((section, check, status, detail))
    print("[%s] %-4s %s: %s" % (section, status, check, detail), flush=True)


def guarded(section, what):
    """Decorator: an exception in a check becomes a FAIL row (the other checks still run)."""
    def deco(fn):
        def run(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:  # noqa: BLE001 - reported as a failed row
                traceback.print_exc()
                row(section, what, "FAIL", "%s: %s" % (type(e).__name__, str(e)[:300]))
        return run
    return deco


# ----------------------------------------------------------------------- (a) correctness
@guarded("a", "pytest -m cuda")
def correctness(cuda: bool, quick: bool):
    with tempfile.TemporaryDirectory() as d:
        xml = Path(d) / "junit.xml"
        files = ["tests/test_cuda.py", "tests/test_den_triton.py"]
        if quick and not cuda:
            files = ["tests/test_cuda.py"]
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
               "junit_family=xunit1", "--junitxml", str(xml)] + files
        t0 = time.time()
        p = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True)
        print(p.stdout[-6000:], p.stderr[-3000:], flush=True)
        if not xml.exists():
            row("a", "pytest", "FAIL", "no junit report (rc %d)" % p.returncode)
            return
        n = {"PASS": 0, "FAIL": 0, "SKIP": 0}
        for tc in ET.parse(xml).getroot().iter("testcase"):
            name = "%s::%s" % (tc.get("classname", "").split(".")[-1], tc.get("name"))
            props = {pp.get("name"): pp.get("value") for pp in tc.iter("property")}
            if tc.find("failure") is not None or tc.find("error") is not None:
                el = tc.find("failure") if tc.find("failure") is not None else tc.find("error")
                st, detail = "FAIL", (el.get("message") or "")[:200]
            elif tc.find("skipped") is not None:
                st, detail = "SKIP", tc.find("skipped").get("message", "")[:120]
            else:
                st = "PASS"
                detail = ", ".join("%s=%.2e" % (k, float(v)) for k, v in props.items())
            n[st] += 1
            row("a", name, st, detail)
        row("a", "pytest (%.0f s)" % (time.time() - t0),
            "FAIL" if n["FAIL"] or p.returncode != 0 else ("PASS" if n["PASS"] else "SKIP"),
            "%d passed, %d failed, %d skipped" % (n["PASS"], n["FAIL"], n["SKIP"]))


# ------------------------------------------------------------------------ (b) speed
def _sync(dev):
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _median_ms(fn, dev, rounds, warmup=1):
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(ts)


def _mib(v):
    return "n/a" if v != v else "%.0f MiB" % v


def _peak_mib(fn, dev):
    import torch
    if dev.type != "cuda":
        return float("nan")
    _sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    _sync(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20


@guarded("b", "denominator speed")
def den_speed(dev, quick: bool):
    import torch
    from bench_chain_loss import plain_pytorch_denominator
    from pkwrap.chain import DenominatorGraph, denominator_forward_backward
    g = DenominatorGraph.from_fst(str(ROOT / "tests/fixtures/kaldi/bench/den.fst"), 2051)
    cuda = dev.type == "cuda"
    fast = "triton" if cuda else "cpp"
    sizes = [64] if (quick or not cuda) else [64, 128]
    for S in sizes:
        T = 50
        x = torch.randn(S, T, 2051, generator=torch.Generator().manual_seed(S)).mul_(2).to(dev)
        f_fast = lambda: denominator_forward_backward(g, x, 0.1, backend=fast)
        f_torch = lambda: denominator_forward_backward(g, x, 0.1, backend="torch")
        f_auto = lambda: plain_pytorch_denominator(g, x, 0.1)
        ref = denominator_forward_backward(g, x.cpu(), 0.1, backend="cpp")
        got = f_fast()
        err = float((got.post.cpu() - ref.post).abs().max())
        lp_err = float(((got.logprob.cpu() - ref.logprob).abs() / ref.logprob.abs()).max())
        ok = got.ok and err < 1e-5 and lp_err < 1e-6
        row("b", "den %s %dx150 equals C++" % (fast, S), "PASS" if ok else "FAIL",
            "max |post err| %.1e, logprob rel err %.1e" % (err, lp_err))
        ms_fast = _median_ms(f_fast, dev, 30 if cuda else 3, warmup=3 if cuda else 1)
        ms_torch = _median_ms(f_torch, dev, 5 if cuda else 1)
        ms_auto = _median_ms(f_auto, dev, 3 if cuda else 1)
        mem = [_peak_mib(f, dev) for f in (f_fast, f_torch, f_auto)]
        row("b", "den fwd-bwd %dx150 %s" % (S, dev.type), "INFO",
            "%s %.3f ms (peak %s) | plain torch %.2f ms (%s) = %.1fx | "
            "torch autograd %.2f ms (%s) = %.1fx"
            % (fast, ms_fast, _mib(mem[0]), ms_torch, _mib(mem[1]), ms_torch / ms_fast, ms_auto,
               _mib(mem[2]), ms_auto / ms_fast))
        if cuda:
            ratio = ms_torch / ms_fast
            row("b", "den speedup vs plain torch %dx150 >= 20x" % S,
                "PASS" if ratio >= 20 else "FAIL", "%.1fx" % ratio)


def train_step_speed(dev, S, warmup, steps, profile_dir=None, tf32=False):
    """Seconds per tdnn_1j NG-SGD training step (mean over ``steps`` after ``warmup``) and
    the peak memory of one step."""
    import torch
    from bench_train_step import F, P, T, numerator
    from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
    from pkwrap.nn import TDNNFModel, scale_batchnorm_stats
    from pkwrap.optim import NGSGD, kaldi_param_groups
    from pkwrap.train.context import probe_model_context
    from pkwrap.train.data import ChainBatch
    from pkwrap.train.diagnostics import compute_chain_loss
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(0)
    model = TDNNFModel.tdnn_1j(P, feat_dim=F).to(dev)
    ctx = probe_model_context(model, F, device=dev)
    den = DenominatorGraph.from_fst(str(ROOT / "tests/fixtures/kaldi/bench/den.fst"), P)
    loss_fn = ChainLoss(den, ChainOptions(leaky_hmm_coefficient=0.1, xent_regularize=0.1))
    opt = NGSGD(kaldi_param_groups(model), lr=0.002, max_param_change=2.0)
    feats = torch.randn(S, ctx.num_input_frames(T), F, generator=torch.Generator().manual_seed(1))
    batch = ChainBatch(feats, numerator(S, T, P), None, ctx.left_context).to(dev)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        res = compute_chain_loss(model, ctx, loss_fn, batch)
        res.loss.backward()
        opt.step(num_sequences=S)
        scale_batchnorm_stats(model, 0.8)
        return res

    for _ in range(warmup):
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        res = step()
    _sync(dev)
    sec = (time.perf_counter() - t0) / steps
    mem = _peak_mib(step, dev)
    if profile_dir and dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(4):
                step()
            _sync(dev)
        tag = "S%d%s" % (S, "_tf32" if tf32 else "")
        (Path(profile_dir) / ("profile_%s.txt" % tag)).write_text(
            prof.key_averages().table(sort_by="cuda_time_total", row_limit=40) + "\n\n" +
            prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))
        import warnings
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            step()
            _sync(dev)
        torch.cuda.set_sync_debug_mode(0)
        import collections
        where = collections.Counter()
        for x in w:
            where["%s:%s %s" % (x.filename, x.lineno, str(x.message)[:60])] += 1
        (Path(profile_dir) / ("syncs_%s.txt" % tag)).write_text(
            "\n".join("%4d %s" % (n, k) for k, n in where.most_common()) + "\n")
    return sec, mem, res.objf / res.weight


@guarded("b", "tdnn_1j training step")
def train_speed(dev, quick: bool, profile_dir=None):
    cuda = dev.type == "cuda"
    settings = [(64, False), (128, False), (128, True)] if cuda and not quick else [(64, False)]
    for S, tf32 in settings:
        warmup, steps = (11, 12) if cuda else (2, 2)
        sec, mem, objf = train_step_speed(dev, S, warmup, steps, profile_dir, tf32)
        fps = S * 50 / sec
        row("b", "tdnn_1j NG-SGD step %dx150 %s%s" % (S, dev.type, " tf32" if tf32 else ""),
            "INFO", "%.1f ms/step, %.0f output frames/s, peak %s (objf %.3f/frame)"
            % (1000 * sec, fps, _mib(mem), objf))
        if cuda and not tf32 and S == 128:
            row("b", "tdnn_1j step above 150,000 output frames/s (float32)",
                "PASS" if fps > 150000 else "FAIL", "%.0f frames/s" % fps)


# ---------------------------------------------------------------------- (c) torchrun
@guarded("c", "torchrun")
def torchrun_check(cuda: bool):
    import torch
    worker = ROOT / "tests" / "train_scripts" / "train_tiny.py"
    dev = "cuda" if cuda else "cpu"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    tr = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    with tempfile.TemporaryDirectory() as d:
        def run(exp, extra):
            t0 = time.time()
            p = subprocess.run(tr + extra + [str(worker), "--exp", exp, "--device", dev,
                                             "--process-group"] +
                               (["--kill-rank", "0", "--kill-step", "5", "--kill-marker",
                                 os.path.join(d, "killed")] if extra else []),
                               cwd=str(ROOT), env=env, capture_output=True, text=True,
                               timeout=400)
            if p.returncode != 0:
                print(p.stdout[-20000:], p.stderr[-20000:], flush=True)
                logf = Path(exp) / "log" / "train.0.log"
                if logf.exists():
                    print("---- %s (tail)\n%s" % (logf, logf.read_text()[-4000:]), flush=True)
                errs = [ln for ln in (p.stdout + p.stderr).splitlines()
                        if "Error" in ln and "elastic" not in ln]
                raise RuntimeError("torchrun failed (rc %d): %s" % (
                    p.returncode, errs[-1][:300] if errs else "see the log above"))
            return p.stdout + p.stderr, time.time() - t0
        out_full, t_full = run(os.path.join(d, "full"), [])
        backend = "nccl" if cuda else "gloo"
        ok = ("on %s" % ("cuda:0" if cuda else "cpu")) in out_full and \
            ("backend %s" % backend) in out_full
        row("c", "torchrun 1 process, %s, backend %s" % (dev, backend), "PASS" if ok else "FAIL",
            "18 steps in %.0f s" % t_full)
        out_k, t_k = run(os.path.join(d, "killed_run"), ["--max-restarts=1"])
        log = open(os.path.join(d, "killed_run", "log", "train.0.log")).read()
        resumed = os.path.exists(os.path.join(d, "killed")) and "resumed from" in log \
            and "ckpt-00000004.pt" in log
        a = torch.load(os.path.join(d, "full", "params.0.pt"))
        b = torch.load(os.path.join(d, "killed_run", "params.0.pt"))
        # per tensor, relative to its largest entry: the GPU denominator sums blocks with
        # atomics, so CUDA runs are not bitwise repeatable (the CPU's are)
        diff = max(float((a[k].double() - b[k].double()).abs().max())
                   / max(float(a[k].double().abs().max()), 1e-30) for k in a)
        close = diff <= (1e-3 if cuda else 0.0)
        row("c", "SIGKILL after step 5, restart, resume from step-4 checkpoint",
            "PASS" if (resumed and close) else "FAIL",
            "resumed=%s, params vs uninterrupted run: max rel diff %.1e" % (resumed, diff))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and settings")
    ap.add_argument("--profile", default=None, help="write profiler tables and sync sites here")
    ap.add_argument("--json", default=None, help="also write the rows as JSON")
    ap.add_argument("--skip", default="", help="comma list of sections to skip (a,b,c)")
    args = ap.parse_args()
    import torch
    cuda = torch.cuda.is_available()
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    import pkwrap
    print("pkwrap %s (%s), torch %s, triton %s, python %s" % (
        getattr(pkwrap, "__version__", "?"), Path(pkwrap.__file__).parent, torch.__version__,
        tv, sys.version.split()[0]), flush=True)
    if cuda:
        p = torch.cuda.get_device_properties(0)
        env = "CUDA: %s, %d SMs, %.0f GiB" % (p.name, p.multi_processor_count,
                                              p.total_memory / 2 ** 30)
    else:
        env = "no CUDA device: running the CPU half; every CUDA row is SKIP"
    print(env, flush=True)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    skip = set(args.skip.split(",")) if args.skip else set()
    dev = torch.device("cuda" if cuda else "cpu")
    if "a" not in skip:
        correctness(cuda, args.quick)
    if "b" not in skip:
        den_speed(dev, args.quick)
        train_speed(dev, args.quick, args.profile)
        if not cuda:
            row("b", "den speedup vs plain torch on CUDA", "SKIP", "no CUDA device")
            row("b", "tdnn_1j step on CUDA", "SKIP", "no CUDA device")
    if "c" not in skip:
        torchrun_check(cuda)
        if not cuda:
            row("c", "torchrun on CUDA with nccl", "SKIP", "no CUDA device")
    print("\n==== pkwrap gpu_check summary (%s) ====" % env)
    w = max(len(r[1]) for r in ROWS) if ROWS else 10
    for sec, check, st, detail in ROWS:
        print("%s  %-4s  %-*s  %s" % (sec, st, w, check, detail))
    n = {s: sum(1 for r in ROWS if r[2] == s) for s in ("PASS", "FAIL", "SKIP", "INFO")}
    print("%d passed, %d failed, %d skipped, %d measurements" % (n["PASS"], n["FAIL"],
                                                                 n["SKIP"], n["INFO"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": ROWS}, indent=1))
    return 1 if n["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
