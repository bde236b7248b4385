"""ChainLoss against Kaldi's ComputeChainObjfAndDeriv on every fixture case.

Each case: the eg is read from the archive named in expected.json with
read_chain_egs, X (t-major rows in the fixture) is made batch-first with
reshape(T, S, P).transpose(0, 1), and objf / l2_term / weight / num and den
log-probs (relative 1e-4), d loss / d X = -nnet_output_deriv and
d loss / d xent = -xent_regularize * xent_output_deriv (max abs error below 2e-4 of
the largest entry) are compared. The torch backend must equal the C++ one.
"""
import logging
from functools import lru_cache

import numpy as np
import pytest
import torch

from conftest import FIXTURES, all_cases, load_case
from pkwrap.chain import (ChainLoss, ChainOptions, DenominatorGraph, chain_loss,
                          denominator_forward_backward, denominator_logprob)
from pkwrap.kaldi.chain_egs import Supervision, read_chain_egs
from pkwrap.kaldi.fst import Fst

THREADS = 1  # the CI machine has 2 cores shared by everything


@lru_cache(maxsize=None)
def _graph(rel_path, num_pdfs):
    return DenominatorGraph.from_fst(FIXTURES / rel_path, num_pdfs)


@lru_cache(maxsize=None)
def _egs(rel_path):
    return dict(read_chain_egs("ark:%s" % (FIXTURES / rel_path)))


def _bf(arr, S, T):
    """Fixture t-major (T*S, P) -> batch-first (S, T, P)."""
    a = np.asarray(arr)
    return np.ascontiguousarray(a.reshape(T, S, a.shape[-1]).transpose(1, 0, 2))


def _setup(case):
    c = load_case(case)
    S, T, P = c["num_sequences"], c["frames_per_sequence"], c["num_pdfs"]
    g = _graph(c["inputs"]["den_fst"], P)
    eg = _egs(c["inputs"]["egs"])[c["inputs"]["eg_key"]]
    X = torch.from_numpy(_bf(np.load(c["inputs"]["nnet_output"]), S, T))
    Y = None
    if c["inputs"].get("xent_output"):
        Y = torch.from_numpy(_bf(np.load(c["inputs"]["xent_output"]), S, T))
    return c, g, eg, X, Y


def _run(case, backend="cpp", reduction="sum", device="cpu"):
    c, g, eg, X, Y = _setup(case)
    X = X.to(device).requires_grad_()
    Y = Y.to(device).requires_grad_() if Y is not None else None
    crit = ChainLoss(g, ChainOptions(**c["options"]), reduction=reduction, backend=backend,
                     num_threads=THREADS)
    res = crit(X, eg.supervision, Y)
    res.loss.backward()
    return c, eg, res, X, Y


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def _max_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _other_branch(case):
    if case.endswith("not-applied"):
        return case[: -len("not-applied")] + "applied"
    return case[: -len("applied")] + "not-applied"


@pytest.mark.parametrize("case", all_cases())
def test_case_matches_kaldi(case):
    c, eg, res, X, Y = _run(case)
    o = c["outputs"]
    S, T = c["num_sequences"], c["frames_per_sequence"]
    assert eg.supervision.e2e == c["e2e"]
    assert eg.supervision.weight == pytest.approx(c["supervision_weight"])
    assert res.ok and o["den_ok"] and o["num_ok"]
    assert res.weight == pytest.approx(o["weight"], rel=1e-7)
    assert _rel(res.objf, o["objf"]) < 1e-4
    assert _rel(res.num_logprob_weighted, o["num_logprob_weighted"]) < 1e-4
    assert _rel(res.den_logprob_weighted, o["den_logprob_weighted"]) < 1e-4
    if o["l2_term"] == 0:
        assert res.l2_term == 0.0
    else:
        assert _rel(res.l2_term, o["l2_term"]) < 1e-4
    assert res.objf_plus_l2_per_frame == pytest.approx(o["objf_plus_l2_per_frame"], rel=1e-4)
    assert res.num_elements_out_of_range == o["num_elements_out_of_range"]

    ref = _bf(np.load(c["arrays"]["nnet_output_deriv"]), S, T)
    if o["out_of_range_penalty_applied"] is not None:
        # Kaldi applies twice the penalty on a random half of the minibatches; pkwrap
        # applies its expected value: the mean of the two recorded branches.
        other = load_case(_other_branch(case))
        ref2 = _bf(np.load(other["arrays"]["nnet_output_deriv"]), S, T)
        assert np.abs(ref - ref2).max() > 1e-3  # the branches really differ
        ref = 0.5 * (ref + ref2)
    assert _max_err(-X.grad.numpy(), ref) < 2e-4
    # loss = -(objf + l2_term + penalty + xent_regularize * xent_objf)
    expected_loss = -(res.objf + res.l2_term + res.out_of_range_term
                      + c["options"]["xent_regularize"] * res.xent_objf)
    assert float(res.loss.detach()) == pytest.approx(expected_loss, rel=1e-6)

    if Y is not None:
        xref = _bf(np.load(c["arrays"]["xent_output_deriv"]), S, T)
        assert _rel(res.xent_objf, o["xent_objf"]) < 1e-4
        assert _max_err(-Y.grad.numpy() / c["options"]["xent_regularize"], xref) < 2e-4


