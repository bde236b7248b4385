"""Chain egs from a Kaldi lattice dir (get_egs.sh as train.py runs it), checked against the
egs Kaldi made: tests/fixtures/kaldi_recipe_small (60 utterances of
/work/shared/fixtures/kaldi_recipe, see its README.md).

Every Kaldi eg of the fixture (training archives, valid and train diagnostics) is rebuilt
from its key (utterance, first frame) with pkwrap's pipeline -- lattice-align-phones,
chain-get-supervision --lattice-input, apply-cmvn-online, nnet3-chain-get-egs with online
i-vectors, normalization.fst -- and compared:

* input features: the compressed matrix decodes to exactly Kaldi's values (same bytes);
* i-vector: Kaldi draws the row at random (a frame in [b - l, b - l + U - 1], / period);
  Kaldi's row and ours both lie in that range (and Kaldi's equals one of them exactly);
* supervision: same frames, label dim, weight; the FSTs are deterministic acceptors with the
  same set of label sequences (counted on the product automaton) and the same cost on
  every sequence within 1e-4 (states may be numbered differently);
* deriv weights, input and output indexes: equal.
"""
import gzip
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, script_env

SMALL = REPO / "tests" / "fixtures" / "kaldi_recipe_small"


def _kaldi_egs():
    from pkwrap.kaldi.chain_egs import read_chain_egs
    egs = {}
    d = SMALL / "exp" / "chain" / "tdnn" / "egs"
    for name in ["cegs.1.ark", "cegs.2.ark", "cegs.3.ark", "cegs.4.ark"]:
        for k, eg in read_chain_egs("ark:%s" % (d / name)):
            egs.setdefault("train", {})[k] = eg
    for job, name in [("valid", "valid_diagnostic.cegs"), ("subset", "train_diagnostic.cegs")]:
        egs[job] = dict(read_chain_egs("ark:%s" % (d / name)))
    return egs


def _deterministic_compare(a, b):
    """(paths of a, paths of b, common paths, max |cost_a - cost_b| over the common ones)
    for two deterministic, acyclic acceptors."""
    def arcmap(f):
        out = []
        for s in range(f.num_states):
            d = {}
            for i in range(f.state_offsets[s], f.state_offsets[s + 1]):
                lab = int(f.ilabel[i])
                assert lab not in d, "not deterministic"
                d[lab] = (int(f.nextstate[i]), float(f.weight[i]))
            out.append(d)
        return out
    A, B = arcmap(a), arcmap(b)

    def count(f, M):
        n = np.zeros(f.num_states, dtype=object)
        for s in range(f.num_states - 1, -1, -1):  # breadth-first sorted: arcs go forward
            n[s] = int(np.isfinite(f.final[s])) + sum(n[d] for d, _ in M[s].values())
        return n[f.start]
    memo = {}
    order = [(a.start, b.start)]
    seen = {(a.start, b.start)}
    for x, y in order:
        for lab, (dx, _) in A[x].items():
            if lab in B[y]:
                k = (dx, B[y][lab][0])
                if k not in seen:
                    seen.add(k)
                    order.append(k)
    for x, y in reversed(order):
        n, lo, hi = 0, np.inf, -np.inf
        if np.isfinite(a.final[x]) and np.isfinite(b.final[y]):
            n, lo = 1, float(a.final[x]) - float(b.final[y])
            hi = lo
        for lab, (dx, wx) in A[x].items():
            if lab in B[y]:
                dy, wy = B[y][lab]
                c, l2, h2 = memo[(dx, dy)]
                if c:
                    n += c
                    lo, hi = min(lo, l2 + wx - wy), max(hi, h2 + wx - wy)
        memo[(x, y)] = (n, lo, hi)
    n, lo, hi = memo[(a.start, b.start)]
    return count(a, A), count(b, B), n, max(abs(lo), abs(hi))


