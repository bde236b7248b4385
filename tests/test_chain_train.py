"""pkwrap-chain-train (pkwrap.train.chain_train): Kaldi train.py's arguments and schedule,
and an end-to-end run on a small cut of Kaldi's egs (tests/fixtures/kaldi_recipe_egs_small)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pkwrap.train import chain_train as ct

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "tests" / "fixtures" / "kaldi_recipe_egs_small"

# the argument list of the fixture's train_cmd.sh (Kaldi's own recipe command), in its
# mixed forms: --opt=value, --opt value, an empty value, a quoted value with spaces
KALDI_CMD = [
    "--stage=-10", "--cmd=run.pl", "--feat.online-ivector-dir=exp/nnet3/ivectors_train_hires",
    "--feat.cmvn-opts=--config=conf/online_cmvn.conf", "--chain.xent-regularize", "0.1",
    "--chain.leaky-hmm-coefficient=0.1", "--chain.l2-regularize=0.0",
    "--chain.apply-deriv-weights=false", "--chain.lm-opts=--num-extra-lm-states=2000",
    "--trainer.add-option=--optimization.memory-compression-level=2", "--trainer.srand=0",
    "--trainer.max-param-change=2.0", "--trainer.num-epochs=4",
    "--trainer.frames-per-iter=30000", "--trainer.optimization.num-jobs-initial=1",
    "--trainer.optimization.num-jobs-final=1",
    "--trainer.optimization.initial-effective-lrate=0.002",
    "--trainer.optimization.final-effective-lrate=0.0002",
    "--trainer.num-chunk-per-minibatch=64,32", "--egs.chunk-width=140,100,160", "--egs.dir=",
    "--egs.stage=-10",
    "--egs.opts=--frames-overlap-per-eg 0 --online-cmvn true --num-utts-subset 60",
    "--cleanup.remove-egs=false", "--use-gpu=no", "--reporting.email=",
    "--feat-dir=data/train_hires", "--tree-dir=exp/chain/tree", "--lat-dir=exp/chain/lats",
    "--dir=exp/chain/tdnn"]

# Kaldi's log_parse.py regex for compute_prob logs (steps/libs/nnet3/report/log_parse.py)
KALDI_PROB_RE = re.compile(
    r".*compute_prob_.*\.([0-9]+).log:LOG .nnet3.*compute-prob.*:PrintTotalStats..:"
    r"nnet.*diagnostics.cc:[0-9]+. Overall ([a-zA-Z\-]+) for 'output'.*is ([0-9.\-e]+) "
    r".*per frame")


def test_parse_kaldi_recipe_command():
    args, notes = ct.parse_args(KALDI_CMD)
    assert args.xent_regularize == 0.1 and args.leaky_hmm_coefficient == 0.1
    assert args.apply_deriv_weights is False and args.remove_egs is False
    assert args.egs_dir is None and args.email is None and args.stage == -10
    assert args.num_epochs == 4.0 and args.num_chunk_per_minibatch == "64,32"
    assert args.initial_effective_lrate == 0.002 and args.final_effective_lrate == 0.0002
    assert args.lm_opts == "--num-extra-lm-states=2000"
    assert ct.parse_egs_opts(args.egs_opts) == {
        "frames_overlap_per_eg": "0", "online_cmvn": "true", "num_utts_subset": "60"}
    assert any("--optimization.memory-compression-level=2 ignored" in n for n in notes)
    _, notes = ct.parse_args(KALDI_CMD + ["--reporting.email=me@example.org"])
    assert any("--reporting.email=me@example.org ignored" in n for n in notes)


@pytest.mark.parametrize("extra, message", [
    (["--trainer.no-such-option=1"], "unrecognized arguments: --trainer.no-such-option=1"),
    (["--trainer.add-option=--frobnicate=3"], "does not support this nnet3-chain-train option"),
    (["--chain.apply-deriv-weights=maybe"], "expected true or false"),
    (["--trainer.num-chunk-per-minibatch=64,x"], "--trainer.num-chunk-per-minibatch"),
])
def test_bad_arguments(extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        ct.parse_args(KALDI_CMD + extra)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_schedule_equals_kaldis():
    """num_iters, per-iteration jobs/epoch/lr lines and the models combined, as Kaldi's
    train.py printed them for the fixture (4 archives, frame subsampling 3, 4 epochs)."""
    lines = (SMALL / "kaldi" / "train_py_iters.txt").read_text().splitlines()
    s = ct.KaldiSchedule(4, 3, 4.0, 1, 1, 0.002, 0.0002, num_workers=1)
    assert s.num_iters == 48
    assert [s.iteration_line(i) for i in range(48)] == lines[:48]
    assert lines[48] == "Combining {%s} models." % ", ".join(
        str(i) for i in sorted(s.models_to_combine()))
    # Kaldi's own growing number of jobs (num_workers=None) vs pkwrap's fixed-W rule
    k = ct.KaldiSchedule(100, 3, 2.0, 2, 6, 0.001, 0.0001)
    assert k.num_iters == 600 * 2 // 8 and k.num_jobs(0) == 2 and k.num_jobs(149) == 6
    assert k.learning_rate(0) == pytest.approx(2 * 0.001)
    assert k.learning_rate(k.num_iters - 1) == pytest.approx(6 * 0.0001)
    w = ct.KaldiSchedule(100, 3, 2.0, 2, 6, 0.001, 0.0001, num_workers=6)
    assert w.num_iters == 100 and w.num_archives_processed(50) == 300
    assert w.learning_rate(50) == pytest.approx(6 * 0.001 * 0.1 ** 0.5)


def test_dropout_schedule():
    assert ct.dropout_proportions("0,0@0.20,0.5@0.50,0", 0.1) == [("*", 0.0)]
    assert ct.dropout_proportions("0,0@0.20,0.5@0.50,0", 0.35) == [("*", pytest.approx(0.25))]
    assert ct.dropout_proportions("0,0@0.20,0.5@0.50,0", 1.0) == [("*", 0.0)]
    assert ct.dropout_proportions("*=0,0.4,0 lstm*=0.1,0.1", 0.25) == [
        ("*", pytest.approx(0.2)), ("lstm*", pytest.approx(0.1))]


def _recipe_dir(tmp_path):
    """A recipe dir laid out as the chain recipe's: exp/chain/{tree,tdnn/configs}."""
    root = tmp_path / "recipe"
    shutil.copytree(SMALL / "tree", root / "exp/chain/tree")
    shutil.copytree(SMALL / "configs", root / "exp/chain/tdnn/configs")
    return root


