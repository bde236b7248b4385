#!/usr/bin/env bash
# The embedded spoken-digits recipe: espeak-ng corpus -> fbank -> flat-start chain
# graphs -> TDNN-F trained with LF-MMI + NG-SGD under torchrun -> digit-loop decoding
# -> test WER on voices never heard in training.
#
#   ./run.sh                               # everything (about 4 minutes on 2 CPU cores)
#   ./run.sh --stage 4                     # retrain from scratch, then decode
#   ./run.sh --stage 5                     # decode again
#   ./run.sh --stage 3 --stop-stage 3      # only the graphs
#
# Each stage leaves a marker <exp>/.done.<stage>; a later call skips finished stages,
# so a killed run just continues (training resumes from its last checkpoint).
# Passing --stage N re-runs stages N.. even if they finished (training from scratch).
set -euo pipefail

stage=0
stop_stage=100
nj=2                    # parallel jobs for synthesis
nproc=2                 # torchrun --nproc_per_node (training processes)
seed=0                  # corpus (voices split, utterances) and training seed
data=data
exp=exp/chain
corpus=corpus
# corpus size (local/synth_corpus.py)
train_utts_per_voice=50
valid_utts_per_voice=25
test_utts_per_voice=30
num_valid_voices=4
num_test_voices=10
# model and training (train.py)
train_opts=""
decode_opts=""

# graph options (tree_type, ngram_order, ...): conf/chain.conf, overridable below
. "$(dirname "$0")/conf/chain.conf"

usage() {
  sed -n '2,13p' "$0"
  echo "options (default): --stage ($stage) --stop-stage ($stop_stage) --nj ($nj) --nproc ($nproc) --seed ($seed)"
  echo "  --data ($data) --exp ($exp) --corpus ($corpus) --train-utts-per-voice ($train_utts_per_voice)"
  echo "  --valid-utts-per-voice ($valid_utts_per_voice) --test-utts-per-voice ($test_utts_per_voice)"
  echo "  --num-valid-voices ($num_valid_voices) --num-test-voices ($num_test_voices)"
  echo "  --train-opts '<extra train.py options>' --decode-opts '<extra decode.py options>'"
  echo "  graphs (conf/chain.conf): --tree-type ($tree_type) --ngram-order ($ngram_order)"
  echo "  --no-prune-ngram-order ($no_prune_ngram_order) --num-extra-lm-states ($num_extra_lm_states)"
  echo "  --edge-silprob ($edge_silprob) --between-silprob ($between_silprob) --lm-copies ($lm_copies)"
}

stage_given=false
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --*=*) name="${1%%=*}"; value="${1#*=}"; shift ;;
    --*) [ $# -ge 2 ] || { echo "run.sh: option $1 needs a value" >&2; exit 1; }
         name="$1"; value="$2"; shift 2 ;;
    *) echo "run.sh: unexpected argument '$1' (see --help)" >&2; exit 1 ;;
  esac
  var="${name#--}"; var="${var//-/_}"
  case "$var" in
    stage|stop_stage|nj|nproc|seed|data|exp|corpus|train_utts_per_voice|valid_utts_per_voice|\
test_utts_per_voice|num_valid_voices|num_test_voices|train_opts|decode_opts|tree_type|\
ngram_order|no_prune_ngram_order|num_extra_lm_states|edge_silprob|between_silprob|lm_copies)
      printf -v "$var" '%s' "$value" ;;
    *) echo "run.sh: unknown option $name (see --help)" >&2; exit 1 ;;
  esac
  [ "$var" = stage ] && stage_given=true
done

recipe=$(cd "$(dirname "$0")" && pwd)
. "$recipe/path.sh"
# two cores: keep each process at one OpenMP/MKL thread (torchrun runs $nproc of them)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

