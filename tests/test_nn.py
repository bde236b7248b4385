"""pkwrap.nn: natural-gradient layers, model conversion, the fused batchnorm kernels, TDNN-F
model semantics (TDNNFModel is a pkwrap.nnet3 network: tests/test_nnet3_plan.py trains it
with and without the fused kernels)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from pkwrap.ngsgd import OnlineNaturalGradient
from pkwrap.nn import (NaturalAffine, NaturalConv1d, TDNNFModel, compute_idct_matrix,
                       constrain_orthonormal_, natural_gradient, natural_gradient_state_dict,
                       load_natural_gradient_state_dict, scale_batchnorm_stats)
from pkwrap.nnet3.components import component_from_config

torch.set_num_threads(1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n_in,n_out", [(30, 12), (12, 30)])
def test_natural_affine_grads_match_independent_preconditioning(n_in, n_out):
    torch.manual_seed(0)
    layer = NaturalAffine(n_in, n_out)
    r_in, r_out = min(20, (n_in + 1) // 2), min(80, (n_out + 1) // 2)
    assert layer.preconditioner_in.rank == r_in and layer.preconditioner_out.rank == r_out
    ref_in, ref_out = OnlineNaturalGradient(r_in), OnlineNaturalGradient(r_out)
    for step in range(14):  # past the first 11 updating calls
        x = torch.randn(64, n_in, generator=_gen(step), requires_grad=True)
        x = x * torch.linspace(0.2, 3.0, n_in)  # not isotropic, so preconditioning matters
        x.retain_grad()
        y = layer(x)
        torch.testing.assert_close(y, x @ layer.weight.t() + layer.bias)
        g = torch.randn(64, n_out, generator=_gen(100 + step))
        layer.weight.grad = layer.bias.grad = None
        y.backward(g)
        # independent reference: Kaldi's NaturalGradientAffineComponent::Update
        xe = torch.cat([x.detach(), torch.ones(64, 1)], 1)
        xh, s_in = ref_in.precondition_directions(xe)
        gh, s_out = ref_out.precondition_directions(g)
        s = float(s_in * s_out)
        torch.testing.assert_close(layer.weight.grad, s * gh.t() @ xh[:, :n_in], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.bias.grad, s * gh.t() @ xh[:, n_in], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x.grad, g @ layer.weight.detach())  # input grad not preconditioned
    assert not torch.allclose(layer.weight.grad, g.t() @ x.detach())
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_natural_affine_off_and_eval_are_plain():
    torch.manual_seed(1)
    layer = NaturalAffine(8, 5, bias=False)
    plain = nn.Linear(8, 5, bias=False)
    plain.weight.data.copy_(layer.weight.data)
    layer.use_natural_gradient = False
    x = torch.randn(3, 7, 8)
    layer(x).square().sum().backward()
    plain(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
    layer.use_natural_gradient = True
    with torch.no_grad():
        layer(x)
    assert layer.preconditioner_in.t == 0  # nothing preconditioned without gradients


def test_natural_gradient_converts_in_place():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(6, 10, 3, dilation=2, padding=1), nn.ReLU(),
                          nn.Conv1d(10, 10, 1, groups=2), nn.Flatten(), nn.Linear(10 * 10, 4))
    x = torch.randn(5, 6, 12)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    ref = copy.deepcopy(model)
    out_before = model(x)
    assert natural_gradient(model) is model
    assert isinstance(model[0], NaturalConv1d) and isinstance(model[4], NaturalAffine)
    assert type(model[2]) is nn.Conv1d  # groups=2: not converted (warned)
    assert model[4].max_change == 1.5 and model[0].max_change == 0.75
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    out = model(x)
    torch.testing.assert_close(out, out_before)
    g = torch.randn_like(out)
    out.backward(g)
    ref(x).backward(g)
    for a, b in zip(model[2].parameters(), ref[2].parameters()):
        torch.testing.assert_close(a.grad, b.grad)  # unconverted layer: plain gradient
    assert not torch.allclose(model[0].weight.grad, ref[0].weight.grad)
    assert model[0].preconditioner_in.t == 1 and model[0].preconditioner_in.W_t.shape == (9, 19)
    # The conv gradient is formed from preconditioned unfolded patches (Kaldi's TdnnComponent).
    conv = ref[0]
    pin, pout = OnlineNaturalGradient(9), OnlineNaturalGradient(5)
    h = conv(x)
    gh_full = torch.autograd.grad((model[2](torch.relu(h)).flatten(1) @ ref[4].weight.t()
                                   + ref[4].bias).mul(g).sum(), h)[0]
    patches = torch.nn.functional.unfold(x.unsqueeze(2), (1, 3), dilation=(1, 2), padding=(0, 1))
    rows = torch.cat([patches.transpose(1, 2).reshape(-1, 18), torch.ones(50, 1)], 1)
    xh, s1 = pin.precondition_directions(rows)
    gh, s2 = pout.precondition_directions(gh_full.transpose(1, 2).reshape(-1, 10))
    want = float(s1 * s2) * gh.t() @ xh
    torch.testing.assert_close(model[0].weight.grad.reshape(10, 18), want[:, :18], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[0].bias.grad, want[:, 18], rtol=1e-4, atol=1e-5)
    sd = natural_gradient_state_dict(model)
    assert set(sd) == {"0", "4"}
    fresh = natural_gradient(copy.deepcopy(ref))
    load_natural_gradient_state_dict(fresh, sd)
    assert torch.equal(fresh[0].preconditioner_in.W_t, model[0].preconditioner_in.W_t)


def _bn(dim, target_rms=1.0):
    """Kaldi's BatchNormComponent (pkwrap.nnet3), as TDNNFModel's config makes it."""
    line = "component name=bn type=BatchNormComponent dim=%d target-rms=%g" % (dim, target_rms)
    return component_from_config(line, {"name": "bn", "type": "BatchNormComponent",
                                        "dim": str(dim), "target-rms": str(target_rms)})


def test_kaldi_batchnorm():
    bn = _bn(4, target_rms=2.0)
    x = torch.randn(3, 50, 4) * 3 + 1
    y = bn(x)
    rows = y.reshape(-1, 4)
    torch.testing.assert_close(rows.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(rows.pow(2).mean(0), torch.full((4,), 4.0), rtol=1e-3, atol=0)
    assert float(bn.count) == 150
    bn.eval()
    xr = x.reshape(-1, 4).double()
    want = (x - xr.mean(0).float()) * 2.0 / (xr.var(0, unbiased=False).float() + 1e-3).sqrt()
    torch.testing.assert_close(bn(x), want, rtol=1e-4, atol=1e-4)
    scale_batchnorm_stats(nn.Sequential(bn), 0.8)
    assert abs(float(bn.count) - 120) < 1e-9
    with pytest.raises(RuntimeError):
        _bn(4).eval()(x)


def _relu_bn_bypass_reference(y, bn, x, offset, step, scale):
    """``bn(relu(y)) + scale * x[:, offset::step]`` as plain torch operations (training-mode
    batchnorm: the minibatch's mean and biased variance), and the rows' sum and sum of
    squares that the statistics accumulate."""
    r = torch.relu(y).reshape(-1, y.shape[-1]).double()
    mean, var = r.mean(0), r.var(0, unbiased=False)
    out = ((r - mean) * bn.target_rms / (var + bn.epsilon).sqrt()).reshape(y.shape).float()
    if x is not None:
        out = out + scale * x[:, offset::step][:, :y.shape[1]]
    return out, r.sum(0).detach(), r.square().sum(0).detach()


@pytest.mark.parametrize("pick,target_rms,bypass", [(None, 1.0, True), ((1, 3), 1.0, True),
                                                     ((2, 3), 0.5, True), (None, 2.0, False)])
def test_fused_relu_batchnorm_equals_separate_ops(pick, target_rms, bypass):
    """The fused kernel (ReLU, batchnorm, TDNN-F bypass rows ``c + j0, c + j0 + f, ...``)
    against torch operations: outputs, gradients, statistics added to existing ones."""
    from pkwrap.nn.tdnnf import _ReluBatchNormFunction, _fused_ok
    assert _fused_ok(torch.zeros(2, 2)), "the C++ kernels are not built"
    torch.manual_seed(0)
    B, Tx, D, c = 3, 23, 9, 2
    j0, f = pick if pick is not None else (0, 1)
    J = len(range(j0, Tx - 2 * c, f))
    x0 = torch.randn(B, Tx, D)
    y0 = torch.randn(B, J, D) * 2 + 0.3
    w = torch.randn(B, J, D)
    m0, v0 = torch.randn(D).double(), torch.rand(D).double() + 0.5
    res = []
    for fused in (True, False):
        bn = _bn(D, target_rms=target_rms)
        bn.add_stats(5, m0 * 5, (v0 + m0 * m0) * 5)  # existing statistics are added to
        y = y0.clone().requires_grad_(True)
        x = x0.clone().requires_grad_(True)
        if fused:
            out = _ReluBatchNormFunction.apply(y * 1.0, x if bypass else None, bn, True, 0.66,
                                               (c + j0, f) if bypass else None)
        else:
            out, rs, rq = _relu_bn_bypass_reference(y, bn, x if bypass else None, c + j0, f,
                                                    0.66)
            bn.add_stats(B * J, rs, rq)
        (out * w).sum().backward()
        res.append((out.detach(), y.grad, x.grad, float(bn.count), bn.stats_mean.clone(),
                    bn.stats_var.clone()))
    (o1, gy1, gx1, n1, s1, q1), (o2, gy2, gx2, n2, s2, q2) = res
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gy1, gy2, rtol=1e-4, atol=1e-5)
    if bypass:
        torch.testing.assert_close(gx1, gx2, rtol=1e-6, atol=1e-7)
        assert bool((gx1[:, :c] == 0).all()) and bool((gx1[:, Tx - c:] == 0).all())
    else:
        assert gx1 is None and gx2 is None
    assert n1 == n2 == 5.0 + B * J
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(q1, q2, rtol=1e-5, atol=1e-5)
    # a ReLU'd-away unit gets no gradient
    assert bool((gy1[y0 <= 0] == 0).all())


def test_fused_batchnorm_is_the_same_with_any_thread_count():
    from pkwrap.nn.tdnnf import _ReluBatchNormFunction
    torch.manual_seed(1)
    x = torch.randn(2, 700, 16)  # rows over several of the kernel's 256-row blocks
    y0 = torch.randn(2, 698, 16)
    w = torch.randn(2, 698, 16)
    outs = []
    nt = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            bn = _bn(16)
            y = y0.clone().requires_grad_(True)
            out = _ReluBatchNormFunction.apply(y * 1.0, x, bn, True, 0.5, (1, 1))
            (out * w).sum().backward()
            outs.append((out.detach(), y.grad, bn.stats_mean.clone(), bn.stats_var.clone()))
    finally:
        torch.set_num_threads(nt)
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], o))


def test_fused_batchnorm_checks_rows_and_falls_back():
    from pkwrap.nn.tdnnf import _ReluBatchNormFunction
    with pytest.raises(ValueError, match="at least 2 rows"):
        _ReluBatchNormFunction.apply(torch.randn(1, 1, 4), None, _bn(4), False, 0.0, None)
    # bypass rows 2..6 of a 6-frame input: one too many
    with pytest.raises(ValueError, match="bypass map does not fit"):
        _ReluBatchNormFunction.apply(torch.randn(2, 5, 4), torch.randn(2, 6, 4), _bn(4), True,
                                     0.5, (2, 1))
    # float64 (no C++ kernel) takes the torch path and gives the same numbers and statistics
    y = torch.randn(2, 5, 4, dtype=torch.float64) * 2 + 1
    bn64, bn32 = _bn(4).double(), _bn(4)
    got, want = bn64(y), bn32(y.float())
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)
    assert float(bn64.count) == float(bn32.count) == 10
    torch.testing.assert_close(bn64.stats_var.float(), bn32.stats_var, rtol=1e-5, atol=1e-6)


def test_fused_batchnorm_kernel_statistics():
    """The row norms of the forward and the column sums / squared norm of the backward that
    the kernels return for the natural-gradient layers equal torch's."""
    from pkwrap.nn.tdnnf import _bn_backward, _bn_forward, _bypass_map
    torch.manual_seed(3)
    B, Tx, J, D = 2, 530, 526, 7  # several 256-row blocks
    x = torch.randn(B, Tx, D)
    y = torch.randn(B, J, D)
    bn = _bn(D)
    bmap = _bypass_map((B, J), x, (2, 1))
    out, osq, mean, sc = _bn_forward(y, x, bn, True, 0.66, bmap, True)
    assert osq.dtype == torch.float64 and tuple(osq.shape) == (B * J,)
    torch.testing.assert_close(osq, out.double().square().sum(-1).reshape(-1), rtol=1e-6, atol=0)
    g = torch.randn(B, J, D)
    gy, gx, (gsum, gsq) = _bn_backward(g, y, mean, sc, bn, True, 0.66, bmap, x.shape, True)
    torch.testing.assert_close(gsum, gy.double().sum((0, 1)), rtol=1e-6, atol=1e-9)
    assert abs(gsq - float(gy.double().square().sum())) <= 1e-6 * gsq
    assert _bn_backward(g, y, mean, sc, bn, True, 0.66, bmap, None, False)[2] is None


def test_row_sqnorm_is_dropped_when_stale():
    from pkwrap.nn.natural import row_sqnorm, set_row_sqnorm
    x = torch.randn(3, 4, 5)
    sq = x.square().sum(-1)
    assert row_sqnorm(set_row_sqnorm(x, sq)) is sq
    assert row_sqnorm(x.view(12, 5)) is None  # another tensor
    x.add_(1.0)  # modified in place: the norms no longer hold
    assert row_sqnorm(x) is None
    assert row_sqnorm(set_row_sqnorm(torch.randn(3, 4), sq)) is None  # wrong shape


def _assert_close_to_max(a, b, rel, what):
    err = float((a - b).abs().max())
    assert err <= rel * float(b.abs().max()) + 1e-7, (what, err, float(b.abs().max()))


def test_keep_freed_memory(monkeypatch):
    import ctypes.util
    from pkwrap.train import host_memory
    monkeypatch.setattr(host_memory, "_state", {"done": None})
    monkeypatch.setenv("PKWRAP_KEEP_FREED_MEMORY", "0")
    assert host_memory.keep_freed_memory() is False
    assert host_memory._state["done"] is None  # nothing was done
    monkeypatch.setenv("PKWRAP_KEEP_FREED_MEMORY", "1")
    assert host_memory.keep_freed_memory(enable=False) is False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = host_memory.keep_freed_memory()
    assert ok is hasattr(libc, "gnu_get_libc_version")
    assert host_memory.keep_freed_memory() is ok  # once per process
    t = torch.ones(20_000_000)  # 80 MB: from the heap now, and usable
    assert float(t.sum()) == 2e7

def test_constrain_orthonormal_floating_scale():
    torch.manual_seed(3)
    M = torch.randn(16, 40) * 0.3
    for _ in range(30):
        constrain_orthonormal_(M, -1.0)
    P = M @ M.t()
    a2 = float(torch.trace(P)) / 16
    torch.testing.assert_close(P / a2, torch.eye(16), atol=1e-3, rtol=0)
    W = torch.randn(40, 16) / 40 ** 0.5  # more rows than columns: constrained transposed
    for _ in range(30):
        constrain_orthonormal_(W, 1.0)
    torch.testing.assert_close(W.t() @ W, torch.eye(16), atol=1e-3, rtol=0)


def test_idct_and_tdnn_1j_size():
    m = TDNNFModel.tdnn_1j(2051)
    # nnet3-info of Kaldi's tdnn_1j (the trainable parameters; the idct layer is fixed)
    assert m.num_parameters() == sum(p.numel() for p in m.parameters() if p.requires_grad) \
        == 5024134
    assert (m.left_context, m.right_context, m.frame_subsampling_factor) == (29, 29, 3)
    assert m.num_output_frames(208) == 50
    from conftest import fixture_path
    txt = fixture_path("bench", "tdnn_1j.idct.mat").read_text().replace("[", "").replace("]", "")
    kaldi = torch.tensor([float(v) for v in txt.split()]).reshape(40, 41)
    torch.testing.assert_close(compute_idct_matrix(40, 22.0), kaldi[:, :40], atol=1e-6, rtol=0)
    idct = m.component("idct")  # the model's idct layer: Kaldi's matrix, zero bias, fixed
    torch.testing.assert_close(idct.weight, kaldi[:, :40], atol=1e-6, rtol=0)
    assert not idct.bias.abs().sum() and not any(p.requires_grad for p in idct.parameters())


def _small_model(fsf, strides=(1, 0, 3, 3), use_delta=True):
    torch.manual_seed(4)
    return TDNNFModel(11, feat_dim=8, tdnn_dim=16, tdnnf_dim=16, bottleneck_dim=6,
                      time_strides=strides, prefinal_dim=6, prefinal_big_dim=16,
                      frame_subsampling_factor=fsf, use_delta=use_delta)


@pytest.mark.parametrize("strides,use_delta", [((1, 0, 3, 3), True), ((3, 0, 3), True),
                                               ((3, 3), False), ((1, 2), False)])
def test_tdnnf_model_frame_alignment(strides, use_delta):
    m3, m1 = _small_model(3, strides, use_delta), _small_model(1, strides, use_delta)
    m1.load_state_dict(m3.state_dict())
    ctx = (2 if use_delta else 0) + sum(strides)
    assert m3.left_context == m3.right_context == ctx
    x = torch.randn(2, 60, 8)
    m3.train()
    m3(x)  # accumulate batchnorm stats
    m1.load_state_dict(m3.state_dict())
    m3.eval(), m1.eval()
    o3, o1 = m3(x), m1(x)
    c3, x3, c1, x1 = o3["output"], o3["output-xent"], o1["output"], o1["output-xent"]
    assert c3.shape == (2, m3.num_output_frames(60), 11) and c1.shape[1] == 60 - 2 * ctx
    torch.testing.assert_close(c3, c1[:, ::3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x3, x1[:, ::3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x3.exp().sum(-1), torch.ones(2, c3.shape[1]))
    # output frame j depends on input frames 3j .. 3j + 2 ctx only
    # (give the zero-initialized output layer some weight)
    torch.nn.init.normal_(m3.component("output.affine").weight)
    xi = x.clone().requires_grad_(True)
    m3(xi, output="output")[0, 4].sum().backward()
    nz = (xi.grad[0].abs().sum(-1) > 0).nonzero().flatten()
    assert int(nz.min()) >= 12 and int(nz.max()) <= 12 + 2 * ctx


def test_tdnnf_layer_bypass_and_bad_input():
    # one TDNN-F layer of stride 2, bypass 0.5: 2 frames of context each side; at init
    # (zero output layers) the output is the output bias, 0
    torch.manual_seed(1)
    m = TDNNFModel(5, feat_dim=8, tdnn_dim=8, tdnnf_dim=8, bottleneck_dim=4, time_strides=(2,),
                   bypass_scale=0.5, frame_subsampling_factor=1, use_idct=False,
                   use_delta=False)
    assert "Sum(Scale(0.5, tdnn1.batchnorm), tdnnf2.batchnorm)" in m.nnet3_config()
    y = m(torch.randn(2, 10, 8), output="output")
    assert y.shape == (2, 6, 5) and not y.abs().sum()
    with pytest.raises(ValueError, match="needs more than"):
        _small_model(3)(torch.randn(1, 10, 8))
    with pytest.raises(ValueError, match="must be"):
        _small_model(3)(torch.randn(1, 40, 7))
    with pytest.raises(ValueError, match="unknown spec_augment"):
        _small_model(3).__class__(5, feat_dim=8, spec_augment={"freq_max_proportions": 0.5})


def test_nan_gradient_does_not_crash_and_optimizer_skips():
    from pkwrap.optim import NGSGD, kaldi_param_groups
    layer = NaturalAffine(6, 4)
    opt = NGSGD(kaldi_param_groups(layer), lr=0.1)
    x = torch.randn(10, 6)
    layer(x).sum().backward()
    opt.step()
    W = layer.weight.detach().clone()
    Wt = layer.preconditioner_in.W_t.clone()
    opt.zero_grad()
    bad = x.clone()
    bad[0, 0] = float("inf")
    layer(bad).sum().backward()
    assert not torch.isfinite(layer.weight.grad).all()
    with pytest.warns(UserWarning, match="will not apply"):
        opt.step()
    assert torch.equal(layer.weight.detach(), W)
    assert torch.equal(layer.preconditioner_in.W_t, Wt)  # estimate not poisoned


def _kaldi_small(fsf):
    return TDNNFModel(329, feat_dim=40, tdnn_dim=256, tdnnf_dim=256, bottleneck_dim=64,
                      time_strides=(1, 1, 1, 0, 3, 3), prefinal_dim=64, prefinal_big_dim=256,
                      frame_subsampling_factor=fsf,
                      spec_augment=dict(freq_max_proportion=0.5, time_zeroed_proportion=0.2,
                                        time_mask_max_frames=20))


def _untrained_fields(c):
    from pkwrap.nnet3.components import _TensorRef
    skip = {"LearningRate", "Count", "StatsMean", "StatsVar", "ValueAvg", "DerivAvg",
            "OderivRms", "OderivCount", "NumDimsSelfRepaired", "NumDimsProcessed"}
    return {k: (v.attr if isinstance(v, _TensorRef) else np.asarray(v, dtype=np.float32).tolist())
            for k, v in c.fields.items() if k not in skip}


def test_tdnnf_model_is_kaldis_tdnn_1j_graph():
    """TDNNFModel's network equals Kaldi's xconfig tdnn_1j-like model (the fixture's
    final.raw, made by Kaldi from its xconfig): the same nodes and descriptors, the same
    components in the same order, with the same types, dims and training options
    (l2-regularize, max-change, learning-rate-factor, orthonormal-constraint, ranks,
    time offsets, batchnorm and spec-augment settings); a model with other strides does
    not."""
    from conftest import fixture_path
    from pkwrap.nn import load_kaldi_nnet3
    k = load_kaldi_nnet3(fixture_path("nnet3", "model", "final.raw"))
    m = _kaldi_small(3)
    assert m.config_lines() == k.config_lines()
    assert [(c.name, c.TYPE) for c in m.components] == [(c.name, c.TYPE) for c in k.components]
    for a, b in zip(m.components, k.components):
        assert _untrained_fields(a) == _untrained_fields(b), a.name
        assert {n: p.shape for n, p in a.state_dict().items()} == \
            {n: p.shape for n, p in b.state_dict().items()}, a.name
    assert m.num_parameters() == k.num_parameters() == 518162  # nnet3-info num-parameters
    other = TDNNFModel(329, feat_dim=40, tdnn_dim=256, tdnnf_dim=256, bottleneck_dim=64,
                       time_strides=(1, 1, 1, 0, 3, 1), prefinal_dim=64, prefinal_big_dim=256)
    assert _untrained_fields(other.component("tdnnf7.linear"))["TimeOffsets"] != \
        _untrained_fields(k.component("tdnnf7.linear"))["TimeOffsets"]


def test_kaldi_nnet3_import_matches_nnet3_compute():
    """Kaldi's trained TDNN-F (tests/fixtures/kaldi/nnet3) as a TDNNFModel (its trained
    parameters and statistics in the model's state dict) gives nnet3-compute's outputs
    (edge-replicated context, test-mode batchnorm) to 1e-4; so does load_kaldi_nnet3's
    module."""
    from conftest import fixture_path
    from pkwrap.nn import load_kaldi_nnet3
    d = fixture_path("nnet3")
    kaldi = load_kaldi_nnet3(d / "model" / "final.txt.gz")
    m3 = _kaldi_small(3)
    m3.load_state_dict(kaldi.state_dict())  # the same components in the same order
    m3.eval()
    kaldi.frame_subsampling_factor = 3
    kaldi.eval()
    assert (m3.left_context, m3.right_context) == (11, 11)
    assert m3.num_parameters() == 518162  # nnet3-info num-parameters
    m1 = _kaldi_small(1)
    m1.load_state_dict(m3.state_dict())
    m1.eval()
    x = np.load(d / "compute" / "feats_utt0_97.npy")
    xp = np.concatenate([np.repeat(x[:1], 11, 0), x, np.repeat(x[-1:], 11, 0)])
    with torch.no_grad():
        for fsf, m in ((3, m3), (1, m1), (3, kaldi)):
            out = m(torch.from_numpy(xp)[None])
            for key, tag in (("output", "output"), ("output-xent", "output_xent")):
                ref = np.load(d / "compute" / f"{tag}_fsf{fsf}_utt0_97.npy")
                assert out[key].shape[1:] == ref.shape
                err = np.abs(out[key][0].numpy() - ref).max()
                assert err < 1e-4, f"{tag} fsf={fsf}: max abs diff {err:.2e}"
        # the merged chain eg: 8 sequences x 174 rows (t = -12..161, n-major), outputs t-major
        eg = np.load(d / "egs" / "dump_cegs_merged8" / "eg0_input_input.npy").reshape(8, 174, 40)
        out = m3(torch.from_numpy(eg[:, 1:-1]))  # model context is 11, egs carry 12
        assert out["output"].shape == (8, 50, 329)
        for key, name in (("output", "eg_nnet_output.npy"),
                          ("output-xent", "eg_xent_output.npy")):
            ref = np.load(d / "egs" / name)
            got = out[key].transpose(0, 1).reshape(400, 329).numpy()  # row = t * 8 + n
            assert np.abs(got - ref).max() < 1e-4


def test_load_kaldi_nnet3_rejects_a_model_to_fill():
    """load_kaldi_nnet3(path) returns the model; the older form that filled a given
    TDNNFModel says so."""
    from conftest import fixture_path
    from pkwrap.nn import load_kaldi_nnet3
    with pytest.raises(TypeError, match="returns the model"):
        load_kaldi_nnet3(_kaldi_small(3))
    with pytest.raises(TypeError):
        load_kaldi_nnet3(_kaldi_small(3), fixture_path("nnet3", "model", "final.txt.gz"))


def test_autocast_bfloat16():
    layer, conv = NaturalAffine(8, 4), NaturalConv1d(8, 4, 3)
    x = torch.randn(16, 8, requires_grad=True)
    xc = torch.randn(2, 8, 10, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yc = layer(x), conv(xc)
    (y.float().sum() + yc.float().sum()).backward()
    assert x.grad.dtype == xc.grad.dtype == layer.weight.grad.dtype == torch.float32
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(conv.weight.grad).all()


@pytest.mark.parametrize("natural", [False, True])
@pytest.mark.parametrize("dims,offsets,bias", [((40, 12), (-1, 0, 2), True),
                                               ((768, 96), (-3, 0), False)])
def test_spliced_tdnn_equals_splice_then_affine(natural, dims, offsets, bias):
    # the wide-input TDNN path of the plan (row-shifted products, no spliced copy) against
    # the TdnnComponent's natural-gradient affine map of the spliced frames: outputs, input
    # and parameter gradients, through preconditioner updates
    from pkwrap.nnet3.plan import _spliced_tdnn
    torch.manual_seed(3)
    line = "component name=t type=TdnnComponent input-dim=%d output-dim=%d time-offsets=%s " \
        "use-bias=%s" % (dims[0], dims[1], ",".join(map(str, offsets)), str(bias).lower())
    a = component_from_config(line, {"name": "t", "type": "TdnnComponent",
                                     "input-dim": str(dims[0]), "output-dim": str(dims[1]),
                                     "time-offsets": ",".join(map(str, offsets)),
                                     "use-bias": str(bias).lower()})
    a.use_natural_gradient = natural
    b = copy.deepcopy(a)
    rel = tuple(o - offsets[0] for o in offsets)
    for step in range(12):
        x = torch.randn(6, 40, dims[0], generator=_gen(step), requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        L = 40 - rel[-1]
        y = _spliced_tdnn(a, x, (0, 40, rel))
        assert y is not None
        want = b._affine(torch.cat([x2[:, r:r + L] for r in rel], dim=-1))
        assert y.shape == (6, 40 - (offsets[-1] - offsets[0]), dims[1])
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
        g = torch.randn(y.shape, generator=_gen(50 + step))
        a.zero_grad()
        b.zero_grad()
        y.backward(g)
        want.backward(g)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-4, atol=1e-4)
        if bias:
            torch.testing.assert_close(a.bias.grad, b.bias.grad, rtol=1e-4, atol=1e-4)
    assert a.preconditioner_in.t == (12 if natural else 0)
    assert b.preconditioner_in.t == a.preconditioner_in.t
    if natural:
        torch.testing.assert_close(a.preconditioner_in.W_t, b.preconditioner_in.W_t,
                                   rtol=1e-4, atol=1e-5)
        for p in (a.preconditioner_in, a.preconditioner_out):
            assert isinstance(p.last_scale, float) and p.last_scale >= 1.0


def test_digits_decode_names_a_checkpoint_that_does_not_fit(tmp_path):
    """egs/digits/decode.py rebuilds the TDNNFModel of model.json: a checkpoint of the
    older layout (its own layer modules, before TDNNFModel became an nnet3 network) or of
    another model is one clear error naming the file; a fitting one loads."""
    import importlib.util
    import json
    from pathlib import Path
    from pkwrap.train import save_checkpoint
    path = Path(__file__).resolve().parents[1] / "egs" / "digits" / "decode.py"
    spec = importlib.util.spec_from_file_location("digits_decode", path)
    dec = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dec)
    cfg = dict(num_pdfs=7, feat_dim=8, tdnn_dim=8, tdnnf_dim=8, bottleneck_dim=4,
               time_strides=[1, 3], prefinal_dim=4, prefinal_big_dim=8, use_idct=False,
               xent_head=False)
    (tmp_path / "model.json").write_text(json.dumps(cfg))
    model = TDNNFModel(**cfg)
    old = {"batchnorm0.stats_count": torch.zeros(()), "tdnn1.weight": torch.zeros(8, 24),
           "tdnnfs.0.linear.weight": torch.zeros(4, 16)}
    save_checkpoint(str(tmp_path / "old.pt"), {"model": old})
    with pytest.raises(SystemExit, match="old.pt does not fit the model of .*model.json: it "
                                         "is a checkpoint of the older TDNNFModel layout"):
        dec.load_model(tmp_path, tmp_path / "old.pt")
    other = TDNNFModel(**dict(cfg, time_strides=[1])).state_dict()
    save_checkpoint(str(tmp_path / "other.pt"), {"model": other})
    with pytest.raises(SystemExit, match="other.pt does not fit .* unexpected"):
        dec.load_model(tmp_path, tmp_path / "other.pt")
    save_checkpoint(str(tmp_path / "final.pt"), {"model": model.state_dict()})
    got = dec.load_model(tmp_path, tmp_path / "final.pt")
    assert not got.training and all(torch.equal(a, b) for a, b in
                                    zip(got.state_dict().values(), model.state_dict().values()))


def test_tdnnf_model_written_for_kaldi_and_read_back(tmp_path):
    """A trained TDNNFModel is an nnet3 network: save_kaldi_nnet3 writes it (Kaldi's
    format, training settings kept) and load_kaldi_nnet3 reads back the same network."""
    from pkwrap.nn import load_kaldi_nnet3, save_kaldi_nnet3
    m = _small_model(3)
    m.train()(torch.randn(2, 60, 8))  # batchnorm statistics
    m.eval()
    save_kaldi_nnet3(m, tmp_path / "m.raw")
    back = load_kaldi_nnet3(tmp_path / "m.raw")
    back.frame_subsampling_factor = 3
    assert back.config_lines() == m.config_lines()
    for a, b in zip(back.components, m.components):  # (as float32 in the file)
        assert a.training_options() == pytest.approx(b.training_options(), rel=1e-6), a.name
    x = torch.randn(2, 60, 8)
    with torch.no_grad():
        a, b = m(x), back.eval()(x)
    assert set(a) == set(b) == {"output", "output-xent"}
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


def test_tdnnf_model_initial_parameters_come_from_the_global_generator():
    """TDNNFModel draws its initial parameters from torch's global generator, in config
    order with Kaldi's default distributions (weights N(0, 1/inputs), biases N(0, 1)); the
    idct layer takes no draws. The same seed gives the same model (every DDP rank)."""
    kw = dict(num_pdfs=11, feat_dim=8, tdnn_dim=16, tdnnf_dim=16, bottleneck_dim=6,
              time_strides=(1, 0), prefinal_dim=6, prefinal_big_dim=16)
    torch.manual_seed(7)
    m = TDNNFModel(**kw)
    torch.manual_seed(7)
    f32 = np.float32
    w1 = torch.randn(16, 24).numpy() * f32(24 ** -0.5)  # tdnn1.affine on the 3 x 8 deltas
    b1 = torch.randn(16).numpy() * f32(1.0)
    w2 = torch.randn(6, 32).numpy() * f32(32 ** -0.5)  # tdnnf2.linear, offsets -1,0, no bias
    assert np.array_equal(m.component("tdnn1.affine").weight.detach().numpy(), w1)
    assert np.array_equal(m.component("tdnn1.affine").bias.detach().numpy(), b1)
    assert np.array_equal(m.component("tdnnf2.linear").weight.detach().numpy(), w2)
    torch.manual_seed(7)
    again = TDNNFModel(**kw)
    torch.manual_seed(8)
    other = TDNNFModel(**kw)
    for k, v in m.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert not torch.equal(m.component("tdnn1.affine").weight,
                           other.component("tdnn1.affine").weight)


def test_tdnnf_model_dropout_is_kaldis_tdnnf_layer_dropout():
    """dropout=True puts a continuous GeneralDropoutComponent between each TDNN-F layer's
    batchnorm and its bypass sum (xconfig tdnnf-layer with a dropout proportion): no
    parameters, so the same seed gives the same parameters; evaluation and proportion 0
    are the network without it; proportion p scales each dimension of a sequence by
    1 - 2p + 4pu, one factor for all its frames."""
    kw = dict(num_pdfs=11, feat_dim=8, tdnn_dim=16, tdnnf_dim=16, bottleneck_dim=6,
              time_strides=(1, 0, 3), prefinal_dim=6, prefinal_big_dim=16, use_idct=False,
              xent_head=False)
    torch.manual_seed(3)
    plain = TDNNFModel(**kw)
    torch.manual_seed(3)
    m = TDNNFModel(dropout=True, **kw)
    assert [c.name for c in m.components if c.TYPE == "GeneralDropoutComponent"] == \
        ["tdnnf2.dropout", "tdnnf3.dropout", "tdnnf4.dropout"]
    assert "component-node name=tdnnf3.noop component=tdnnf3.noop " \
           "input=Sum(Scale(0.66, tdnnf2.noop), tdnnf3.dropout)" in m._config
    assert m.state_dict().keys() != plain.state_dict().keys()  # component indices moved
    assert [v.shape for v in m.state_dict().values()] == \
        [v.shape for v in plain.state_dict().values()]
    for a, b in zip(m.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    w = torch.randn_like(m.component("output.affine").weight)  # Kaldi initializes it to 0
    with torch.no_grad():
        m.component("output.affine").weight.copy_(w)
        plain.component("output.affine").weight.copy_(w)
    x = torch.randn(3, 40, 8)
    plain.train(), m.train()
    m.apply_edits("set-dropout-proportion name=* proportion=0")
    # (the plain network's bypass sum runs fused, this one's not: another summation order)
    torch.testing.assert_close(m(x)["output"], plain(x)["output"], rtol=1e-3, atol=1e-3)
    plain.eval(), m.eval()                       # (batchnorm statistics from the pass above)
    m.apply_edits("set-dropout-proportion name=* proportion=0.5")
    torch.testing.assert_close(m(x)["output"], plain(x)["output"], rtol=1e-3, atol=1e-3)
    plain.train(), m.train()
    m.apply_edits("set-dropout-proportion name=* proportion=0")
    m.apply_edits("set-dropout-proportion name=tdnnf3.* proportion=0.5")
    assert m.component("tdnnf2.dropout").fields["DropoutProportion"] == 0
    assert m.component("tdnnf3.dropout").fields["DropoutProportion"] == 0.5
    d = m.component("tdnnf3.dropout")
    y = torch.randn(3, 20, 16)
    z = d(y) / y                                   # the factors: per sequence and dimension
    assert torch.allclose(z, z[:, :1].expand_as(z), atol=1e-5)
    assert z.min() >= 0 - 1e-6 and z.max() <= 2 + 1e-6 and z.std() > 0.1
    assert (m(x)["output"] - plain(x)["output"]).abs().max() > 0.1