@pytest.fixture(scope="module")
def pipeline():
    """The pieces of the pipeline, loaded once."""
    from pkwrap.chain.get_egs import FeatureNormalizer
    from pkwrap.chain.supervision import SupervisionOptions
    from pkwrap.kaldi.cmvn import (OnlineCmvnOptions, read_global_cmvn_stats, read_spk2utt,
                                   read_utt2spk)
    from pkwrap.kaldi.fst import read_fst
    from pkwrap.kaldi.hmm import read_transition_model, read_tree
    from pkwrap.kaldi.lattice import read_compact_lattices
    from pkwrap.kaldi.table import read_table
    cwd = os.getcwd()
    os.chdir(SMALL)
    try:
        feats = read_table("scp:data/train_hires/feats.scp")
        ivs = read_table("scp:exp/nnet3/ivectors_train_hires/ivector_online.scp")
    finally:
        os.chdir(cwd)
    e = SMALL / "exp" / "chain" / "tdnn"
    P = dict(
        lat_tm=read_transition_model(SMALL / "exp/chain/lats/final.mdl"),
        tm=read_transition_model(e / "0.trans_mdl"), tree=read_tree(e / "tree"),
        norm=read_fst(e / "normalization.fst"),
        lats=dict(read_compact_lattices(str(SMALL / "exp/chain/lats/lat.1.gz"))),
        feats=feats, ivs=ivs, opts=SupervisionOptions(5, 5, 3),
        valid=(e / "egs/valid_uttlist").read_text().split(),
        subset=(e / "egs/train_subset_uttlist").read_text().split())
    utt2spk = read_utt2spk(SMALL / "data/train_hires/utt2spk")
    spk2utt = read_spk2utt(SMALL / "data/train_hires/spk2utt")
    g = read_global_cmvn_stats(e / "egs/global_cmvn.stats")
    copts = OnlineCmvnOptions.from_string("--config=conf/online_cmvn.conf", str(SMALL))
    vset, tset = set(P["valid"]), set(P["subset"])
    P["cmvn"] = {
        "train": FeatureNormalizer(feats, set(feats) - vset, spk2utt, utt2spk, True, copts, g),
        "valid": FeatureNormalizer(feats, vset, spk2utt, utt2spk, True, copts, g),
        "subset": FeatureNormalizer(feats, tset, spk2utt, utt2spk, True, copts, g)}
    P["kaldi"] = _kaldi_egs()
    return P


def test_phone_align_lattice(pipeline, tmp_path):
    from pkwrap.kaldi.lattice import (COMPACT_LATTICE_HOLDER, phone_align_lattice,
                                      read_compact_lattices)
    from pkwrap.kaldi.table import TableWriter
    tm = pipeline["lat_tm"]

    def paths(lat):
        """(number of paths, best cost) by dynamic programming (states in time order)."""
        times, _ = lat.state_times()
        order = sorted(range(lat.num_states), key=lambda s: times[s])
        n = {lat.start: 1}
        best = {lat.start: 0.0}
        tot_n, tot_best = 0, np.inf
        for s in order:
            if s not in n:
                continue
            for _, g, a, _, d in lat.arcs[s]:
                n[d] = n.get(d, 0) + n[s]
                best[d] = min(best.get(d, np.inf), best[s] + g + a)
            if lat.final[s] is not None:
                tot_n += n[s]
                tot_best = min(tot_best, best[s] + lat.final[s][0] + lat.final[s][1])
        return tot_n, tot_best

    aligned = {}
    for key, lat in pipeline["lats"].items():
        out = phone_align_lattice(lat, tm, key=key)
        aligned[key] = out
        _, T = out.state_times()
        assert T == lat.state_times()[1]
        for s in range(out.num_states):
            for phone, _, _, tids, _ in out.arcs[s]:
                # one phone per arc: all its transition-ids, ending with the final one
                # and its self-loops
                assert {tm.transition_id_to_phone(int(t)) for t in tids} == {phone}
                last = max(i for i, t in enumerate(tids) if not tm.is_self_loop(int(t)))
                assert tm.is_final(int(tids[last])), key
                assert not tm.is_self_loop(int(tids[0]))
        n0, b0 = paths(lat)
        n1, b1 = paths(out)
        assert n0 == n1 and abs(b0 - b1) < 1e-2 * max(1.0, abs(b0)) * 1e-3, (key, n0, n1, b0, b1)
    # written and read back
    p = tmp_path / "ali.ark"
    with TableWriter("ark:%s" % p, COMPACT_LATTICE_HOLDER) as w:
        for k, lat in aligned.items():
            w.write_item(k, lat)
    back = dict(read_compact_lattices("ark:%s" % p))
    k = next(iter(aligned))
    assert back.keys() == aligned.keys()
    assert all(np.array_equal(x[3], y[3]) and x[:3] == y[:3] and x[4] == y[4]
               for x, y in zip(sum(back[k].arcs, []), sum(aligned[k].arcs, [])))


