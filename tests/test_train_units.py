"""pkwrap.train pieces that need no egs reader or loss: minibatch rules, the resumable
sampler, frame shifts, checkpoints, context probing, nnet3-compute style forward."""
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pkwrap.train import checkpoint as ckpt
from pkwrap.train.context import (ModelContext, probe_model_context, select_model_input,
                                  split_model_output)
from pkwrap.train.data import ChainMinibatchSampler, MinibatchSizeRule, effective_frame_shift
from pkwrap.train.forward import compute_nnet_output
from pkwrap.train.metrics import ObjfTracker, kaldi_objf_line

torch.set_num_threads(1)


# --- Kaldi's --minibatch-size rules ----------------------------------------------------------
def test_minibatch_rule_fixed_and_ranges():
    r = MinibatchSizeRule("128")
    assert r.size(170, 127, False) == 0 and r.size(170, 128, False) == 128
    assert r.size(170, 100, True) == 0  # only 128 allowed: the rest is dropped
    r = MinibatchSizeRule("16:32,64")
    assert r.largest(170) == 64
    assert r.size(170, 63, False) == 0
    assert r.size(170, 63, True) == 32 and r.size(170, 20, True) == 20
    assert r.size(170, 15, True) == 0


def test_minibatch_rule_by_eg_size():
    r = MinibatchSizeRule("256=64/512=32")
    assert r.largest(170) == 64 and r.largest(300) == 64 and r.largest(400) == 32
    assert r.largest(10000) == 32
    for bad in ("", "a", "256=64/32", "0", "5:3", "x=4"):
        with pytest.raises(ValueError):
            MinibatchSizeRule(bad)


def test_effective_frame_shift():
    # nnet3-chain-copy-egs --frame-shift=s: inputs move by s, outputs by s rounded to f
    assert [effective_frame_shift(s, 3) for s in range(3)] == [0, -1, 1]
    assert [effective_frame_shift(s, 1) for s in range(2)] == [0, 0]
    assert [effective_frame_shift(s, 2) for s in range(2)] == [0, 1]


# --- the sampler ---------------------------------------------------------------------------
def _structures(n=37):
    # two eg structures (different chunk sizes) as Kaldi's egs with several chunk widths
    return [(170, 50) if i % 3 else (140, 40) for i in range(n)]


def test_sampler_plan_shards_and_structure():
    st = _structures()
    samplers = [ChainMinibatchSampler(st, "4", 3, seed=7, rank=r, world_size=2) for r in (0, 1)]
    plan = samplers[0].plan(0)
    assert plan == samplers[1].plan(0)
    for mb in plan:
        assert len({st[i] for i in mb}) == 1, "egs of different structure merged"
        assert len(mb) == 4
    used = [i for mb in plan for i in mb]
    assert len(used) == len(set(used))
    got = [list(samplers[r]) for r in (0, 1)]
    assert len(got[0]) == len(got[1]) == len(plan) // 2
    idx0 = {b[0][1] for b in got[0]}
    idx1 = {b[0][1] for b in got[1]}
    assert idx0.isdisjoint(idx1)
    assert all(g % 2 == 0 for g in idx0) and all(g % 2 == 1 for g in idx1)
    assert samplers[0].plan(1) != plan  # a new permutation per epoch
    # frame shifts rotate through the f values
    shifts = {b[0][2] for b in got[0] + got[1]}
    assert shifts == {-1, 0, 1}


