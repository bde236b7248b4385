"""compute-prob, combination and batchnorm stats of pkwrap.train against Kaldi's numbers.

The nnet3 fixture stores Kaldi's outputs of its trained model on one merged eg
(8 x 50 frames) and nnet3-chain-compute-prob's printout for it. A module that returns
exactly those outputs for that eg's input rows isolates the diagnostics pipeline (egs
reading and merging, context cutting, row order, ChainLoss, per-frame sums, log lines)."""
import json
import logging
import re

import numpy as np
import pytest
import torch
from torch import nn

from conftest import fixture_path
from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
from pkwrap.train.context import probe_model_context
from pkwrap.train.data import ChainMinibatchSampler, EgsDataset, make_loader
from pkwrap.train.diagnostics import (average_state_dicts, combine_models, compute_prob,
                                      compute_prob_log_lines, recompute_batchnorm_stats)

torch.set_num_threads(1)


class KaldiOutputs(nn.Module):
    """Valid-convolution stand-in with context 11/11 and subsampling 3 that returns Kaldi's
    stored outputs when given the eg's input rows, and zeros for anything else."""

    left_context = 11
    right_context = 11

    def __init__(self, feats, chain, xent):
        super().__init__()
        self.register_buffer("feats", feats)    # [S][T_in][F], the rows the model gets
        self.register_buffer("chain", chain)    # [S][T][P]
        self.register_buffer("xent", xent)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        t_out = (x.shape[1] - 23) // 3 + 1
        if t_out < 1:
            raise ValueError("input too short")
        if x.shape == self.feats.shape and torch.equal(x, self.feats):
            return self.chain + self.dummy, self.xent
        z = x.new_zeros(x.shape[0], t_out, self.chain.shape[-1]) + self.dummy
        return z, z


def _nnet3_setup():
    fx = fixture_path("nnet3")
    prob = json.loads((fx / "compute_prob.json").read_text())
    data = EgsDataset.from_kaldi(str(fx / "egs" / "cegs_merged8.ark"))
    _, eg = data[0]
    s, t = eg.supervision.num_sequences, eg.supervision.frames_per_sequence
    p = eg.supervision.label_dim
    feats = eg.inputs["input"].reshape(s, -1, 40)[:, 1:171]  # t = -11 .. 158
    chain = torch.from_numpy(np.load(fx / "egs" / "eg_nnet_output.npy"))
    xent = torch.from_numpy(np.load(fx / "egs" / "eg_xent_output.npy"))
    chain = chain.reshape(t, s, p).transpose(0, 1).contiguous()  # t-major rows -> [S][T][P]
    xent = xent.reshape(t, s, p).transpose(0, 1).contiguous()
    model = KaldiOutputs(feats.contiguous(), chain, xent)
    den = DenominatorGraph.from_fst(str(fixture_path("biphone", "den.fst")), p)
    opts = prob["options"]
    loss = ChainLoss(den, ChainOptions(leaky_hmm_coefficient=opts["leaky_hmm_coefficient"],
                                       l2_regularize=opts["l2_regularize"],
                                       xent_regularize=opts["xent_regularize"]))
    return prob, data, model, loss


def _batches(data, ctx):
    s = ChainMinibatchSampler(data.structures, "1", ctx.frame_subsampling_factor,
                              shuffle=False, rank=0, world_size=1, frame_shift=False)
    return list(make_loader(data, s))


def test_compute_prob_equals_kaldi():
    prob, data, model, loss = _nnet3_setup()
    ctx = probe_model_context(model, 40)
    assert (ctx.left_context, ctx.right_context, ctx.frame_subsampling_factor) == (11, 11, 3)
    batches = _batches(data, ctx)
    assert batches[0].egs_left_context == 12  # from the eg's indexes (t = -12 ..)
    tr = compute_prob(model, ctx, loss, batches)
    want = prob["result"]
    assert tr["weight"] == want["output"]["num_frames"] == 400
    assert tr.per_frame("objf") == pytest.approx(want["output"]["objf_per_frame"], rel=1e-4)
    assert tr.per_frame("xent_objf") == pytest.approx(want["output-xent"]["objf_per_frame"],
                                                      rel=1e-4)
    lines = compute_prob_log_lines(tr)
    # Kaldi's lines, same order and wording; numbers printed with %g agree to 1e-4
    num = re.compile(r"-?\d+\.?\d*(?:e[-+]?\d+)?")
    for got, ref in zip(lines, prob["kaldi_log_lines"]):
        assert num.sub("#", got) == num.sub("#", ref)
        for a, b in zip(num.findall(got), num.findall(ref)):
            assert float(a) == pytest.approx(float(b), rel=1e-4), (got, ref)
    assert len(lines) == len(prob["kaldi_log_lines"]) == 2


