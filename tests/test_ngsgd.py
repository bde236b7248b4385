"""OnlineNaturalGradient against Kaldi's own outputs (tests/fixtures/kaldi/natgrad)."""
import json
import logging
import os

import numpy as np
import pytest
import torch

from conftest import fixture_path
from pkwrap.ngsgd import OnlineNaturalGradient

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def _load(case):
    d = fixture_path("natgrad", case)
    e = json.loads((d / "expected.json").read_text())
    o = e["options"]
    ng = OnlineNaturalGradient(o["rank"], o["update_period"], o["num_samples_history"],
                               e.get("num_minibatches_history", 0.0), o["alpha"])
    inputs = [torch.from_numpy(np.load(d / f).astype(np.float32)) for f in e["inputs"]]
    return d, e, ng, inputs


@pytest.mark.parametrize("case", ["r20_128x64", "r80_256x512"])
def test_matches_kaldi(case):
    d, e, ng, inputs = _load(case)
    r = e["result"]
    checked_out = checked_W = 0
    for k, X in enumerate(inputs):
        X_in = X.clone()
        assert ng.updating() == r["updated_this_step"][k], f"step {k}: update schedule"
        Y, scale = ng.precondition_directions(X)
        assert torch.equal(X, X_in), "input must not be modified"
        assert ng.t == r["t_after_step"][k]
        assert ng.rank == r["rank_used"]
        np.testing.assert_allclose(float(scale), r["scales"][k], rtol=1e-3, err_msg=f"step {k} scale")
        np.testing.assert_allclose(ng.rho_t, r["rho_t_after_step"][k], rtol=1e-3)
        np.testing.assert_allclose(ng.d_t.numpy(), r["d_t_after_step"][k], rtol=1e-3,
                                   atol=1e-3 * max(r["d_t_after_step"][k]))
        if str(k) in e["outputs"]:
            ref = np.load(d / e["outputs"][str(k)])
            err = np.abs(Y.numpy() - ref).max() / np.abs(ref).max()
            assert err < 1e-3, f"step {k}: output rel err {err:.2e}"
            checked_out += 1
        wf = d / ("W_%03d.npy" % k)
        if wf.exists():
            # Rows of W are eigenvectors (sign and order within near-equal eigenvalues are
            # arbitrary); W^T W = R^T E R is what the preconditioner uses.
            W = np.load(wf).astype(np.float64)
            Wo = ng.W_t.double().numpy()
            A, B = W.T @ W, Wo.T @ Wo
            err = np.abs(A - B).max() / np.abs(A).max()
            assert err < 1e-3, f"step {k}: W^T W rel err {err:.2e}"
            checked_W += 1
    assert checked_out >= 4 and checked_W >= 1


def test_state_dict_resume_is_exact():
    _, _, ng, inputs = _load("r20_128x64")
    ref = OnlineNaturalGradient(20, 4, 2000.0, 0.0, 4.0)
    outs_ref = [ref.precondition_directions(X)[0] for X in inputs[:14]]
    for X in inputs[:6]:
        ng.precondition_directions(X)
    saved = ng.state_dict()
    ng2 = OnlineNaturalGradient(rank=3)
    ng2.load_state_dict(saved)
    for k, X in enumerate(inputs[6:14]):
        Y, _ = ng2.precondition_directions(X)
        assert torch.equal(Y, outs_ref[6 + k])


def test_freeze_stops_updates_but_preconditions():
    _, _, ng, inputs = _load("r20_128x64")
    ng.precondition_directions(inputs[0])
    W = ng.W_t.clone()
    ng.freeze(True)
    Y, scale = ng.precondition_directions(inputs[1])
    assert not ng.last_updated and torch.equal(ng.W_t, W)
    assert not torch.allclose(Y, inputs[1]) and float(scale) > 0
    ng.freeze(False)
    ng.precondition_directions(inputs[2])
    assert ng.last_updated and not torch.equal(ng.W_t, W)


def test_rank_reduced_and_one_column(caplog):
    ng = OnlineNaturalGradient(rank=20)
    X = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING):
        Y, scale = ng.precondition_directions(X)
    assert ng.rank == 7 and "setting it to 7" in caplog.text
    assert torch.isfinite(Y).all()
    np.testing.assert_allclose(float((Y * float(scale)).norm()), float(X.norm()), rtol=1e-5)
    ng1 = OnlineNaturalGradient(rank=5)
    X1 = torch.randn(10, 1)
    Y1, s1 = ng1.precondition_directions(X1)
    assert torch.equal(Y1, X1) and float(s1) == 1.0