def test_sampler_resume_and_world_size_change():
    st = _structures(64)
    full = ChainMinibatchSampler(st, "4", 3, seed=1, rank=0, world_size=1)
    order = [b[0][1] for b in full]
    # two workers consume 3 steps, then the job restarts with one worker
    s2 = [ChainMinibatchSampler(st, "4", 3, seed=1, rank=r, world_size=2) for r in (0, 1)]
    seen = []
    its = [iter(s) for s in s2]
    for _ in range(3):
        for r in (0, 1):
            seen.append(next(its[r])[0][1])
        for s in s2:
            s.step_done()
    sd = s2[0].state_dict()
    assert sd["position"] == 6
    s1 = ChainMinibatchSampler(st, "4", 3, seed=1, rank=0, world_size=1)
    s1.load_state_dict(sd)
    rest = [b[0][1] for b in s1]
    assert seen + rest == order  # every minibatch exactly once, in the global order
    # same world size: the resumed rank gets exactly the batches it would have had
    s2b = ChainMinibatchSampler(st, "4", 3, seed=1, rank=1, world_size=2)
    s2b.load_state_dict(sd)
    assert [b for b in s2b] == list(its[1])
    with pytest.raises(ValueError):
        ChainMinibatchSampler(st, "4", 3, seed=2).load_state_dict(sd)


# --- checkpoints ---------------------------------------------------------------------------
def test_checkpoint_roundtrip_truncation_and_retention(tmp_path):
    d = str(tmp_path / "ck")
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(ckpt.checkpoint_path(d, step), {"step": step,
                                                             "w": torch.arange(5.0) * step})
    st = ckpt.load_checkpoint(ckpt.checkpoint_path(d, 8))
    assert st["step"] == 8 and torch.equal(st["w"], torch.arange(5.0) * 8)
    assert not any(".tmp." in p for p in os.listdir(d))
    # cut the newest short, as a kill during a non-atomic write would
    p8 = ckpt.checkpoint_path(d, 8)
    data = open(p8, "rb").read()
    open(p8, "wb").write(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load_checkpoint(p8)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        path, st = ckpt.find_latest_checkpoint(d)
    assert path == ckpt.checkpoint_path(d, 6) and st["step"] == 6
    assert any("ckpt-00000008.pt" in str(x.message) and "truncated" in str(x.message) for x in w)
    # a flipped byte is caught by the hash
    p6 = ckpt.checkpoint_path(d, 6)
    b = bytearray(open(p6, "rb").read())
    b[-10] ^= 0xFF
    open(p6, "wb").write(bytes(b))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.load_checkpoint(p6)
    open(str(tmp_path / "junk.pt"), "wb").write(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="not a pkwrap checkpoint"):
        ckpt.load_checkpoint(str(tmp_path / "junk.pt"))
    # retention: last 2 plus the best by valid objective
    ckpt.apply_retention(d, keep_last=2, objf_of={2: -0.5, 4: -0.9, 6: -1.0})
    assert [s for s, _ in ckpt.list_checkpoints(d)] == [2, 6, 8]


def test_rng_state_roundtrip():
    st = ckpt.get_rng_state()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    ckpt.set_rng_state(st)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# --- context probing -----------------------------------------------------------------------
class ValidTdnn(nn.Module):
    """Conv stack without padding: total context 4 + 2 + 18 = 24, subsampling 3."""

    def __init__(self, lc=None, rc=None):
        super().__init__()
        self.c1 = nn.Conv1d(5, 8, 5)             # context 4
        self.c2 = nn.Conv1d(8, 8, 3, stride=3)   # context 2, subsampling 3
        self.c3 = nn.Conv1d(8, 6, 3, dilation=3)  # context 2 output frames = 6 input frames
        self.xent = nn.Linear(8, 6)
        if lc is not None:
            self.left_context, self.right_context = lc, rc

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x.transpose(1, 2)))))
        y = self.c3(h).transpose(1, 2)
        return {"output": y, "output-xent": self.xent(h.transpose(1, 2)[:, 3:-3]).log_softmax(-1)}


class PaddedCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(4, 6, 5, padding=2)
        self.d = nn.Conv1d(6, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.d(torch.relu(self.c(x.transpose(1, 2))))).transpose(1, 2)