def test_combine_models_picks_best_average():
    _, data, model, loss = _nnet3_setup()
    ctx = probe_model_context(model, 40)
    batches = _batches(data, ctx)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    # older models: the outputs shifted by a constant per pdf -> worse objective;
    # the average of the newest two is half as bad as the older one
    bad = {k: v.clone() for k, v in good.items()}
    bad["chain"] = bad["chain"] + torch.linspace(-2, 2, bad["chain"].shape[-1])
    base = compute_prob(model, ctx, loss, batches).per_frame("objf")
    n, init, best = combine_models(model, [bad, bad, good], ctx, loss, batches,
                                   recompute_stats=False, logger=logging.getLogger("t"))
    assert n == 1 and init == pytest.approx(base) and best == init
    # newest is bad, older two good: averaging the last 3 pulls 2/3 of the way back
    n, init, best = combine_models(model, [good, good, bad], ctx, loss, batches,
                                   max_objective_evaluations=30, recompute_stats=False)
    assert n == 3 and best > init
    avg = average_state_dicts([good, good, bad])
    assert torch.allclose(model.state_dict()["chain"], avg["chain"])
    # select="average": the plain average of all, even where the valid objective prefers
    # the last model alone (the first case above)
    n, init, got = combine_models(model, [bad, bad, good], ctx, loss, batches,
                                  recompute_stats=False, select="average")
    avg = average_state_dicts([bad, bad, good])
    assert n == 3 and got < init
    assert torch.allclose(model.state_dict()["chain"], avg["chain"])
    assert got == pytest.approx(compute_prob(model, ctx, loss, batches).per_frame("objf"))
    with pytest.raises(ValueError, match="select must be 'valid' or 'average'"):
        combine_models(model, [good], ctx, loss, batches, select="best")


def test_recompute_batchnorm_stats():
    from pkwrap.nn import TDNNFModel
    torch.manual_seed(0)
    m = TDNNFModel(5, feat_dim=8, tdnn_dim=8, tdnnf_dim=8, bottleneck_dim=4,
                   time_strides=(1,), prefinal_dim=4, prefinal_big_dim=8, use_idct=False)
    bn2 = nn.BatchNorm1d(3)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m, self.bn = m, bn2

        def forward(self, x):
            out = self.m(x)
            c, xe = out["output"], out["output-xent"]
            return self.bn(c[..., :3].transpose(1, 2)).transpose(1, 2), xe

    w = Wrap()
    ctx = probe_model_context(w, 8)

    class B:  # the parts of a ChainBatch recompute_batchnorm_stats uses
        def __init__(self, x):
            self.feats, self.egs_left_context, self.frames_per_sequence = x, ctx.left_context, 4
            self.frame_shift = 0

        def to(self, device):
            return self

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, ctx.num_input_frames(4), 8, generator=g) * 3 + 1 for _ in range(3)]
    bn0 = m.component("batchnorm0")
    bn0.count.fill_(123.0)  # stale statistics are replaced
    assert recompute_batchnorm_stats(w, ctx, [B(x) for x in xs]) == len(
        [mod for mod in w.modules() if "BatchNorm" in type(mod).__name__])
    rows = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    assert float(bn0.count) == rows.shape[0]
    assert torch.allclose(bn0.stats_mean.double(), rows.mean(0), atol=1e-5)
    assert torch.allclose(bn0.stats_var.double(), rows.var(0, unbiased=False), rtol=1e-4)
    assert bn2.momentum == 0.1 and int(bn2.num_batches_tracked) == 3
    assert w.training  # modes restored