def test_egs_equal_kaldis(pipeline):
    """Every Kaldi eg of the fixture, rebuilt from its key."""
    from pkwrap.chain.egs import ExampleGenerationConfig, UtteranceSplitter, get_chain_egs
    from pkwrap.chain.supervision import SupervisionSplitter, lattice_to_supervision
    from pkwrap.kaldi.lattice import phone_align_lattice
    from pkwrap.kaldi.matrix import CompressedMatrix
    P = pipeline
    cfg = ExampleGenerationConfig(12, 12, -1, -1, "140,100,160", 0, 3)
    splitter = UtteranceSplitter(cfg, seed=0)
    sups = {}
    n_checked = 0
    max_cost = 0.0
    for job in ("train", "valid", "subset"):
        by_utt = {}
        for k, eg in P["kaldi"][job].items():
            u, b = k.rsplit("-", 1)
            by_utt.setdefault(u, []).append((int(b), eg))
        assert by_utt
        for u, items in by_utt.items():
            assert (u in P["valid"]) == (job == "valid")
            if u not in sups:
                lat = phone_align_lattice(P["lats"][u], P["lat_tm"], key=u)
                sups[u] = lattice_to_supervision(lat, P["tree"], P["tm"], P["opts"], u)
            items.sort(key=lambda x: x[0])
            x = P["cmvn"][job](u)
            U = x.shape[0]
            chunks = splitter.chunks_at(U, [b for b, _ in items],
                                        [eg.supervision.frames_per_sequence * 3
                                         for _, eg in items])
            iv = P["ivs"][u]
            ours = get_chain_egs(u, x, sups[u], splitter, P["norm"], chunks=chunks,
                                 sup_splitter=SupervisionSplitter(sups[u]), ivectors=iv,
                                 ivector_period=10)
            assert [k for k, _ in ours] == ["%s-%d" % (u, b) for b, _ in items]
            for (b, ref), (_, eg) in zip(items, ours):
                # features: our compressed matrix decodes to Kaldi's values exactly
                a = CompressedMatrix.from_matrix(eg.inputs["input"].numpy()).to_numpy()
                assert np.array_equal(a, ref.inputs["input"].numpy()), (job, u, b)
                assert np.array_equal(eg.input_indexes["input"], ref.input_indexes["input"])
                # i-vector: drawn from rows (b - l) / 10 .. (b - l + U - 1) / 10
                lo = min(max((b - 12) // 10, 0), len(iv) - 1)
                hi = min(max((b - 12 + U - 1) // 10, 0), len(iv) - 1)
                cands = [CompressedMatrix.from_matrix(iv[r:r + 1]).to_numpy()
                         for r in range(lo, hi + 1)]
                kal = ref.inputs["ivector"].numpy()
                assert any(np.array_equal(c, kal) for c in cands), (job, u, b)
                assert any(np.array_equal(eg.inputs["ivector"].numpy(), iv[r:r + 1])
                           for r in range(lo, hi + 1))
                assert np.array_equal(ref.input_indexes["ivector"], np.zeros((1, 3)))
                assert np.array_equal(eg.input_indexes["ivector"], np.zeros((1, 3)))
                # supervision
                s, r = eg.supervision, ref.supervision
                assert (s.weight, s.num_sequences, s.frames_per_sequence, s.label_dim) == \
                    (r.weight, r.num_sequences, r.frames_per_sequence, r.label_dim)
                na, nb, nc, d = _deterministic_compare(s.fst, r.fst)
                assert na == nb == nc, (job, u, b, na, nb, nc)
                assert d < 1e-4, (job, u, b, d)
                max_cost = max(max_cost, d)
                assert np.array_equal(eg.output_indexes, ref.output_indexes)
                assert np.array_equal(eg.deriv_weights.numpy(), ref.deriv_weights.numpy())
                n_checked += 1
    assert n_checked == sum(len(v) for v in P["kaldi"].values()) == 92
    print("checked %d Kaldi egs; largest path-cost difference %.2g" % (n_checked, max_cost))


def test_online_cmvn_follows_the_definition():
    """apply_online_cmvn against a frame-by-frame transcription of Kaldi's OnlineCmvn,
    with a window shorter than the utterance, speaker back-off and variance
    normalization."""
    from pkwrap.kaldi.cmvn import OnlineCmvnOptions, apply_online_cmvn
    rng = np.random.default_rng(0)
    D = 3
    g = np.zeros((2, D + 1))
    gx = rng.normal(2.0, 3.0, (500, D))
    g[0, :D], g[1, :D], g[0, D] = gx.sum(0), (gx * gx).sum(0), 500
    opts = OnlineCmvnOptions(cmn_window=50, speaker_frames=40, global_frames=20,
                             norm_vars=True)
    u1 = rng.normal(1.0, 2.0, (80, D)).astype(np.float32)
    u2 = rng.normal(-1.0, 1.0, (30, D)).astype(np.float32)
    out1, spk = apply_online_cmvn(u1, g, opts)
    out2, spk2 = apply_online_cmvn(u2, g, opts, spk)

    def ref(x, spk_stats):
        out = np.zeros_like(x)
        for t in range(len(x)):
            w = x[max(0, t - 49):t + 1].astype(np.float64)
            s = np.zeros((2, D + 1))
            s[0, :D], s[1, :D], s[0, D] = w.sum(0), (w * w).sum(0), len(w)
            if spk_stats is not None and s[0, D] < 50:
                c = min(50 - s[0, D], 40, spk_stats[0, D])
                s += c / spk_stats[0, D] * spk_stats
            if s[0, D] < 50:
                s += min(50 - s[0, D], 20) / g[0, D] * g
            mean = s[0, :D] / s[0, D]
            var = s[1, :D] / s[0, D] - mean ** 2
            out[t] = (x[t] - mean) / np.sqrt(var)
        return out
    assert np.allclose(out1, ref(u1, None), atol=1e-5)
    assert np.allclose(out2, ref(u2, spk), atol=1e-5)
    assert spk2[0, D] == 110 and np.allclose(spk2[0, :D], u1.sum(0) + u2.sum(0), rtol=1e-6)
    # the speaker's first utterance backs off to the global stats only: it differs
    assert not np.allclose(apply_online_cmvn(u2, g, opts)[0], out2)


def test_scripts(tmp_path):
    """lattice-align-phones | chain-get-supervision --lattice-input, apply-cmvn-online."""
    from pkwrap.chain.supervision import lattice_to_supervision, read_supervisions
    from pkwrap.chain.supervision import SupervisionOptions
    from pkwrap.kaldi.cmvn import (OnlineCmvnOptions, apply_online_cmvn_table,
                                   read_global_cmvn_stats, read_spk2utt)
    from pkwrap.kaldi.hmm import read_transition_model, read_tree
    from pkwrap.kaldi.lattice import phone_align_lattice, read_compact_lattices
    from pkwrap.kaldi.table import read_table
    env = script_env()
    py = sys.executable
    sc = REPO / "scripts"
    sup_ark = tmp_path / "sup.ark"
    cmd = ("%s %s --replace-output-symbols=true exp/chain/lats/final.mdl "
           "'ark:gunzip -c exp/chain/lats/lat.1.gz |' ark:- | %s %s --lattice-input=true "
           "--frame-subsampling-factor=3 exp/chain/tdnn/tree exp/chain/tdnn/0.trans_mdl ark:- "
           "ark:%s" % (py, sc / "lattice-align-phones", py, sc / "chain-get-supervision", sup_ark))
    r = subprocess.run(cmd, shell=True, cwd=SMALL, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "aligned 60 lattices; 0 had errors" in r.stderr
    got = dict(read_supervisions("ark:%s" % sup_ark))
    tm = read_transition_model(SMALL / "exp/chain/lats/final.mdl")
    ctm = read_transition_model(SMALL / "exp/chain/tdnn/0.trans_mdl")
    tree = read_tree(SMALL / "exp/chain/tdnn/tree")
    for k, lat in list(read_compact_lattices(str(SMALL / "exp/chain/lats/lat.1.gz")))[:5]:
        ref = lattice_to_supervision(phone_align_lattice(lat, tm, key=k), tree, ctm,
                                     SupervisionOptions(5, 5, 3), k)
        assert np.array_equal(got[k].fst.ilabel, ref.fst.ilabel)
        assert got[k].frames_per_sequence == ref.frames_per_sequence
    # apply-cmvn-online with --spk2utt equals the library
    out = tmp_path / "cmvn.ark"
    r = subprocess.run([py, str(sc / "apply-cmvn-online"), "--config=conf/online_cmvn.conf",
                        "--spk2utt=ark:data/train_hires/spk2utt",
                        "exp/chain/tdnn/egs/global_cmvn.stats", "scp:data/train_hires/feats.scp",
                        "ark:%s" % out], cwd=SMALL, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cwd = os.getcwd()
    os.chdir(SMALL)
    try:
        feats = read_table("scp:data/train_hires/feats.scp")
        ivs = read_table("scp:exp/nnet3/ivectors_train_hires/ivector_online.scp")
    finally:
        os.chdir(cwd)
    ref = dict(apply_online_cmvn_table(
        feats, read_spk2utt(SMALL / "data/train_hires/spk2utt"),
        read_global_cmvn_stats(SMALL / "exp/chain/tdnn/egs/global_cmvn.stats"),
        OnlineCmvnOptions.from_string("--config=conf/online_cmvn.conf", str(SMALL))))
    got = read_table("ark:%s" % out)
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
    # nnet3-chain-get-egs with online i-vectors, on those features and supervisions
    egs = tmp_path / "cegs.ark"
    r = subprocess.run([py, str(sc / "nnet3-chain-get-egs"),
                        "--online-ivectors=scp:exp/nnet3/ivectors_train_hires/ivector_online.scp",
                        "--online-ivector-period=10", "--left-context=12", "--right-context=12",
                        "--num-frames=140,100,160", "--frame-subsampling-factor=3",
                        "exp/chain/tdnn/normalization.fst", "ark:%s" % out, "ark:%s" % sup_ark,
                        "ark:%s" % egs], cwd=SMALL, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from pkwrap.kaldi.chain_egs import read_chain_egs
    n = 0
    for k, eg in read_chain_egs("ark:%s" % egs):
        u = k.rsplit("-", 1)[0]
        assert eg.inputs["ivector"].shape == (1, 40)
        iv = ivs[u]
        assert any(np.abs(eg.inputs["ivector"].numpy()[0] - row).max() <
                   0.01 * (np.abs(row).max() + 1) for row in iv), k
        n += 1
    assert n > 40


def _make(egs_dir, **kw):
    from pkwrap.chain.get_egs import make_chain_egs_dir
    args = dict(left_context=12, right_context=12,
                online_ivector_dir="exp/nnet3/ivectors_train_hires",
                cmvn_opts="--config=conf/online_cmvn.conf", online_cmvn=True,
                frames_per_eg="140,100,160", num_utts_subset=5, frames_per_iter=4000,
                srand=0, progress=lambda m: None)
    args.update(kw)
    return make_chain_egs_dir(str(egs_dir), "data/train_hires", "exp/chain/lats",
                              "exp/chain/tdnn", **args)


def test_make_chain_egs_dir(tmp_path, monkeypatch):
    from pkwrap.kaldi.chain_egs import read_chain_egs
    from pkwrap.train.stream import KaldiEgsDir, StreamingEgs
    monkeypatch.chdir(SMALL)
    d = tmp_path / "egs"
    s = _make(d)
    info = {p.name: p.read_text().strip() for p in (d / "info").iterdir()}
    # get_egs.sh's numbers: num_frames = round(sum(utt2dur) / 0.01); 4000 frames per iter
    dur = sum(float(l.split()[1]) for l in open("data/train_hires/utt2dur"))
    nf = int(round(dur / 0.01))
    assert info["num_frames"] == str(nf) and s.num_frames == nf
    assert info["num_archives"] == str(nf // 4000 + 1)
    assert info["egs_per_archive"] == str(nf // (160 * (nf // 4000 + 1)))
    assert (info["feat_dim"], info["ivector_dim"], info["num_pdfs"]) == ("40", "40", "64")
    assert (info["left_context"], info["right_context"], info["left_context_initial"],
            info["right_context_final"], info["frames_per_eg"]) == \
        ("12", "12", "-1", "-1", "140,100,160")
    assert (d / "online_cmvn").exists() and (d / "cmvn_opts").read_text().strip() == \
        "--config=conf/online_cmvn.conf"
    valid = (d / "valid_uttlist").read_text().split()
    subset = (d / "train_subset_uttlist").read_text().split()
    assert len(valid) == len(subset) == 5 and not set(valid) & set(subset)
    n = 0
    for a in range(1, s.num_archives + 1):
        keys = [k for k, _ in read_chain_egs("ark:%s" % (d / ("cegs.%d.ark" % a)))]
        assert len(keys) == s.egs_per_archive_written[a - 1]
        assert not {k.rsplit("-", 1)[0] for k in keys} & set(valid)
        n += len(keys)
    vk = [k.rsplit("-", 1)[0] for k, _ in read_chain_egs("ark:%s" % (d / "valid_diagnostic.cegs"))]
    tk = [k.rsplit("-", 1)[0] for k, _ in read_chain_egs("ark:%s" % (d / "train_diagnostic.cegs"))]
    assert vk and set(vk) <= set(valid) and tk and set(tk) <= set(subset)
    assert len(list(read_chain_egs("ark:%s" % (d / "combine.cegs")))) == len(tk)
    # too-short utterances are reported, not dropped silently
    assert s.report.num_ok + s.report.num_errors == 60
    assert set(s.report.counts) <= {"too_short"}
    assert not [p for p in os.listdir(d) if "tmp" in p]
    # the streaming reader takes it
    eg_dir = KaldiEgsDir(str(d))
    assert eg_dir.num_archives == s.num_archives and eg_dir.left_context == 12
    st = StreamingEgs(str(d), minibatch_size="16", frame_subsampling_factor=3,
                      shuffle_buffer_size=50, seed=1, rank=0, world_size=1)
    st.set_epoch(0)
    got = 0
    for batch in st.batches():
        got += 1
        st.step_done()
        if got == 3:
            break
    assert got == 3
    # Kaldi's global stats are the sum of cmvn.scp
    from pkwrap.kaldi.cmvn import read_global_cmvn_stats
    from pkwrap.kaldi.table import read_table
    cm = read_table("scp:data/train_hires/cmvn.scp")
    assert np.allclose(read_global_cmvn_stats(d / "global_cmvn.stats"),
                       sum(np.asarray(m, np.float64) for m in cm.values()), rtol=1e-6)


def test_make_chain_egs_dir_bad_input(tmp_path, monkeypatch):
    from pkwrap.chain.get_egs import EgsDirError
    work = tmp_path / "fx"
    shutil.copytree(SMALL, work)
    monkeypatch.chdir(work)
    os.unlink("exp/chain/lats/lat.1.gz")
    with pytest.raises(EgsDirError, match=r"exp/chain/lats/lat.1.gz: missing"):
        _make(tmp_path / "egs")
    with open("exp/chain/lats/lat.1.gz", "wb") as f:
        f.write(b"not gzip")
    with pytest.raises(Exception, match=r"lat.1.gz"):
        _make(tmp_path / "egs")
    assert not (tmp_path / "egs" / "cegs.1.ark").exists()
    with pytest.raises(EgsDirError, match="too few"):
        _make(tmp_path / "egs2", num_utts_subset=40)


def test_make_chain_egs_dir_jobs_in_parallel(tmp_path, monkeypatch):
    """Two lattice archives: the same egs dir with one process or two."""
    import gzip
    from pkwrap.kaldi.lattice import COMPACT_LATTICE_HOLDER
    from pkwrap.kaldi.table import read_archive_entry
    work = tmp_path / "fx"
    shutil.copytree(SMALL, work)
    monkeypatch.chdir(work)
    data = gzip.open("exp/chain/lats/lat.1.gz").read()
    parts, pos = [], 0
    while True:
        key, _, _, end = read_archive_entry(data, pos, "lat.1.gz", COMPACT_LATTICE_HOLDER)
        if key is None:
            break
        parts.append(data[pos:end])
        pos = end
    for n, chunk in enumerate((parts[:30], parts[30:]), 1):
        with gzip.open("exp/chain/lats/lat.%d.gz" % n, "wb") as f:
            f.write(b"".join(chunk))
    with open("exp/chain/lats/num_jobs", "w") as f:
        f.write("2\n")
    s1 = _make(tmp_path / "e1", num_processes=1)
    s2 = _make(tmp_path / "e2", num_processes=2)
    assert s1.egs_per_archive_written == s2.egs_per_archive_written
    for name in sorted(os.listdir(tmp_path / "e1")):
        p1, p2 = tmp_path / "e1" / name, tmp_path / "e2" / name
        if p1.is_file():
            assert p1.read_bytes() == p2.read_bytes(), name


def test_scripts_on_damaged_input(tmp_path):
    """lattice-align-phones and apply-cmvn-online on a truncated lattice archive and a
    damaged global_cmvn.stats: exit 1, one line naming the file, no output left."""
    env = script_env()
    py = sys.executable
    sc = REPO / "scripts"
    lat = tmp_path / "lat.1.gz"
    data = gzip.open(SMALL / "exp/chain/lats/lat.1.gz").read()
    with gzip.open(lat, "wb") as f:
        f.write(data[:len(data) // 2])
    out = tmp_path / "ali.ark"
    r = subprocess.run([py, str(sc / "lattice-align-phones"), "--replace-output-symbols=true",
                        "exp/chain/lats/final.mdl", "ark:gunzip -c %s |" % lat, "ark:%s" % out],
                       cwd=SMALL, env=env, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lattice-align-phones: ") and "lat.1.gz" in last, r.stderr
    assert not out.exists() and not list(tmp_path.glob("ali.ark*"))
    stats = tmp_path / "global_cmvn.stats"
    stats.write_text("[ 1 2 nan\n 3 ]\n")
    out = tmp_path / "cmvn.ark"
    r = subprocess.run([py, str(sc / "apply-cmvn-online"), "--config=conf/online_cmvn.conf",
                        "--spk2utt=ark:data/train_hires/spk2utt", str(stats),
                        "scp:data/train_hires/feats.scp", "ark:%s" % out],
                       cwd=SMALL, env=env, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apply-cmvn-online: ") and \
        "global_cmvn.stats" in lines[0], r.stderr
    assert not out.exists() and not list(tmp_path.glob("cmvn.ark*"))