@pytest.mark.parametrize("case", ["mono_merged4_leaky0.1_l25e-05_xent0.1",
                                  "biphone_merged4_outofrange_applied",
                                  "biphone_weighted0.5_merged2",
                                  "e2e_merged3_leaky1e-05_l25e-05_xent0.1"])
def test_torch_backend_equals_cpp(case):
    _, _, r1, X1, Y1 = _run(case, backend="cpp")
    _, _, r2, X2, Y2 = _run(case, backend="torch")
    for k in ("objf", "l2_term", "weight", "num_logprob_weighted", "den_logprob_weighted",
              "xent_objf", "out_of_range_term"):
        assert getattr(r2, k) == pytest.approx(getattr(r1, k), rel=1e-6, abs=1e-6), k
    g1 = X1.grad.numpy()
    assert np.abs(X2.grad.numpy() - g1).max() < 1e-5 * np.abs(g1).max()
    if Y1 is not None:
        assert np.abs(Y2.grad.numpy() - Y1.grad.numpy()).max() < 1e-6


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_denominator_logprob_alone(backend):
    c, g, eg, X, _ = _setup("biphone_merged4_leaky0.1_l20_xent0")
    S, T = c["num_sequences"], c["frames_per_sequence"]
    X = X.clone().requires_grad_()
    lp = denominator_logprob(g, X, c["options"]["leaky_hmm_coefficient"], backend=backend,
                             num_threads=THREADS)
    assert lp.dim() == 0
    assert _rel(float(lp.detach()), c["outputs"]["den_logprob"]) < 1e-4
    lp.backward()
    ref = _bf(np.load(c["arrays"]["den_deriv"]), S, T)
    assert _max_err(X.grad.numpy(), ref) < 2e-4
    np.testing.assert_allclose(X.grad.sum(-1).numpy(), 1.0, atol=1e-4)  # posteriors


def test_denominator_threads_agree():
    c, g, _, X, _ = _setup("biphone_merged4_leaky0.1_l20_xent0")
    a = denominator_forward_backward(g, X, 0.1, num_threads=1)
    b = denominator_forward_backward(g, X, 0.1, num_threads=2)
    np.testing.assert_array_equal(a.logprob.numpy(), b.logprob.numpy())
    np.testing.assert_array_equal(a.post.numpy(), b.post.numpy())