def _cmd(extra=()):
    return ["--stage=-10", "--cmd=run.pl", "--chain.xent-regularize", "0.1",
            "--chain.leaky-hmm-coefficient=0.1", "--chain.l2-regularize=0.0",
            "--chain.apply-deriv-weights=false", "--chain.lm-opts=--num-extra-lm-states=2000",
            "--trainer.add-option=--optimization.memory-compression-level=2",
            "--trainer.srand=0", "--trainer.max-param-change=2.0",
            "--trainer.num-epochs=0.5", "--trainer.optimization.num-jobs-initial=1",
            "--trainer.optimization.num-jobs-final=1",
            "--trainer.optimization.initial-effective-lrate=0.002",
            "--trainer.optimization.final-effective-lrate=0.0002",
            "--trainer.num-chunk-per-minibatch=4", "--egs.chunk-width=140,100,160",
            "--egs.dir=%s" % (SMALL / "egs"), "--cleanup.remove-egs=false", "--use-gpu=no",
            "--reporting.email=", "--feat-dir=data/train_hires", "--tree-dir=exp/chain/tree",
            "--lat-dir=exp/chain/lats", "--dir=exp/chain/tdnn",
            "--pkwrap.checkpoint-every=2"] + list(extra)


def _run_cmd(root, cmd):
    """``pkwrap-chain-train cmd`` in the recipe dir ``root`` (one torch thread)."""
    old = os.getcwd()
    threads = torch.get_num_threads()
    os.chdir(root)
    try:
        torch.set_num_threads(1)  # small minibatches: one thread is fastest
        return ct.main(cmd)
    finally:
        torch.set_num_threads(threads)
        os.chdir(old)


def _run(root, extra=()):
    return _run_cmd(root, _cmd(extra))