def test_probe_valid_model():
    torch.manual_seed(0)
    m = ValidTdnn()
    rng = torch.get_rng_state()
    ctx = probe_model_context(m, 5)
    assert torch.equal(rng, torch.get_rng_state()), "probing moved the training RNG"
    # c1: 4, c2: 2, c3 (dilation 3 at the subsampled rate): 6 outputs = 18 input frames
    assert ctx.left_context + ctx.right_context == 24
    for t_in in range(25, 70):
        y, _ = split_model_output(m(torch.randn(1, t_in, 5)))
        assert y.shape[1] == ctx.num_output_frames(t_in)
    assert ctx.frame_subsampling_factor == 3 and not ctx.padded and ctx.has_xent
    total = ctx.left_context + ctx.right_context
    assert ctx.left_context == (total + 1) // 2
    m2 = ValidTdnn(lc=total - 3, rc=3)
    ctx2 = probe_model_context(m2, 5)
    assert (ctx2.left_context, ctx2.right_context) == (total - 3, 3)
    with pytest.raises(ValueError, match="total context"):
        probe_model_context(ValidTdnn(lc=1, rc=1), 5)


def test_probe_padded_model_and_tdnnf():
    ctx = probe_model_context(PaddedCnn(), 4)
    # output j at input 2j depends on inputs 2j-3 .. 2j+3
    assert ctx == ModelContext(3, 3, 2, True, False, 6)
    from pkwrap.nn import TDNNFModel
    m = TDNNFModel(30, feat_dim=12, tdnn_dim=16, tdnnf_dim=16, bottleneck_dim=4,
                   time_strides=(1, 0, 3), prefinal_dim=8, prefinal_big_dim=16)
    ctx = probe_model_context(m, 12)  # Kaldi batchnorm has no stats yet: probed in train mode
    assert (ctx.left_context, ctx.right_context) == (m.left_context, m.right_context) == (6, 6)
    assert ctx.frame_subsampling_factor == 3 and ctx.has_xent and ctx.num_outputs == 30
    assert float(m.component("batchnorm0").count) == 0, "probing changed the model's statistics"


def test_select_model_input_frame_shift():
    ctx = ModelContext(4, 5, 3, False)
    feats = torch.arange(30.0).reshape(1, 30, 1)  # t = -6 .. 23
    x, off = select_model_input(feats, ctx, egs_left_context=6, num_output_frames=5,
                                frame_shift=1)
    # output 0 centred on chunk row 6 + 1; needs rows 3 .. 3 + 4 + 12 + 5
    assert off == 0 and x[0, 0, 0] == 3 and x.shape[1] == 4 + 12 + 1 + 5
    with pytest.raises(ValueError, match="too short"):
        select_model_input(feats, ctx, egs_left_context=3, num_output_frames=5)


# --- nnet3-compute forward -----------------------------------------------------------------
def test_compute_nnet_output_edge_padding_and_chunks():
    torch.manual_seed(1)
    m = ValidTdnn()
    ctx = probe_model_context(m, 5)
    feats = torch.randn(47, 5)
    y = compute_nnet_output(m, feats, ctx)
    assert y.shape == (16, 6)  # ceil(47 / 3)
    lc, rc = ctx.left_context, ctx.right_context
    pad = torch.cat([feats[:1].repeat(lc, 1), feats, feats[-1:].repeat(rc + 3, 1)])
    with torch.no_grad():
        ref = m(pad[None])["output"][0]
    assert torch.allclose(y, ref[:16], atol=1e-6)
    y2 = compute_nnet_output(m, feats, ctx, frames_per_chunk=10)
    assert torch.allclose(y, y2, atol=1e-5)
    yx = compute_nnet_output(m, feats, ctx, output="output-xent")
    assert yx.shape == (16, 6)


