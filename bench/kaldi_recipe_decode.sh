#!/usr/bin/env bash
# Decode the kaldi_recipe fixture's test set with REAL Kaldi (nnet3-latgen-faster) using a
# chain dir's final.mdl, and score it as steps/nnet3/decode.sh + steps/score_kaldi.sh do
# (--acwt 1.0 --post-decode-acwt 10.0; LM weight 7..17, word-insertion penalty 0/0.5/1; best
# WER over that grid, as Kaldi reports it). Also checks that Kaldi reads the model
# (nnet3-am-info) and that nnet3-chain-train accepts it for one minibatch of Kaldi's egs.
#
#   bench/kaldi_recipe_decode.sh KALDI_SRC FIXTURE CHAIN_DIR OUT_DIR
# e.g. bench/kaldi_recipe_decode.sh /work/kaldi/src ../shared/fixtures/kaldi_recipe \
#        /tmp/run/exp/chain/tdnn /tmp/dec_pkwrap
# Run it on the fixture's own exp/chain/tdnn for Kaldi's figure computed the same way.
# Needs Kaldi's nnet3bin, chainbin, latbin, bin (shared/tools/build_kaldi.sh). Online CMVN of
# the test features: Kaldi's apply-cmvn-online if built (RECIPE=1), else pkwrap's (equal to
# Kaldi's; tests/test_lattice_egs.py).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
K=$1; FIX=$(cd "$2" && pwd); DIR=$(cd "$3" && pwd); OUT=$4
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PATH=$K/nnet3bin:$K/chainbin:$K/latbin:$K/bin:$K/online2bin:$K/fstbin:$PATH
cd "$FIX"
nnet3-am-info "$DIR/final.mdl" > "$OUT/am_info.txt"
echo "nnet3-am-info: $(grep -m1 num-parameters "$OUT/am_info.txt")"
# one minibatch of nnet3-chain-train on Kaldi's egs, starting from this final.mdl
nnet3-am-copy --raw=true "$DIR/final.mdl" "$OUT/final.raw" 2> "$OUT/am_copy.log"
nnet3-chain-copy-egs ark:exp/chain/tdnn/egs/valid_diagnostic.cegs ark:- 2>/dev/null | \
  nnet3-chain-merge-egs --minibatch-size=32 ark:- ark:"$OUT/one_mb.cegs" 2> "$OUT/merge.log"
nnet3-chain-train --use-gpu=no --xent-regularize=0.1 --leaky-hmm-coefficient=0.1 \
  "$OUT/final.raw" exp/chain/tdnn/den.fst ark:"$OUT/one_mb.cegs" \
  "$OUT/trained.raw" > "$OUT/chain_train.log" 2>&1 || { tail -5 "$OUT/chain_train.log"; exit 1; }
echo "nnet3-chain-train: $(grep -m1 'Overall average objective' "$OUT/chain_train.log" || tail -1 "$OUT/chain_train.log")"

d=data/test_hires
if command -v apply-cmvn-online >/dev/null 2>&1 && [ -x "$K/online2bin/apply-cmvn-online" ]; then
  apply-cmvn-online --config=conf/online_cmvn.conf --spk2utt=ark:$d/spk2utt \
    "$DIR/global_cmvn.stats" scp:$d/feats.scp ark:"$OUT/feats.ark" 2> "$OUT/cmvn.log"
  echo "online CMVN: Kaldi's apply-cmvn-online"
else
  python3 "$HERE/../scripts/apply-cmvn-online" --config=conf/online_cmvn.conf \
    --spk2utt=ark:$d/spk2utt "$DIR/global_cmvn.stats" scp:$d/feats.scp ark:"$OUT/feats.ark" 2> "$OUT/cmvn.log"
  echo "online CMVN: pkwrap's apply-cmvn-online (Kaldi's online2bin not built)"
fi
G=exp/chain/tdnn/graph
fpc=$(cut -d, -f1 < exp/chain/tdnn/egs/info/frames_per_eg)
/usr/bin/time -f "%e s" -o "$OUT/latgen.time" \
nnet3-latgen-faster --online-ivectors=scp:exp/nnet3/ivectors_test_hires/ivector_online.scp \
  --online-ivector-period=$(cat exp/nnet3/ivectors_test_hires/ivector_period) \
  --frame-subsampling-factor=$(cat "$DIR/frame_subsampling_factor") --frames-per-chunk=$fpc \
  --extra-left-context=0 --extra-right-context=0 --extra-left-context-initial=-1 \
  --extra-right-context-final=-1 --minimize=false --max-active=7000 --min-active=200 \
  --beam=15.0 --lattice-beam=8.0 --acoustic-scale=1.0 --allow-partial=true \
  --word-symbol-table=$G/words.txt "$DIR/final.mdl" $G/HCLG.fst ark:"$OUT/feats.ark" \
  "ark:|lattice-scale --acoustic-scale=10.0 ark:- ark:$OUT/lat.ark" 2> "$OUT/latgen.log"
grep -o "Overall log-likelihood per frame.*" "$OUT/latgen.log" || true
# scoring as steps/score_kaldi.sh (text filtering is a no-op for this vocabulary)
best=""; bestn=1000000
for wip in 0.0 0.5 1.0; do
  for lmwt in $(seq 7 17); do
    lattice-scale --inv-acoustic-scale=$lmwt ark:"$OUT/lat.ark" ark:- 2>/dev/null | \
      lattice-add-penalty --word-ins-penalty=$wip ark:- ark:- 2>/dev/null | \
      lattice-best-path --word-symbol-table=$G/words.txt ark:- ark,t:- 2>/dev/null | \
      awk 'NR==FNR{w[$2]=$1; next} {printf "%s", $1; for(i=2;i<=NF;i++) printf " %s", w[$i]; print ""}' $G/words.txt - \
      > "$OUT/hyp_${lmwt}_${wip}.txt"
    compute-wer --text --mode=present ark:$d/text ark:"$OUT/hyp_${lmwt}_${wip}.txt" > "$OUT/wer_${lmwt}_${wip}" 2>/dev/null
    n=$(grep WER "$OUT/wer_${lmwt}_${wip}" | awk '{print $4}')
    if [ "$n" -lt "$bestn" ]; then bestn=$n; best="$(grep WER "$OUT/wer_${lmwt}_${wip}") wer_${lmwt}_${wip}"; fi
  done
done
echo "$best" | tee "$OUT/best_wer"
