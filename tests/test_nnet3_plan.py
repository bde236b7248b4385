"""pkwrap.nnet3.plan: the compiled evaluation plan of Nnet3 (issue 11 item 3, issue 15).

The plan must compute what interval evaluation (``Nnet3.compute_generic``) computes where
both compute the same frames (evaluation mode; training with every frame wanted), and in
chain training (frame subsampling 3) the frames Kaldi computes (batchnorm statistics over
those rows only), with its fused kernels giving what the components give one by one
(TDNNFModel, which is an Nnet3). The Kaldi nnet3-compute fixtures (tests/test_nnet3.py) run
through the plan too.
"""
import copy

import numpy as np
import pytest
import torch

from conftest import fixture_path
from pkwrap.nn import TDNNFModel
from pkwrap.nnet3 import nnet3_from_config, read_nnet3
from pkwrap.nnet3.plan import compile_plan

torch.set_num_threads(1)  # as tests/test_nn.py: small work, a shared machine


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


def _unfused(monkeypatch):
    """Make the plan run every component by itself, in plain torch (the reference)."""
    from pkwrap.nn import tdnnf
    from pkwrap.nnet3 import plan
    monkeypatch.setattr(plan, "_run_fused", lambda *a: False)
    monkeypatch.setattr(plan, "_spliced_tdnn", lambda *a: None)
    monkeypatch.setattr(tdnnf, "_fused_ok", lambda *a: False)


def _assert_close_to_max(a, b, rel, what):
    err = float((a - b).abs().max())
    assert err <= rel * float(b.abs().max()) + 1e-7, (what, err, float(b.abs().max()))


