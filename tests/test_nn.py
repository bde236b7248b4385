"""pkwrap.nn: natural-gradient layers, model conversion, TDNN-F model semantics."""
import copy

import pytest
import torch
import torch.nn as nn

from pkwrap.ngsgd import OnlineNaturalGradient
from pkwrap.nn import (TDNNF, KaldiBatchNorm, NaturalAffine, NaturalConv1d, TDNNFModel,
                       compute_idct_matrix, constrain_orthonormal_, natural_gradient,
                       natural_gradient_state_dict, load_natural_gradient_state_dict,
                       scale_batchnorm_stats)

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


def test_kaldi_batchnorm():
    bn = KaldiBatchNorm(4, target_rms=2.0)
    x = torch.randn(3, 50, 4) * 3 + 1
    y = bn(x)
    rows = y.reshape(-1, 4)
    torch.testing.assert_close(rows.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(rows.pow(2).mean(0), torch.full((4,), 4.0), rtol=1e-3, atol=0)
    assert float(bn.stats_count) == 150
    bn.eval()
    xr = x.reshape(-1, 4).double()
    want = (x - xr.mean(0).float()) * 2.0 / (xr.var(0, unbiased=False).float() + 1e-3).sqrt()
    torch.testing.assert_close(bn(x), want, rtol=1e-4, atol=1e-4)
    scale_batchnorm_stats(nn.Sequential(bn), 0.8)
    assert abs(float(bn.stats_count) - 120) < 1e-9
    with pytest.raises(RuntimeError):
        KaldiBatchNorm(4).eval()(x)



def _relu_bn_bypass_reference(y, bn, x, c, scale, pick):
    """The elementwise tail of a TDNN-F layer as separate torch operations."""
    from pkwrap.nn.tdnnf import _BypassAddFunction
    out = bn._forward(torch.relu(y))
    return out if x is None else _BypassAddFunction.apply(out, x, c, scale, pick)


@pytest.mark.parametrize("pick,target_rms,bypass", [(None, 1.0, True), ((1, 3), 1.0, True),
                                                     ((2, 3), 0.5, True), (None, 2.0, False)])
def test_fused_relu_batchnorm_equals_separate_ops(pick, target_rms, bypass):
    from pkwrap.nn.tdnnf import _fused_ok, relu_batchnorm
    assert _fused_ok(torch.zeros(2, 2)), "the C++ kernels are not built"
    torch.manual_seed(0)
    B, Tx, D, c = 3, 23, 9, 2
    J = Tx - 2 * c if pick is None else len(range(pick[0], Tx - 2 * c, pick[1]))
    x0 = torch.randn(B, Tx, D)
    y0 = torch.randn(B, J, D) * 2 + 0.3
    w = torch.randn(B, J, D)
    res = []
    for fused in (True, False):
        bn = KaldiBatchNorm(D, target_rms=target_rms)
        bn.stats_count += 5.0  # existing statistics are added to
        y = y0.clone().requires_grad_(True)
        x = x0.clone().requires_grad_(True)
        args = (y * 1.0, bn, x if bypass else None, c, 0.66, pick)
        out = relu_batchnorm(*args) if fused else _relu_bn_bypass_reference(*args)
        (out * w).sum().backward()
        res.append((out.detach(), y.grad, x.grad, bn.stats_count.clone(), bn.stats_sum.clone(),
                    bn.stats_sumsq.clone()))
    (o1, gy1, gx1, n1, s1, q1), (o2, gy2, gx2, n2, s2, q2) = res
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gy1, gy2, rtol=1e-4, atol=1e-5)
    if bypass:
        torch.testing.assert_close(gx1, gx2, rtol=0, atol=0)
        assert bool((gx1[:, :c] == 0).all()) and bool((gx1[:, Tx - c:] == 0).all())
    else:
        assert gx1 is None and gx2 is None
    assert float(n1) == float(n2) == 5.0 + B * J
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(q1, q2, rtol=1e-6, atol=1e-5)
    # a ReLU'd-away unit gets no gradient
    assert bool((gy1[y0 <= 0] == 0).all())


