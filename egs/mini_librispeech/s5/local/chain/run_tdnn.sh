#!/usr/bin/env bash
# The chain stages of mini_librispeech (Kaldi's local/chain/tuning/run_tdnn_1k.sh: i-vectors
# with online CMVN, chain lang/topology, lattices, tree, the tdnn_1k xconfig, training, graph,
# decoding, online decoding) with one change: steps/nnet3/chain/train.py is replaced by
# pkwrap-chain-train, which takes the same arguments and writes the same chain dir.
#
# The script is made from your Kaldi's own run_tdnn_1k.sh at run time (nothing of Kaldi is
# copied into this repository), and the change is checked to have been applied exactly once.
# Kaldi's "cuda-compiled" guard is dropped as well: it checks Kaldi's CUDA build, which
# training with pkwrap does not use (pkwrap-chain-train uses torch's CUDA when --use-gpu asks
# for it and a GPU is there). All options of run_tdnn_1k.sh pass through, e.g.
#   local/chain/run_tdnn.sh --stage 14 --train-stage -10
# run_tdnn_1k.sh asks for --use-gpu=true; on a machine without a GPU run with USE_GPU=no
# (e.g. `USE_GPU=no ./run.sh --stage 9`) to train on the CPU instead.
set -euo pipefail
. ./path.sh
src=$KALDI_ROOT/egs/mini_librispeech/s5/local/chain/tuning/run_tdnn_1k.sh
out=local/chain/run_tdnn_1k_pkwrap.sh
[ -f "$src" ] || { echo "$0: $src is missing (KALDI_ROOT=$KALDI_ROOT)" >&2; exit 1; }
command -v pkwrap-chain-train >/dev/null || { echo "$0: pkwrap-chain-train is not on PATH (pip install pkwrap)" >&2; exit 1; }

n_train=$(grep -c 'steps/nnet3/chain/train.py' "$src" || true)
n_cuda=$(grep -c '^if ! cuda-compiled; then' "$src" || true)
if [ "$n_train" != 1 ] || [ "$n_cuda" != 1 ]; then
  echo "$0: $src has changed upstream (expected one train.py call and one cuda-compiled guard, found $n_train and $n_cuda); edit it by hand" >&2
  exit 1
fi
use_gpu=${USE_GPU:-true}
case $use_gpu in true|yes|wait|no|false) ;; *) echo "$0: USE_GPU=$use_gpu: expected true, no or wait" >&2; exit 1;; esac
tmp=$out.tmp.$$
sed -e 's#steps/nnet3/chain/train\.py#pkwrap-chain-train#' \
    -e 's#^if ! cuda-compiled; then#if false; then#' \
    -e "s#--use-gpu=true#--use-gpu=$use_gpu#" "$src" > $tmp
chmod +x $tmp && mv $tmp $out
exec $out "$@"