def test_compute_nnet_outputs_writes_kaldi_ark(tmp_path):
    import kaldiio
    from pkwrap.train import compute_nnet_outputs
    torch.manual_seed(2)
    m = ValidTdnn()
    feats = {"a": np.random.rand(20, 5).astype(np.float32),
             "b": np.random.rand(31, 5).astype(np.float32)}
    ark = str(tmp_path / "out.ark")
    compute_nnet_outputs(m, feats, "ark,scp:%s,%s" % (ark, tmp_path / "out.scp"))
    got = dict(kaldiio.load_ark(ark))
    assert sorted(got) == ["a", "b"] and got["a"].shape == (7, 6) and got["b"].shape == (11, 6)
    ref = compute_nnet_outputs(m, feats)
    assert np.allclose(got["b"], ref["b"])


def test_objf_tracker_and_log_line():
    class R:
        objf, l2_term, weight, xent_objf = -40.0, -2.0, 100.0, -300.0
    t = ObjfTracker()
    t.add_result(R())
    t.add_result(R())
    assert t.per_frame("objf") == -0.4 and t.per_frame("xent_objf") == -3.0
    assert kaldi_objf_line("output", -0.666522, 400.0) == \
        "Overall log-probability for 'output' is -0.666522 per frame, over 400 frames."


