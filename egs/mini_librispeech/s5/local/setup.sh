#!/usr/bin/env bash
# Links Kaldi's shared scripts and mini_librispeech's own data-preparation scripts into this
# recipe (steps/, utils/, conf/, local/*.sh, local/nnet3/), so that only what pkwrap changes
# lives here. Safe to re-run.
set -euo pipefail
. ./path.sh
src=$KALDI_ROOT/egs/mini_librispeech/s5
for f in $src/run.sh $src/local/chain/tuning/run_tdnn_1k.sh $KALDI_ROOT/egs/wsj/s5/steps/nnet3/chain/train.py; do
  [ -f $f ] || { echo "$0: $f is missing: KALDI_ROOT=$KALDI_ROOT is not a full Kaldi checkout" >&2; exit 1; }
done
ln -sfn $KALDI_ROOT/egs/wsj/s5/steps steps
ln -sfn $KALDI_ROOT/egs/wsj/s5/utils utils
ln -sfn $src/conf conf
for f in download_and_untar.sh download_lm.sh data_prep.sh prepare_dict.sh format_lms.sh score.sh; do
  ln -sfn $src/local/$f local/$f
done
ln -sfn $src/local/nnet3 local/nnet3
