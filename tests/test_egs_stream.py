"""pkwrap.train.stream: a Kaldi egs dir streamed as train.py feeds nnet3-chain-train.

The egs dir is ``fixtures/kaldi_recipe/egs``: the first 8 egs of each of the 4
archives that Kaldi's get_egs.sh wrote for the kaldi_recipe fixture (three chunk
widths, so three eg structures for the merger), with its ``info/``."""
import os
import shutil
import threading

import numpy as np
import pytest
import torch

from conftest import fixture_path
from pkwrap.kaldi import read_chain_egs
from pkwrap.kaldi.chain_egs import _fst_text, merge_chain_egs_stream
from pkwrap.train.data import (ChainBatch, collate_chain_egs, effective_frame_shift,
                               halve_minibatch_size)
from pkwrap.train.stream import KaldiEgsDir, StreamingEgs, archive_pass

torch.set_num_threads(1)


def _egs_dir():
    return str(fixture_path("kaldi_recipe", "egs"))


def _sig(b: ChainBatch):
    return (b.keys, b.frame_shift, tuple(b.feats.shape))


def test_archive_pass_is_train_py_assignment():
    # from the fixture's exp/chain/tdnn/log/train.<iter>.1.log (4 archives, f = 3, 1 job):
    # iteration: (archive, --frame-shift)
    seen = {0: (1, 1), 1: (2, 2), 2: (3, 0), 24: (1, 1), 47: (4, 0)}
    for it, want in seen.items():
        assert archive_pass(it, 4, 3) == want
    # 2 jobs: job j of iteration i reads k = 2 i + j - 1
    assert [archive_pass(2 * 5 + j, 4, 3) for j in (0, 1)] == [(3, 2), (4, 0)]
    assert archive_pass(5, 4, 3, frame_shift=False) == (2, 0)


def test_egs_dir_info_and_errors(tmp_path):
    d = KaldiEgsDir(_egs_dir())
    assert d.num_archives == 4 and d.left_context == 12 and d.feat_dim == 40
    bad = tmp_path / "egs"
    shutil.copytree(_egs_dir(), bad)
    os.remove(bad / "cegs.3.ark")
    with pytest.raises(FileNotFoundError, match=r"num_archives says 4, but cegs.3.ark"):
        KaldiEgsDir(str(bad))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        KaldiEgsDir(str(tmp_path / "nothing"))


def _reference_pass(path, seed, buffer_size, rule):
    """train.py's pipeline for one archive pass, written plainly: read all, shuffle as
    nnet3-chain-shuffle-egs --buffer-size (same RNG draws), merge with
    nnet3-chain-merge-egs' code."""
    rng = np.random.default_rng(list(seed))
    slots = [None] * buffer_size
    out = []
    for key, eg in read_chain_egs("ark:" + path):
        j = int(rng.integers(buffer_size))
        if slots[j] is not None:
            out.append(slots[j])
        slots[j] = (key, eg)
    out += [s for s in slots if s is not None]
    merged = []
    for _, eg in merge_chain_egs_stream(((k, e) for k, e in out), rule):
        merged.append(eg)
    return [k for k, _ in out], merged


@pytest.mark.parametrize("buffer_size", [1, 5, 5000])
def test_stream_is_copy_shuffle_merge_of_each_archive(buffer_size):
    rule = "4,2"
    src = StreamingEgs(_egs_dir(), rule, 3, shuffle_buffer_size=buffer_size, seed=3,
                       rank=0, world_size=1)
    src.set_epoch(0)
    got = list(src.batches())
    assert src.epoch_finished()
    # epoch 0 = 4 archives x 3 frame shifts = 12 iterations
    ref = []
    for it in range(12):
        a, s = archive_pass(it, 4, 3)
        order, merged = _reference_pass(os.path.join(_egs_dir(), "cegs.%d.ark" % a),
                                        (3, it), buffer_size, rule)
        d = effective_frame_shift(s, 3)
        assert sorted(order) == sorted(k for k, _ in read_chain_egs(
            "ark:" + os.path.join(_egs_dir(), "cegs.%d.ark" % a)))
        for eg in merged:
            ref.append((collate_chain_egs([("", eg, 0, d)], "input", 3, 12)))
    assert len(got) == len(ref) > 12
    for g, r in zip(got, ref):
        assert g.frame_shift == r.frame_shift
        assert torch.equal(g.feats, r.feats)
        assert _fst_text(g.supervision.fst) == _fst_text(r.supervision.fst)
    if buffer_size == 1:  # no shuffling: archive order within each structure
        first = got[0].keys
        keys = [k for k, _ in read_chain_egs("ark:" + os.path.join(_egs_dir(), "cegs.1.ark"))]
        assert list(first) == [k for k in keys if k in first]


