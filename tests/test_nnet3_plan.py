"""pkwrap.nnet3.plan: the compiled evaluation plan of Nnet3 (issue 11 item 3, issue 15).

The plan must compute what interval evaluation (``Nnet3.compute_generic``) computes where
both compute the same frames (evaluation mode; training with every frame wanted), and in
chain training (frame subsampling 3) exactly what TDNNFModel computes for the same network
(the frames Kaldi computes: batchnorm statistics over those rows only), with the same
gradients. The Kaldi nnet3-compute fixtures (tests/test_nnet3.py) run through the plan too.
"""
import copy

import numpy as np
import pytest
import torch

from conftest import fixture_path
from pkwrap.nn import TDNNFModel
from pkwrap.nnet3 import nnet3_from_config, read_nnet3
from pkwrap.nnet3.plan import compile_plan


def _model(name):
    m = read_nnet3(fixture_path("nnet3_io", name, "final.mdl"))
    for c in m.components:  # deterministic training mode: masks off
        if c.TYPE in ("GeneralDropoutComponent", "SpecAugmentTimeMaskComponent"):
            c.fields["TestMode"] = True
        if c.TYPE == "DropoutComponent":
            c.fields["DropoutProportion"] = 0.0
    return m


def _inputs(m, B=3, T=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, m.input_dim("input"), generator=g),
            torch.randn(B, m.input_dim("ivector"), generator=g))


def _run(m, x, iv, compiled):
    m.compiled = compiled
    xx = x.clone().requires_grad_(m.training)
    out = m(xx, iv)
    grads = None
    if m.training:
        w = {k: torch.linspace(-1, 1, v.numel()).view(v.shape) for k, v in out.items()}
        sum((v * w[k]).sum() for k, v in out.items()).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        grads["<input>"] = xx.grad
    return {k: v.detach() for k, v in out.items()}, grads


def _close(a, b, rtol):
    for k in b:
        scale = float(b[k].abs().max()) + 1e-30
        err = float((a[k] - b[k]).abs().max())
        assert err <= rtol * scale, "%s: max abs diff %.3g (scale %.3g)" % (k, err, scale)


@pytest.mark.parametrize("name", ["P1_tdnnf", "P2_cnn_tdnnf", "P3_lda_tdnn"])
@pytest.mark.parametrize("f", [1, 3])
def test_plan_equals_interval_evaluation_in_eval_mode(name, f):
    m = _model(name).eval()
    m.frame_subsampling_factor = f
    x, iv = _inputs(m)
    with torch.no_grad():
        new, _ = _run(m, x, iv, True)
        old, _ = _run(m, x, iv, False)
    assert set(new) == {"output", "output-xent"}
    for k in old:
        assert new[k].shape == old[k].shape
    _close(new, old, 1e-5)
    assert m._plans and all(p is not None for p in m._plans.values())  # the plan ran


def test_plan_equals_interval_evaluation_in_training_every_frame():
    """Training with every frame wanted (f = 1): the same rows in batchnorm, so the same
    outputs, input and parameter gradients (natural gradient on), and statistics."""
    m0 = _model("P1_tdnnf").train()
    x, iv = _inputs(m0, B=4, T=50)
    a, b = copy.deepcopy(m0), copy.deepcopy(m0)
    new, gn = _run(a, x, iv, True)
    old, go = _run(b, x, iv, False)
    _close(new, old, 1e-5)
    _close(gn, go, 1e-3)
    assert set(gn) == set(go)
    for ca, cb in zip(a.components, b.components):
        if ca.TYPE == "BatchNormComponent":
            assert float(ca.count) == float(cb.count)
            assert torch.allclose(ca.stats_mean, cb.stats_mean, atol=1e-5)
            assert torch.allclose(ca.stats_var, cb.stats_var, rtol=1e-4, atol=1e-5)


def test_tdnnf_model_as_nnet3_trains_identically():
    """A TDNNFModel's own network as nnet3 config lines (TDNNFModel.to_nnet3) in chain
    training (frame subsampling 3, strides 1, 1, 0, 3, 3): the plan computes the frames
    TDNNFModel computes (batchnorm counts per layer), the same outputs and the same
    natural-gradient parameter gradients."""
    torch.manual_seed(0)
    m = TDNNFModel(13, feat_dim=10, tdnn_dim=24, tdnnf_dim=24, bottleneck_dim=8,
                   time_strides=(1, 1, 0, 3, 3), prefinal_dim=8, prefinal_big_dim=24)
    with torch.no_grad():
        m.output.weight.normal_(0, 0.3)
        m.output_xent.weight.normal_(0, 0.3)
    m.train()
    net = m.to_nnet3()
    assert net.context("output") == (m.left_context, m.right_context)
    assert net.num_parameters() == sum(p.numel() for p in m.parameters())
    T = 60  # = (T_out - 1) * 3 + 1 + left + right, as chain egs give (TDNNFModel computes
    # every input frame given; Kaldi and the plan only those an output needs)
    x = torch.randn(4, T, 10)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ca, ea = m(xa)
    out = net(xb)
    cb, eb = out["output"], out["output-xent"]
    assert ca.shape == cb.shape == (4, m.num_output_frames(T), 13) == (4, 14, 13)
    w = torch.randn(ca.shape)
    ((ca * w).sum() + (ea * w).sum()).backward()
    ((cb * w).sum() + (eb * w).sum()).backward()
    _close({"c": cb.detach(), "e": eb.detach(), "x": xb.grad},
           {"c": ca.detach(), "e": ea.detach(), "x": xa.grad}, 1e-5)
    counts = []
    for name, mod in m.nnet3_layers():
        c = net.component(name)
        if hasattr(mod, "weight"):
            _close({name: c.weight.grad}, {name: mod.weight.grad}, 1e-4)
        else:
            n = float(mod.stats_count)
            counts.append(n)
            assert float(c.count) == n, name
            assert torch.allclose(c.stats_mean.double(), mod.stats_sum / n, atol=1e-5)
    # full rate up to tdnnf3's linear half (its affine half only at the 14 + 4 frames
    # tdnnf4..6 need), then one row per needed frame down to one per output
    assert counts == [4 * 60, 4 * 56, 4 * 56, 4 * 54, 4 * 18, 4 * 18, 4 * 16, 4 * 14] + \
        [4 * 14] * 4


