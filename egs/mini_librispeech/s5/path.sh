# Kaldi's programs and scripts come from your Kaldi checkout: set KALDI_ROOT (nothing of
# this machine is assumed). pkwrap-chain-train must be on PATH (pip install pkwrap).
if [ -z "${KALDI_ROOT:-}" ]; then
  echo "path.sh: set KALDI_ROOT to your Kaldi checkout (the one with src/ built)" >&2
  return 1 2>/dev/null || exit 1
fi
[ -f $KALDI_ROOT/tools/env.sh ] && . $KALDI_ROOT/tools/env.sh
if [ ! -f $KALDI_ROOT/tools/config/common_path.sh ]; then
  echo "path.sh: $KALDI_ROOT/tools/config/common_path.sh is missing: is KALDI_ROOT a Kaldi checkout?" >&2
  return 1 2>/dev/null || exit 1
fi
export PATH=$PWD/utils:$KALDI_ROOT/tools/openfst/bin:$PWD:$PATH
. $KALDI_ROOT/tools/config/common_path.sh
export LC_ALL=C
export PYTHONUNBUFFERED=1