def test_fused_batchnorm_is_the_same_with_any_thread_count():
    from pkwrap.nn.tdnnf import relu_batchnorm
    torch.manual_seed(1)
    x = torch.randn(2, 700, 16)  # rows over several of the kernel's 256-row blocks
    y0 = torch.randn(2, 698, 16)
    w = torch.randn(2, 698, 16)
    outs = []
    nt = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            bn = KaldiBatchNorm(16)
            y = y0.clone().requires_grad_(True)
            out = relu_batchnorm(y * 1.0, bn, x, 1, 0.5)
            (out * w).sum().backward()
            outs.append((out.detach(), y.grad, bn.stats_sum.clone()))
    finally:
        torch.set_num_threads(nt)
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], o))


def test_fused_batchnorm_checks_shapes_and_falls_back():
    from pkwrap.nn.tdnnf import relu_batchnorm
    bn = KaldiBatchNorm(4)
    with pytest.raises(ValueError, match="bypass input"):
        relu_batchnorm(torch.randn(2, 5, 4), bn, torch.randn(2, 6, 4), 1, 0.5)
    with pytest.raises(ValueError, match="at least 2 rows"):
        bn(torch.randn(1, 4))
    # float64 (no C++ kernel) takes the torch path and gives the same numbers
    y = torch.randn(2, 5, 4, dtype=torch.float64)
    x = torch.randn(2, 7, 4, dtype=torch.float64)
    bn64 = KaldiBatchNorm(4)
    got = relu_batchnorm(y.clone(), bn64, x, 1, 0.5)
    want = relu_batchnorm(y.float(), KaldiBatchNorm(4), x.float(), 1, 0.5)
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)


def test_fused_batchnorm_kernel_statistics():
    """The row norms of the forward and the column sums / squared norm of the backward that
    the kernels return for the natural-gradient layers equal torch's."""
    from pkwrap.nn.tdnnf import _bn_backward, _bn_forward, _bypass_map
    torch.manual_seed(3)
    B, Tx, J, D = 2, 530, 526, 7  # several 256-row blocks
    x = torch.randn(B, Tx, D)
    y = torch.randn(B, J, D)
    bn = KaldiBatchNorm(D)
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


def _separate_affine_relu_batchnorm(x, affine, bn, bypass=None, c=0, bypass_scale=0.0,
                                    pick=None, row_norms=False):
    from pkwrap.nn.tdnnf import relu_batchnorm
    return relu_batchnorm(NaturalAffine.forward(affine, x), bn, bypass, c, bypass_scale, pick)


