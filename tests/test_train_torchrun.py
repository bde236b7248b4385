"""End-to-end pkwrap.train runs on the mono fixture egs (real ChainLoss, TDNN-F, NG-SGD):
2 ranks under torchrun (gloo), SIGKILL + elastic restart, single process without torchrun,
a truncated checkpoint, and a change in the number of workers."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "train_scripts" / "train_tiny.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

# 19 egs, minibatches of 2 -> 9 minibatches per epoch: 4 steps per epoch on 2 ranks, 9 on 1
STEPS_2RANKS = 8
STEPS_1RANK = 18


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd, timeout=240):
    p = subprocess.run(cmd, cwd=str(ROOT), env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, "command failed (rc %d): %s\n%s" % (
        p.returncode, " ".join(map(str, cmd)), (p.stdout + p.stderr)[-4000:])
    return p


def _params(exp, rank=0):
    return torch.load(os.path.join(exp, "params.%d.pt" % rank))


def _assert_equal_bitwise(a, b, what):
    assert sorted(a) == sorted(b)
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, "%s: %d tensors differ, e.g. %s (max abs diff %g)" % (
        what, len(bad), bad[0], (a[bad[0]].double() - b[bad[0]].double()).abs().max())


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    exp = str(tmp_path_factory.mktemp("train2") / "exp")
    _run(TORCHRUN + [str(WORKER), "--exp", exp])
    return exp


def test_two_ranks_identical_and_tensorboard(two_rank_run):
    exp = two_rank_run
    _assert_equal_bitwise(_params(exp, 0), _params(exp, 1), "rank 0 vs rank 1")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(exp, "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"train/objf", "train/xent_objf", "train/l2_term", "train/objf_plus_l2",
            "train/learning_rate", "train/param_change", "train/grad_norm",
            "train/frames_per_second", "train/skipped_minibatches", "valid/objf",
            "valid/xent_objf", "train/ng_rho_mean", "train/ng_floored",
            "train/ng_reorthogonalized"}
    assert want <= tags, "missing TensorBoard scalars: %s" % sorted(want - tags)
    steps = [e.step for e in acc.Scalars("train/objf")]
    assert steps == list(range(1, STEPS_2RANKS + 1))
    objf = [e.value for e in acc.Scalars("train/objf")]
    assert all(-20 < v < 0 for v in objf)
    assert [e.value for e in acc.Scalars("train/learning_rate")][0] == pytest.approx(0.002)
    # one plain text log per rank; Kaldi's compute-prob lines on rank 0
    for r in (0, 1):
        assert os.path.getsize(os.path.join(exp, "log", "train.%d.log" % r)) > 0
    log0 = open(os.path.join(exp, "log", "train.0.log")).read()
    assert "Overall log-probability for 'output' is" in log0
    assert "Overall log-probability for 'output-xent' is" in log0
    # retention: keep_last=2 (+ the best by valid objective)
    ck = sorted(os.listdir(os.path.join(exp, "checkpoints")))
    assert 1 <= len(ck) <= 3 and ck[-1] == "ckpt-%08d.pt" % STEPS_2RANKS
    assert os.path.exists(os.path.join(exp, "final.pt"))


def test_sigkill_restart_resumes_bitwise(two_rank_run, tmp_path):
    exp = str(tmp_path / "exp")
    marker = str(tmp_path / "killed")
    # rank 1 SIGKILLs itself after step 5; the last checkpoint is step 4
    _run(TORCHRUN + ["--max-restarts=1", str(WORKER), "--exp", exp, "--kill-rank", "1",
                     "--kill-step", "5", "--kill-marker", marker])
    assert os.path.exists(marker), "the worker was never killed"
    for r in (0, 1):
        log = open(os.path.join(exp, "log", "train.%d.log" % r)).read()
        assert "resumed from" in log and "ckpt-00000004.pt" in log
    ref = _params(two_rank_run, 0)
    for r in (0, 1):
        _assert_equal_bitwise(ref, _params(exp, r), "killed+resumed run, rank %d" % r)


def test_single_process_truncated_checkpoint_and_worker_change(tmp_path):
    full = str(tmp_path / "full")
    part = str(tmp_path / "part")
    _run([sys.executable, str(WORKER), "--exp", full])  # no torchrun: one process
    _run([sys.executable, str(WORKER), "--exp", part, "--num-epochs", "1"])
    grown = str(tmp_path / "grown")
    shutil.copytree(part, grown)
    # the newest checkpoint is cut short: it is skipped for the previous one, with a warning
    ck = sorted(os.listdir(os.path.join(part, "checkpoints")))
    newest = os.path.join(part, "checkpoints", ck[-1])
    data = open(newest, "rb").read()
    open(newest, "wb").write(data[: len(data) // 3])
    _run([sys.executable, str(WORKER), "--exp", part, "--num-epochs", "2"])
    log = open(os.path.join(part, "log", "train.0.log")).read()
    assert "skipping checkpoint" in log and "truncated" in log and ck[-1] in log
    assert "resumed from" in log and ck[-2] in log
    _assert_equal_bitwise(_params(full), _params(part), "resumed past a truncated checkpoint")
    # a job written by 1 worker continued by 2: same global data position, then 4 steps
    _run(TORCHRUN + [str(WORKER), "--exp", grown, "--num-epochs", "2"])
    log0 = open(os.path.join(grown, "log", "train.0.log")).read()
    assert "written by 1 workers, now 2" in log0
    assert "wrote %s" % os.path.join(grown, "final.pt") in log0
    assert "after %d steps" % (STEPS_1RANK // 2 + STEPS_2RANKS // 2) in log0
    _assert_equal_bitwise(_params(grown, 0), _params(grown, 1), "after 1 -> 2 workers")


def test_compute_prob_and_combine_clis(two_rank_run, tmp_path):
    exp = two_rank_run
    fx = ROOT / "tests" / "fixtures" / "kaldi" / "mono"
    egs = "ark:%s" % (fx / "data" / "cegs_merged4.ark")
    opts = ["--leaky-hmm-coefficient=0.1", "--xent-regularize=0.1"]
    p = _run([sys.executable, str(ROOT / "scripts" / "nnet3-chain-compute-prob")] + opts +
             [os.path.join(exp, "final.pt"), str(fx / "den.fst"), egs])
    lines = [l for l in p.stderr.splitlines() if "Overall log-probability" in l]
    assert len(lines) == 2 and "'output-xent'" in lines[0] and "'output'" in lines[1]
    assert lines[1].endswith("per frame, over 200 frames.")  # 4 sequences x 50 frames
    last = float(lines[1].split(" is ")[1].split()[0])
    ck = sorted(os.listdir(os.path.join(exp, "checkpoints")))
    out = str(tmp_path / "combined.pt")
    p = _run([sys.executable, str(ROOT / "scripts" / "nnet3-chain-combine")] + opts +
             [str(fx / "den.fst")] + [os.path.join(exp, "checkpoints", c) for c in ck] +
             [egs, out])
    assert "objective function using the last model is" in p.stderr
    # the combined model (batchnorm stats recomputed) loads and is evaluated like any other
    from pkwrap.train import load_model
    model, ctx = load_model(out)
    assert ctx is not None and ctx.frame_subsampling_factor == 3
    n_models = int(p.stderr.split("Combining ")[-1].split()[0])
    assert 1 <= n_models <= len(ck)
    assert -20 < last < 0


def test_kaldi_model_averaging(two_rank_run, tmp_path):
    """Kaldi's scheme: local NG-SGD steps, parameters averaged every 3 steps (and before
    each checkpoint, every 2 steps here)."""
    exp = str(tmp_path / "exp")
    _run(TORCHRUN + [str(WORKER), "--exp", exp, "--model-averaging-period", "3"])
    a, b = _params(exp, 0), _params(exp, 1)
    _assert_equal_bitwise(a, b, "averaged model, rank 0 vs rank 1")
    ref = _params(two_rank_run, 0)  # gradient allreduce every step: another trajectory
    assert any(not torch.equal(a[k], ref[k]) for k in a if "stats" not in k)
