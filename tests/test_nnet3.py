"""pkwrap.nnet3 against Kaldi: model files (tests/fixtures/kaldi/nnet3_io, made by real Kaldi)
and nnet3-compute's stored outputs for three architectures with i-vectors.

P1 tdnn_1k-like (idct, spec-augment, delta, Scale(0.4, ReplaceIndex(ivector, t, 0)), TDNN-F),
P2 CNN-TDNN (TimeHeightConvolution, Permute, i-vector Linear + BatchNorm), P3 LDA TDNN
(FixedAffine on Append(Offset(input, -1), input, Offset(input, 1), ivector), Dropout).
"""
import gzip
import io
import json
from functools import lru_cache

import numpy as np
import pytest
import torch

from conftest import fixture_path
from pkwrap.kaldi.io import KaldiFormatError
from pkwrap.nnet3 import (Nnet3, chunk_plan, nnet3_compute, online_ivector_row,
                          parse_descriptor, read_nnet3, write_nnet3)

MODELS = ["P1_tdnnf", "P2_cnn_tdnnf", "P3_lda_tdnn"]
# nnet3-info num-parameters (model.json); FixedAffine (idct, lda) is not counted
NUM_PARAMS = {"P1_tdnnf": 287986, "P2_cnn_tdnnf": 140002, "P3_lda_tdnn": 161058}
CONTEXT = {"P1_tdnnf": (10, 10), "P2_cnn_tdnnf": (6, 6), "P3_lda_tdnn": (9, 9)}
ONLINE = dict(online_ivector_period=10)
RUNS = {  # tag -> nnet3_compute options (besides the i-vectors)
    "online_onechunk_output_fsf3": dict(frame_subsampling_factor=3, frames_per_chunk=100000),
    "online_onechunk_output_fsf1": dict(frame_subsampling_factor=1, frames_per_chunk=100000),
    "online_onechunk_output_xent_fsf3": dict(frame_subsampling_factor=3,
                                             frames_per_chunk=100000, output="output-xent"),
    "online_chunk50_output_fsf3": dict(frame_subsampling_factor=3, frames_per_chunk=50),
    "online_chunk50_output_fsf1": dict(frame_subsampling_factor=1, frames_per_chunk=50),
    "utt_ivector_output_fsf3": dict(frame_subsampling_factor=3, frames_per_chunk=50),
    "utt_ivector_output_xent_fsf3": dict(frame_subsampling_factor=3, frames_per_chunk=50,
                                         output="output-xent"),
}
CASES = [(m, tag, "utt1_95") for m in MODELS for tag in RUNS] + \
        [(m, "online_chunk50_output_fsf3", "utt2_146") for m in MODELS]


def fx(*parts):
    return fixture_path("nnet3_io", *parts)


@lru_cache(maxsize=None)
def model(name):
    return read_nnet3(fx(name, "final.mdl")).eval()


def inputs(utt):
    return (np.load(fx("inputs", "feats_%s.npy" % utt)),
            np.load(fx("inputs", "ivector_online_%s.npy" % utt)),
            np.load(fx("inputs", "ivector_utt_%s.npy" % utt)))


@pytest.mark.parametrize("name,tag,utt", CASES)
def test_nnet3_compute_matches_kaldi(name, tag, utt):
    """Every stored nnet3-compute run (online i-vectors in one chunk and in chunks of 50,
    utterance i-vector; output and output-xent; fsf 3 and 1) to 1e-4 absolute."""
    feats, online, utt_iv = inputs(utt)
    opts = dict(RUNS[tag])
    if tag.startswith("online"):
        opts.update(online_ivectors=online, **ONLINE)
    else:
        opts.update(ivector=utt_iv)
    ref = np.load(fx(name, "%s_%s.npy" % (tag, utt)))
    got = nnet3_compute(model(name), feats, **opts)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max()
    assert err < 1e-4, "%s %s %s: max abs diff %.3g" % (name, tag, utt, err)


def test_chunking_changes_only_the_ivector():
    """Sanity of the reference itself: chunked and one-chunk runs differ (the i-vector row
    differs per chunk), so the chunk plan is really tested above."""
    a = np.load(fx("P3_lda_tdnn", "online_chunk50_output_fsf3_utt1_95.npy"))
    b = np.load(fx("P3_lda_tdnn", "online_onechunk_output_fsf3_utt1_95.npy"))
    assert np.abs(a - b).max() > 0.1
    assert np.abs(a[:17] - b[:17]).max() > 0.1  # row 2 vs row 4


