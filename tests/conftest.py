"""Shared test helpers: the Kaldi fixtures copied from shared/fixtures/kaldi."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Without CUDA, Triton kernels (pkwrap.chain.den_triton) run in Triton's interpreter; it is
# chosen when the kernels are defined, so before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "kaldi"


REPO = Path(__file__).resolve().parent.parent


def script_env(**extra) -> dict:
    """Environment for running ``scripts/<prog>`` in a subprocess: this checkout's
    ``pkwrap`` first on the path (also when another copy is installed)."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=str(REPO) + (os.pathsep + path if path else ""), **extra)


def fixture_path(*parts) -> Path:
    p = FIXTURES.joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError("missing test fixture %s" % p)
    return p


def load_case(name: str) -> dict:
    """expected.json of a chain-objective case, with array paths made absolute."""
    d = json.loads(fixture_path("cases", name, "expected.json").read_text())
    d["arrays"] = {k: FIXTURES / v for k, v in d.get("arrays", {}).items()}
    d["inputs"] = {k: (FIXTURES / v if isinstance(v, str) and "/" in v else v)
                   for k, v in d["inputs"].items()}
    return d


def all_cases():
    return json.loads(fixture_path("manifest.json").read_text())["cases"]


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


SYNTH_CORPUS = REPO / "egs" / "digits" / "local" / "synth_corpus.py"


@pytest.fixture(scope="module")
def synth_corpus():
    """The digits recipe's corpus generator, ``SYNTH_CORPUS``, as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("synth_corpus", SYNTH_CORPUS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def espeak_calls(synth_corpus, monkeypatch):
    """A list that collects ``(voice, text)`` of every ``synthesize`` (espeak-ng) call of
    ``synth_corpus`` during the test; the calls still synthesize."""
    seen, real = [], synth_corpus.synthesize

    def spy(text, voice, *a):
        seen.append((voice, text))
        return real(text, voice, *a)

    monkeypatch.setattr(synth_corpus, "synthesize", spy)
    return seen