def test_zero_input_and_eta():
    ng = OnlineNaturalGradient(rank=4)
    Y, scale = ng.precondition_directions(torch.zeros(16, 10))
    assert float(scale) == 1.0 and torch.equal(Y, torch.zeros(16, 10))
    for _ in range(12):
        Y, scale = ng.precondition_directions(torch.zeros(16, 10))
    assert ng.rho_t >= 1e-10 and torch.isfinite(ng.W_t).all()
    assert ng.eta(100000) == 0.9
    assert abs(ng.eta(128) - (1 - np.exp(-128 / 2000.0))) < 1e-12
    assert OnlineNaturalGradient(num_minibatches_history=10.0).eta(5) == 0.1
    with pytest.raises(ValueError):
        OnlineNaturalGradient(num_minibatches_history=0.5)
    with pytest.raises(ValueError):
        ng.precondition_directions(torch.zeros(16, 11))


def test_factored_path_equals_explicit():
    g = torch.Generator().manual_seed(7)
    a, b = OnlineNaturalGradient(rank=6), OnlineNaturalGradient(rank=6)
    for step in range(14):
        N = 40 if step % 3 else 9  # both N > D and N <= D
        x = torch.randn(N, 15, generator=g) * torch.linspace(0.1, 3, 15)
        Y, s1 = a.precondition_directions(torch.cat([x, torch.ones(N, 1)], 1))
        H, W, s2 = b.precondition_factors(x, ones_column=True)
        Y2 = torch.cat([x, torch.ones(N, 1)], 1) - H @ W
        torch.testing.assert_close(Y2, Y, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(s2), float(s1), rtol=1e-4)
        assert a.last_updated == b.last_updated and a.t == b.t
        torch.testing.assert_close(b.W_t, a.W_t, rtol=1e-4, atol=1e-5)


def test_nonfinite_input_keeps_estimate(caplog):
    ng = OnlineNaturalGradient(rank=3)
    X = torch.randn(20, 8)
    ng.precondition_directions(X)
    W, rho = ng.W_t.clone(), ng.rho_t
    bad = X.clone()
    bad[3, 2] = float("nan")
    with caplog.at_level(logging.WARNING):
        Y, _ = ng.precondition_directions(bad)
    assert "non-finite" in caplog.text and not ng.last_updated
    assert torch.equal(ng.W_t, W) and ng.rho_t == rho
    Y, _ = ng.precondition_directions(X)
    assert torch.isfinite(Y).all() and ng.last_updated


@pytest.mark.parametrize("ones", [False, True])
def test_spliced_factors_equal_explicit_rows(ones):
    # rows of frames spliced at offsets (0, 2, 3) of 4 sequences: same state, scale and W as
    # the factored path on the explicitly spliced matrix, through updating and other calls
    g = torch.Generator().manual_seed(11)
    a, b = OnlineNaturalGradient(rank=5), OnlineNaturalGradient(rank=5)
    offs = (0, 2, 3)
    for step in range(14):
        x = torch.randn(4, 9 + step % 3, 6, generator=g) * torch.linspace(0.2, 2.0, 6)
        T_out = x.shape[1] - 3
        X = torch.cat([x[:, o:o + T_out] for o in offs], -1).reshape(-1, 18)
        _, W1, s1 = a.precondition_factors(X, ones_column=ones)
        W2, s2 = b.precondition_factors_spliced(x, offs, ones_column=ones)
        torch.testing.assert_close(W2, W1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(s2), float(s1), rtol=1e-5)
        assert b.last_scale == float(s2) and a.last_updated == b.last_updated and a.t == b.t
    np.testing.assert_allclose(b.rho_t, a.rho_t, rtol=1e-5)
    with pytest.raises(ValueError):
        b.precondition_factors_spliced(torch.randn(2, 3, 6), (0, 3), ones_column=ones)


def test_update_independent_of_thread_count():
    # the small R x R LAPACK calls run on one thread: same estimate with 1 or 2 threads,
    # and the caller's thread count is restored
    _, _, _, inputs = _load("r20_128x64")
    n = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ng = OnlineNaturalGradient(20, 4, 2000.0, 0.0, 4.0)
            outs.append([ng.precondition_directions(X)[0] for X in inputs[:12]])
            assert torch.get_num_threads() == threads
        for a, b in zip(*outs):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(n)
