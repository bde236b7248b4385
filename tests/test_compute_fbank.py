"""egs/digits/local/compute_fbank.py: features and their mean normalizations."""
import subprocess
import sys
from pathlib import Path

import kaldiio
import numpy as np
import pytest
from scipy.io import wavfile

RECIPE = Path(__file__).resolve().parent.parent / "egs" / "digits"
SCRIPT = RECIPE / "local" / "compute_fbank.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fbank")
    rng = np.random.default_rng(0)
    scp, u2s = [], []
    for spk, gain in (("a", 0.1), ("b", 0.5)):
        for i in range(3):
            n = 4000 + 800 * i
            x = gain * np.sin(np.arange(n) * (0.2 + 0.05 * i)) + 0.01 * rng.standard_normal(n)
            path = d / f"{spk}{i}.wav"
            wavfile.write(str(path), 16000, np.round(x * 32767).astype(np.int16))
            scp.append(f"{spk}-{i} {path}\n")
            u2s.append(f"{spk}-{i} {spk}\n")
    (d / "wav.scp").write_text("".join(scp))
    (d / "utt2spk").write_text("".join(u2s))
    return d


def feats(data_dir, *opts):
    r = subprocess.run([sys.executable, str(SCRIPT), "--config", str(RECIPE / "conf" / "fbank.conf"),
                        *opts, str(data_dir)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return {k: np.array(v) for k, v in kaldiio.load_scp(str(data_dir / "feats.scp")).items()}


def test_mean_normalizations(data_dir):
    raw = feats(data_dir, "--cmn", "none")
    assert list(raw) == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]
    assert all(f.shape[1] == 40 for f in raw.values())
    utt = feats(data_dir)
    for k in raw:
        np.testing.assert_allclose(utt[k], raw[k] - raw[k].mean(axis=0), atol=1e-4)
    spk = feats(data_dir, "--cmn", "speaker")
    for s in "ab":
        keys = [k for k in raw if k.startswith(s)]
        mean = np.concatenate([raw[k] for k in keys]).mean(axis=0)
        for k in keys:
            np.testing.assert_allclose(spk[k], raw[k] - mean, atol=1e-4)
        # the speaker's frames have mean zero, its utterances' each not
        assert np.abs(np.concatenate([spk[k] for k in keys]).mean(axis=0)).max() < 1e-4
        assert max(np.abs(spk[k].mean(axis=0)).max() for k in keys) > 0.1
    lens = dict(line.split() for line in (data_dir / "utt2num_frames").read_text().splitlines())
    assert {k: int(v) for k, v in lens.items()} == {k: f.shape[0] for k, f in raw.items()}


def test_speaker_cmn_needs_utt2spk(data_dir, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "wav.scp").write_text((data_dir / "wav.scp").read_text())
    r = subprocess.run([sys.executable, str(SCRIPT), "--config", str(RECIPE / "conf" / "fbank.conf"),
                        "--cmn", "speaker", str(d)], capture_output=True, text=True)
    assert r.returncode != 0 and "needs" in r.stderr and "utt2spk" in r.stderr
    assert not (d / "feats.scp").exists()
    (d / "utt2spk").write_text("a-0 a\na-1\n")          # damaged: a line without speaker
    r = subprocess.run([sys.executable, str(SCRIPT), "--config", str(RECIPE / "conf" / "fbank.conf"),
                        "--cmn", "speaker", str(d)], capture_output=True, text=True)
    assert r.returncode != 0 and "utt2spk:2: expected 'utt speaker'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (d / "feats.scp").exists()
