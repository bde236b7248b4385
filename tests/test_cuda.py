"""pkwrap on a CUDA device, against the CPU results and Kaldi's fixtures.

Marked ``cuda``: skipped (and counted as skipped) where torch sees no CUDA device.
``bench/gpu_check.py`` runs them on a GPU (``pytest -m cuda``) and prints each test's
recorded errors in its summary table.
"""
import copy
import json

import numpy as np
import pytest
import torch

from conftest import fixture_path, load_case
from test_chain_loss import _bf, _max_err, _rel, _setup

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

CASES = ["mono_merged4_leaky0.1_l25e-05_xent0.1",   # regular, l2, xent
         "mono_merged4_leaky1e-05_l20_xent0",       # small leaky coefficient
         "biphone_merged4_leaky1e-05_l25e-05_xent0.1",
         "biphone_weighted0.5_merged2",
         "biphone_merged4_outofrange_applied",
         "e2e_merged3_leaky1e-05_l25e-05_xent0.1",  # end-to-end supervision
         "e2e_single_e2e03_leaky0.1"]


@pytest.fixture(autouse=True)
def _exact_float32():
    """No TF32 in products or convolutions: the comparisons are float32 against float32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("case", CASES)
def test_chain_loss_cuda_matches_kaldi(case, record_property):
    from pkwrap.chain import ChainLoss, ChainOptions
    c, g, eg, X, Y = _setup(case)
    S, T = c["num_sequences"], c["frames_per_sequence"]
    Xc = X.cuda().requires_grad_()
    Yc = Y.cuda().requires_grad_() if Y is not None else None
    crit = ChainLoss(g, ChainOptions(**c["options"]))
    res = crit(Xc, eg.supervision, Yc)
    res.loss.backward()
    o = c["outputs"]
    assert res.ok
    errs = {k: _rel(getattr(res, k), o[k]) for k in ("objf", "num_logprob_weighted",
                                                      "den_logprob_weighted")}
    ref = _bf(np.load(c["arrays"]["nnet_output_deriv"]), S, T)
    if o["out_of_range_penalty_applied"] is not None:  # pkwrap applies the expected value
        other = load_case(case.replace("applied", "not-applied"))
        ref = 0.5 * (ref + _bf(np.load(other["arrays"]["nnet_output_deriv"]), S, T))
    errs["deriv"] = _max_err(-Xc.grad.cpu().numpy(), ref)
    if Y is not None:
        xref = _bf(np.load(c["arrays"]["xent_output_deriv"]), S, T)
        errs["xent_deriv"] = _max_err(-Yc.grad.cpu().numpy() / c["options"]["xent_regularize"],
                                      xref)
        errs["xent_objf"] = _rel(res.xent_objf, o["xent_objf"])
    if o["l2_term"]:
        errs["l2_term"] = _rel(res.l2_term, o["l2_term"])
    record_property("max_rel_err_vs_kaldi", max(errs.values()))
    for k, v in errs.items():
        assert v < (2e-4 if "deriv" in k else 1e-4), (k, v)


def test_denominator_cuda_graph_replay_and_shapes(record_property):
    """Replays of the captured graph give the same answer as a fresh capture and the C++
    kernel, for several shapes (new captures) and back again (cached plans)."""
    from pkwrap.chain import DenominatorGraph, denominator_forward_backward
    g = DenominatorGraph.from_fst(fixture_path("bench", "den.fst"), 2051)
    worst = 0.0
    gen = torch.Generator().manual_seed(5)
    for S, T in [(8, 20), (3, 7), (8, 20), (64, 50), (3, 7)]:
        x = torch.randn(S, T, 2051, generator=gen) * 2
        ref = denominator_forward_backward(g, x, 0.1, num_threads=4)
        got = denominator_forward_backward(g, x.cuda(), 0.1)
        assert got.ok and ref.ok
        assert torch.allclose(got.logprob.cpu(), ref.logprob, rtol=1e-6, atol=1e-4)
        worst = max(worst, float((got.post.cpu() - ref.post).abs().max()))
    record_property("max_abs_post_err", worst)
    assert worst < 1e-5
    assert len(g.triton("cuda")._plans) == 3  # (8, 20), (3, 7), (64, 50): cached plans


@pytest.mark.parametrize("case", ["r20_128x64", "r80_256x512"])
def test_natural_gradient_cuda_matches_kaldi(case, record_property):
    from pkwrap.ngsgd import OnlineNaturalGradient
    d = fixture_path("natgrad", case)
    e = json.loads((d / "expected.json").read_text())
    o = e["options"]
    ng = OnlineNaturalGradient(o["rank"], o["update_period"], o["num_samples_history"],
                               e.get("num_minibatches_history", 0.0), o["alpha"])
    r = e["result"]
    worst = 0.0
    for k, f in enumerate(e["inputs"]):
        X = torch.from_numpy(np.load(d / f).astype(np.float32)).cuda()
        Y, scale = ng.precondition_directions(X)
        assert Y.is_cuda
        worst = max(worst, abs(float(scale) - r["scales"][k]) / abs(r["scales"][k]))
        if str(k) in e["outputs"]:
            ref = np.load(d / e["outputs"][str(k)])
            worst = max(worst, float(np.abs(Y.cpu().numpy() - ref).max() / np.abs(ref).max()))
    record_property("max_rel_err_vs_kaldi", worst)
    assert worst < 1e-3


def _tdnn_1j_step(model, batch, ctx, den, device):
    from pkwrap.chain import ChainLoss, ChainOptions
    from pkwrap.nn import scale_batchnorm_stats
    from pkwrap.optim import NGSGD, kaldi_param_groups
    from pkwrap.train.diagnostics import compute_chain_loss
    model = model.to(device).train()
    loss_fn = ChainLoss(den, ChainOptions(leaky_hmm_coefficient=0.1, xent_regularize=0.1,
                                          l2_regularize=5e-5))
    opt = NGSGD(kaldi_param_groups(model), lr=0.002, max_param_change=2.0)
    losses = []
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        res = compute_chain_loss(model, ctx, loss_fn, batch.to(device))
        res.loss.backward()
        opt.step(num_sequences=batch.num_sequences)
        scale_batchnorm_stats(model, 0.8)
        losses.append(float(res.loss.detach()))
    return losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}


def test_tdnn_1j_training_steps_cuda_equal_cpu(record_property):
    """Two NG-SGD steps of the full tdnn_1j model (8 x 150 frames, bench den.fst): the
    losses and every updated parameter and batchnorm statistic on CUDA equal the CPU's."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_train_step import numerator
    from pkwrap.chain import DenominatorGraph
    from pkwrap.nn import TDNNFModel
    from pkwrap.train.context import probe_model_context
    from pkwrap.train.data import ChainBatch
    S, T, P = 8, 50, 2051
    torch.manual_seed(0)
    model = TDNNFModel.tdnn_1j(P, feat_dim=40)
    ctx = probe_model_context(model, 40)
    feats = torch.randn(S, ctx.num_input_frames(T), 40, generator=torch.Generator().manual_seed(1))
    batch = ChainBatch(feats, numerator(S, T, P), None, ctx.left_context)
    den = DenominatorGraph.from_fst(fixture_path("bench", "den.fst"), P)
    l_cpu, p_cpu = _tdnn_1j_step(copy.deepcopy(model), batch, ctx, den, "cpu")
    l_gpu, p_gpu = _tdnn_1j_step(copy.deepcopy(model), batch, ctx, den, "cuda")
    loss_err = max(abs(a - b) / abs(a) for a, b in zip(l_cpu, l_gpu))
    # parameters and batchnorm statistics: compared by their change from the initial model
    # (the two steps themselves), each tensor's difference relative to its change's norm
    init = {k: v.detach() for k, v in model.state_dict().items()}
    errs = {}
    for k in p_cpu:
        if not p_cpu[k].is_floating_point():
            assert torch.equal(p_cpu[k], p_gpu[k]), k
            continue
        d_cpu = (p_cpu[k] - init[k]).double()
        d_gpu = (p_gpu[k] - init[k]).double()
        n = float(d_cpu.norm())
        if n > 0:
            errs[k] = float((d_cpu - d_gpu).norm()) / n
    worst = max(errs, key=errs.get)
    record_property("loss_rel_err", loss_err)
    record_property("update_rel_err", errs[worst])
    assert loss_err < 1e-4
    assert errs[worst] < 1e-2, "%s: %.3g (all: %s)" % (worst, errs[worst], sorted(
        ((round(v, 4), k) for k, v in errs.items()), reverse=True)[:6])
