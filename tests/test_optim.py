"""pkwrap.optim: Kaldi's update rules (max-change, l2, momentum, backstitch), schedule, state."""
import copy
import io
import math

import pytest
import torch
import torch.nn as nn

from pkwrap.nn import NaturalAffine, TDNNFModel
from pkwrap.optim import (NGSGD, KaldiLRScheduler, kaldi_learning_rate, kaldi_num_jobs,
                          kaldi_param_groups)

torch.set_num_threads(1)


def _set_grads(model, value):
    for p in model.parameters():
        p.grad = torch.full_like(p, value)


def test_per_layer_max_change_clips():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 3))
    model[1].max_change = 1.5
    before = [p.detach().clone() for p in model.parameters()]
    opt = NGSGD(kaldi_param_groups(model), lr=1.0, max_param_change=0.0)
    _set_grads(model, 1.0)
    opt.step()
    ch = [p.detach() - b for p, b in zip(model.parameters(), before)]
    n0 = math.sqrt(float(ch[0].square().sum() + ch[1].square().sum()))
    n1 = math.sqrt(float(ch[2].square().sum() + ch[3].square().sum()))
    assert abs(n0 - 0.75) < 1e-5 and abs(n1 - 1.5) < 1e-5  # weight and bias clipped together
    assert float(ch[0].max()) < 0  # descent direction
    assert opt.num_max_change_per_group_applied == [1, 1]
    # small gradients are not touched
    _set_grads(model, 1e-4)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach() - b, torch.full_like(b, -1e-4))


def test_global_max_param_change():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(8)])
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt = NGSGD(kaldi_param_groups(model), lr=1.0, max_param_change=2.0)
    _set_grads(model, 1.0)  # each layer's change capped at 0.75 -> total 0.75 * sqrt(8) > 2
    opt.step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert abs(float((after - before).norm()) - 2.0) < 1e-5
    assert opt.num_max_change_global_applied == 1


def test_l2_and_learning_rate_factor():
    layer = NaturalAffine(3, 2, l2_regularize=0.25, learning_rate_factor=2.0)
    w0 = layer.weight.detach().clone()
    opt = NGSGD(kaldi_param_groups(layer), lr=0.01, l2_regularize_factor=0.5)
    layer.weight.grad = torch.zeros_like(layer.weight)
    layer.bias.grad = torch.zeros_like(layer.bias)
    opt.step(num_sequences=4)
    # delta = -2 * (S * factor) * lr_eff * l2 * w = -2 * 2 * 0.02 * 0.25 * w
    torch.testing.assert_close(layer.weight.detach(), w0 * (1 - 0.02))


def test_kaldi_momentum():
    p = nn.Parameter(torch.zeros(3))
    opt = NGSGD([p], lr=0.1, momentum=0.5, max_change=0.0, max_param_change=0.0)
    steps = []
    for _ in range(3):
        p.grad = torch.ones(3)
        before = p.detach().clone()
        opt.step()
        steps.append(float(before[0] - p.detach()[0]))
    # applied = (1 - mu) * accumulated, accumulated = mu * previous + lr * g
    assert steps == pytest.approx([0.05, 0.075, 0.0875])


def test_nonfinite_gradient_skipped_with_warning():
    model = nn.Linear(3, 3)
    opt = NGSGD(kaldi_param_groups(model), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    _set_grads(model, 1.0)
    model.weight.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="will not apply"):
        opt.step()
    assert opt.num_skipped == 1
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    model.bias.grad[1] = float("inf")
    with pytest.warns(UserWarning):
        opt.step()
    assert opt.num_skipped == 2


