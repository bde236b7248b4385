"""DenominatorGraph (den.fst -> HMM, Kaldi's initial probs, validation) and ChainOptions."""
import pickle

import numpy as np
import pytest
import torch

from conftest import fixture_path
from pkwrap.chain import ChainOptions, DenominatorGraph, denominator_forward_backward
from pkwrap.kaldi.fst import Fst, read_fst, write_fst


@pytest.mark.parametrize("setup,num_pdfs,states,arcs", [("mono", 34, 68, 764),
                                                         ("biphone", 329, 488, 4110)])
def test_initial_probs_equal_kaldi(setup, num_pdfs, states, arcs):
    g = DenominatorGraph.from_fst(fixture_path(setup, "den.fst"), num_pdfs)
    assert (g.num_states, g.num_arcs, g.num_pdfs) == (states, arcs, num_pdfs)
    ref = np.load(fixture_path(setup, "den_initial_probs.npy"))
    assert g.initial_probs.dtype == np.float32
    np.testing.assert_allclose(g.initial_probs, ref, rtol=1e-6, atol=1e-9)
    assert g.initial_probs.sum() == pytest.approx(1.0, abs=1e-5)
    # arc groupings cover the same arcs
    assert np.all(np.diff(g.src) >= 0) and np.all(np.diff(g.dst[g.bwd_order]) >= 0)
    assert g.fwd_offsets[-1] == g.bwd_offsets[-1] == arcs


def test_from_fst_accepts_fst_object_and_pickles():
    fst = read_fst(str(fixture_path("mono", "den.fst")))
    g = DenominatorGraph.from_fst(fst, 34)
    g2 = pickle.loads(pickle.dumps(g))
    x = torch.randn(2, 5, 34)
    a = denominator_forward_backward(g, x, 0.1, num_threads=1)
    b = denominator_forward_backward(g2, x, 0.1, num_threads=1)
    np.testing.assert_array_equal(a.logprob.numpy(), b.logprob.numpy())
    assert a.ok


def _bad_copy(fst, **changes):
    d = dict(num_states=fst.num_states, start=fst.start, final=fst.final,
             state_offsets=fst.state_offsets, ilabel=fst.ilabel.copy(),
             olabel=fst.olabel.copy(), weight=fst.weight.copy(), nextstate=fst.nextstate)
    d.update(changes)
    return Fst(**d)


def test_bad_den_fst_errors_name_the_file(tmp_path):
    fst = read_fst(str(fixture_path("mono", "den.fst")))
    # not an acceptor
    ol = fst.olabel.copy()
    ol[5] += 1
    p = tmp_path / "not_acceptor.fst"
    write_fst(_bad_copy(fst, olabel=ol), str(p))
    with pytest.raises(ValueError, match="not_acceptor.fst.*not an acceptor"):
        DenominatorGraph.from_fst(p, 34)
    # epsilon arcs
    il = fst.ilabel.copy()
    il[3] = 0
    p = tmp_path / "eps.fst"
    write_fst(_bad_copy(fst, ilabel=il, olabel=il.copy()), str(p))
    with pytest.raises(ValueError, match="eps.fst.*epsilon"):
        DenominatorGraph.from_fst(p, 34)
    # wrong num_pdfs: labels beyond it
    with pytest.raises(ValueError, match=r"den.fst.*outside \[1, num_pdfs=20\]"):
        DenominatorGraph.from_fst(fixture_path("mono", "den.fst"), 20)
    with pytest.raises(ValueError, match="num_pdfs"):
        DenominatorGraph.from_fst(fixture_path("mono", "den.fst"), 0)
    # not a readable FST at all
    p = tmp_path / "garbage.fst"
    p.write_bytes(b"not an fst")
    with pytest.raises(ValueError, match="garbage.fst"):
        DenominatorGraph.from_fst(p, 34)
    empty = Fst.from_arcs(0, -1, [])
    with pytest.raises(ValueError, match="empty"):
        DenominatorGraph.from_fst(empty, 34)


def test_output_checks():
    g = DenominatorGraph.from_fst(fixture_path("mono", "den.fst"), 34)
    with pytest.raises(ValueError, match="num_pdfs=34"):
        denominator_forward_backward(g, torch.zeros(2, 3, 33), 0.1)
    with pytest.raises(ValueError, match="leaky"):
        denominator_forward_backward(g, torch.zeros(2, 3, 34), 0.0)
    with pytest.raises(ValueError, match="backend"):
        denominator_forward_backward(g, torch.zeros(2, 3, 34), 0.1, backend="gpu")
    # NaN makes Kaldi's check fail instead of crashing
    x = torch.zeros(2, 3, 34)
    x[0, 1, 2] = float("nan")
    assert not denominator_forward_backward(g, x, 0.1, num_threads=1).ok
    assert not denominator_forward_backward(g, x, 0.1, backend="torch").ok


def test_native_graph_rejects_inconsistent_arrays():
    from pkwrap import _pkwrap
    g = DenominatorGraph.from_fst(fixture_path("mono", "den.fst"), 34)
    bad_pdf = g.pdf.copy()
    bad_pdf[0] = 99
    with pytest.raises(ValueError, match="pdf"):
        _pkwrap.DenGraph(g.num_states, g.num_pdfs, g.fwd_offsets, g.dst, bad_pdf, g.prob,
                         g.bwd_offsets, g.src[g.bwd_order], g.pdf[g.bwd_order],
                         g.prob[g.bwd_order], g.initial_probs)


def test_chain_options_kaldi_names_and_flags():
    o = ChainOptions()
    assert (o.leaky_hmm_coefficient, o.l2_regularize, o.xent_regularize,
            o.out_of_range_regularize) == (0.1, 0.0, 0.0, 0.01)
    assert ChainOptions.flag_name("leaky_hmm_coefficient") == "--leaky-hmm-coefficient"
    o2 = ChainOptions(l2_regularize=5e-5, xent_regularize=0.1)
    assert "--l2-regularize=5e-05" in o2.to_kaldi_flags()
    assert ChainOptions.from_kaldi_flags(o2.to_kaldi_flags()) == o2
    assert ChainOptions.from_kaldi_flags(["--leaky-hmm-coefficient=1e-05"]).leaky_hmm_coefficient == 1e-05
    with pytest.raises(ValueError, match="unknown"):
        ChainOptions.from_kaldi_flags(["--leaky=0.1"])
    with pytest.raises(ValueError, match="leaky_hmm_coefficient"):
        ChainOptions(leaky_hmm_coefficient=1.0)
    with pytest.raises(ValueError, match="l2_regularize"):
        ChainOptions(l2_regularize=-1)
    with pytest.raises(TypeError):
        ChainOptions(xent_regularize="0.1")