def test_end_to_end_and_resume(tmp_path):
    """A short run (3 iterations: 0.5 epoch of 2 archives x 3 frame shifts) writes Kaldi's
    files; stopped with --exit-stage and run again, it ends with the same final.mdl as an
    uninterrupted run."""
    from pkwrap.kaldi.hmm import read_transition_model
    from pkwrap.nnet3 import read_nnet3
    root = _recipe_dir(tmp_path)
    d = root / "exp/chain/tdnn"
    assert _run(root, ["--exit-stage=2"]) == 0
    assert (d / "0.mdl").is_file() and (d / "1.mdl").is_file() and not (d / "2.mdl").exists()
    assert not (d / "final.mdl").exists()
    assert _run(root) == 0
    # the graphs and copied files are Kaldi's
    for name in ("phone_lm.fst", "den.fst", "normalization.fst", "0.trans_mdl"):
        assert (d / name).read_bytes() == (SMALL / "kaldi" / name).read_bytes(), name
    for name in ("tree", "phones.txt"):
        assert (d / name).read_bytes() == (SMALL / "tree" / name).read_bytes()
    for name in ("cmvn_opts", "global_cmvn.stats", "online_cmvn"):
        assert (d / name).read_bytes() == (SMALL / "egs" / name).read_bytes()
    assert (d / "final.ie.id").read_text() == (SMALL / "egs/info/final.ie.id").read_text()
    assert (d / "frame_subsampling_factor").read_text().strip() == "3"
    assert (d / "num_iters").read_text().strip() == "3"
    assert (d / "srand").read_text().strip() == "0"
    # final.mdl: Kaldi's acoustic-model file with the chain transition model
    m = read_nnet3(str(d / "final.mdl"))
    tm = read_transition_model(str(d / "0.trans_mdl"))
    assert m.trans_model is not None and m.trans_model.num_pdfs == tm.num_pdfs == 64
    assert m.trans_model.num_transition_ids == tm.num_transition_ids
    assert m.output_dim("output") == 64 and "ivector" in m.input_names
    assert m.priors is not None and len(m.priors) == 0
    # Kaldi-style logs that Kaldi's log parser reads, and accuracy.report
    objf = {}
    for it in ("0", "1", "2", "final"):
        for name in ("train", "valid"):
            p = d / "log" / ("compute_prob_%s.%s.log" % (name, it))
            hits = [KALDI_PROB_RE.search("%s:%s" % (p, l)) for l in p.read_text().splitlines()]
            hits = [h for h in hits if h]
            if it != "final":
                assert len(hits) == 1 and hits[0].group(2) == "log-probability", p
            text = p.read_text()
            assert re.search(r"Overall log-probability for 'output-xent' is -?[0-9.e-]+ per "
                             r"frame, over \d+ frames\.", text)
            objf[name, it] = float(re.search(r"for 'output' is (\S+) per frame", text).group(1))
    assert objf["valid", "final"] > objf["valid", "0"]  # it learned something
    report = (d / "accuracy.report").read_text().splitlines()
    assert report[0] == "%Iter\tduration\ttrain_objective\tvalid_objective\tdifference"
    assert [r.split("\t")[0] for r in report[1:4]] == ["0", "1", "2"]
    assert float(report[1].split("\t")[3]) == pytest.approx(objf["valid", "0"], abs=1e-5)
    assert report[4].startswith("Total training time is ")
    assert (d / "log" / "combine.log").is_file() and (d / "checkpoints").is_dir()
    # cleanup as train.py: only 0.mdl and final.mdl are kept
    assert sorted(p.name for p in d.glob("*.mdl")) == ["0.mdl", "final.mdl"]
    # the same run without the interruption gives the same model
    root2 = _recipe_dir(tmp_path / "b")
    assert _run(root2) == 0
    assert (root2 / "exp/chain/tdnn/final.mdl").read_bytes() == (d / "final.mdl").read_bytes()


