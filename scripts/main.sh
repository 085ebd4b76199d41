#!/usr/bin/env bash
# The main job on a fresh machine: train configs/tiny.yaml on 2 CPU ranks under the deepspeed
# launcher (a few minutes on a laptop-class CPU), export the final checkpoint, evaluate the export,
# quantize it to 4 bits for the ks it will be served at (GPTQ + EBSS + AGQ, calibrated at each of
# DEPLOY_KS as tasks on a local Ray), measure the quantized model beside the FP one at every k
# (moe slim), and print where everything is. Each run gets its own folder: nothing is overwritten.
#   NPROC=2           ranks (deepspeed launcher; on a GPU machine, GPUs)
#   RUN_DIR=runs/...  output folder (default: runs/tiny-<date>-<time>)
#   DEPLOY_KS=2,4     the active-expert counts the quantized model is calibrated for (below E = 8)
#   extra arguments go to `moe train`, e.g.  bash scripts/main.sh --set train.steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
RUN_DIR=${RUN_DIR:-runs/tiny-$(date +%Y%m%d-%H%M%S)}
MOE=.venv/bin/moe
DEPLOY_KS=${DEPLOY_KS:-2,4}

echo "== train: configs/tiny.yaml on $NPROC ranks -> $RUN_DIR"
"$MOE" train --config configs/tiny.yaml --nproc "$NPROC" --set out_dir="$RUN_DIR" "$@"
echo "== export: $RUN_DIR/checkpoints -> $RUN_DIR/export"
"$MOE" export "$RUN_DIR/checkpoints" "$RUN_DIR/export"
echo "== eval: $RUN_DIR/export"
"$MOE" eval --model "$RUN_DIR/export"
echo "== quantize: $RUN_DIR/export -> $RUN_DIR/export-w4 (GPTQ + EBSS + AGQ, 4 bits, calibrated at k = $DEPLOY_KS, local Ray)"
"$MOE" quantize --model "$RUN_DIR/export" --out "$RUN_DIR/export-w4" --method gptq --bits 4 --calib ebss --agq \
    --experts "$DEPLOY_KS"
echo "== slim: $RUN_DIR/export-w4 beside $RUN_DIR/export at every k"
"$MOE" slim --model "$RUN_DIR/export-w4"
cat <<DONE
== where things are
  logs (JSONL)     $RUN_DIR/metrics.jsonl
  TensorBoard      $RUN_DIR/tensorboard     (.venv/bin/tensorboard --logdir $RUN_DIR/tensorboard)
  checkpoints      $RUN_DIR/checkpoints     (continue: moe train --config configs/tiny.yaml --set out_dir=$RUN_DIR --resume)
  exported model   $RUN_DIR/export          (moe.load_pretrained("$RUN_DIR/export"); moe eval --model $RUN_DIR/export --k 2)
  4-bit model      $RUN_DIR/export-w4       (moe.load_pretrained("$RUN_DIR/export-w4"); moe quantize --help)
  4-bit vs FP by k $RUN_DIR/export-w4/slim  (slim.md, slim.png)
  resolved config  $RUN_DIR/config.yaml
DONE
