"""The Triton denominator (pkwrap.chain.den_triton) against the C++ kernel and Kaldi.

On a machine without CUDA the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1 before anything imports triton), so these tests check the very code
that runs on GPUs; the interpreter is slow, so graphs and sizes are small. On CUDA
(bench/gpu_check.py runs ``pytest -m cuda``) tests/test_cuda.py checks the compiled
kernels and the CUDA-graph path.
"""
import numpy as np
import pytest
import torch

from conftest import fixture_path
from test_chain_loss import _run

triton = pytest.importorskip("triton")

from pkwrap.chain import DenominatorGraph, denominator_forward_backward  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", ["mono_merged4_leaky1e-05_l25e-05_xent0.1"])
def test_triton_chain_loss_equals_cpp_on_kaldi_cases(case):
    _, _, r1, X1, Y1 = _run(case, backend="cpp")
    _, _, r2, X2, Y2 = _run(case, backend="triton", device=DEV)
    assert r2.ok
    for k in ("objf", "l2_term", "num_logprob_weighted", "den_logprob_weighted", "xent_objf"):
        assert getattr(r2, k) == pytest.approx(getattr(r1, k), rel=1e-6, abs=1e-6), k
    g1 = X1.grad.numpy()
    assert np.abs(X2.grad.cpu().numpy() - g1).max() < 1e-5 * np.abs(g1).max()
    if Y1 is not None:
        assert np.abs(Y2.grad.cpu().numpy() - Y1.grad.numpy()).max() < 1e-6


@pytest.mark.parametrize("S,T,leaky,scale", [(3, 6, 0.1, 1.0), (2, 4, 1e-5, -0.25)])
def test_triton_denominator_equals_cpp_biphone(S, T, leaky, scale):
    g = DenominatorGraph.from_fst(fixture_path("biphone", "den.fst"), 329)
    x = torch.randn(S, T, 329, generator=torch.Generator().manual_seed(S * T)) * 3
    x[0, 1, :5] = 40.0  # beyond the clamp
    ref = denominator_forward_backward(g, x, leaky, post_scale=scale, backend="cpp",
                                       num_threads=1)
    got = denominator_forward_backward(g, x.to(DEV), leaky, post_scale=scale, backend="triton")
    assert got.ok and ref.ok
    assert torch.allclose(got.logprob.cpu(), ref.logprob, rtol=1e-6, atol=1e-5)
    err = (got.post.cpu() - ref.post).abs().max()
    assert float(err) < 1e-5 * float(ref.post.abs().max())
    # each frame's posteriors sum to post_scale (a wrong arc list would break this)
    assert torch.allclose(got.post.cpu().sum(-1), torch.full((S, T), scale), atol=1e-4)
    only = denominator_forward_backward(g, x.to(DEV), leaky, want_post=False, backend="triton")
    assert only.post is None and torch.allclose(only.logprob.cpu(), ref.logprob, rtol=1e-6)


def test_triton_denominator_nan_fails_the_check():
    g = DenominatorGraph.from_fst(fixture_path("mono", "den.fst"), 34)
    x = torch.zeros(2, 3, 34)
    x[1, 2, 7] = float("nan")
    assert not denominator_forward_backward(g, x.to(DEV), 0.1, backend="triton").ok
    assert denominator_forward_backward(g, torch.zeros(2, 3, 34).to(DEV), 0.1,
                                        backend="triton").ok


def test_triton_is_the_auto_backend_on_cuda_only():
    from pkwrap.chain.denominator import _pick_backend
    assert _pick_backend(torch.zeros(1), None) == "cpp"
    if torch.cuda.is_available():
        assert _pick_backend(torch.zeros(1, device="cuda"), None) == "triton"