def test_plan_frames_and_fallback():
    """Kaldi's frame sets: a time-stride-1 layer under a subsampled one is computed at 2
    of every 3 frames; convolutions are planned; networks with IfDefined (or convolutions
    with optional time offsets) use interval evaluation, with the same results."""
    cfg = ("input-node name=input dim=4\n"
           "component name=a type=TdnnComponent input-dim=4 output-dim=5 time-offsets=-1,0\n"
           "component name=b type=TdnnComponent input-dim=5 output-dim=3 time-offsets=0,1\n"
           "component-node name=a component=a input=input\n"
           "component-node name=b component=b input=a\n"
           "output-node name=output input=b\n")
    n = nnet3_from_config(cfg)
    p = compile_plan(n, {"input": np.arange(0, 30)}, {"output": np.arange(1, 28, 3)})
    assert p.times["b"].tolist() == list(range(1, 28, 3))
    assert p.times["a"].tolist() == sorted(set(range(1, 28, 3)) | set(range(2, 29, 3)))
    n2 = nnet3_from_config(cfg.replace("input=b\n", "input=Sum(b, IfDefined(Offset(b, 5)))\n"))
    assert compile_plan(n2, {"input": np.arange(0, 30)}, {"output": np.arange(1, 28)}) is None
    x = torch.randn(2, 30, 4)
    n2.frame_subsampling_factor = 3
    with torch.no_grad():
        y = n2(x)["output"]
        n2.compiled = False
        assert torch.equal(y, n2(x)["output"])
    with pytest.raises(ValueError, match="needs more than 2"):
        n2(torch.randn(2, 2, 4))
    p2 = read_nnet3(fixture_path("nnet3_io", "P2_cnn_tdnnf", "final.mdl"))
    assert compile_plan(p2, {"input": np.arange(30), "ivector": np.arange(1)},
                        {"output": np.arange(6, 24)}) is not None  # convolutions: planned
    conv = ("input-node name=input dim=6\n"
            "component name=c type=TimeHeightConvolutionComponent num-filters-in=2 "
            "num-filters-out=1 height-in=3 height-out=3 time-offsets=-1,0,1 "
            "height-offsets=-1,0,1 required-time-offsets=%s\n"
            "component-node name=c component=c input=input\n"
            "output-node name=output input=c\n")
    p = compile_plan(nnet3_from_config(conv % "-1,0,1"), {"input": np.arange(0, 10)},
                     {"output": np.arange(1, 9)})
    assert p.times["input"].tolist() == list(range(10))
    # an optional time offset reads zeros where not computable: interval evaluation
    assert compile_plan(nnet3_from_config(conv % "0"), {"input": np.arange(0, 10)},
                        {"output": np.arange(0, 10)}) is None


def test_batchnorm_component_stats_as_kaldi_batchnorm():
    """BatchNormComponent's statistics in training (fused kernel or not) and scale_stats
    (what pkwrap.train applies after every step, as nnet3-chain-train does) follow
    KaldiBatchNorm's count-weighted sums."""
    from pkwrap.nn import KaldiBatchNorm
    net = nnet3_from_config("input-node name=input dim=6\n"
                            "component name=bn type=BatchNormComponent dim=6 target-rms=0.5\n"
                            "component-node name=bn component=bn input=input\n"
                            "output-node name=output input=bn\n")
    bn, ref = net.component("bn"), KaldiBatchNorm(6, target_rms=0.5)
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        x = torch.randn(2, 7, 6, generator=g) * (step + 1) + step
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                y = net.train()(x, output="output")
                y_ref = ref.train()(x)
            assert torch.allclose(y, y_ref, atol=1e-5)
        bn.scale_stats(0.8)
        ref.scale_stats(0.8)
        n = float(ref.stats_count)
        assert float(bn.count) == pytest.approx(n)
        assert torch.allclose(bn.stats_mean.double(), ref.stats_sum / n, atol=1e-5)
        assert torch.allclose(bn.stats_var.double(),
                              ref.stats_sumsq / n - (ref.stats_sum / n) ** 2, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x, output="output"), ref.eval()(x), atol=1e-4)
    bn.scale_stats(0.0)
    assert float(bn.count) == 0 and not bn.stats_mean.abs().sum()