@pytest.mark.parametrize("use_ng", [True, False])
def test_tdnnf_model_fused_plan_equals_components(monkeypatch, use_ng):
    """TDNNFModel in chain training (frame subsampling 3, strides 1, 1, 0, 3, 3), 14 steps:
    the plan with the fused affine + ReLU + batchnorm (+ bypass) kernels, the row norms they
    pass on and the spliced TDNN products gives the outputs, input and parameter gradients,
    batchnorm statistics and natural-gradient state of the same model run component by
    component in torch; and it computes each layer at the frames Kaldi does (batchnorm
    counts per layer)."""
    from pkwrap.nn import natural_gradient_modules, tdnnf
    torch.manual_seed(0)
    m = TDNNFModel(13, feat_dim=10, tdnn_dim=24, tdnnf_dim=24, bottleneck_dim=8,
                   time_strides=(1, 1, 0, 3, 3), prefinal_dim=8, prefinal_big_dim=24)
    with torch.no_grad():  # the zero output layers would hide gradients
        m.component("output.affine").weight.normal_(0, 0.3)
        m.component("output-xent.affine").weight.normal_(0, 0.3)
    for _, c in natural_gradient_modules(m):
        c.use_natural_gradient = use_ng
    m.train()
    ref = copy.deepcopy(m)
    assert (m.left_context, m.right_context) == (10, 10)
    T = 60  # = (T_out - 1) * 3 + 1 + left + right, as chain egs give
    calls = []
    fused_fn = tdnnf._AffineReluBatchNormFunction.apply
    monkeypatch.setattr(tdnnf._AffineReluBatchNormFunction, "apply",
                        lambda *a: calls.append(1) or fused_fn(*a))
    for step in range(14):  # past the preconditioners' updating calls
        x = torch.randn(4, T, 10, generator=torch.Generator().manual_seed(step))
        w = torch.randn(4, 14, 13, generator=torch.Generator().manual_seed(50 + step))
        res = []
        for net in (m, ref):
            with monkeypatch.context() as mp:
                if net is ref:
                    _unfused(mp)
                net.zero_grad()
                xx = x.clone().requires_grad_()
                out = net(xx)
                assert out["output"].shape == (4, m.num_output_frames(T), 13) == (4, 14, 13)
                ((out["output"] * w).sum() + (out["output-xent"] * w).sum()).backward()
            res.append(({k: v.detach() for k, v in out.items()}, xx.grad,
                        {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}))
        with torch.no_grad():  # both take the fused model's step (rounding would compound)
            for p, q in zip(m.parameters(), ref.parameters()):
                if p.requires_grad:  # not the fixed idct
                    q.copy_(p.sub_(0.01 * p.grad))
        (o1, x1, g1), (o2, x2, g2) = res
        for k in o1:  # float rounding differs: errors relative to each tensor's largest entry
            _assert_close_to_max(o1[k], o2[k], 1e-4, "%s step %d" % (k, step))
        _assert_close_to_max(x1, x2, 1e-4, "input grad step %d" % step)
        assert set(g1) == set(g2)
        for n in g1:
            _assert_close_to_max(g1[n], g2[n], 1e-4, "%s step %d" % (n, step))
    monkeypatch.undo()
    # tdnn1, 5 TDNN-F affine halves, the affine and the linear of 2 prefinal layers
    assert len(calls) == 14 * 10
    counts = []
    for a, b in zip(m.components, ref.components):
        if a.TYPE == "BatchNormComponent":
            counts.append(float(a.count))
            assert float(a.count) == float(b.count), a.name
            torch.testing.assert_close(a.stats_mean, b.stats_mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.stats_var, b.stats_var, rtol=1e-4, atol=1e-5)
    if use_ng:
        for (n, c1), (_, c2) in zip(natural_gradient_modules(m), natural_gradient_modules(ref)):
            for p1, p2 in ((c1.preconditioner_in, c2.preconditioner_in),
                           (c1.preconditioner_out, c2.preconditioner_out)):
                assert p1.t == p2.t > 10, n
                # W's rows are eigenvectors (signs arbitrary): compare W^T W, which the
                # preconditioning uses
                torch.testing.assert_close(p1.W_t.t() @ p1.W_t, p2.W_t.t() @ p2.W_t,
                                           rtol=1e-3, atol=1e-5)
    # the counts of the last step (statistics accumulate: sum over 14 steps of one
    # step's rows): full rate up to tdnnf3's linear half (its affine half only at the
    # 14 + 4 frames tdnnf4..6 need), then one row per needed frame down to one per output
    rows = [4 * 60, 4 * 56, 4 * 56, 4 * 54, 4 * 18, 4 * 18, 4 * 16, 4 * 14] + [4 * 14] * 4
    assert counts == [14 * r for r in rows]