@pytest.mark.parametrize("stride,pick", [(1, (0, 3)), (1, (2, 3)), (2, (1, 3))])
def test_tdnnf_picked_layer_evaluates_linear_at_needed_frames_only(stride, pick):
    """With pick (j0, f) and stride s < f, a TDNN-F layer evaluates its linear half only at
    the 2 of f frames the picked outputs read, as nnet3 does: outputs, gradients and
    natural-gradient statistics equal those of the linear half applied to exactly those
    spliced rows."""
    from pkwrap.nn.tdnnf import relu_batchnorm, splice
    torch.manual_seed(0)
    layer = TDNNF(12, 5, stride, bypass_scale=0.66)
    ref = copy.deepcopy(layer)
    B, T = 3, 31
    j0, f = pick
    picked = list(range(j0, T - 2 * stride, f))
    need = sorted({j + d for j in picked for d in (0, stride)})
    assert len(need) == 2 * len(picked) < (T - stride) * 0.7
    for step in range(13):
        x0 = torch.randn(B, T, 12, generator=_gen(step))
        xa, xb = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        out = layer(xa, 1, pick)
        rows = splice(xb, (0, stride))[:, need]  # [x(i), x(i + s)] at the needed i only
        h = NaturalAffine.forward(ref.linear, rows).reshape(B, len(picked), 10)
        want = relu_batchnorm(NaturalAffine.forward(ref.affine, h), ref.batchnorm, xb, stride,
                              0.66, pick)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        w = torch.randn(out.shape, generator=_gen(50 + step))
        (out * w).sum().backward()
        (want * w).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
        for (n, p), q in zip(layer.named_parameters(), ref.parameters()):
            _assert_close_to_max(p.grad, q.grad, 1e-4, f"{n} step {step}")
            with torch.no_grad():
                q.copy_(p.sub_(0.01 * p.grad))
            p.grad = q.grad = None
    assert layer.linear.preconditioner_in.t == ref.linear.preconditioner_in.t == 13
    W1, W2 = layer.linear.preconditioner_in.W_t, ref.linear.preconditioner_in.W_t
    torch.testing.assert_close(W1.t() @ W1, W2.t() @ W2, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("use_ng", [True, False])
def test_fused_affine_batchnorm_equals_separate_layers(monkeypatch, use_ng):
    """A TDNN-F model trained a few steps with the fused affine + ReLU + batchnorm (+ bypass)
    nodes and the row norms they pass on gives the outputs, gradients, batchnorm statistics
    and natural-gradient state of the same model built from separate layers."""
    from pkwrap.nn import natural_gradient_modules, tdnnf
    torch.manual_seed(0)
    model = TDNNFModel(13, feat_dim=10, tdnn_dim=24, tdnnf_dim=24, bottleneck_dim=8,
                       time_strides=(1, 0, 3, 3), prefinal_dim=12, prefinal_big_dim=20)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.1)  # the zero output layers would hide gradients
    for _, m in natural_gradient_modules(model):
        m.use_natural_gradient = use_ng
    ref = copy.deepcopy(model)
    calls = []
    fused_fn = tdnnf._AffineReluBatchNormFunction.apply
    monkeypatch.setattr(tdnnf._AffineReluBatchNormFunction, "apply",
                        lambda *a: calls.append(1) or fused_fn(*a))
    for step in range(14):  # past the preconditioners' updating calls
        x = torch.randn(4, 45, 10, generator=_gen(step))
        res = []
        for m in (model, ref):
            with monkeypatch.context() as mp:
                if m is ref:
                    mp.setattr(tdnnf, "affine_relu_batchnorm", _separate_affine_relu_batchnorm)
                m.zero_grad()
                chain, xent = m(x)
                (chain.square().sum() - xent.sum()).backward()
            res.append((chain.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
        with torch.no_grad():  # both take the fused model's step (rounding would compound)
            for p, q in zip(model.parameters(), ref.parameters()):
                q.copy_(p.sub_(0.01 * p.grad))
        (c1, g1), (c2, g2) = res
        # float rounding differs: errors relative to each tensor's largest entry
        _assert_close_to_max(c1, c2, 1e-4, f"output step {step}")
        for n in g1:
            _assert_close_to_max(g1[n], g2[n], 1e-4, f"{n} step {step}")
    monkeypatch.undo()
    assert len(calls) == 14 * 7  # tdnn1, 4 TDNN-F layers, 2 prefinal layers per step
    for (n, b1), b2 in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b1, b2, rtol=1e-5, atol=1e-6, msg=n)
    if use_ng:
        for (_, m1), (_, m2) in zip(natural_gradient_modules(model),
                                    natural_gradient_modules(ref)):
            for p1, p2 in ((m1.preconditioner_in, m2.preconditioner_in),
                           (m1.preconditioner_out, m2.preconditioner_out)):
                assert p1.t == p2.t > 10
                # W's rows are eigenvectors (signs arbitrary): compare W^T W, which the
                # preconditioning uses
                torch.testing.assert_close(p1.W_t.t() @ p1.W_t, p2.W_t.t() @ p2.W_t,
                                           rtol=1e-3, atol=1e-5)


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
    assert sum(p.numel() for p in m.parameters()) == 5024134  # nnet3-info of Kaldi's tdnn_1j
    assert (m.left_context, m.right_context, m.frame_subsampling_factor) == (29, 29, 3)
    assert m.num_output_frames(208) == 50
    from conftest import fixture_path
    txt = fixture_path("bench", "tdnn_1j.idct.mat").read_text().replace("[", "").replace("]", "")
    kaldi = torch.tensor([float(v) for v in txt.split()]).reshape(40, 41)
    torch.testing.assert_close(compute_idct_matrix(40, 22.0), kaldi[:, :40], atol=1e-6, rtol=0)


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
    c3, x3 = m3(x)
    c1, x1 = m1(x)
    assert c3.shape == (2, m3.num_output_frames(60), 11) and c1.shape[1] == 60 - 2 * ctx
    torch.testing.assert_close(c3, c1[:, ::3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x3, x1[:, ::3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x3.exp().sum(-1), torch.ones(2, c3.shape[1]))
    # output frame j depends on input frames 3j .. 3j + 2 ctx only
    for mod in m3.modules():  # give the zero-initialized output layers some weight
        if mod is m3.output:
            torch.nn.init.normal_(mod.weight)
    xi = x.clone().requires_grad_(True)
    m3(xi)[0][0, 4].sum().backward()
    nz = (xi.grad[0].abs().sum(-1) > 0).nonzero().flatten()
    assert int(nz.min()) >= 12 and int(nz.max()) <= 12 + 2 * ctx


def test_tdnnf_layer_bypass_and_bad_input():
    layer = TDNNF(8, 4, time_stride=2, bypass_scale=0.5)
    x = torch.randn(1, 10, 8)
    y = layer(x)
    assert y.shape == (1, 6, 8)
    with pytest.raises(ValueError):
        _small_model(3)(torch.randn(1, 10, 8))
    with pytest.raises(ValueError):
        _small_model(3)(torch.randn(1, 40, 7))


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
                      frame_subsampling_factor=fsf)


def test_kaldi_nnet3_import_matches_nnet3_compute():
    """Kaldi's trained TDNN-F (tests/fixtures/kaldi/nnet3) loaded into TDNNFModel gives
    nnet3-compute's outputs (edge-replicated context, test-mode batchnorm) to 1e-4."""
    import numpy as np
    from conftest import fixture_path
    from pkwrap.nn.kaldi_import import load_kaldi_nnet3
    d = fixture_path("nnet3")
    m3 = load_kaldi_nnet3(_kaldi_small(3), d / "model" / "final.txt.gz").eval()
    assert (m3.left_context, m3.right_context) == (11, 11)
    assert sum(p.numel() for p in m3.parameters()) == 518162  # nnet3-info num-parameters
    m1 = _kaldi_small(1)
    m1.load_state_dict(m3.state_dict())
    m1.eval()
    x = np.load(d / "compute" / "feats_utt0_97.npy")
    xp = np.concatenate([np.repeat(x[:1], 11, 0), x, np.repeat(x[-1:], 11, 0)])
    with torch.no_grad():
        for fsf, m in ((3, m3), (1, m1)):
            chain, xent = m(torch.from_numpy(xp)[None])
            for out, tag in ((chain, "output"), (xent, "output_xent")):
                ref = np.load(d / "compute" / f"{tag}_fsf{fsf}_utt0_97.npy")
                assert out.shape[1:] == ref.shape
                err = np.abs(out[0].numpy() - ref).max()
                assert err < 1e-4, f"{tag} fsf={fsf}: max abs diff {err:.2e}"
        # the merged chain eg: 8 sequences x 174 rows (t = -12..161, n-major), outputs t-major
        eg = np.load(d / "egs" / "dump_cegs_merged8" / "eg0_input_input.npy").reshape(8, 174, 40)
        chain, xent = m3(torch.from_numpy(eg[:, 1:-1]))  # model context is 11, egs carry 12
        assert chain.shape == (8, 50, 329)
        for out, name in ((chain, "eg_nnet_output.npy"), (xent, "eg_xent_output.npy")):
            ref = np.load(d / "egs" / name)
            got = out.transpose(0, 1).reshape(400, 329).numpy()  # row = t * 8 + n
            assert np.abs(got - ref).max() < 1e-4


def test_load_kaldi_nnet3_rejects_mismatch():
    from conftest import fixture_path
    from pkwrap.nn.kaldi_import import load_kaldi_nnet3
    bad = TDNNFModel(329, feat_dim=40, tdnn_dim=256, tdnnf_dim=256, bottleneck_dim=64,
                     time_strides=(1, 1, 1, 0, 3, 1), prefinal_dim=64, prefinal_big_dim=256)
    with pytest.raises(ValueError, match="time offsets"):
        load_kaldi_nnet3(bad, fixture_path("nnet3", "model", "final.txt.gz"))


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
    # the wide-input TDNN path (row-shifted products, no spliced copy) against splice() +
    # NaturalAffine: outputs, input and parameter gradients, through preconditioner updates
    from pkwrap.nn import TDNN
    from pkwrap.nn.tdnnf import splice
    torch.manual_seed(3)
    a = TDNN(dims[0], dims[1], offsets, bias=bias)
    a.use_natural_gradient = natural
    b = copy.deepcopy(a)
    for step in range(12):
        x = torch.randn(6, 40, dims[0], generator=_gen(step), requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        y = a(x)
        want = NaturalAffine.forward(b, splice(x2, list(offsets)))
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
