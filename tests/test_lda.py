"""The LDA-like preconditioning transform (pkwrap.chain.lda; scripts nnet3-chain-acc-lda-stats,
sum-lda-accs, nnet-get-feature-transform) against Kaldi's outputs in tests/fixtures/kaldi_lda
(made by its make.sh with real Kaldi on the egs of tests/fixtures/kaldi_recipe_small), and
pkwrap-chain-train's stages -4 .. -1 on a network with configs/init.config."""
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pkwrap.chain.lda import (LdaStats, acc_chain_lda_stats, estimate_feature_transform,
                              rand_prune, read_lda_stats, supervision_posteriors)
from pkwrap.kaldi.chain_egs import read_chain_egs
from pkwrap.kaldi.io import KaldiFormatError, KaldiReader
from pkwrap.kaldi.matrix import read_matrix, read_packed_matrix
from test_chain_train import _run, _run_cmd

REPO = Path(__file__).resolve().parents[1]
FX = REPO / "tests" / "fixtures" / "kaldi_lda"
EGS = REPO / "tests" / "fixtures" / "kaldi_recipe_small" / "exp" / "chain" / "tdnn" / "egs"
SMALL = REPO / "tests" / "fixtures" / "kaldi_recipe_egs_small"


def _script(name):
    import runpy
    return runpy.run_path(str(REPO / "scripts" / name), run_name="cli")["main"]


def _read(path, fn):
    r = KaldiReader(Path(path).read_bytes(), name=str(path))
    r.read_header()
    return fn(r)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _gram(m):
    m = m.astype(np.float64)
    return m.T @ m


def _check_transform(m, k, tol):
    """lda.mat m equals Kaldi's k: rows of distinct between-class variances up to sign,
    the others (a degenerate group: here the 97 zero variances of 64 classes in 160 dims)
    through M'M (they are defined up to a rotation among themselves). Measured: 2e-5 of
    the largest element from pkwrap's stats (which differ from Kaldi's by 4e-8)."""
    assert m.shape == k.shape
    res = estimate_feature_transform(read_lda_stats([str(FX / "lda_stats")]))
    r = int((res.singular_values > 1e-8).sum())
    sign = np.sign((m[:r] * k[:r]).sum(axis=1))
    assert _rel(m[:r] * sign[:, None], k[:r]) < tol
    assert _rel(_gram(m[r:]), _gram(k[r:])) < tol
    assert _rel(_gram(m), _gram(k)) < tol


@pytest.fixture(scope="module")
def kaldi():
    return {"stats": read_lda_stats([str(FX / "lda_stats")]),
            "stats_rp4": read_lda_stats([str(FX / "lda_stats.rp4")]),
            "mat": _read(FX / "lda.mat", read_matrix),
            "mat_rp4": _read(FX / "lda.rp4.mat", read_matrix)}


def test_stats_and_matrix_equal_kaldis(tmp_path, kaldi):
    """--rand-prune=0: nnet3-chain-acc-lda-stats on each of the 4 archives, sum-lda-accs,
    nnet-get-feature-transform (pkwrap's scripts, Kaldi's arguments) give Kaldi's stats and
    lda.mat (train.py's compute_preconditioning_matrix, with init.raw from init.config)."""
    acc, summ, get = (_script("nnet3-chain-acc-lda-stats"), _script("sum-lda-accs"),
                      _script("nnet-get-feature-transform"))
    init = _script("nnet3-init")
    raw = str(tmp_path / "init.raw")
    assert init(["--srand=-2", str(FX / "configs" / "init.config"), raw]) == 0
    jobs = []
    for j in range(1, 5):
        out = str(tmp_path / ("%d.lda_stats" % j))
        assert acc(["--rand-prune=0", raw, "ark:%s/cegs.%d.ark" % (EGS, j), out]) == 0
        jobs.append(out)
    assert summ([str(tmp_path / "lda_stats")] + jobs) == 0
    st, k = read_lda_stats([str(tmp_path / "lda_stats")]), kaldi["stats"]
    assert st.num_classes == 64 and st.dim == 160
    assert np.abs(st.zero - k.zero).max() < 1e-3 and abs(st.tot_count() - 2442) < 1e-3
    assert _rel(st.first, k.first) < 1e-6
    assert _rel(st.second, k.second) < 1e-6
    mat = str(tmp_path / "lda.mat")
    assert get(["--write-within-covar=%s" % (tmp_path / "wc"), mat,
                str(tmp_path / "lda_stats")]) == 0
    _check_transform(_read(mat, read_matrix), kaldi["mat"], tol=1e-4)
    total, between, _, _ = st.get_stats()
    assert _rel(_read(tmp_path / "wc", read_packed_matrix), total - between) < 1e-5