@pytest.mark.parametrize("name", MODELS)
def test_chunk_plan_and_ivector_rows(name):
    """chunk_plan/online_ivector_row reproduce every chunk of compute.json (Kaldi's plan)."""
    comp = json.loads(fx(name, "compute.json").read_text())
    n = 0
    for run in comp["runs"]:
        T = {"utt0_47": 47, "utt1_95": 95, "utt2_146": 146}
        for utt, chunks in run.get("chunks", {}).items():
            plan = chunk_plan(T[utt], run["frame_subsampling_factor"], run["frames_per_chunk"])
            assert plan == [(c["first_output_frame"], c["last_output_frame"]) for c in chunks]
            if run["mode"].startswith("online"):
                rows = [online_ivector_row(a, b, (T[utt] + 9) // 10, 10) for a, b in plan]
                assert rows == [c["ivector_row"] for c in chunks]
                n += 1
    assert n >= 12
    with pytest.raises(ValueError, match="could not get an i-vector"):
        online_ivector_row(0, 200, 3, 10)


@pytest.mark.parametrize("name", MODELS)
def test_model_structure(name):
    m = model(name)
    assert m.context("output") == CONTEXT[name]
    assert m.input_names == ["ivector", "input"]
    assert m.output_names == ["output", "output-xent"]
    assert m.output_dim("output") == 329 and m.input_dim("ivector") == 100
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == NUM_PARAMS[name]
    assert m.trans_model is not None and m.trans_model.num_pdfs == 329
    assert m.priors is not None and m.priors.size == 0


_STATS = (b"<StatsMean> ", b"<StatsVar> ", b"<ValueAvg> ", b"<DerivAvg> ", b"<OderivRms> ")


def _without_stats(data: bytes) -> bytes:
    """Binary model bytes with the float vectors of accumulated statistics (batchnorm
    mean/var, nonlinearity value/deriv averages, oderiv rms) cut out."""
    out, pos = [], 0
    while True:
        hits = [(data.find(t, pos), t) for t in _STATS]
        hits = [(i, t) for i, t in hits if i >= 0]
        if not hits:
            return b"".join(out) + data[pos:]
        i, t = min(hits)
        j = i + len(t)
        assert data[j:j + 4] == b"FV \x04"
        n = int(np.frombuffer(data[j + 4:j + 8], "<i4")[0])
        out.append(data[pos:j])
        pos = j + 8 + 4 * n


@pytest.mark.parametrize("name", MODELS)
def test_binary_write_matches_kaldi(name):
    """Reading Kaldi's binary final.mdl and writing it back gives Kaldi's bytes, except the
    accumulated statistics, which go through Kaldi's own Read/Write arithmetic (sums in
    double, back to averages in float; the last bit can move), as nnet3-am-copy does."""
    m = read_nnet3(fx(name, "final.mdl"))
    raw = fx(name, "final.mdl").read_bytes()
    out = write_nnet3(m, None, binary=True, trans_model=m.trans_model, priors=m.priors)
    assert len(out) == len(raw)
    assert _without_stats(out) == _without_stats(raw)
    m2 = read_nnet3(out)
    for c, c2 in zip(m.components, m2.components):
        if c.TYPE == "BatchNormComponent":
            mean, var = c.kaldi_written_stats()
            assert np.array_equal(c2.stats_mean.numpy(), mean)
            assert np.array_equal(c2.stats_var.numpy(), var)
            assert np.allclose(var, c.stats_var.numpy(), rtol=1e-5, atol=1e-9)


def test_text_write_is_nnet3_am_copy_output():
    """nnet3-am-copy --binary=false final.mdl: our text from the binary model is Kaldi's,
    byte for byte (batchnorm statistics included); reading that text gives the binary's
    module (to the 7 printed digits), with the same forward."""
    b = model("P2_cnn_tdnnf")
    text = gzip.decompress(fx("P2_cnn_tdnnf", "final.mdl.txt.gz").read_bytes())
    assert write_nnet3(b, None, binary=False, trans_model=b.trans_model, priors=b.priors) == text
    t = read_nnet3(fx("P2_cnn_tdnnf", "final.mdl.txt.gz")).eval()
    st, sb = t.state_dict(), b.state_dict()
    assert st.keys() == sb.keys()
    for k in st:  # 7 digits; batchnorm stats 1e-5 (Kaldi re-derives them through sum/sumsq)
        assert torch.allclose(st[k].double(), sb[k].double(), rtol=1e-5, atol=1e-8), k
    feats, online, _ = inputs("utt1_95")
    y1 = nnet3_compute(t, feats, online_ivectors=online, **ONLINE)
    y2 = nnet3_compute(b, feats, online_ivectors=online, **ONLINE)
    assert np.abs(y1 - y2).max() < 1e-4


@pytest.mark.parametrize("binary", [True, False])
def test_save_load_round_trip_after_change(tmp_path, binary):
    """Load, change the parameters and batchnorm stats in torch, save (raw and final.mdl),
    load: identical parameters (text: to 7 digits) and identical forward."""
    from pkwrap.nn import load_kaldi_nnet3, save_kaldi_nnet3
    m = load_kaldi_nnet3(fx("P1_tdnnf", "final.mdl"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
        m.component("tdnn1.batchnorm").stats_var.mul_(1.5)
    for tm in (None, m.trans_model):
        path = tmp_path / ("m.mdl" if tm is not None else "m.raw")
        save_kaldi_nnet3(m, path, binary=binary, trans_model=tm)
        m2 = load_kaldi_nnet3(path)
        assert (m2.trans_model is None) == (tm is None)
        s1, s2 = m.state_dict(), m2.state_dict()
        assert s1.keys() == s2.keys()
        for k in s1:
            if binary and "stats_" not in k:
                assert torch.equal(s1[k].float(), s2[k].float()), k
            else:
                assert torch.allclose(s1[k].double(), s2[k].double(), rtol=2e-6, atol=1e-9), k
        feats, online, _ = inputs("utt1_95")
        y1 = nnet3_compute(m, feats, online_ivectors=online, **ONLINE)
        y2 = nnet3_compute(m2, feats, online_ivectors=online, **ONLINE)
        assert np.abs(y1 - y2).max() < (1e-5 if binary else 1e-4)  # batchnorm stats: last bit
        # still the same training settings
        for c1, c2 in zip(m.components, m2.components):
            assert c1.training_options() == pytest.approx(c2.training_options())
    assert m.component("output-xent.affine").training_options()["learning_rate_factor"] == 5


def test_forward_batch_and_gradients():
    """forward() on chain-eg-like chunks (context included): batch rows are independent,
    equal nnet3_compute's rows where the context is real, and gradients reach every
    trainable parameter; train mode updates batchnorm statistics."""
    m = read_nnet3(fx("P1_tdnnf", "final.mdl"))
    feats, _, utt_iv = inputs("utt1_95")
    x = torch.from_numpy(feats[None, :60].copy()).repeat(2, 1, 1)
    iv = torch.from_numpy(utt_iv)[None].repeat(2, 1)
    m.eval()
    with torch.no_grad():
        out, xent = m(x, iv, output=("output", "output-xent"))
    assert out.shape == (2, 40, 329) and xent.shape == (2, 40, 329)
    ref = nnet3_compute(m, feats, ivector=utt_iv, frames_per_chunk=1000)
    assert np.abs(out[0].numpy() - ref[10:50]).max() < 1e-4
    assert torch.equal(out[0], out[1])
    m.train()
    bn = m.component("tdnnf3.batchnorm")
    count = float(bn.count)
    out, xent = m(x, iv, output=("output", "output-xent"))
    (out.square().mean() + xent.mean()).backward()
    assert float(bn.count) - count == 2 * 52  # frames 4..55 of both sequences are computed
    missing = [c.name for c in m.components for p in c.parameters(recurse=False)
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing


def _tiny_text(config, components):
    return ("<Nnet3> \n" + config.strip() + "\n\n<NumComponents> %d \n" % len(components)
            + "".join("<ComponentName> %s %s \n" % c for c in components)
            + "</Nnet3> ").encode()


def test_descriptors_over_time():
    """Offset, IfDefined, Failover, Round, Switch, Const, Sum, Scale and dim-range nodes at
    the edges of the computable frames."""
    cfg = """
input-node name=input dim=2
dim-range-node name=first input-node=input dim-offset=0 dim=1
component-node name=a component=n1 input=Sum(IfDefined(Offset(first, -2)), Scale(2, first))
component-node name=b component=n1 input=Failover(Offset(first, 1), Const(-7, 1))
component-node name=c component=n1 input=Round(first, 3)
component-node name=d component=n3 input=Append(Switch(first, Offset(first, 1)), Const(0.5, 1), first)
output-node name=output input=Append(a, b, c, d)
"""
    comps = [("n1", "<NoOpComponent> <Dim> 1 <BackpropScale> 1 </NoOpComponent>"),
             ("n3", "<NoOpComponent> <Dim> 3 <BackpropScale> 1 </NoOpComponent>")]
    m = read_nnet3(_tiny_text(cfg, comps))
    assert m.node_dim("d") == 3 and m.output_dim() == 6
    x = torch.arange(10.0).reshape(1, 10, 1) * torch.tensor([1.0, 100.0])
    # frames 0..9 given; Switch's Offset(first, 1) needs t+1, so t <= 8 is computable
    y = m.compute({"input": (0, x)}, {"output": (0, 8)})["output"][0]
    t = torch.arange(9.0)
    assert torch.equal(y[:, 0], torch.where(t >= 2, t - 2, 0 * t) + 2 * t)
    assert torch.equal(y[:, 1], t + 1)
    assert torch.equal(y[:, 2], 3 * torch.div(t, 3, rounding_mode="floor"))
    assert torch.equal(y[:, 3], torch.where(t % 2 == 0, t, t + 1))
    assert torch.equal(y[:, 4], torch.full_like(t, 0.5))
    with pytest.raises(ValueError, match="not computable"):
        m.compute({"input": (0, x)}, {"output": (0, 9)})
    # Failover falls back where Offset(first, 1) is not computable: frames of a shorter input
    m2 = read_nnet3(_tiny_text("input-node name=input dim=1\n"
                               "component-node name=b component=n1 input=Failover(Offset(input, 1), Const(-7, 1))\n"
                               "output-node name=output input=b", comps[:1]))
    y2 = m2.compute({"input": (0, x[..., :1])}, {"output": (0, 9)})["output"][0, :, 0]
    assert y2.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, -7]
    assert str(parse_descriptor("Append(Offset(x, -1), Scale(0.4, ReplaceIndex(iv, t, 0)))")) \
        == "Append(Offset(x, -1), Scale(0.4, ReplaceIndex(iv, t, 0)))"


def test_clear_errors():
    good = _tiny_text("input-node name=input dim=1\ncomponent-node name=a component=n input=input\n"
                      "output-node name=output input=a",
                      [("n", "<NoOpComponent> <Dim> 1 <BackpropScale> 1 </NoOpComponent>")])
    read_nnet3(good)
    with pytest.raises(KaldiFormatError, match=r"<bytes>.*unsupported component type "
                                               r"LstmNonlinearityComponent"):
        read_nnet3(good.replace(b"NoOpComponent", b"LstmNonlinearityComponent"))
    with pytest.raises(KaldiFormatError, match=r"<bytes>.*unknown descriptor type 'Offst'"):
        read_nnet3(good.replace(b"input=input", b"input=Offst(input, 1)"))
    with pytest.raises(KaldiFormatError, match=r"<bytes>.*unknown field '<Foo>'"):
        read_nnet3(good.replace(b"<BackpropScale> 1", b"<Foo> 1"))
    with pytest.raises(KaldiFormatError, match=r"<bytes>.*input dim 2.*expects 1"):
        read_nnet3(good.replace(b"input=input", b"input=Append(input, input)"))
    with pytest.raises(KaldiFormatError, match=r"<bytes>.*undefined node 'nope'"):
        read_nnet3(good.replace(b"input=input", b"input=nope"))
    with pytest.raises(KaldiFormatError, match="nothing.mdl: cannot read"):
        read_nnet3("/nonexistent/nothing.mdl")


def test_load_kaldi_nnet3_returns_module():
    from pkwrap.nn import load_kaldi_nnet3
    m = load_kaldi_nnet3(str(fx("P3_lda_tdnn", "final.mdl")))
    assert isinstance(m, Nnet3) and isinstance(m, torch.nn.Module)
    assert m.component("tdnn3.dropout").TYPE == "DropoutComponent"


# ----------------------------------------------------------------------------- programs
REPO = fixture_path().parents[2]


def _script(name):
    import runpy
    return runpy.run_path(str(REPO / "scripts" / name), run_name="cli")["main"]


def _arks(tmp_path, utts):
    """feats.ark, ivector_online.{ark,scp}, ivector_utt.ark as the README rebuilds them."""
    from pkwrap.kaldi.table import TableWriter
    with TableWriter("ark:%s" % (tmp_path / "feats.ark")) as f, \
            TableWriter("ark,scp:%s,%s" % (tmp_path / "on.ark", tmp_path / "on.scp")) as o, \
            TableWriter("ark:%s" % (tmp_path / "utt.ark"), "vector") as v:
        for utt in utts:
            feats, online, iv = inputs(utt)
            f[utt], o[utt], v[utt] = feats, online, iv


def test_nnet3_compute_program(tmp_path, capsys):
    """scripts/nnet3-compute with Kaldi's arguments reproduces the stored runs (ark in,
    ark out), including output-xent through nnet3-copy --edits and a piped model."""
    from pkwrap.kaldi.table import read_table
    utts = ["utt1_95", "utt2_146"]
    _arks(tmp_path, utts)
    compute, copy = _script("nnet3-compute"), _script("nnet3-copy")
    mdl = str(fx("P2_cnn_tdnnf", "final.mdl"))
    out = tmp_path / "out.ark"
    assert compute(["--use-gpu=no", "--frame-subsampling-factor=3", "--frames-per-chunk=50",
                    "--online-ivectors=scp:%s" % (tmp_path / "on.scp"),
                    "--online-ivector-period=10", mdl, "ark:%s" % (tmp_path / "feats.ark"),
                    "ark:%s" % out]) == 0
    assert "Done 2 utterances, failed for 0" in capsys.readouterr().err
    got = read_table("ark:%s" % out)
    for utt in utts:
        ref = np.load(fx("P2_cnn_tdnnf", "online_chunk50_output_fsf3_%s.npy" % utt))
        assert np.abs(got[utt] - ref).max() < 1e-4
    xent = tmp_path / "xent.raw"
    copy(["--edits=remove-output-nodes name=output;remove-orphans;"
          "rename-node old-name=output-xent new-name=output", mdl, str(xent)])
    assert read_nnet3(xent).output_names == ["output"]
    assert compute(["--frame-subsampling-factor=3", "--ivectors=ark:%s" % (tmp_path / "utt.ark"),
                    "cat %s |" % xent, "ark:%s" % (tmp_path / "feats.ark"),
                    "ark,t:%s" % out, "--apply-exp=true"]) == 0
    got = read_table("ark:%s" % out)
    ref = np.load(fx("P2_cnn_tdnnf", "utt_ivector_output_xent_fsf3_utt1_95.npy"))
    assert np.abs(np.log(got["utt1_95"]) - ref).max() < 1e-4  # text: 7 digits
    with pytest.raises(SystemExit, match="nnet3-compute: .*no-such.mdl: cannot read"):
        compute(["no-such.mdl", "ark:%s" % (tmp_path / "feats.ark"), "ark:%s" % out])
    with pytest.raises(SystemExit, match="--online-ivector-period"):
        compute(["--online-ivectors=scp:%s" % (tmp_path / "on.scp"), mdl,
                 "ark:%s" % (tmp_path / "feats.ark"), "ark:%s" % out])


def test_nnet3_copy_am_copy_info(tmp_path, capsys):
    copy, am_copy, info = _script("nnet3-copy"), _script("nnet3-am-copy"), _script("nnet3-info")
    mdl = fx("P1_tdnnf", "final.mdl")
    # am-copy to text: Kaldi's nnet3-am-copy --binary=false bytes
    am_copy(["--binary=false", str(fx("P2_cnn_tdnnf", "final.mdl")), str(tmp_path / "t.mdl")])
    assert (tmp_path / "t.mdl").read_bytes() == \
        gzip.decompress(fx("P2_cnn_tdnnf", "final.mdl.txt.gz").read_bytes())
    am_copy(["--raw=true", str(mdl), str(tmp_path / "f.raw")])
    raw = read_nnet3(tmp_path / "f.raw")
    assert raw.trans_model is None and raw.num_parameters() == NUM_PARAMS["P1_tdnnf"]
    with pytest.raises(SystemExit, match="not an acoustic model"):
        am_copy([str(tmp_path / "f.raw"), str(tmp_path / "x")])
    # --scale, --learning-rate, set-learning-rate-factor
    copy(["--scale=0.5", "--learning-rate=0.001",
          "--edits=set-learning-rate-factor name=prefinal-l learning-rate-factor=2",
          str(mdl), str(tmp_path / "s.raw")])
    s = read_nnet3(tmp_path / "s.raw")
    assert torch.equal(s.component("tdnn1.affine").weight,
                       0.5 * model("P1_tdnnf").component("tdnn1.affine").weight)
    assert s.component("output-xent.affine").training_options()["learning_rate"] == \
        pytest.approx(0.005)
    assert s.component("prefinal-l").training_options()["learning_rate_factor"] == 2
    assert float(s.component("tdnn1.batchnorm").count) == \
        pytest.approx(0.5 * float(model("P1_tdnnf").component("tdnn1.batchnorm").count))
    with pytest.raises(SystemExit, match="nnet3-copy: .*not supported"):
        copy(["--edits=apply-magic name=x", str(mdl), str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="rename-node: no node 'nope'"):
        copy(["--edits=rename-node old-name=nope new-name=x", str(mdl), str(tmp_path / "x")])
    # nnet3-info: Kaldi's header and config lines with dims, exactly
    capsys.readouterr()
    info([str(mdl)])
    ours = capsys.readouterr().out.splitlines()
    kaldi = fx("P1_tdnnf", "final.info").read_text().splitlines()
    n = next(i for i, l in enumerate(kaldi) if l.startswith("component name="))
    assert ours[:n] == kaldi[:n]
    assert [l.split(",")[0] for l in ours[n:]] == [l.split(",")[0] for l in kaldi[n:]]


_TRAINED = {"LinearParams", "BiasParams", "Params", "StatsMean", "StatsVar", "Count",
            "LearningRate", "ValueAvg", "DerivAvg", "OderivRms", "OderivCount",
            "NumDimsSelfRepaired", "NumDimsProcessed"}


@pytest.mark.parametrize("name", MODELS)
def test_nnet3_init_from_xconfig_configs(name, tmp_path, monkeypatch):
    """nnet3-init configs/final.config (xconfig_to_configs.py's output, with idct.mat /
    lda.mat): the same config lines (normalized descriptors), components, dims and every
    setting Kaldi's nnet3-init wrote (ranks, alphas, offsets, max-change, l2, ...) as the
    Kaldi-made model; fixed matrices equal; only trained values differ."""
    monkeypatch.chdir(fx(name))
    init = _script("nnet3-init")
    out = tmp_path / "0.raw"
    assert init(["--srand=1", "configs/final.config", str(out)]) == 0
    m, k = read_nnet3(out), model(name)
    assert m.config_lines() == k.config_lines()
    # Kaldi's BatchNormComponent::Read needs <StatsMean>/<StatsVar> even with Count 0
    # (zeros); real Kaldi's nnet3-copy read these files (see the report of issue 11)
    num_bn = sum(c.TYPE == "BatchNormComponent" for c in m.components)
    assert out.read_bytes().count(b"<StatsMean> FV ") == num_bn
    assert b"<Count> 0 <StatsMean>  [ 0 0 " in write_nnet3(m, None, binary=False)
    assert m.num_parameters() == NUM_PARAMS[name]
    for a, b in zip(m.components, k.components):
        assert (a.name, a.TYPE) == (b.name, b.TYPE)
        for f, vb in b.fields.items():
            if f in _TRAINED:
                continue
            va = a.fields[f]
            if isinstance(vb, dict):
                assert all(np.array_equal(va[x], vb[x]) for x in vb), (a.name, f)
            else:
                assert np.allclose(np.asarray(va, dtype=float), np.asarray(vb, dtype=float),
                                   rtol=1e-6), (a.name, f, va, vb)
        for pn, pa in a.named_parameters(recurse=False):
            assert pa.shape == getattr(b, pn).shape
        if a.TYPE == "FixedAffineComponent":
            assert torch.allclose(a.weight, b.weight, atol=1e-6)
    # untrained batchnorm has no statistics: eval mode says so; train mode runs
    feats, _, iv = inputs("utt1_95")
    with pytest.raises(RuntimeError, match="needs statistics"):
        m.eval()(torch.from_numpy(feats[None]), torch.from_numpy(iv)[None])
    y = m.train()(torch.from_numpy(feats[None]), torch.from_numpy(iv)[None], output="output")
    assert y.shape[1] == 95 - sum(CONTEXT[name]) and torch.isfinite(y).all()
    # seeds: same seed, same parameters; existing nnet + config
    init(["--srand=1", "configs/final.config", str(tmp_path / "again.raw")])
    assert out.read_bytes() == (tmp_path / "again.raw").read_bytes()
    (tmp_path / "extra.config").write_text(
        "component name=extra type=NoOpComponent dim=329\n"
        "component-node name=extra component=extra input=Scale(2.0, Offset(output.affine, 0))\n"
        "output-node name=output input=extra objective=linear\n")
    init([str(out), str(tmp_path / "extra.config"), str(tmp_path / "ext.raw")])
    e = read_nnet3(tmp_path / "ext.raw")
    assert e.config_lines()[-2:] == ["component-node name=extra component=extra "
                                    "input=Scale(2, output.affine)",
                                    "output-node name=output input=extra objective=linear"]
    assert e.output_names == ["output-xent", "output"]
    with pytest.raises(SystemExit, match=r"nnet3-init: .*bad.config: config line 1: .*unused values "
                                         r"wrong=1"):
        (tmp_path / "bad.config").write_text("component name=x type=NoOpComponent dim=3 wrong=1\n")
        init([str(tmp_path / "bad.config"), str(tmp_path / "x.raw")])


def test_descriptor_normal_form():
    """Kaldi's normalization, as in the fixtures' final.config vs final.mdl lines."""
    cases = {
        "Append(delta, Scale(0.4, ReplaceIndex(ivector, t, 0)))":
            "Append(delta, ReplaceIndex(Scale(0.4, ivector), t, 0))",
        "Offset(Offset(x, 1), -1)": "x",
        "Offset(Append(a, Offset(b, 2)), 1)": "Append(Offset(a, 1), Offset(b, 3))",
        "Sum(a, b, c)": "Sum(a, Sum(b, c))",
        "Scale(2, Sum(a, Scale(3, b)))": "Sum(Scale(2, a), Scale(6, b))",
        "Offset(Sum(a, IfDefined(b)), -3)": "Sum(Offset(a, -3), IfDefined(Offset(b, -3)))",
    }
    for text, want in cases.items():
        assert str(parse_descriptor(text).normalized()) == want


def test_forward_for_pkwrap_train():
    """Without an output name, forward gives {'output', 'output-xent'} (what pkwrap.train
    takes); frame_subsampling_factor keeps every f-th frame from the left context on; the
    trainer's context probe finds Kaldi's context."""
    from pkwrap.train.context import probe_model_context
    m = read_nnet3(fx("P3_lda_tdnn", "final.mdl")).eval()
    m.remove_output_nodes(["output-xent"])
    m.remove_orphans()
    feats, _, iv = inputs("utt1_95")
    x, v = torch.from_numpy(feats[None]), torch.from_numpy(iv)[None]
    with torch.no_grad():
        full = m(x, v)["output"]
        m.frame_subsampling_factor = 3
        sub = m(x, v)
    assert list(sub) == ["output"] and torch.equal(sub["output"], full[:, ::3])
    assert sub["output"].shape[1] == (95 - 1 - 18) // 3 + 1
    assert (m.left_context, m.right_context) == (9, 9)
    p1 = read_nnet3(fx("P1_tdnnf", "final.mdl"))
    assert p1.component("input2").TYPE == "NoOpComponent"
    # a model without i-vector input: the context probe of pkwrap.train
    cfg = ("input-node name=input dim=4\n"
           "component name=a type=TdnnComponent input-dim=4 output-dim=3 time-offsets=-2,0,1\n"
           "component-node name=a component=a input=input\n"
           "output-node name=output input=Offset(a, 1)\n")
    from pkwrap.nnet3 import nnet3_from_config
    n = nnet3_from_config(cfg)
    n.frame_subsampling_factor = 3
    ctx = probe_model_context(n, 4)
    assert (ctx.left_context, ctx.right_context, ctx.frame_subsampling_factor) == (1, 2, 3)


def test_train_mode_dropout_and_spec_augment():
    """Train mode follows Kaldi's training-time masks; eval mode is Kaldi's test mode."""
    from pkwrap.nnet3 import nnet3_from_config
    torch.manual_seed(0)
    cfg = ("input-node name=input dim=40\n"
           "component name=f type=GeneralDropoutComponent dim=40 specaugment-max-proportion=0.5\n"
           "component name=t type=SpecAugmentTimeMaskComponent dim=40 zeroed-proportion=0.2 "
           "time-mask-max-frames=20\n"
           "component name=d type=DropoutComponent dim=40 dropout-proportion=0.1\n"
           "component name=g type=GeneralDropoutComponent dim=40 block-dim=10 "
           "dropout-proportion=0.25 time-period=7\n"
           "component-node name=f component=f input=input\n"
           "component-node name=t component=t input=input\n"
           "component-node name=d component=d input=input\n"
           "component-node name=g component=g input=input\n"
           "output-node name=output input=Append(f, t, d, g)\n")
    m = nnet3_from_config(cfg)
    x = torch.ones(64, 400, 40)
    f, t, d, g = m.train()(x, output="output").split(40, dim=-1)
    # frequency mask: the same for every frame, at most 20 consecutive (circular) bins
    assert torch.equal(f, f[:, :1].expand_as(f))
    for row in f[:, 0]:
        zero = (row == 0).tolist()
        starts = sum(zero[i] and not zero[i - 1] for i in range(40))  # circular runs
        assert sum(zero) <= 20 and starts == (1 if any(zero) else 0)
    assert 0.1 < float((f == 0).float().mean()) < 0.4  # mean of U(0..20) / 40 = 0.25
    # time mask: whole frames, spans of at most 20 frames, about 20% of the frames
    assert torch.equal(t, t[..., :1].expand_as(t))
    assert 0.15 < float((t[..., 0] == 0).float().mean()) < 0.25
    # dropout: zeros about 10%, kept values not rescaled
    assert set(d.unique().tolist()) == {0.0, 1.0}
    assert 0.08 < float((d == 0).float().mean()) < 0.12
    # general dropout: kept values scaled by 1/(1-p), one mask per 7 frames and per sequence
    assert g.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]
    blocks = g.reshape(64, 400, 4, 10)
    assert torch.equal(blocks, blocks[:, :, :1].expand_as(blocks))  # every block alike
    assert torch.equal(g[:, 0:7], g[:, :1].expand(64, 7, 40))
    assert not torch.equal(g[:, 6], g[:, 7])
    # eval: identity, identity, (1 - p) x, identity
    f, t, d, g = m.eval()(x, output="output").split(40, dim=-1)
    assert torch.equal(f, x) and torch.equal(t, x) and torch.equal(g, x)
    assert torch.allclose(d, 0.9 * x)


def test_kaldi_training_settings_reach_ngsgd(tmp_path):
    """Per-component learning-rate-factor, max-change, l2-regularize and orthonormal
    constraint from the model file are what kaldi_param_groups / NGSGD use; natural
    gradient (Kaldi's OnlineNaturalGradient) preconditions NaturalGradientAffine, Linear
    and Tdnn gradients in training; changed settings are saved."""
    from pkwrap.nn import natural_gradient_modules
    from pkwrap.optim import NGSGD, kaldi_param_groups
    m = read_nnet3(fx("P1_tdnnf", "final.mdl")).train()
    name_of = {"components.%d" % i: c.name for i, c in enumerate(m.components)}
    groups = {name_of[g["name"]]: g for g in kaldi_param_groups(m)}
    assert "idct" not in groups and "batchnorm0" not in groups  # nothing trainable
    g = groups["output-xent.affine"]
    assert (g["learning_rate_factor"], g["max_change"], g["l2_regularize"]) == \
        pytest.approx((5, 1.5, 0.015))  # float32 in the file
    g = groups["tdnnf2.linear"]
    assert (g["orthonormal_constraint"], g["max_change"], g["l2_regularize"]) == \
        pytest.approx((-1, 0.75, 0.03))
    assert groups["tdnnf2.affine"]["orthonormal_constraint"] == 0
    assert {n for n, _ in natural_gradient_modules(m)} == {
        k for k, v in name_of.items() if m.components[int(k.split(".")[1])].TYPE in
        ("NaturalGradientAffineComponent", "LinearComponent", "TdnnComponent")}
    feats, _, iv = inputs("utt1_95")
    x, v = torch.from_numpy(feats[None, :60]), torch.from_numpy(iv)[None]

    def grad(natural):
        m.zero_grad()
        for c in m.components:
            if hasattr(c, "use_natural_gradient"):
                c.use_natural_gradient = natural
        out = m(x, v)
        (out["output"].square().mean() + out["output-xent"].mean()).backward()
        return m.component("tdnnf3.linear").weight.grad.clone()

    plain, nat = grad(False), grad(True)
    assert plain.shape == nat.shape and not torch.allclose(plain, nat, rtol=1e-3)
    w0 = m.component("output.affine").weight.detach().clone()
    opt = NGSGD(kaldi_param_groups(m), lr=0.001)
    opt.step(num_sequences=1)
    assert not torch.equal(w0, m.component("output.affine").weight)
    c = m.component("tdnn1.affine")
    c.max_change, c.l2_regularize, c.learning_rate_factor = 0.5, 0.01, 2.0
    m.component("output.affine").orthonormal_constraint = 1.0
    write_nnet3(m, tmp_path / "m.raw")
    m2 = read_nnet3(tmp_path / "m.raw")
    assert m2.component("tdnn1.affine").training_options() == pytest.approx(dict(
        learning_rate=0.004, learning_rate_factor=2.0, max_change=0.5, l2_regularize=0.01))
    assert list(m2.component("tdnn1.affine").fields)[:4] == ["LearningRateFactor", "MaxChange",
                                                             "L2Regularize", "LearningRate"]
    assert m2.component("output.affine").orthonormal_constraint == 1.0
    assert list(m2.component("output.affine").fields).index("OrthonormalConstraint") == \
        list(m2.component("output.affine").fields).index("RankOut") + 1


def test_convolution_optional_time_offsets_and_height_padding():
    """TimeHeightConvolution: heights outside the input are zero padding; a time offset that
    is not required reads zeros where its frame cannot be computed (e.g. beyond the input)."""
    from pkwrap.nnet3 import nnet3_from_config
    cfg = ("input-node name=input dim=6\n"
           "component name=c type=TimeHeightConvolutionComponent num-filters-in=2 "
           "num-filters-out=1 height-in=3 height-out=2 height-subsample-out=2 "
           "time-offsets=-1,0,1 height-offsets=-1,0,1 required-time-offsets=0 "
           "param-stddev=1 bias-stddev=0\n"
           "component-node name=c component=c input=input\n"
           "output-node name=output input=c\n")
    m = nnet3_from_config(cfg, srand=5).eval()
    assert m.context() == (0, 0)
    c = m.component("c")
    x = torch.randn(1, 4, 6)
    y = m.compute({"input": (0, x)}, {"output": (0, 3)})["output"][0]
    W = c.weight.detach().reshape(1, 3, 3, 2)  # [out][dt][dh][f_in]
    xi = x[0].reshape(4, 3, 2)
    for t in range(4):
        for h_out in range(2):
            want = c.bias.detach()[0].clone()
            for i, dt in enumerate((-1, 0, 1)):
                for j, dh in enumerate((-1, 0, 1)):
                    h = 2 * h_out + dh
                    if 0 <= t + dt < 4 and 0 <= h < 3:
                        want += (W[0, i, j] * xi[t + dt, h]).sum()
            assert torch.allclose(y[t, h_out], want, atol=1e-5), (t, h_out)


def test_other_components_against_their_formulas(tmp_path):
    """Normalize, ScaleAndOffset, ElementwiseProduct, Sigmoid, Tanh, Affine, Permute built
    from a config, written and read back (binary and text), each equal to its formula."""
    from pkwrap.nnet3 import nnet3_from_config
    cfg = ("input-node name=input dim=8\n"
           "component name=n type=NormalizeComponent input-dim=8 block-dim=4 target-rms=0.5 "
           "add-log-stddev=true\n"
           "component name=s type=ScaleAndOffsetComponent dim=8 block-dim=4\n"
           "component name=e type=ElementwiseProductComponent input-dim=8 output-dim=4\n"
           "component name=sg type=SigmoidComponent dim=8\n"
           "component name=th type=TanhComponent dim=8\n"
           "component name=a type=AffineComponent input-dim=8 output-dim=3\n"
           "component name=p type=PermuteComponent column-map=7,6,5,4,3,2,1,0\n"
           "component-node name=n component=n input=input\n"
           "component-node name=s component=s input=input\n"
           "component-node name=e component=e input=input\n"
           "component-node name=sg component=sg input=input\n"
           "component-node name=th component=th input=input\n"
           "component-node name=a component=a input=input\n"
           "component-node name=p component=p input=input\n"
           "output-node name=output input=Append(n, s, e, sg, th, a, p)\n")
    m0 = nnet3_from_config(cfg, srand=2)
    with torch.no_grad():
        m0.component("s").scales.copy_(torch.tensor([1.0, 2, 3, 4]))
        m0.component("s").offsets.copy_(torch.tensor([0.5, 0, 0, -1]))
    for binary in (True, False):
        write_nnet3(m0, tmp_path / "m", binary=binary)
        m = read_nnet3(tmp_path / "m").eval()
        x = torch.randn(2, 5, 8)
        y = m(x, output="output")
        n, s, e, sg, th, a, p = y.split([10, 8, 4, 8, 8, 3, 8], dim=-1)
        xb = x.reshape(2, 5, 2, 4)
        scale = (xb.square().sum(-1, keepdim=True) / (4 * 0.25)).rsqrt()
        want_n = torch.cat([xb * scale, math_log(0.5) - torch.log(scale)], -1).reshape(2, 5, 10)
        assert torch.allclose(n, want_n, atol=1e-5)
        assert torch.allclose(s, (xb * torch.tensor([1.0, 2, 3, 4]) +
                                  torch.tensor([0.5, 0, 0, -1])).reshape(2, 5, 8))
        assert torch.allclose(e, x[..., :4] * x[..., 4:])
        assert torch.allclose(sg, torch.sigmoid(x)) and torch.allclose(th, torch.tanh(x))
        w, b = m0.component("a").weight, m0.component("a").bias
        assert torch.allclose(a, x @ w.t() + b, atol=1e-5)
        assert torch.equal(p, x.flip(-1))


def math_log(v):
    import math
    return math.log(v)


def test_context_over_all_shifts_and_failover_requests():
    """Found by bench/nnet3_heldout_kaldi.py against real Kaldi: (1) with Round(x, 3) an
    output at t = 3k + 2 reads x at 3k, so Kaldi's left context is 2 (it takes the largest
    context over input start frames 0..modulus-1), not 0; (2) Failover(Offset(c, -4), c)
    must not read c where the first part already covers the request (interval evaluation
    asked for c's frames only where needed, then read others)."""
    from pkwrap.nnet3 import nnet3_from_config
    head = ("input-node name=input dim=4\n"
            "component name=a type=AffineComponent input-dim=4 output-dim=3\n"
            "component-node name=a component=a input=input\n"
            "component name=n type=NoOpComponent dim=3\n")
    r = nnet3_from_config(head + "component-node name=n component=n input=Round(a, 3)\n"
                          "output-node name=output input=n\n")
    assert r.modulus() == 3 and r.context() == (2, 0)
    f = nnet3_from_config(
        head.replace("input=input", "input=Append(Offset(input, -1), input)")
        .replace("input-dim=4", "input-dim=8")
        + "component-node name=n component=n input=Failover(Offset(a, -4), a)\n"
        "output-node name=output input=n\n").eval()
    x = torch.randn(1, 60, 4)
    with torch.no_grad():
        y = f.compute({"input": (-7, x)}, {"output": (0, 45)})["output"]
    assert y.shape == (1, 46, 3)
    # frames t >= -2: a(t - 4) exists (a needs input t-1 >= -7)
    with torch.no_grad():
        full = f.compute_generic({"input": (-7, x)}, {"output": (-2, 45)})["output"]
    assert torch.allclose(y, full[:, 2:], atol=1e-6)