log() {
  # like icefall's: time, file:line, message
  local fname=${BASH_SOURCE[1]##*/}
  echo -e "$(date '+%Y-%m-%d %H:%M:%S') (${fname}:${BASH_LINENO[0]}:${FUNCNAME[1]}) $*"
}

mkdir -p "$exp"
fresh_train=false
if $stage_given; then
  # re-running training explicitly starts it afresh (a plain re-run resumes instead)
  if [ "$stage" -le 4 ] && [ "$stop_stage" -ge 4 ]; then fresh_train=true; fi
  for m in "$exp"/.done.*; do
    [ -e "$m" ] || continue
    n=${m##*.}
    if [ "$n" -ge "$stage" ] && [ "$n" -le "$stop_stage" ]; then rm -f "$m"; fi
  done
fi

# run_stage N: true if stage N is in [stage, stop_stage] and not done yet
run_stage() {
  [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ] || return 1
  if [ -f "$exp/.done.$1" ]; then log "stage $1: already done ($exp/.done.$1)"; return 1; fi
  return 0
}
done_stage() { touch "$exp/.done.$1"; }

start=$(date +%s)

if run_stage 0; then
  log "stage 0: synthesize the spoken-digit corpus with espeak-ng (split by voice)"
  python3 "$recipe/local/synth_corpus.py" --accents "$recipe/conf/accents.txt" \
    --out-dir "$data" --wav-dir "$corpus/wav" --nj "$nj" \
    --train-utts-per-voice "$train_utts_per_voice" --valid-utts-per-voice "$valid_utts_per_voice" \
    --test-utts-per-voice "$test_utts_per_voice" --num-valid-voices "$num_valid_voices" \
    --num-test-voices "$num_test_voices" --seed "$seed"
  done_stage 0
fi

if run_stage 1; then
  log "stage 1: 40-dim fbank features (kaldi-native-fbank)"
  for part in train valid test; do
    python3 "$recipe/local/compute_fbank.py" --config "$recipe/conf/fbank.conf" "$data/$part"
  done
  done_stage 1
fi

if run_stage 2; then
  log "stage 2: lexicon and phone set from espeak-ng's phonemes"
  python3 "$recipe/local/prepare_lang.py" --accents "$recipe/conf/accents.txt" "$data/lang"
  done_stage 2
fi

if run_stage 3; then
  log "stage 3: flat-start chain graphs: topology, $tree_type tree, phone LM, den.fst, normalization.fst"
  lang=$data/lang
  ids() { awk 'NR==FNR{a[$1]; next} ($1 in a){print $2}' "$1" "$lang/phones.txt" | paste -sd:; }
  sil=$(ids "$lang/silence_phones.txt")
  chain-gen-topo "$(ids "$lang/nonsilence_phones.txt")" "$sil" > "$exp/topo"
  chain-init-tree --type="$tree_type" --ci-phones="$sil" "$exp/topo" "$exp/0.trans_mdl" "$exp/tree"
  python3 "$recipe/local/text_to_phones.py" --int --copies "$lm_copies" --all-word-pairs --edge-silprob "$edge_silprob" \
    --between-silprob "$between_silprob" "$lang" "$data/train/text" > "$exp/phone_seqs.txt"
  chain-est-phone-lm --ngram-order="$ngram_order" --no-prune-ngram-order="$no_prune_ngram_order" \
    --num-extra-lm-states="$num_extra_lm_states" "ark:$exp/phone_seqs.txt" "$exp/phone_lm.fst"
  chain-make-den-fst "$exp/tree" "$exp/0.trans_mdl" "$exp/phone_lm.fst" \
    "$exp/den.fst" "$exp/normalization.fst"
  done_stage 3
fi

if run_stage 4; then
  log "stage 4: train the TDNN-F with LF-MMI and NG-SGD (torchrun --nproc_per_node=$nproc)"
  if $fresh_train; then
    rm -rf "$exp/checkpoints" "$exp/tensorboard" "$exp/log" "$exp/final.pt" "$exp/model.json"
  fi
  torchrun --standalone --nproc_per_node="$nproc" "$recipe/train.py" \
    --data "$data" --exp "$exp" --seed "$seed" $train_opts
  done_stage 4
fi

if run_stage 5; then
  log "stage 5: digit-loop decoding graph and decoding of the test voices"
  python3 "$recipe/decode.py" --data "$data" --exp "$exp" --part test $decode_opts
  done_stage 5
fi

log "finished stages $stage..$stop_stage in $(( $(date +%s) - start )) s"
if [ -f "$exp/decode_test/wer" ]; then
  log "test WER (unseen voices): $(cat "$exp/decode_test/wer")"
fi