def test_transform_from_kaldis_stats(kaldi):
    """Kaldi's own stats through pkwrap's nnet-get-feature-transform give Kaldi's lda.mat,
    with --rand-prune=0 stats and with train.py's 4.0 (here the singular-value ceiling of
    5 binds: 2 and 7 values, as Kaldi logged)."""
    for stats, mat, ceiled in (("stats", "mat", 2), ("stats_rp4", "mat_rp4", 7)):
        res = estimate_feature_transform(kaldi[stats])
        assert res.num_ceiled == ceiled and res.smoothed == 0.0
        m, k = res.matrix, kaldi[mat]
        r = int((res.singular_values > 1e-8).sum())
        sign = np.sign((m[:r] * k[:r]).sum(axis=1))
        assert _rel(m[:r] * sign[:, None], k[:r]) < 2e-5
        assert _rel(_gram(m), _gram(k)) < 2e-5
    assert res.singular_values.sum() == pytest.approx(44.6658, abs=1e-3)  # Kaldi's log


def test_stats_file_is_kaldis_format(tmp_path, kaldi):
    """Kaldi's stats file read and written again is the same bytes; text mode and sums
    round-trip; mismatched stats and damaged files are named errors."""
    buf = io.BytesIO()
    kaldi["stats"].write(buf)
    assert buf.getvalue() == (FX / "lda_stats").read_bytes()
    kaldi["stats"].write(str(tmp_path / "t"), binary=False)
    text = (tmp_path / "t").read_bytes()
    assert text.startswith(b"<LDAACCS> <VECSIZE> 160 <NUMCLASSES> 64 <ZERO_ACCS>  [ 822.1074")
    back = read_lda_stats([str(tmp_path / "t")])
    assert _rel(back.second, kaldi["stats"].second) < 1e-6
    two = read_lda_stats([str(FX / "lda_stats"), str(tmp_path / "t")])
    assert two.tot_count() == pytest.approx(2 * 2442, abs=1e-2)
    small = LdaStats(3, 2)
    small.accumulate(np.eye(2, dtype=np.float32), [0, 1], [1.0, 1.0])
    small.write(str(tmp_path / "small"))
    with pytest.raises(KaldiFormatError, match="small.*3 classes, dim 2 cannot be added"):
        read_lda_stats([str(FX / "lda_stats"), str(tmp_path / "small")])
    (tmp_path / "cut").write_bytes((FX / "lda_stats").read_bytes()[:5000])
    with pytest.raises(KaldiFormatError, match="cut.*truncated"):
        read_lda_stats([str(tmp_path / "cut")])
    with pytest.raises(SystemExit, match="sum-lda-accs: .*nothing: No such file"):
        _script("sum-lda-accs")([str(tmp_path / "o"), str(tmp_path / "nothing")])
    assert not (tmp_path / "o").exists()


def test_rand_prune():
    """RandPrune: 0 stays 0, weights >= the threshold are kept, the others become the
    threshold with probability w / threshold (unbiased), else 0."""
    rng = np.random.default_rng(0)
    w = np.array([0.0, 0.3, 4.0, 5.5, 1.0] * 20000, np.float32)
    out = rand_prune(w, 4.0, rng)
    assert set(np.unique(out).tolist()) == {0.0, 4.0, 5.5}
    assert np.all(out[w == 0] == 0) and np.all(out[w >= 4] == w[w >= 4])
    for v in (0.3, 1.0):
        assert out[w == v].mean() == pytest.approx(v, rel=0.05)
    assert np.array_equal(rand_prune(w, 0.0, rng), w)