def test_schedule_matches_kaldi_formula():
    p = nn.Parameter(torch.zeros(1))
    opt = NGSGD([p], lr=123.0)
    sch = KaldiLRScheduler(opt, num_iters=10, initial_effective_lrate=0.001,
                           final_effective_lrate=0.0001, num_jobs_initial=2, num_jobs_final=4,
                           proportional_shrink=10.0)
    jobs = [kaldi_num_jobs(i, 10, 2, 4) for i in range(10)]
    assert jobs == [2, 2, 2, 3, 3, 3, 3, 3, 4, 4]
    processed = [sum(jobs[:i]) for i in range(10)]
    lrs = []
    for i in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        want = jobs[i] * 0.001 * math.exp(processed[i] * math.log(0.1) / sum(jobs))
        if i == 9:
            want = 4 * 0.0001
        assert lrs[-1] == pytest.approx(want, rel=1e-12)
        assert kaldi_learning_rate(i, jobs[i], 10, processed[i], sum(jobs), 0.001, 0.0001) == \
            pytest.approx(want, rel=1e-12)
        assert sch.shrink_value() == pytest.approx(1 - 10.0 * want)
        p.grad = torch.zeros(1)
        opt.step()
        sch.step()
    assert lrs[0] == pytest.approx(0.002)
    p.data.fill_(2.0)
    opt.shrink_(0.5)
    assert float(p.detach()) == 1.0


def _train(model, opt, sched, batches):
    out = []
    for x, y in batches:
        opt.zero_grad()
        xent = model(x, output="output-xent")
        loss = -xent.gather(-1, y[:, None, None].expand(-1, xent.shape[1], 1)).sum()
        loss.backward()
        opt.step(num_sequences=x.shape[0])
        sched.step()
        out.append(float(loss.detach()))
    return out


def _tiny():
    torch.manual_seed(5)
    return TDNNFModel(7, feat_dim=6, tdnn_dim=12, tdnnf_dim=12, bottleneck_dim=4,
                      time_strides=(1, 3), prefinal_dim=4, prefinal_big_dim=12)


def test_checkpoint_round_trip_continues_exactly():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 30, 6, generator=g), torch.randint(0, 7, (3,), generator=g))
               for _ in range(16)]

    def fresh():
        m = _tiny()
        o = NGSGD(kaldi_param_groups(m), lr=0.002, momentum=0.3)
        s = KaldiLRScheduler(o, 16, 0.002, 0.0002)
        return m, o, s

    m, o, s = fresh()
    full = _train(m, o, s, batches)
    m1, o1, s1 = fresh()
    _train(m1, o1, s1, batches[:9])
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict(), "sched": s1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    m2, o2, s2 = fresh()
    m2.load_state_dict(ck["model"])
    o2.load_state_dict(ck["opt"])
    s2.load_state_dict(ck["sched"])
    assert o2.num_steps == 9 and m2.component("tdnn1.affine").preconditioner_in.t == 9
    rest = _train(m2, o2, s2, batches[9:])
    assert rest == full[9:]
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    # losing the preconditioner state would change the trajectory
    m3, o3, s3 = fresh()
    m3.load_state_dict(ck["model"])
    sd = copy.deepcopy(ck["opt"])
    sd.pop("ngsgd")
    o3.load_state_dict(sd)
    s3.load_state_dict(ck["sched"])
    assert _train(m3, o3, s3, batches[9:]) != full[9:]


def test_backstitch_and_orthonormal_constraint():
    m = _tiny()
    x = torch.randn(2, 30, 6)
    y = torch.randint(0, 7, (2,))
    opt = NGSGD(kaldi_param_groups(m), lr=0.01, backstitch_training_scale=0.3)
    with pytest.raises(ValueError):
        NGSGD(kaldi_param_groups(m), lr=0.01, backstitch_training_scale=0.3, momentum=0.1)

    def closure():
        opt.zero_grad()
        loss = -m(x, output="output-xent")[..., 0].sum()
        loss.backward()
        return loss

    closure()
    with pytest.raises(ValueError):
        opt.step()
    W = m.component("prefinal-l").weight.detach().clone()
    l0 = float(closure().detach())
    t0 = m.component("tdnn1.affine").preconditioner_in.t
    opt.step(closure)
    # two passes, the first with frozen preconditioners (t still counts both calls)
    assert m.component("tdnn1.affine").preconditioner_in.t == t0 + 2
    assert float(closure().detach()) < l0
    # step 0 applied the orthonormal constraint to prefinal-l: rows closer to orthogonal
    def off(M):
        P = M @ M.t()
        return float((P / P.diagonal().mean() - torch.eye(P.shape[0])).abs().max())
    assert off(m.component("prefinal-l").weight.detach()) < off(W)