def test_mean_reduction_divides_by_weight():
    case = "biphone_weighted0.5_merged2"
    _, _, rs, Xs, Ys = _run(case, reduction="sum")
    _, _, rm, Xm, Ym = _run(case, reduction="mean")
    assert float(rm.loss.detach()) == pytest.approx(float(rs.loss.detach()) / rs.weight, rel=1e-6)
    np.testing.assert_allclose(Xm.grad.numpy(), Xs.grad.numpy() / rs.weight, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(Ym.grad.numpy(), Ys.grad.numpy() / rs.weight, rtol=1e-5, atol=1e-12)


def test_deriv_weights_scale_gradient_rows_only():
    case = "biphone_merged4_leaky0.1_l20_xent0.1"
    c, g, eg, X, Y = _setup(case)
    S, T = c["num_sequences"], c["frames_per_sequence"]
    dw_kaldi = eg.deriv_weights  # t-major vector, Kaldi's order
    assert dw_kaldi is not None and float(dw_kaldi.min()) < 1.0  # the egs have 0.5 edges
    dw_bf = torch.as_tensor(dw_kaldi).reshape(T, S).t()
    opts = ChainOptions(**c["options"])
    ref = _bf(np.load(c["arrays"]["nnet_output_deriv"]), S, T) * dw_bf.numpy()[..., None]
    xref = _bf(np.load(c["arrays"]["xent_output_deriv"]), S, T) * dw_bf.numpy()[..., None]
    for dw in (dw_kaldi, dw_bf):
        Xg, Yg = X.clone().requires_grad_(), Y.clone().requires_grad_()
        res = chain_loss(g, Xg, eg.supervision, opts, Yg, deriv_weights=dw, num_threads=THREADS)
        res.loss.backward()
        assert _rel(res.objf, c["outputs"]["objf"]) < 1e-4  # objf is not weighted
        assert _max_err(-Xg.grad.numpy(), ref) < 2e-4
        assert _max_err(-Yg.grad.numpy() / opts.xent_regularize, xref) < 2e-4
    with pytest.raises(ValueError, match="deriv_weights"):
        chain_loss(g, X, eg.supervision, opts, deriv_weights=torch.ones(S + 1, T))


def test_no_grad_gives_same_objective():
    c, g, eg, X, _ = _setup("mono_merged4_leaky0.1_l20_xent0")
    with torch.no_grad():
        res = ChainLoss(g, ChainOptions(**c["options"]), num_threads=THREADS)(X, eg.supervision)
    assert _rel(res.objf, c["outputs"]["objf"]) < 1e-4
    assert not res.loss.requires_grad


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_nan_output_is_skipped_like_kaldi(backend, caplog):
    c, g, eg, X, _ = _setup("mono_merged4_leaky0.1_l20_xent0")
    X = X.clone()
    X[1, 7, 3] = float("nan")
    X.requires_grad_()
    crit = ChainLoss(g, ChainOptions(l2_regularize=5e-5), backend=backend, num_threads=THREADS)
    with caplog.at_level(logging.WARNING, logger="pkwrap.chain"):
        res = crit(X, eg.supervision)
    res.loss.backward()
    assert not res.ok
    assert res.objf == -10.0 * res.weight
    assert crit.num_failed == 1 and crit.num_minibatches == 1
    assert torch.all(X.grad == 0)
    assert any("setting objective function to -10" in r.message for r in caplog.records)
    # a good minibatch afterwards is not counted
    crit(X.detach().nan_to_num(0.0), eg.supervision)
    assert crit.num_failed == 1 and crit.num_minibatches == 2


def test_empty_numerator_is_skipped():
    # A supervision FST with fewer frames than the output has no complete path.
    c, g, eg, X, _ = _setup("mono_merged4_leaky0.1_l20_xent0")
    S, T, P = X.shape
    F = S * T - 1
    arcs = [(t, 1 + t % P, 1 + t % P, 0.0, t + 1) for t in range(F)]
    fst = Fst.from_arcs(F + 1, 0, arcs, {F: 0.0})
    sup = Supervision(weight=1.0, num_sequences=S, frames_per_sequence=T, label_dim=P, fst=fst)
    crit = ChainLoss(g, ChainOptions(), num_threads=THREADS)
    Xg = X.clone().requires_grad_()
    res = crit(Xg, sup)
    res.loss.backward()
    assert not res.ok and crit.num_failed == 1
    assert res.objf == -10.0 * res.weight and torch.all(Xg.grad == 0)


def test_bad_input_is_reported():
    c, g, eg, X, Y = _setup("mono_merged4_leaky0.1_l20_xent0.1")
    S, T, P = X.shape
    crit = ChainLoss(g, ChainOptions(), num_threads=THREADS)
    with pytest.raises(ValueError, match="num_pdfs"):
        crit(X[..., :-1], eg.supervision)  # output dim != graph's pdfs
    with pytest.raises(ValueError, match="shape"):
        crit(X.reshape(S * T, P), eg.supervision)  # not (S, T, P)
    with pytest.raises(ValueError, match="num_sequences"):
        crit(X[:-1], eg.supervision)  # sequences differ from supervision
    with pytest.raises(ValueError, match="frames_per_sequence"):
        crit(X[:, :-1], eg.supervision)
    with pytest.raises(ValueError, match="xent_output"):
        crit(X, eg.supervision, Y[:, :-1])
    with pytest.raises(TypeError):
        crit(X, "not a supervision")
    with pytest.raises(ValueError, match="reduction"):
        ChainLoss(g, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        ChainLoss(g, backend="cuda")
    # a graph read with a num_pdfs that does not match the eg's supervision
    big = DenominatorGraph.from_fst(FIXTURES / c["inputs"]["den_fst"], P + 5)
    with pytest.raises(ValueError, match="label_dim"):
        ChainLoss(big, num_threads=THREADS)(torch.zeros(S, T, P + 5), eg.supervision)
    # a supervision label outside [1, P]
    f = eg.supervision.fst
    bad_il = f.ilabel.copy()
    bad_il[0] = P + 1
    bad = Fst(f.num_states, f.start, f.final, f.state_offsets, bad_il, bad_il.copy(), f.weight,
              f.nextstate)
    sup = Supervision(1.0, S, T, P, fst=bad)
    for backend in ("cpp", "torch"):
        with pytest.raises(ValueError, match="outside"):
            ChainLoss(g, backend=backend, num_threads=THREADS)(X, sup)


def test_nnet3_whole_model_objective():
    """Kaldi's nnet3-chain-compute-prob on a trained TDNN-F: -0.666522 per frame, xent -5.30337."""
    S, T, P = 8, 50, 329
    g = _graph("biphone/den.fst", P)
    eg = _egs("nnet3/egs/cegs_merged8.ark")["merged-0-8"]
    X = torch.from_numpy(_bf(np.load(FIXTURES / "nnet3/egs/eg_nnet_output.npy"), S, T))
    Y = torch.from_numpy(_bf(np.load(FIXTURES / "nnet3/egs/eg_xent_output.npy"), S, T))
    opts = ChainOptions(leaky_hmm_coefficient=0.1, xent_regularize=0.1)
    res = ChainLoss(g, opts, num_threads=THREADS)(X, eg.supervision, Y)
    assert res.weight == 400
    assert res.objf_per_frame == pytest.approx(-0.666522, abs=2e-6)
    assert res.xent_per_frame == pytest.approx(-5.30337, abs=2e-5)


def test_float64_output_and_loops_in_regular_supervision():
    c, g, eg, X, _ = _setup("mono_merged4_leaky0.1_l20_xent0")
    X32 = X.clone().requires_grad_()
    X64 = X.double().requires_grad_()
    crit = ChainLoss(g, ChainOptions(**c["options"]), num_threads=THREADS)
    r32, r64 = crit(X32, eg.supervision), crit(X64, eg.supervision)
    r32.loss.backward()
    r64.loss.backward()
    assert r64.loss.dtype == torch.float64 and X64.grad.dtype == torch.float64
    assert r64.objf == pytest.approx(r32.objf, rel=1e-7)
    np.testing.assert_allclose(X64.grad.numpy(), X32.grad.numpy(), atol=1e-6)
    # a regular (non-e2e) supervision FST must be time-synchronous: a self-loop is not
    S, T, P = X.shape
    loop = Fst.from_arcs(2, 0, [(0, 1, 1, 0.0, 1), (1, 2, 2, 0.0, 1)], {1: 0.0})
    sup = Supervision(1.0, S, T, P, fst=loop)
    for backend in ("cpp", "torch"):
        with pytest.raises(ValueError, match="time-synchronous"):
            ChainLoss(g, backend=backend, num_threads=THREADS)(X, sup)


@pytest.mark.parametrize("case", ["biphone_weighted0.5_merged2", "e2e_merged3_leaky0.1_l20_xent0"])
def test_numerator_host_path_equals_cpp(case):
    """The path CUDA tensors take for the numerator (gather, C++ on the host, index_add)."""
    from pkwrap.chain.numerator import numerator_forward_backward
    c, g, eg, X, _ = _setup(case)
    out = {}
    for backend in ("cpp", "host", "torch"):
        post = torch.zeros(X.shape)
        lp, ok = numerator_forward_backward(eg.supervision, X, post, backend=backend,
                                            post_scale=-2.0)
        assert ok
        out[backend] = (lp, post)
    assert out["cpp"][0] == pytest.approx(c["outputs"]["num_logprob_weighted"], rel=1e-5)
    for b in ("host", "torch"):
        assert out[b][0] == pytest.approx(out["cpp"][0], rel=1e-7)
        np.testing.assert_allclose(out[b][1].numpy(), out["cpp"][1].numpy(), atol=1e-6)


def test_backward_scaled_and_twice():
    c, g, eg, X, _ = _setup("mono_merged4_leaky0.1_l20_xent0")
    crit = ChainLoss(g, ChainOptions(**c["options"]), num_threads=THREADS)
    X1 = X.clone().requires_grad_()
    crit(X1, eg.supervision).loss.backward()
    X2 = X.clone().requires_grad_()
    res = crit(X2, eg.supervision)
    (2.0 * res.loss).backward(retain_graph=True)
    np.testing.assert_allclose(X2.grad.numpy(), 2.0 * X1.grad.numpy(), rtol=1e-6)
    (3.0 * res.loss).backward()  # a scaled backward keeps the stored gradient
    np.testing.assert_allclose(X2.grad.numpy(), 5.0 * X1.grad.numpy(), rtol=1e-6)
    r = crit(X1, eg.supervision)
    r.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        r.loss.backward()