def test_rand_prune_stats_close_to_kaldis(kaldi):
    """With train.py's --rand-prune=4.0 Kaldi's decisions come from rand(), which its
    compiler also consumes: not reproducible. pkwrap's pruned stats differ from the exact
    (--rand-prune=0) ones by as much as Kaldi's do (sampling noise of the pruning), and
    their lda.mat is as far from Kaldi's as Kaldi's is from the exact one."""
    from pkwrap.nnet3 import read_nnet3
    nnet = read_nnet3(str(FX / "init.raw"))
    st = LdaStats(64, 160)
    for j in range(1, 5):
        s, _ = acc_chain_lda_stats(nnet, read_chain_egs("ark:%s/cegs.%d.ark" % (EGS, j)), 4.0)
        st.add(s)
    exact = kaldi["stats"]

    def dev(a):
        return np.array([np.linalg.norm(getattr(a, n) - getattr(exact, n))
                         / np.linalg.norm(getattr(exact, n)) for n in ("zero", "first", "second")])
    ours, theirs = dev(st), dev(kaldi["stats_rp4"])
    assert np.all(ours > 0.02) and np.all(ours / theirs > 0.5) and np.all(ours / theirs < 2)
    m = estimate_feature_transform(st).matrix

    def gdist(a, b):
        return np.linalg.norm(_gram(a) - _gram(b)) / np.linalg.norm(_gram(b))
    assert gdist(m, kaldi["mat_rp4"]) < 2 * gdist(kaldi["mat"], kaldi["mat_rp4"])


