# pkwrap: the two commands a newcomer needs are
#   make demo   install everything, then run the embedded digits recipe (egs/digits)
#   make test   install everything, then run the test suite
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# torch: keep the user's if it satisfies setup.py's range, otherwise install the CPU
# build that this machine kind provides (a bare 'torch' would pull a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install sysdeps build test test-fast demo bench clean

install: sysdeps
	@$(PYTHON) -c "import torch, sys; v=tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v >= (2, 1) else 1)" 2>/dev/null \
	  || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[full,test,digits]"

# Debian packages: egs/digits synthesizes its corpus with espeak-ng, flite and festival
# (festvox-* voices built from recordings of real talkers: English, and Italian, Czech,
# Finnish and Telugu ones reading the digits respelled, i.e. accented English);
# asterisk-core-sounds-en-wav has a real talker's digit recordings (run.sh
# --recorded-talkers ...,allison). Needs root (CI and dev machines are). MBROLA and its
# voices (talkers us1 .. sw2) are in Debian's contrib / non-free areas:
# egs/digits/local/install_mbrola.sh fetches them without changing the apt sources.
DIGITS_DEBS = espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts \
	festvox-itapc16k festvox-czech-machac festvox-czech-ph festvox-suopuhe-mv festival-te \
	asterisk-core-sounds-en-wav
sysdeps:
	@missing=""; for p in $(DIGITS_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq $$missing >/dev/null); \
	  else echo "missing Debian packages:$$missing: sudo apt-get install$$missing (needed by egs/digits)"; fi; fi
	@egs/digits/local/install_mbrola.sh

# Rebuild the C++ core in place after editing csrc/ (the editable install picks it up).
build:
	$(PYTHON) setup.py -q build_ext --inplace

test: install
	$(PYTHON) -m pytest -q tests

test-fast:
	$(PYTHON) -m pytest -q -x tests -m "not slow"

demo: install
	cd egs/digits && ./run.sh

# Speed figures (ratios against baselines timed in the same run; see each script's --help).
bench:
	$(PYTHON) bench/bench_chain_loss.py
	$(PYTHON) bench/bench_ngsgd.py
	$(PYTHON) bench/bench_train_step.py

clean:
	rm -rf build *.egg-info pkwrap/*.so