def test_first_iteration_rule_and_halving():
    assert halve_minibatch_size("64,32") == "32,16"
    assert halve_minibatch_size("256=64:128/512=32") == "256=32:64/512=16"
    src = StreamingEgs(_egs_dir(), "4", 3, shuffle_buffer_size=8, rank=0, world_size=1,
                       first_iteration_minibatch_size="2")
    src.set_epoch(0)
    sizes = []
    for b in src.batches():
        sizes.append((src.iteration, b.num_sequences))
    assert {n for it, n in sizes if it == 0} <= {1, 2}
    assert 4 in {n for it, n in sizes if it > 0}


def _run(src, n=None):
    out = []
    for b in src.batches():
        out.append(b)
        src.step_done()
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("stop_after", [1, 3, 4, 7, 11])
def test_resume_continues_at_the_same_minibatch(stop_after):
    kw = dict(minibatch_size="3,1", frame_subsampling_factor=3, shuffle_buffer_size=4,
              seed=5, rank=0, world_size=1)
    full_src = StreamingEgs(_egs_dir(), **kw)
    full = []
    for e in range(2):
        full_src.set_epoch(e)
        full += _run(full_src)
    a = StreamingEgs(_egs_dir(), **kw)
    a.set_epoch(0)
    first = _run(a, stop_after)
    sd = a.state_dict()
    assert sd["pass"] is not None and (sd["pass"]["slots"] or sd["pass"]["merger"])
    b = StreamingEgs(_egs_dir(), **kw)
    assert b.load_state_dict(sd) is None
    rest = _run(b)
    assert b.epoch_finished()
    b.set_epoch(1)
    rest += _run(b)
    got = first + rest
    assert [_sig(x) for x in got] == [_sig(x) for x in full]
    for x, y in zip(got, full):
        assert torch.equal(x.feats, y.feats)


def test_resume_refuses_a_changed_egs_dir(tmp_path):
    d = tmp_path / "egs"
    shutil.copytree(_egs_dir(), d)
    a = StreamingEgs(str(d), "4", 3, shuffle_buffer_size=4, rank=0, world_size=1)
    a.set_epoch(0)
    _run(a, 2)
    sd = a.state_dict()
    with open(d / "cegs.2.ark", "ab") as f:
        f.write(b" ")
    with pytest.raises(ValueError, match="changed since the checkpoint"):
        StreamingEgs(str(d), "4", 3, shuffle_buffer_size=4, rank=0,
                     world_size=1).load_state_dict(sd)


def test_truncated_archive_names_the_file(tmp_path):
    d = tmp_path / "egs"
    shutil.copytree(_egs_dir(), d)
    p = d / "cegs.1.ark"
    data = p.read_bytes()
    p.write_bytes(data[:len(data) - 100])
    src = StreamingEgs(str(d), "4", 3, shuffle_buffer_size=4, rank=0, world_size=1)
    src.set_epoch(0)
    with pytest.raises(Exception, match="cegs.1.ark"):
        _run(src)


