"""Natural-gradient training of TimeHeightConvolution components (issue 11 item 3) against
real Kaldi: ``tests/fixtures/kaldi/conv_natgrad`` holds a small CNN network (two
convolutions with their own natural-gradient settings, a natural-gradient affine output
reading an i-vector) as Kaldi's ``nnet3-init`` wrote it, and the model Kaldi's
``nnet3-chain-train`` made from it on three minibatches of 4 real chain egs (see the
fixture's README for the commands). pkwrap trains the same model on the same minibatches
with ChainLoss and NGSGD: every parameter must match Kaldi's.
"""
import numpy as np
import pytest
import torch

from conftest import fixture_path

SMALL = fixture_path("..", "kaldi_recipe_egs_small")
from pkwrap.chain import ChainLoss, ChainOptions, DenominatorGraph
from pkwrap.kaldi.chain_egs import merge_chain_egs, read_chain_egs
from pkwrap.nnet3 import read_nnet3
from pkwrap.optim import NGSGD, kaldi_param_groups


def _minibatches(size=4):
    egs = [eg for _, eg in read_chain_egs("ark:" + str(SMALL / "egs" / "cegs.1.ark"))]
    return [merge_chain_egs(egs[i:i + size]) for i in range(0, len(egs), size)]


def _train(model, minibatches):
    den = DenominatorGraph.from_fst(str(SMALL / "kaldi" / "den.fst"), 64)
    loss_fn = ChainLoss(den, ChainOptions(leaky_hmm_coefficient=0.1))
    opt = NGSGD(kaldi_param_groups(model), lr=0.005, max_param_change=1000.0)
    left, right = model.context("output")
    model.frame_subsampling_factor = 3
    model.train()
    objf = frames = 0.0
    for eg in minibatches:
        S = eg.supervision.num_sequences
        x = eg.inputs["input"].reshape(S, -1, 40)
        first_t = int(eg.input_indexes["input"][0, 1])  # -12: the egs' left context
        last_t = (eg.supervision.frames_per_sequence - 1) * 3
        x = x[:, -left - first_t:last_t + right - first_t + 1]
        out = model(x, eg.inputs["ivector"].reshape(S, 40), output="output")
        assert out.shape == (S, eg.supervision.frames_per_sequence, 64)
        res = loss_fn(out, eg.supervision)
        opt.zero_grad()
        res.loss.backward()
        opt.step()
        objf += float(res.objf)
        frames += float(res.weight)
    return objf / frames


def test_conv_natural_gradient_training_equals_kaldi():
    d = fixture_path("conv_natgrad")
    model = read_nnet3(d / "init.raw")
    kaldi = read_nnet3(d / "trained.raw")
    objf = _train(model, _minibatches())
    # Kaldi's train.log: "Overall average objective function for 'output' is -0.89878 over
    # 408 frames"
    assert objf == pytest.approx(-0.89878, abs=2e-5)
    init = read_nnet3(d / "init.raw")
    for name in ("conv1", "conv2", "affine"):
        c, k, c0 = model.component(name), kaldi.component(name), init.component(name)
        for attr in ("weight", "bias"):
            got = getattr(c, attr).detach() - getattr(c0, attr).detach()
            want = getattr(k, attr).detach() - getattr(c0, attr).detach()
            err = float((got - want).abs().max()) / float(want.abs().max())
            assert float(want.abs().max()) > 0, (name, attr)
            assert err < 1e-3, "%s.%s: relative max error %.3g of the update" % (name, attr, err)
        # the preconditioners saw what Kaldi's saw: 3 calls each (conv: one per minibatch)
        assert c.preconditioner_in.t == c.preconditioner_out.t == 3, name


def test_conv_without_natural_gradient_is_plain_sgd():
    """use-natural-gradient=false: the update is the plain gradient; with it on, the
    preconditioned one differs (the test above checks it is Kaldi's)."""
    d = fixture_path("conv_natgrad")
    plain, ng = read_nnet3(d / "init.raw"), read_nnet3(d / "init.raw")
    plain.component("conv2").use_natural_gradient = False
    mb = _minibatches()[:1]
    grads = {}
    for tag, m in (("plain", plain), ("ng", ng)):
        m.frame_subsampling_factor = 3
        m.train()
        eg = mb[0]
        S = eg.supervision.num_sequences
        x = eg.inputs["input"].reshape(S, -1, 40)[:, 8:116]
        den = DenominatorGraph.from_fst(str(SMALL / "kaldi" / "den.fst"), 64)
        res = ChainLoss(den, ChainOptions(leaky_hmm_coefficient=0.1))(
            m(x, eg.inputs["ivector"].reshape(S, 40), output="output"), eg.supervision)
        res.loss.backward()
        grads[tag] = m.component("conv2").weight.grad.clone()
    # plain: the gradient of the summed objective, checked against autograd of F.linear
    assert not torch.allclose(grads["plain"], grads["ng"], rtol=1e-2)
    assert np.isfinite(grads["ng"].numpy()).all()