def test_egs_made_from_lattices(tmp_path):
    """``--egs.dir=`` (empty, as in the recipe's command): the egs are made from the lattice
    and feature dirs (pkwrap.chain.get_egs, Kaldi's get_egs.sh) with --egs.opts, their
    properties copied to the chain dir, and training runs on them (iteration 0)."""
    lat_small = REPO / "tests" / "fixtures" / "kaldi_recipe_small"
    root = tmp_path / "recipe"
    shutil.copytree(lat_small, root, ignore=shutil.ignore_patterns("egs"))
    shutil.rmtree(root / "exp/chain/tree")
    shutil.rmtree(root / "exp/chain/tdnn")
    shutil.copytree(SMALL / "tree", root / "exp/chain/tree")
    shutil.copytree(SMALL / "configs", root / "exp/chain/tdnn/configs")
    cmd = [a for a in _cmd() if not a.startswith(("--egs.dir", "--trainer.num-epochs"))]
    cmd += ["--egs.dir=", "--feat.online-ivector-dir=exp/nnet3/ivectors_train_hires",
            "--feat.cmvn-opts=--config=conf/online_cmvn.conf",
            "--egs.opts=--frames-overlap-per-eg 0 --online-cmvn true --num-utts-subset 5",
            "--trainer.frames-per-iter=4000", "--trainer.num-epochs=1", "--exit-stage=1"]
    old = os.getcwd()
    os.chdir(root)
    try:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        assert ct.main(cmd) == 0
        torch.set_num_threads(threads)
    finally:
        os.chdir(old)
    d = root / "exp/chain/tdnn"
    egs = d / "egs"
    n = int((egs / "info/num_archives").read_text())
    assert n >= 2 and all((egs / ("cegs.%d.ark" % i)).is_file() for i in range(1, n + 1))
    assert (egs / "valid_diagnostic.cegs").is_file() and (egs / "combine.cegs").is_file()
    assert (d / "online_cmvn").is_file()  # get_egs.sh touches it (empty) with online CMVN
    assert (d / "cmvn_opts").read_text().strip() == "--config=conf/online_cmvn.conf"
    assert (d / "log/compute_prob_valid.0.log").is_file() and (d / "log/train.0.1.log").is_file()
    assert any((d / "checkpoints").iterdir())


@pytest.mark.slow
def test_two_workers_under_torchrun(tmp_path):
    """--trainer.optimization.num-jobs-final=2: the program prepares the dir, then runs
    its training under torchrun with 2 CPU workers (gloo); learning rate 2x effective."""
    root = _recipe_dir(tmp_path)
    cmd = [a for a in _cmd() if "num-jobs-final" not in a and "num-epochs" not in a]
    cmd += ["--trainer.optimization.num-jobs-final=2", "--trainer.num-epochs=1",
            "--pkwrap.num-threads=1"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "pkwrap.train.chain_train"] + cmd, cwd=str(root),
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = root / "exp/chain/tdnn"
    assert (d / "final.mdl").is_file() and (d / "num_iters").read_text().strip() == "3"
    assert "Iter: 0/2   Jobs: 2   Epoch: 0.00/1.0 (0.0% complete)   lr: 0.004000" in r.stderr


def test_console_script_help():
    """``python -m pkwrap.train.chain_train`` (what the console script runs) answers
    --help with Kaldi's option names."""
    r = subprocess.run([sys.executable, "-m", "pkwrap.train.chain_train", "--help"],
                       capture_output=True, text=True, cwd=str(REPO),
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0
    assert "--trainer.optimization.num-jobs-initial" in r.stdout and "--egs.dir" in r.stdout


def test_input_model(tmp_path):
    """--trainer.input-model (transfer learning, as train.py): no configs needed; 0.mdl is
    the given network as it is (its learning-rate factors too) with the chain transition
    model, and the egs must fit its context."""
    from pkwrap.nnet3 import nnet3_from_config, read_nnet3, write_nnet3
    root = _recipe_dir(tmp_path)
    d = root / "exp/chain/tdnn"
    old = os.getcwd()
    os.chdir(root)
    try:
        src = nnet3_from_config("exp/chain/tdnn/configs/final.config", srand=7)
    finally:
        os.chdir(old)
    src.component("tdnn1.affine").learning_rate_factor = 0.25
    write_nnet3(src, str(tmp_path / "input.raw"))
    shutil.rmtree(d / "configs")
    assert _run(root, ["--trainer.input-model=%s" % (tmp_path / "input.raw"),
                       "--exit-stage=1"]) == 0
    m0 = read_nnet3(str(d / "0.mdl"))
    assert m0.trans_model is not None and m0.trans_model.num_pdfs == 64
    assert m0.component("tdnn1.affine").learning_rate_factor == 0.25
    for (n, p), q in zip(src.named_parameters(), m0.parameters()):
        assert torch.equal(p, q), n
    assert (d / "log" / "train.0.1.log").is_file() and not (d / "init.raw").exists()
    with pytest.raises(SystemExit) as e:  # a missing input model is one named error
        _run(_recipe_dir(tmp_path / "b"), ["--trainer.input-model=%s" % (tmp_path / "no.raw")])
    assert e.value.code != 0