def test_two_ranks_read_their_archives_in_lockstep():
    """Rank r of 2 reads archive pass 2 i + r; both take the same number of steps; an
    iteration ends on both ranks when one rank's archive ends."""
    flags = {}
    bar = threading.Barrier(2)

    def all_have(rank):
        def f(have):
            flags[rank] = have
            bar.wait()
            res = all(flags.values())
            bar.wait()
            return res
        return f

    srcs = [StreamingEgs(_egs_dir(), "3", 3, shuffle_buffer_size=4, seed=1, rank=r,
                         world_size=2) for r in (0, 1)]
    got = {0: [], 1: []}

    def run(r):
        s = srcs[r]
        s._all_have = all_have(r)
        s.set_epoch(0)
        for b in s.batches():
            got[r].append((s.iteration, b.keys))
            s.step_done()

    th = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in th:
        t.start()
    for t in th:
        t.join(60)
    assert len(got[0]) == len(got[1]) > 0
    assert [it for it, _ in got[0]] == [it for it, _ in got[1]]
    assert max(it for it, _ in got[0]) == 5  # 12 passes / 2 ranks = 6 iterations
    arch = {a: {k for k, _ in read_chain_egs(
        "ark:" + os.path.join(_egs_dir(), "cegs.%d.ark" % a))} for a in range(1, 5)}
    for r in (0, 1):
        for it, keys in got[r]:
            a = archive_pass(2 * it + r, 4, 3)[0]
            assert set(keys) <= arch[a]


def test_resume_with_another_number_of_workers():
    a = StreamingEgs(_egs_dir(), "4", 3, shuffle_buffer_size=4, rank=0, world_size=1)
    a.set_epoch(0)
    it = a.batches()
    for _ in range(3):
        next(it)
        a.step_done()
    sd = a.state_dict()
    assert sd["iteration"] == 2 and sd["pass"] is not None  # one minibatch per archive
    b = StreamingEgs(_egs_dir(), "4", 3, shuffle_buffer_size=4, rank=1, world_size=2)
    note = b.load_state_dict(sd)
    assert "iteration 2 of 1 workers -> iteration 2 of 2" in note
    assert b.iteration == 2 and b._pass is None  # passes 0..2 begun -> 2 x 2 = pass 4


