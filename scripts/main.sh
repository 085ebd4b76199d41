#!/usr/bin/env bash
# The main job on a fresh machine: train configs/tiny.yaml on 2 CPU ranks under the deepspeed
# launcher (a few minutes on a laptop-class CPU), export the final checkpoint, evaluate the export,
# quantize it to 4 bits (GPTQ + EBSS + AGQ, calibrated as tasks on a local Ray), evaluate that, and
# print where everything is. Each run gets its own folder, so nothing is ever overwritten.
#   NPROC=2           ranks (deepspeed launcher; on a GPU machine, GPUs)
#   RUN_DIR=runs/...  output folder (default: runs/tiny-<date>-<time>)
#   extra arguments go to `moe train`, e.g.  bash scripts/main.sh --set train.steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
RUN_DIR=${RUN_DIR:-runs/tiny-$(date +%Y%m%d-%H%M%S)}
MOE=.venv/bin/moe

echo "== train: configs/tiny.yaml on $NPROC ranks -> $RUN_DIR"
"$MOE" train --config configs/tiny.yaml --nproc "$NPROC" --set out_dir="$RUN_DIR" "$@"
echo "== export: $RUN_DIR/checkpoints -> $RUN_DIR/export"
"$MOE" export "$RUN_DIR/checkpoints" "$RUN_DIR/export"
echo "== eval: $RUN_DIR/export"
"$MOE" eval --model "$RUN_DIR/export"
echo "== quantize: $RUN_DIR/export -> $RUN_DIR/export-w4 (GPTQ + EBSS + AGQ, 4 bits, local Ray)"
"$MOE" quantize --model "$RUN_DIR/export" --out "$RUN_DIR/export-w4" --method gptq --bits 4 --calib ebss --agq
echo "== eval: $RUN_DIR/export-w4"
"$MOE" eval --model "$RUN_DIR/export-w4"
cat <<DONE
== where things are
  logs (JSONL)     $RUN_DIR/metrics.jsonl
  TensorBoard      $RUN_DIR/tensorboard     (.venv/bin/tensorboard --logdir $RUN_DIR/tensorboard)
  checkpoints      $RUN_DIR/checkpoints     (continue: moe train --config configs/tiny.yaml --set out_dir=$RUN_DIR --resume)
  exported model   $RUN_DIR/export          (moe.load_pretrained("$RUN_DIR/export"); moe eval --model $RUN_DIR/export --k 2)
  4-bit model      $RUN_DIR/export-w4       (moe.load_pretrained("$RUN_DIR/export-w4"); moe quantize --help)
  resolved config  $RUN_DIR/config.yaml
DONE