def test_frame_shift_falls_back_without_spare_context():
    import io
    import logging
    from types import SimpleNamespace
    from pkwrap.train.data import ChainBatch
    from pkwrap.train.diagnostics import compute_chain_loss
    ctx = ModelContext(2, 2, 3, False)
    seen = []

    def model(x):
        seen.append(x[0, :, 0].clone())
        return torch.zeros(1, (x.shape[1] - 5) // 3 + 1, 4)

    feats = torch.arange(17.0).reshape(1, 17, 1)  # t = -2 .. 14: exactly the model context
    sup = SimpleNamespace(num_sequences=1, frames_per_sequence=5)
    loss = lambda out, s, xent_output=None, deriv_weights=None: out.shape  # noqa: E731
    assert compute_chain_loss(model, ctx, loss, ChainBatch(feats, sup, None, 2, 0)) == (1, 5, 4)
    import pkwrap.train.diagnostics as diag
    diag._warned_no_shift = False  # warned once per process
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    logging.getLogger("pkwrap.train").addHandler(h)
    try:
        assert compute_chain_loss(model, ctx, loss, ChainBatch(feats, sup, None, 2, 1)) == \
            (1, 5, 4)
    finally:
        logging.getLogger("pkwrap.train").removeHandler(h)
    assert torch.equal(seen[0], seen[1]) and "frame shifts are not applied" in buf.getvalue()
    wide = torch.arange(19.0).reshape(1, 19, 1)  # one spare frame each side: shifted window
    compute_chain_loss(model, ctx, loss, ChainBatch(wide, sup, None, 3, 1))
    assert seen[-1][0] == 2 and seen[-1].shape[0] == 17


def test_checkpoint_writer_killed_leaves_no_torn_file(tmp_path):
    """SIGKILL a process that keeps writing checkpoints: every file under a final name
    verifies; a leftover temporary file is ignored and removed by the retention pass."""
    import signal
    import subprocess
    import sys
    import time
    code = ("import torch, sys\n"
            "from pkwrap.train.checkpoint import save_checkpoint, checkpoint_path\n"
            "x = torch.randn(2_000_000)\n"
            "for i in range(1, 10000):\n"
            "    save_checkpoint(checkpoint_path(sys.argv[1], i), {'step': i, 'x': x + i})\n"
            "    print(i, flush=True)\n")
    d = str(tmp_path / "ck")
    p = subprocess.Popen([sys.executable, "-c", code, d], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # let a few complete, then kill in the middle of the next
            assert p.stdout.readline().strip()
        time.sleep(0.05)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    found = ckpt.list_checkpoints(d)
    assert len(found) >= 3
    for step, path in found:
        st = ckpt.load_checkpoint(path)
        assert st["step"] == step and float(st["x"][0] - st["x"][1]) != 0.0
    path, st = ckpt.find_latest_checkpoint(d)
    assert path == found[-1][1]
    ckpt.apply_retention(d, keep_last=1)
    assert os.listdir(d) == [os.path.basename(found[-1][1])]


def test_objf_tracker_reduce_with_a_rank_that_saw_no_minibatch(tmp_path):
    """Two gloo ranks, one with no minibatch: the reduction must not hang and must sum."""
    import subprocess
    import sys
    import textwrap
    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent("""
        import sys, torch, torch.distributed as dist
        from pkwrap.train.metrics import ObjfTracker
        dist.init_process_group("gloo")
        t = ObjfTracker()
        if dist.get_rank() == 0:
            t.update(objf=-2.0, weight=4.0, frames=4.0, minibatches=1.0)
        r = t.reduce()
        assert r == {"objf": -2.0, "weight": 4.0, "frames": 4.0, "minibatches": 1.0}, r
        dist.destroy_process_group()
    """))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_ivectors_reach_models_that_read_them():
    """The egs' i-vectors go to a model with an ivector input (``model(x, ivector=)``);
    a model without one gets ``model(x)`` and the unused input is reported once; a model
    that needs them and egs without them is an error."""
    import io
    import logging
    from types import SimpleNamespace
    from pkwrap.train.context import model_ivector_dim
    from pkwrap.train.data import ChainBatch
    from pkwrap.train.diagnostics import compute_chain_loss
    import pkwrap.train.diagnostics as diag
    sup = SimpleNamespace(num_sequences=2, frames_per_sequence=5)
    feats = torch.zeros(2, 17, 1)
    iv = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    loss = lambda out, s, xent_output=None, deriv_weights=None: out  # noqa: E731
    got = {}

    class WithIvector(torch.nn.Module):
        input_names = ["input", "ivector"]

        def input_dim(self, name):
            return 2

        def forward(self, x, ivector=None):
            got["iv"] = ivector
            return torch.zeros(x.shape[0], 5, 4)

    m = WithIvector()
    assert model_ivector_dim(m) == 2
    ctx = ModelContext(2, 2, 3, False, ivector_dim=2)
    compute_chain_loss(m, ctx, loss, ChainBatch(feats, sup, None, 2, 0, ivector=iv))
    assert torch.equal(got["iv"], iv)
    with pytest.raises(ValueError, match="reads an ivector input"):
        compute_chain_loss(m, ctx, loss, ChainBatch(feats, sup, None, 2, 0))
    diag._warned_unused_ivector = False  # reported once per process
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    logging.getLogger("pkwrap.train").addHandler(h)
    try:
        plain = lambda x: torch.zeros(x.shape[0], 5, 4)  # noqa: E731
        out = compute_chain_loss(plain, ModelContext(2, 2, 3, False), loss,
                                 ChainBatch(feats, sup, None, 2, 0, ivector=iv))
    finally:
        logging.getLogger("pkwrap.train").removeHandler(h)
    assert out.shape == (2, 5, 4)
    assert "ivector input (dim 2) that the model does not consume" in buf.getvalue()


def test_kaldi_batchnorm_stats_scaled_for_nnet3_components():
    """Kaldi's ScaleBatchnormStats(0.8) after every step, and the reset of
    recompute-stats, also reach pkwrap.nnet3's BatchNormComponent (averages + count)."""
    from pkwrap.nnet3 import nnet3_from_config
    from pkwrap.train.diagnostics import scale_batchnorm_stats
    from pkwrap.train.loop import _scale_kaldi_batchnorm_stats
    net = nnet3_from_config("input-node name=input dim=4\n"
                            "component name=bn type=BatchNormComponent dim=4\n"
                            "component-node name=bn component=bn input=input\n"
                            "output-node name=output input=bn\n")
    bn = net.component("bn")
    net.train()
    net(torch.randn(2, 5, 4))
    assert float(bn.count) == 10.0
    mean = bn.stats_mean.clone()
    _scale_kaldi_batchnorm_stats(net, 0.8)
    assert float(bn.count) == pytest.approx(8.0) and torch.equal(bn.stats_mean, mean)
    assert scale_batchnorm_stats(bn, 0.0) and float(bn.count) == 0.0