def test_trainer_resumes_a_streamed_run_exactly(tmp_path):
    """Train a small model on the streamed egs dir; interrupt after k steps (checkpoint),
    resume in a new Trainer: the minibatches and the final model equal the
    uninterrupted run's."""
    from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
    from pkwrap.nn import TDNNFModel
    from pkwrap.optim import NGSGD, kaldi_param_groups
    from pkwrap.train import TrainConfig, Trainer

    den = str(fixture_path("kaldi_recipe", "den.fst"))

    def make(exp, max_steps):
        torch.manual_seed(0)
        model = TDNNFModel(64, feat_dim=40, tdnn_dim=16, tdnnf_dim=16, bottleneck_dim=4,
                           time_strides=(1, 3), prefinal_dim=8, prefinal_big_dim=16,
                           use_idct=False)
        loss = ChainLoss(DenominatorGraph.from_fst(den, 64), ChainOptions(xent_regularize=0.1))
        src = StreamingEgs(_egs_dir(), "4,2", 3, shuffle_buffer_size=6, seed=2)
        seen = []
        tr = Trainer(model, loss, NGSGD(kaldi_param_groups(model), lr=0.002), src,
                     TrainConfig(str(exp), num_epochs=1, checkpoint_every=5,
                                 max_steps=max_steps, progress_bar=False,
                                 tensorboard=False, log_every=0, seed=2),
                     after_step=lambda m, step: seen.append(step))
        orig = tr._train_step

        def step(batch):
            seen.append(_sig(batch))
            return orig(batch)
        tr._train_step = step
        return tr, seen

    tr, full_seen = make(tmp_path / "full", None)
    full_model = tr.train()
    tr1, seen1 = make(tmp_path / "cut", 7)  # checkpoints at 5 and at 7 (the end)
    tr1.train()
    os.remove(tmp_path / "cut" / "checkpoints" / "ckpt-00000007.pt")  # resume from 5
    tr2, seen2 = make(tmp_path / "cut", None)
    model2 = tr2.train()
    batches = [s for s in full_seen if isinstance(s, tuple)]
    resumed = [s for s in seen1 if isinstance(s, tuple)][:5] + \
        [s for s in seen2 if isinstance(s, tuple)]
    assert len(batches) > 7 and resumed == batches
    for (n, p), q in zip(full_model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(p, q), n


def test_scp_egs_dir_streams_like_its_archives(tmp_path):
    """cegs.N.scp (key archive:offset lines) gives the same minibatches as cegs.N.ark."""
    from pkwrap.kaldi.chain_egs import CHAIN_EG_HOLDER
    from pkwrap.kaldi.table import open_input_buffer, read_archive_entry
    d = tmp_path / "egs"
    shutil.copytree(os.path.join(_egs_dir(), "info"), d / "info")
    for a in range(1, 5):
        ark = os.path.join(_egs_dir(), "cegs.%d.ark" % a)
        buf = open_input_buffer(ark)
        pos, lines = 0, []
        while True:
            key, off, _, pos = read_archive_entry(buf, pos, ark, CHAIN_EG_HOLDER)
            if key is None:
                break
            lines.append("%s %s:%d\n" % (key, ark, off))
        (d / ("cegs.%d.scp" % a)).write_text("".join(lines))
    kw = dict(minibatch_size="3,1", frame_subsampling_factor=3, shuffle_buffer_size=4,
              seed=4, rank=0, world_size=1)
    ref = StreamingEgs(_egs_dir(), **kw)
    scp = StreamingEgs(str(d), **kw)
    assert scp.egs.archives[0].endswith("cegs.1.scp")
    ref.set_epoch(0)
    scp.set_epoch(0)
    first = _run(scp, 5)
    sd = scp.state_dict()
    again = StreamingEgs(str(d), **kw)
    again.load_state_dict(sd)
    got = first + _run(again)
    want = _run(ref)
    assert [_sig(x) for x in got] == [_sig(x) for x in want]


def test_trainer_resume_on_a_changed_egs_dir_says_what_to_do(tmp_path):
    """A checkpoint whose egs dir changed since (e.g. a damaged archive repaired) cannot be
    resumed: one error naming the checkpoint, the reason, and the checkpoints dir to remove
    to start again."""
    from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
    from pkwrap.nn import TDNNFModel
    from pkwrap.optim import NGSGD, kaldi_param_groups
    from pkwrap.train import TrainConfig, Trainer

    d = tmp_path / "egs"
    shutil.copytree(_egs_dir(), d)
    den = DenominatorGraph.from_fst(str(fixture_path("kaldi_recipe", "den.fst")), 64)

    def trainer(max_steps):
        torch.manual_seed(0)
        model = TDNNFModel(64, feat_dim=40, tdnn_dim=16, tdnnf_dim=16, bottleneck_dim=4,
                           time_strides=(1, 3), prefinal_dim=8, prefinal_big_dim=16,
                           use_idct=False)
        return Trainer(model, ChainLoss(den, ChainOptions(xent_regularize=0.1)),
                       NGSGD(kaldi_param_groups(model), lr=0.002),
                       StreamingEgs(str(d), "4", 3, shuffle_buffer_size=4, seed=2),
                       TrainConfig(str(tmp_path / "exp"), num_epochs=1, checkpoint_every=2,
                                   max_steps=max_steps, progress_bar=False,
                                   tensorboard=False, log_every=0, seed=2))

    trainer(2).train()
    with open(d / "cegs.2.ark", "ab") as f:
        f.write(b" ")
    with pytest.raises(ValueError) as e:
        trainer(None).train()
    msg = str(e.value)
    assert "ckpt-00000002.pt: cannot resume" in msg and "changed since the checkpoint" in msg
    assert "remove %s" % (tmp_path / "exp" / "checkpoints") in msg