@pytest.mark.parametrize("stride,j0", [(1, 0), (1, 2), (2, 1)])
def test_tdnnf_linear_half_only_at_the_frames_needed(stride, j0):
    """A TDNN-F layer under frame subsampling 3 with stride s < 3: the plan evaluates its
    linear half only at the 2 of 3 frames the wanted outputs read, as nnet3 does: outputs,
    gradients and natural-gradient statistics equal those of the layer's components applied
    to exactly those spliced rows."""
    s = stride
    cfg = ("input-node name=input dim=12\n"
           "component name=l type=TdnnComponent input-dim=12 output-dim=5 use-bias=false "
           "time-offsets=-%d,0 orthonormal-constraint=-1\n"
           "component name=a type=TdnnComponent input-dim=5 output-dim=12 time-offsets=0,%d\n"
           "component name=r type=RectifiedLinearComponent dim=12\n"
           "component name=bn type=BatchNormComponent dim=12\n"
           "component name=n type=NoOpComponent dim=12\n"
           "component-node name=l component=l input=input\n"
           "component-node name=a component=a input=l\n"
           "component-node name=r component=r input=a\n"
           "component-node name=bn component=bn input=r\n"
           "component-node name=n component=n input=Sum(Scale(0.66, input), bn)\n"
           "output-node name=output input=n\n") % (s, s)
    net = nnet3_from_config(cfg).train()
    ref = copy.deepcopy(net)
    B, T = 3, 31
    outs = np.arange(s + j0, T - s, 3)  # the wanted output frames
    need = sorted({int(t) + d for t in outs for d in (0, s)})  # the linear half's frames
    p = compile_plan(net, {"input": np.arange(T)}, {"output": outs})
    assert p.times["l"].tolist() == need and len(need) == 2 * len(outs) < (T - s) * 0.7
    L, A, BN = (ref.component(k) for k in ("l", "a", "bn"))
    for step in range(13):
        x0 = torch.randn(B, T, 12, generator=torch.Generator().manual_seed(step))
        xa, xb = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        out = p.run(net, {"input": xa})["output"]  # the wanted (subsampled) outputs only
        nd = torch.tensor(need)
        rows = torch.cat([xb[:, nd - s], xb[:, nd]], dim=-1)  # [x(t - s), x(t)], needed t
        h = L._affine(rows)  # [B][2 J][5]
        pos = {t: i for i, t in enumerate(need)}
        hs = torch.cat([h[:, [pos[int(t)] for t in outs]],
                        h[:, [pos[int(t) + s] for t in outs]]], dim=-1)
        want = BN(torch.relu(A._affine(hs))) + 0.66 * xb[:, torch.tensor(outs)]
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(50 + step))
        (out * w).sum().backward()
        (want * w).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
        for (n, pa), pb in zip(net.named_parameters(), ref.parameters()):
            _assert_close_to_max(pa.grad, pb.grad, 1e-4, "%s step %d" % (n, step))
            with torch.no_grad():
                pb.copy_(pa.sub_(0.01 * pa.grad))
            pa.grad = pb.grad = None
    lin = net.component("l")
    assert lin.preconditioner_in.t == L.preconditioner_in.t == 13
    W1, W2 = lin.preconditioner_in.W_t, L.preconditioner_in.W_t
    torch.testing.assert_close(W1.t() @ W1, W2.t() @ W2, rtol=1e-3, atol=1e-5)


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


def test_batchnorm_component_stats_are_count_weighted_sums():
    """BatchNormComponent's statistics in training (fused kernel or not) and scale_stats
    (what pkwrap.train applies after every step, as nnet3-chain-train does) are Kaldi's
    count-weighted sums of the training rows (kept here in float64 as the reference)."""
    net = nnet3_from_config("input-node name=input dim=6\n"
                            "component name=bn type=BatchNormComponent dim=6 target-rms=0.5\n"
                            "component-node name=bn component=bn input=input\n"
                            "output-node name=output input=bn\n")
    bn = net.component("bn")
    n, s1, s2 = 0.0, torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        x = torch.randn(2, 7, 6, generator=g) * (step + 1) + step
        r = x.reshape(-1, 6).double()
        y_ref = ((r - r.mean(0)) * 0.5 / (r.var(0, unbiased=False) + 1e-3).sqrt()).float()
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                y = net.train()(x, output="output")
            assert torch.allclose(y.reshape(-1, 6), y_ref, atol=1e-5)
            n, s1, s2 = n + r.shape[0], s1 + r.sum(0), s2 + r.square().sum(0)
        bn.scale_stats(0.8)
        n, s1, s2 = 0.8 * n, 0.8 * s1, 0.8 * s2
        assert float(bn.count) == pytest.approx(n)
        assert torch.allclose(bn.stats_mean.double(), s1 / n, atol=1e-5)
        assert torch.allclose(bn.stats_var.double(), s2 / n - (s1 / n) ** 2, atol=1e-4)
    with torch.no_grad():
        r = x.reshape(-1, 6).double()
        want = ((r - s1 / n) * 0.5 / (s2 / n - (s1 / n) ** 2 + 1e-3).sqrt()).float()
        assert torch.allclose(net.eval()(x, output="output").reshape(-1, 6), want, atol=1e-4)
    bn.scale_stats(0.0)
    assert float(bn.count) == 0 and not bn.stats_mean.abs().sum()