def test_trainer_on_the_fly_egs_single_process(tmp_path):
    """Egs made on the fly (pkwrap.chain.egs.ChainEgsDataset, redrawn every epoch), no
    torchrun: the Trainer follows the new chunk placement and trains."""
    from pkwrap.chain.egs import ChainEgsDataset, ExampleGenerationConfig
    from pkwrap.chain.supervision import read_supervisions
    from pkwrap.kaldi.fst import read_fst
    from pkwrap.nn import TDNNFModel
    from pkwrap.optim import NGSGD, kaldi_param_groups
    from pkwrap.train import TrainConfig, Trainer
    d = fixture_path("mono")
    sups = dict(read_supervisions("ark:%s" % (d / "data" / "supervision.ark")))
    feats = dict(np.load(d / "data" / "feats.npz"))
    cfg = ExampleGenerationConfig(left_context=10, right_context=10, num_frames="150,120",
                                  frame_subsampling_factor=3)
    ds = ChainEgsDataset(feats, sups, read_fst(str(d / "normalization.fst")), cfg, seed=1)
    epochs_seen = []
    orig = ds.set_epoch
    ds.set_epoch = lambda e: (epochs_seen.append(e), orig(e))[1]
    torch.manual_seed(0)
    model = TDNNFModel(34, feat_dim=40, tdnn_dim=16, tdnnf_dim=16, bottleneck_dim=4,
                       time_strides=(1, 3), prefinal_dim=8, prefinal_big_dim=16, use_idct=False)
    loss = ChainLoss(DenominatorGraph.from_fst(str(d / "den.fst"), 34),
                     ChainOptions(leaky_hmm_coefficient=0.1, xent_regularize=0.1))
    tr = Trainer(model, loss, NGSGD(kaldi_param_groups(model), lr=0.002), ds,
                 TrainConfig(str(tmp_path / "exp"), num_epochs=2, minibatch_size="4,1:3",
                             checkpoint_every=0, log_every=2, progress_bar=False,
                             tensorboard=False))
    before = [p.detach().clone() for p in model.parameters()]
    tr.train()
    assert epochs_seen == [0, 1]
    # every eg of both epochs was used: the rule "4,1:3" leaves no remainder
    n_minibatches = 0
    for e in (0, 1):
        ds.set_epoch(e)
        tr.sampler.set_structures([(c.left_context + c.num_frames + c.right_context,
                                    c.num_frames // 3) for _, c in ds.items])
        assert len({c.num_frames for _, c in ds.items}) == 2  # two chunk sizes
        assert sum(len(mb) for mb in tr.sampler.plan(e)) == len(ds)
        n_minibatches += len(tr.sampler.plan(e))
    assert tr.step == n_minibatches
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    log = open(tmp_path / "exp" / "log" / "train.0.log").read()
    assert "Overall log-probability" not in log  # no valid data given: no compute-prob
    assert "wrote %s" % (tmp_path / "exp" / "final.pt") in log


def _kaldi_trained_model():
    from pkwrap.nn import load_kaldi_nnet3
    m = load_kaldi_nnet3(fixture_path("nnet3", "model", "final.txt.gz"))
    m.frame_subsampling_factor = 3  # chain outputs, as it was trained
    return m


def test_kaldi_model_compute_prob_and_nnet3_compute(tmp_path):
    """Kaldi's trained TDNN-F, imported: pkwrap.train's compute-prob prints Kaldi's
    nnet3-chain-compute-prob numbers, and compute_nnet_outputs (frames_per_chunk=50, as
    the fixture's nnet3-compute ran) writes nnet3-compute's outputs."""
    import kaldiio
    from pkwrap.train import compute_nnet_outputs
    fx = fixture_path("nnet3")
    prob = json.loads((fx / "compute_prob.json").read_text())
    model = _kaldi_trained_model()
    _, data, _, loss = _nnet3_setup()
    ctx = probe_model_context(model, 40)
    assert (ctx.left_context, ctx.right_context, ctx.frame_subsampling_factor) == (11, 11, 3)
    tr = compute_prob(model, ctx, loss, _batches(data, ctx))
    want = prob["result"]
    assert tr.per_frame("objf") == pytest.approx(want["output"]["objf_per_frame"], rel=1e-4)
    assert tr.per_frame("xent_objf") == pytest.approx(want["output-xent"]["objf_per_frame"],
                                                      rel=1e-4)
    assert model.training  # test mode only for the computation
    utts = ["utt0_97", "utt1_150", "utt2_233"]
    feats = {u: np.load(fx / "compute" / ("feats_%s.npy" % u)) for u in utts}
    ark = str(tmp_path / "out.ark")
    compute_nnet_outputs(model, feats, "ark:" + ark, ctx=ctx, frames_per_chunk=50)
    got = dict(kaldiio.load_ark(ark))
    xent = compute_nnet_outputs(model, feats, ctx=ctx, output="output-xent")
    for u in utts:
        ref = np.load(fx / "compute" / ("output_fsf3_%s.npy" % u))
        assert got[u].shape == ref.shape
        assert np.abs(got[u] - ref).max() < 1e-4, u
        ref = np.load(fx / "compute" / ("output_xent_fsf3_%s.npy" % u))
        assert np.abs(xent[u] - ref).max() < 1e-4, u


def test_diagnostics_use_every_eg_whatever_the_training_rule(tmp_path):
    """compute-prob merges with Kaldi's ``1:64`` rule: a training rule such as "16"
    (which drops a final group of fewer than 16 equal-sized egs) must not shrink the
    valid set."""
    from pkwrap.nn import TDNNFModel
    from pkwrap.optim import NGSGD, kaldi_param_groups
    from pkwrap.train import TrainConfig, Trainer
    from pkwrap.train.data import load_egs
    d = fixture_path("mono")
    egs = load_egs("ark:%s" % (d / "data" / "cegs_compress_true.ark"))
    torch.manual_seed(0)
    model = TDNNFModel(34, feat_dim=40, tdnn_dim=16, tdnnf_dim=16, bottleneck_dim=4,
                       time_strides=(1, 3), prefinal_dim=8, prefinal_big_dim=16, use_idct=False)
    loss = ChainLoss(DenominatorGraph.from_fst(str(d / "den.fst"), 34), ChainOptions())
    tr = Trainer(model, loss, NGSGD(kaldi_param_groups(model), lr=0.002), egs,
                 TrainConfig(str(tmp_path / "exp"), minibatch_size="16", progress_bar=False,
                             tensorboard=False), valid_data=egs)
    batches = tr._batches_of(egs, rank_share=False)
    assert sum(b.num_sequences for b in batches) == len(egs) == 19
