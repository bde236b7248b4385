#!/usr/bin/env bash
# mini_librispeech (LibriSpeech train-clean-5 / dev-clean-2) with the chain model trained by
# pkwrap. Stages 0-8 are Kaldi's GMM stages of egs/mini_librispeech/s5/run.sh (data, lexicon,
# LMs, MFCCs, mono -> tri1 -> tri2b -> tri3b with pronunciation probabilities), run with your
# Kaldi's scripts; stage 9 is local/chain/run_tdnn.sh (tdnn_1k, trained by pkwrap-chain-train,
# decoded by Kaldi). See README.md.
#
#   export KALDI_ROOT=/path/to/kaldi   # built, with tools/openfst
#   ./run.sh [--stage N] [--data DIR] [--nj N]
set -euo pipefail
stage=0
data=./corpus            # where the downloaded corpus goes
data_url=www.openslr.org/resources/31
lm_url=www.openslr.org/resources/11
nj=5                     # parallel jobs of the GMM stages
decode_nj=10
while [ $# -gt 0 ]; do
  case $1 in
    --stage) stage=$2; shift 2;;
    --data) data=$2; shift 2;;
    --nj) nj=$2; shift 2;;
    --decode-nj) decode_nj=$2; shift 2;;
    *) echo "$0: unknown option $1 (options: --stage --data --nj --decode-nj)" >&2; exit 1;;
  esac
done
local/setup.sh
. ./cmd.sh
. ./path.sh

mkdir -p $data
if [ $stage -le 0 ]; then
  for part in dev-clean-2 train-clean-5; do
    local/download_and_untar.sh $data $data_url $part
  done
  local/download_lm.sh $lm_url $data data/local/lm
fi

if [ $stage -le 1 ]; then
  for part in dev-clean-2 train-clean-5; do
    local/data_prep.sh $data/LibriSpeech/$part data/${part//-/_}
  done
  local/prepare_dict.sh --stage 3 --nj $nj --cmd "$train_cmd" data/local/lm data/local/lm data/local/dict_nosp
  utils/prepare_lang.sh data/local/dict_nosp "<UNK>" data/local/lang_tmp_nosp data/lang_nosp
  local/format_lms.sh --src-dir data/lang_nosp data/local/lm
  utils/build_const_arpa_lm.sh data/local/lm/lm_tglarge.arpa.gz data/lang_nosp data/lang_nosp_test_tglarge
fi

if [ $stage -le 2 ]; then
  for part in dev_clean_2 train_clean_5; do
    steps/make_mfcc.sh --cmd "$train_cmd" --nj $nj data/$part exp/make_mfcc/$part mfcc
    steps/compute_cmvn_stats.sh data/$part exp/make_mfcc/$part mfcc
  done
  utils/subset_data_dir.sh --shortest data/train_clean_5 500 data/train_500short
fi

if [ $stage -le 3 ]; then   # monophones on the 500 shortest utterances
  steps/train_mono.sh --boost-silence 1.25 --nj $nj --cmd "$train_cmd" data/train_500short data/lang_nosp exp/mono
  steps/align_si.sh --boost-silence 1.25 --nj $nj --cmd "$train_cmd" data/train_clean_5 data/lang_nosp exp/mono exp/mono_ali_train_clean_5
fi

if [ $stage -le 4 ]; then   # delta + delta-delta triphones
  steps/train_deltas.sh --boost-silence 1.25 --cmd "$train_cmd" 2000 10000 data/train_clean_5 data/lang_nosp exp/mono_ali_train_clean_5 exp/tri1
  steps/align_si.sh --nj $nj --cmd "$train_cmd" data/train_clean_5 data/lang_nosp exp/tri1 exp/tri1_ali_train_clean_5
fi

if [ $stage -le 5 ]; then   # LDA + MLLT
  steps/train_lda_mllt.sh --cmd "$train_cmd" --splice-opts "--left-context=3 --right-context=3" 2500 15000 \
    data/train_clean_5 data/lang_nosp exp/tri1_ali_train_clean_5 exp/tri2b
  steps/align_si.sh --nj $nj --cmd "$train_cmd" --use-graphs true data/train_clean_5 data/lang_nosp exp/tri2b exp/tri2b_ali_train_clean_5
fi

if [ $stage -le 6 ]; then   # LDA + MLLT + SAT
  steps/train_sat.sh --cmd "$train_cmd" 2500 15000 data/train_clean_5 data/lang_nosp exp/tri2b_ali_train_clean_5 exp/tri3b
fi

if [ $stage -le 7 ]; then   # pronunciation and silence probabilities; the final lang and LMs
  steps/get_prons.sh --cmd "$train_cmd" data/train_clean_5 data/lang_nosp exp/tri3b
  utils/dict_dir_add_pronprobs.sh --max-normalize true data/local/dict_nosp \
    exp/tri3b/pron_counts_nowb.txt exp/tri3b/sil_counts_nowb.txt exp/tri3b/pron_bigram_counts_nowb.txt data/local/dict
  utils/prepare_lang.sh data/local/dict "<UNK>" data/local/lang_tmp data/lang
  local/format_lms.sh --src-dir data/lang data/local/lm
  utils/build_const_arpa_lm.sh data/local/lm/lm_tglarge.arpa.gz data/lang data/lang_test_tglarge
  steps/align_fmllr.sh --nj $nj --cmd "$train_cmd" data/train_clean_5 data/lang exp/tri3b exp/tri3b_ali_train_clean_5
fi

if [ $stage -le 8 ]; then   # the GMM baseline
  utils/mkgraph.sh data/lang_test_tgsmall exp/tri3b exp/tri3b/graph_tgsmall
  steps/decode_fmllr.sh --nj $decode_nj --cmd "$decode_cmd" exp/tri3b/graph_tgsmall data/dev_clean_2 exp/tri3b/decode_tgsmall_dev_clean_2
  steps/lmrescore_const_arpa.sh --cmd "$decode_cmd" data/lang_test_{tgsmall,tglarge} \
    data/dev_clean_2 exp/tri3b/decode_{tgsmall,tglarge}_dev_clean_2
fi

if [ $stage -le 9 ]; then   # the chain model, trained by pkwrap, decoded by Kaldi
  local/chain/run_tdnn.sh --decode-nj $decode_nj
fi

for x in exp/tri3b/decode_* exp/chain*/*/decode_*; do
  [ -d $x ] && grep WER $x/wer_* | utils/best_wer.sh
done
exit 0