def test_acc_errors_and_e2e(tmp_path):
    """Merged egs (two sequences) and egs the network cannot read are named errors;
    end-to-end egs give their stored pdf alignment (weight 1), and an error without one."""
    from pkwrap.kaldi.chain_egs import merge_chain_egs, write_chain_egs
    from pkwrap.nnet3 import nnet3_from_config, read_nnet3
    nnet = read_nnet3(str(FX / "init.raw"))
    egs = list(read_chain_egs("ark:%s/cegs.4.ark" % EGS))
    same = [e for k, e in egs if e.inputs["input"].shape == egs[0][1].inputs["input"].shape]
    merged = merge_chain_egs(same[:2])
    with pytest.raises(ValueError, match="example m: 2 sequences in one example"):
        acc_chain_lda_stats(nnet, [("m", merged)])
    other = nnet3_from_config("input-node name=input dim=40\n"
                              "output-node name=output input=Append(Offset(input, -1), input)\n")
    with pytest.raises(ValueError, match="has an input 'ivector'.*no such input node"):
        acc_chain_lda_stats(other, egs[:1])
    # end-to-end supervision (no regular FST): the stored pdf alignment, weight 1 each
    import dataclasses
    key, eg = egs[0]
    frames, pdfs, post = supervision_posteriors(eg.supervision)
    T = eg.supervision.frames_per_sequence
    best = np.zeros(T, np.int64)
    for t in range(T):
        best[t] = pdfs[frames == t][np.argmax(post[frames == t])]
    e2e = eg.copy()
    e2e.supervision = dataclasses.replace(eg.supervision, fst=None,
                                          e2e_fsts=[eg.supervision.fst], alignment_pdfs=best)
    st, _ = acc_chain_lda_stats(nnet, [(key, e2e)])
    assert st.tot_count() == T and np.array_equal(st.zero, np.bincount(best, minlength=64))
    e2e.supervision = dataclasses.replace(e2e.supervision, alignment_pdfs=None)
    with pytest.raises(ValueError, match="end-to-end supervision without a pdf alignment"):
        acc_chain_lda_stats(nnet, [(key, e2e)])
    write_chain_egs("ark:%s" % (tmp_path / "m.ark"), [("m", merged)])
    with pytest.raises(SystemExit, match="nnet3-chain-acc-lda-stats: example m: 2 sequences"):
        _script("nnet3-chain-acc-lda-stats")([str(FX / "init.raw"), "ark:%s" % (tmp_path / "m.ark"),
                                              str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_config_vars_context(tmp_path):
    """With init.config, egs made by pkwrap-chain-train take the context from configs/vars
    (the network needs lda.mat); a missing or broken vars file is a named error."""
    from pkwrap.train.chain_train import _ConfigContext
    c = _ConfigContext(str(FX / "configs" / "vars"))
    assert (c.left_context, c.right_context) == (5, 5)
    with pytest.raises(FileNotFoundError, match="vars: missing"):
        _ConfigContext(str(tmp_path / "vars"))
    (tmp_path / "vars").write_text("model_left_context=5\n")
    with pytest.raises(ValueError, match="vars: no model_right_context= line"):
        _ConfigContext(str(tmp_path / "vars"))


def test_chain_train_with_lda_network(tmp_path):
    """pkwrap-chain-train on a recipe dir whose configs have init.config (the LDA network
    of tests/fixtures/kaldi_lda/configs, 64 pdfs as the egs of kaldi_recipe_egs_small):
    stages -4 .. end make init.raw, lda.mat (+ configs/lda.mat link, lda_stats, Kaldi's
    log names, job stats removed), 0.mdl whose lda component holds lda.mat, and train 3
    iterations; the objective improves."""
    from pkwrap.nnet3 import read_nnet3
    root = tmp_path / "recipe"
    shutil.copytree(SMALL / "tree", root / "exp/chain/tree")
    shutil.copytree(FX / "configs", root / "exp/chain/tdnn/configs")
    d = root / "exp/chain/tdnn"
    assert _run(root) == 0  # test_chain_train's command (--egs.dir given)
    for name in ("init.raw", "lda.mat", "lda_stats", "0.mdl", "final.mdl"):
        assert (d / name).is_file(), name
    assert os.readlink(d / "configs" / "lda.mat") == "../lda.mat"
    assert not list(d.glob("*.lda_stats"))
    for name in ("nnet_init.log", "get_lda_stats.1.log", "get_lda_stats.2.log",
                 "sum_transform_stats.log", "get_transform.log"):
        assert (d / "log" / name).is_file(), name
    assert "soft frame count" in (d / "log" / "get_lda_stats.1.log").read_text()
    init = read_nnet3(str(d / "init.raw"))
    assert init.input_names == ["ivector", "input"] and init.output_dim("output") == 160
    lda = _read(d / "lda.mat", read_matrix)
    assert lda.shape == (160, 161)
    m0 = read_nnet3(str(d / "0.mdl"))
    comp = m0.component("lda")
    assert type(comp).__name__ == "FixedAffineComponent"
    assert np.array_equal(comp.weight.detach().numpy(), lda[:, :-1])
    assert np.array_equal(comp.bias.detach().numpy(), lda[:, -1])
    final = read_nnet3(str(d / "final.mdl"))
    assert np.array_equal(final.component("lda").weight.detach().numpy(), lda[:, :-1])
    objf = {}
    for it in ("0", "final"):
        text = (d / "log" / ("compute_prob_valid.%s.log" % it)).read_text()
        objf[it] = float(re.search(r"for 'output' is (\S+) per frame", text).group(1))
    assert objf["final"] > objf["0"]


def test_chain_train_lda_egs_from_lattices(tmp_path):
    """``--egs.dir=`` (empty): with init.config the egs are made before the network exists,
    with the context of configs/vars (5 + frame_subsampling_factor // 2), then lda.mat is
    estimated from them and 0.mdl built (--exit-stage=0: stages -6 .. -1 only)."""
    root = tmp_path / "recipe"
    shutil.copytree(REPO / "tests" / "fixtures" / "kaldi_recipe_small", root,
                    ignore=shutil.ignore_patterns("egs"))
    shutil.rmtree(root / "exp/chain/tree")
    shutil.rmtree(root / "exp/chain/tdnn")
    shutil.copytree(SMALL / "tree", root / "exp/chain/tree")
    shutil.copytree(FX / "configs", root / "exp/chain/tdnn/configs")
    cmd = ["--stage=-10", "--chain.xent-regularize", "0.1", "--trainer.srand=0",
           "--trainer.num-epochs=1", "--trainer.num-chunk-per-minibatch=4",
           "--egs.chunk-width=140,100,160", "--egs.dir=",
           "--feat.online-ivector-dir=exp/nnet3/ivectors_train_hires",
           "--feat.cmvn-opts=--config=conf/online_cmvn.conf",
           "--egs.opts=--frames-overlap-per-eg 0 --online-cmvn true --num-utts-subset 5",
           "--trainer.frames-per-iter=4000", "--trainer.lda.max-lda-jobs=2",
           "--cleanup.remove-egs=false", "--use-gpu=no", "--feat-dir=data/train_hires",
           "--tree-dir=exp/chain/tree", "--lat-dir=exp/chain/lats", "--dir=exp/chain/tdnn",
           "--exit-stage=0"]
    assert _run_cmd(root, cmd) == 0
    d = root / "exp/chain/tdnn"
    assert (d / "egs/info/left_context").read_text().strip() == "6"
    assert (d / "egs/info/right_context").read_text().strip() == "6"
    assert int((d / "egs/info/num_archives").read_text()) > 2
    # --trainer.lda.max-lda-jobs=2: two jobs
    assert sorted(p.name for p in (d / "log").glob("get_lda_stats.*.log")) == [
        "get_lda_stats.1.log", "get_lda_stats.2.log"]
    assert (d / "lda.mat").is_file() and (d / "0.mdl").is_file()
    assert not (d / "log" / "train.0.1.log").exists()


def test_feature_transform_options_equal_kaldis(tmp_path):
    """nnet-get-feature-transform --dim=40 --within-class-factor=1.0 --max-singular-value=0
    --remove-offset=false --write-within-covar (Kaldi's outputs of the same command): the 40
    rows of largest between-class variance (distinct: equal up to sign) and the within-class
    covariance."""
    out, wc = tmp_path / "m", tmp_path / "wc"
    assert _script("nnet-get-feature-transform")([
        "--dim=40", "--within-class-factor=1.0", "--max-singular-value=0",
        "--remove-offset=false", "--write-within-covar=%s" % wc, str(out),
        str(FX / "lda_stats")]) == 0
    m, k = _read(out, read_matrix), _read(FX / "lda.dim40.mat", read_matrix)
    assert m.shape == k.shape == (40, 160)
    sign = np.sign((m * k).sum(axis=1))
    assert _rel(m * sign[:, None], k) < 2e-5
    assert _rel(_read(wc, read_packed_matrix), _read(FX / "within_covar", read_packed_matrix)) < 1e-5
    with pytest.raises(SystemExit, match="--dim=200 is more than the data dimension 160"):
        _script("nnet-get-feature-transform")(["--dim=200", str(out), str(FX / "lda_stats")])


def test_preconditioning_jobs_in_parallel_processes(tmp_path):
    """train.py's stage -2 with its 4 jobs in 2 processes (as run.pl runs JOB=1:4) gives the
    same bytes as one after the other (each job's rand-prune draws are its own), Kaldi's
    log files, and the configs/lda.mat link."""
    from pkwrap.chain.lda import compute_preconditioning_matrix
    out = {}
    for procs in (1, 2):
        d = tmp_path / ("p%d" % procs)
        (d / "configs").mkdir(parents=True)
        shutil.copy(FX / "init.raw", d / "init.raw")
        compute_preconditioning_matrix(str(d), str(EGS), 4, max_lda_jobs=10,
                                       rand_prune_threshold=4.0, num_processes=procs)
        out[procs] = d
        assert os.readlink(d / "configs" / "lda.mat") == "../lda.mat"
        assert not list(d.glob("*.lda_stats"))
        logs = sorted(p.name for p in (d / "log").iterdir())
        assert logs == ["get_lda_stats.%d.log" % j for j in range(1, 5)] + [
            "get_transform.log", "sum_transform_stats.log"]
    for name in ("lda_stats", "lda.mat"):
        assert (out[1] / name).read_bytes() == (out[2] / name).read_bytes()
