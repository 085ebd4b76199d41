#!/usr/bin/env bash
# The project's checks on one CUDA GPU, in three device calls of under 10 minutes, with a Markdown report of what ran.
#
# Where: the GPU machine (torch and triton there, no network, no deepspeed). Make the wheelhouse
# on the CPU machine first (bash scripts/gpu_wheelhouse.sh -> .whl/), then with the device tool:
#     run(carry=[".whl"], command="GPU_CHECK_STEPS=perf bash scripts/gpu_check.sh", timeout_s=600)
#     (then GPU_CHECK_STEPS=bench,tiny,example, then GPU_CHECK_STEPS=decode,pytest: see GPU_CHECK_STEPS below)
# (GPU_CHECK_COMMIT=$(git rev-parse --short HEAD) written out in that command names the commit in the
# report), or by hand, from the repository root: bash scripts/gpu_check.sh
#
# What it does:
#   1. fails at once, with one line, without a CUDA GPU;
#   2. installs the wheels of .whl/ that this Python lacks (or has too old) into /tmp/slimmoe-site
#      and puts that and the checkout on PYTHONPATH; fails if deepspeed still cannot be imported;
#   3. runs these steps, each with its own time limit (`timeout`), its own log, pass/fail and wall
#      seconds, going on after a failure (a step whose input failed is skipped):
#        pytest         pytest -m gpu over tests/kernels, tests/moe, tests/launch and tests/parallel/test_megatron.py
#        bench          moe bench kernels (default shapes, repeats and output file)
#        tiny-train     moe train configs/tiny.yaml on 1 GPU, then on its export:
#        tiny-export, tiny-eval, tiny-slim, tiny-generate
#        example-train  configs/gpu_example.yaml cut to 60 steps, 8 layers, seq 1024 (tokens/s, MFU)
#      and, only when GPU_CHECK_STEPS names them, issue 17's benchmarks:
#        perf group:
#        bench-layer    moe bench layer (the MoE layer vs deepspeed.moe vs the dense MLP, bf16)
#        bench-step     moe bench step (MoE vs dense-equivalent training step, eager and compiled;
#                       moe train vs a plain loop)
#        decode group:
#        decode-tiny    moe bench decode, tiny.yaml at batch 8 (growing cache, static, CUDA graph, compiled)
#        decode-example moe bench decode, gpu_example.yaml (8 layers) at batch 1, k = 1 and 64
#      Everything a step writes goes to a fresh work folder (GPU_CHECK_DIR, default under /tmp), apart
#      from moe bench kernels' default benchmarks/kernels-<gpu>.md and caches (Triton's, pytest's tmp).
#   4. writes benchmarks/gpu-<device>.md (header, table of steps, per step the command, status,
#      seconds, key lines and the log's tail), after every step, so a cut-off run still reports;
#      with $OUT set (the device tool) copies there: that report, kernels-<gpu>.md and
#      gpu-check-logs.tar.gz (the logs, metrics.jsonl files and small outputs);
#   5. prints a table of the steps and exits 1 if any step did not pass.
#
# Settings (environment):
#   PYTHON=python3               the interpreter (torch must import with it)
#   WHEELHOUSE=.whl              wheels to install where missing (scripts/gpu_wheelhouse.sh)
#   GPU_CHECK_SITE=/tmp/slimmoe-site   where they are installed (pip --target)
#   GPU_CHECK_DIR=...            work folder (default: a new /tmp/slimmoe-gpu-check.XXXXXX)
#   GPU_CHECK_TOTAL_S=570        the whole run's budget: a step never runs past it (its limit is cut,
#                                or it is skipped); the per-step limits below are each step's own cap
#   GPU_CHECK_LIMIT_PYTEST=330 GPU_CHECK_LIMIT_BENCH=300 GPU_CHECK_LIMIT_TINY_TRAIN=120
#   GPU_CHECK_LIMIT_TINY_EXPORT=40 GPU_CHECK_LIMIT_TINY_EVAL=90 GPU_CHECK_LIMIT_TINY_SLIM=120
#   GPU_CHECK_LIMIT_TINY_GENERATE=60 GPU_CHECK_LIMIT_EXAMPLE_TRAIN=180     (seconds)
#                                The limits are caps, about twice what each step took on one H100 on
#                                2026-11-26 with an empty Triton cache (benchmarks/gpu-*.md): the
#                                first run in a fresh machine compiles and autotunes every kernel.
#   GPU_CHECK_STEPS=pytest,bench,tiny,example   which groups run, in this order (also: perf, decode);
#                                with 30 device minutes and 10 per call, a session runs three calls,
#                                each with GPU_CHECK_TOTAL_S=570 and timeout_s=600 (the perf group grew
#                                after the first H100 run: bench step's eager cases now run, and two
#                                CUDA-graph cases came, so decode moved to the last call):
#                                GPU_CHECK_STEPS=perf, then bench,tiny,example, then decode,pytest
#   GPU_CHECK_LIMIT_BENCH_LAYER=150 GPU_CHECK_LIMIT_BENCH_STEP=400 GPU_CHECK_LIMIT_DECODE_TINY=180
#   GPU_CHECK_LIMIT_DECODE_EXAMPLE=90    (seconds, the perf and decode groups)
#   GPU_CHECK_PYTEST_ARGS, GPU_CHECK_BENCH_ARGS, GPU_CHECK_TINY_ARGS, GPU_CHECK_EXAMPLE_ARGS
#                                extra arguments of pytest, moe bench kernels and the two moe train runs
#                                (word-split), e.g. GPU_CHECK_TINY_ARGS="--set train.steps=100"
#   GPU_CHECK_COMMIT             the commit to name in the report (default: git rev-parse, or "unknown"
#                                where git cannot tell, as in a copy of the tree without .git)
#   GPU_CHECK_REPORT=benchmarks/gpu-<device>.md  (benchmarks/gpu-<device>-<groups>.md when
#                                GPU_CHECK_STEPS is not the default, so two runs keep two reports)
# The commands see the environment as it is: e.g. TORCH_CUDA_ARCH_LIST or SLIMMOE_TRITON_AUTOTUNE
# set before this script reach every step (the report's header shows them).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PYTHON=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/slimmoe-site}
TOTAL=${GPU_CHECK_TOTAL_S:-570}
GROUPS_TO_RUN=${GPU_CHECK_STEPS:-pytest,bench,tiny,example}
KILL_GRACE=10   # after the time limit's SIGINT, SIGKILL this many seconds later
RESERVE=10      # seconds kept for the report and the archive at the end
STARTED=$(date +%s)
DEADLINE=$((STARTED + TOTAL))

die() {
    echo "gpu_check: $*" >&2
    exit 1
}

command -v timeout >/dev/null 2>&1 || die "the timeout command (coreutils) is missing"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=...)"

# ----------------------------------------------------------------------------- 1. the GPU
# One line on stderr and status 1 without one (gpu_report.py prints it).
device_info=$("$PYTHON" scripts/gpu_report.py device) || exit 1
IFS=$'\t' read -r DEVICE SLUG DETAILS <<<"$device_info"

# ----------------------------------------------------------------------------- 2. packages
export PYTHONUNBUFFERED=1
shopt -s nullglob
wheels=("$WHEELHOUSE"/*.whl)
shopt -u nullglob
if [ "${#wheels[@]}" -gt 0 ]; then
    mapfile -t needed < <("$PYTHON" scripts/gpu_report.py plan-wheels "$WHEELHOUSE")
    if [ "${#needed[@]}" -gt 0 ]; then
        echo "gpu_check: installing ${#needed[@]} wheel(s) from $WHEELHOUSE into $SITE"
        PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --disable-pip-version-check --target "$SITE" "${needed[@]}" \
            || die "pip could not install the wheels of $WHEELHOUSE into $SITE (see above)"
    fi
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/bin:$PATH"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! ds_error=$("$PYTHON" -c 'import deepspeed' 2>&1 >/dev/null); then
    if [ "${#wheels[@]}" -eq 0 ]; then
        die "deepspeed cannot be imported and there is no $WHEELHOUSE/ with wheels: make it on the CPU" \
            "machine (bash scripts/gpu_wheelhouse.sh) and carry it (run(carry=[\".whl\"], ...))"
    fi
    die "deepspeed cannot be imported even with $WHEELHOUSE installed: $(echo "$ds_error" | tail -n 1)"
fi

# ----------------------------------------------------------------------------- 3. the steps
if [ -n "${GPU_CHECK_DIR:-}" ]; then
    WORK=$GPU_CHECK_DIR
    mkdir -p "$WORK" || die "cannot make $WORK"
else
    WORK=$(mktemp -d /tmp/slimmoe-gpu-check.XXXXXX) || die "cannot make a work folder under /tmp"
fi
RUN=$WORK/runs
LOGS=$WORK/logs
STEPS_TSV=$WORK/steps.tsv
mkdir -p "$RUN" "$LOGS" || die "cannot write to $WORK"
: >"$STEPS_TSV"
touch "$WORK/started"
if [ "$GROUPS_TO_RUN" = pytest,bench,tiny,example ]; then
    REPORT=${GPU_CHECK_REPORT:-benchmarks/gpu-$SLUG.md}
else
    REPORT=${GPU_CHECK_REPORT:-benchmarks/gpu-$SLUG-${GROUPS_TO_RUN//,/-}.md}
fi
KERNELS_MD=benchmarks/kernels-$SLUG.md   # moe bench kernels' default output
COMMIT=${GPU_CHECK_COMMIT:-}
if [ -z "$COMMIT" ]; then
    if COMMIT=$(git rev-parse --short HEAD 2>/dev/null); then
        git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT (with uncommitted changes)"
    else
        COMMIT=unknown
    fi
fi
OUT_DIR=${OUT:-}
[ -z "$OUT_DIR" ] || mkdir -p "$OUT_DIR"

echo "gpu_check: $DEVICE ($DETAILS); commit $COMMIT; work folder $WORK; budget $TOTAL s"

write_report() {
    "$PYTHON" scripts/gpu_report.py write --steps "$STEPS_TSV" --out "$REPORT" --device "$DEVICE" \
        --details "$DETAILS" --commit "$COMMIT" || echo "gpu_check: could not write $REPORT" >&2
    if [ -n "$OUT_DIR" ] && [ -f "$REPORT" ]; then cp "$REPORT" "$OUT_DIR/"; fi
}

declare -A RESULT
STEP_INDEX=0

# run_step NAME DEFAULT_LIMIT [--after STEP] -- COMMAND...
# The limit is GPU_CHECK_LIMIT_<NAME> (upper case, - as _) or the default, cut to what is left of
# GPU_CHECK_TOTAL_S. At the limit the command gets SIGINT (pytest then prints its summary, moe train
# saves and stops), SIGKILL KILL_GRACE seconds later.
run_step() {
    local name=$1 limit=$2 after=""
    shift 2
    if [ "${1:-}" = "--after" ]; then
        after=$2
        shift 2
    fi
    [ "${1:-}" = "--" ] && shift
    local var="GPU_CHECK_LIMIT_$(echo "$name" | tr '[:lower:]-' '[:upper:]_')"
    limit=${!var:-$limit}
    STEP_INDEX=$((STEP_INDEX + 1))
    local log
    log="$LOGS/$(printf %02d "$STEP_INDEX")-$name.log"
    local shown="" arg
    for arg in "$@"; do  # as a shell reads it back; plain words unquoted
        if [[ "$arg" =~ ^[A-Za-z0-9_./=,:+@%-]+$ ]]; then shown+="$arg "; else shown+="${arg@Q} "; fi
    done
    shown=${shown% }
    local status rc="-" seconds=0 note=""
    local left=$((DEADLINE - $(date +%s) - KILL_GRACE - RESERVE))
    if [ -n "$after" ] && [ "${RESULT[$after]:-}" != PASS ]; then
        status=SKIP
        note="skipped: $after did not pass"
    elif [ "$left" -lt 15 ]; then
        status=SKIP
        note="skipped: no time left of GPU_CHECK_TOTAL_S=$TOTAL"
    else
        if [ "$left" -lt "$limit" ]; then
            note="limit cut from $limit s to fit GPU_CHECK_TOTAL_S=$TOTAL"
            limit=$left
        fi
        echo "== [$STEP_INDEX] $name (limit $limit s): $shown"
        local began ended
        began=$(date +%s.%N)
        timeout -s INT -k "$KILL_GRACE" "$limit" "$@" >"$log" 2>&1 </dev/null
        rc=$?
        ended=$(date +%s.%N)
        seconds=$(awk -v a="$began" -v b="$ended" 'BEGIN { printf "%.1f", b - a }')
        if [ "$rc" -eq 0 ]; then
            status=PASS
        elif { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && awk -v s="$seconds" -v l="$limit" 'BEGIN { exit !(s >= l - 1) }'; then
            status=TIMEOUT
            note="${note:+$note; }stopped at the $limit s limit"
        else
            status=FAIL
        fi
    fi
    [ "$status" = SKIP ] && echo "$note" >"$log"
    RESULT[$name]=$status
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$seconds" "$limit" "$rc" "$log" "$shown" "$note" \
        >>"$STEPS_TSV"
    echo "   $name: $status ($seconds s${note:+; $note})"
    if [ "$status" = FAIL ] || [ "$status" = TIMEOUT ]; then
        tail -n 15 "$log" | tr '\r' '\n' | tail -n 15 | sed 's/^/   | /'
    fi
    write_report
}

on_signal() {
    echo "gpu_check: interrupted; the report so far is $REPORT" >&2
    write_report
    exit 130
}
trap on_signal INT TERM

# Without megatron-core (the GPU image lacks it) this file cannot even be collected; it has no gpu tests.
pytest_ignore=()
"$PYTHON" -c 'import megatron.core' >/dev/null 2>&1 || pytest_ignore=(--ignore=tests/moe/test_peer_parity.py)
read -r -a pytest_extra <<<"${GPU_CHECK_PYTEST_ARGS:-}"
read -r -a bench_extra <<<"${GPU_CHECK_BENCH_ARGS:-}"
read -r -a tiny_extra <<<"${GPU_CHECK_TINY_ARGS:-}"
read -r -a example_extra <<<"${GPU_CHECK_EXAMPLE_ARGS:-}"
MOE=("$PYTHON" -m launch.cli)
TINY=$RUN/tiny
CACHE=$RUN/cache

IFS=',' read -r -a groups <<<"$GROUPS_TO_RUN"
for group in "${groups[@]}"; do
    case $group in
    pytest)
        run_step pytest 330 -- "$PYTHON" -m pytest -q -m gpu tests/kernels tests/moe tests/launch tests/parallel/test_megatron.py \
            -p no:cacheprovider --durations=15 "${pytest_ignore[@]}" "${pytest_extra[@]}"
        ;;
    bench)
        run_step bench 300 -- "${MOE[@]}" bench kernels --json "$RUN/bench-kernels.json" "${bench_extra[@]}"
        ;;
    tiny)
        run_step tiny-train 120 -- "${MOE[@]}" train --config configs/tiny.yaml --nproc 1 \
            --set "out_dir=$TINY" --set "data.cache_dir=$CACHE" "${tiny_extra[@]}"
        run_step tiny-export 40 --after tiny-train -- "${MOE[@]}" export "$TINY/checkpoints" "$TINY/export"
        run_step tiny-eval 90 --after tiny-export -- "${MOE[@]}" eval --model "$TINY/export" --device cuda
        run_step tiny-slim 120 --after tiny-export -- "${MOE[@]}" slim --model "$TINY/export" --device cuda
        run_step tiny-generate 60 --after tiny-export -- "${MOE[@]}" generate --model "$TINY/export" \
            --prompt "def main(" --device cuda --max-new-tokens 64
        ;;
    example)
        # configs/gpu_example.yaml at 8 of its 16 layers and half its sequence length, 60 steps on the
        # built-in corpus; no validation, one checkpoint (at the end, which the trainer always writes).
        run_step example-train 180 -- "${MOE[@]}" train --config configs/gpu_example.yaml --nproc 1 \
            --set "out_dir=$RUN/gpu_example" --set data.path=null --set "data.cache_dir=$CACHE" \
            --set train.steps=60 --set model.num_layers=8 --set train.seq_len=1024 \
            --set train.warmup_steps=10 --set train.log_every=10 --set train.eval_every=0 \
            --set train.save_every=60 "${example_extra[@]}"
        # Its checkpoint is about 12 GB (bf16 weights, fp32 master weights and Adam moments).
        rm -rf "$RUN/gpu_example/checkpoints"
        ;;
    perf)
        run_step bench-layer 150 -- "${MOE[@]}" bench layer --json "$RUN/bench-layer.json"
        run_step bench-step 400 -- "${MOE[@]}" bench step --json "$RUN/bench-step.json" \
            --set "data.cache_dir=$CACHE" --set "out_dir=$RUN/bench-step"
        ;;
    decode)
        run_step decode-tiny 180 -- "${MOE[@]}" bench decode --config configs/tiny.yaml --batch 8 --compile \
            --json "$RUN/bench-decode-tiny.json"
        run_step decode-example 90 -- "${MOE[@]}" bench decode --config configs/gpu_example.yaml --batch 1 \
            --k 1,64 --set model.num_layers=8 --json "$RUN/bench-decode-example.json"
        ;;
    *)
        echo "gpu_check: unknown group '$group' in GPU_CHECK_STEPS (pytest, bench, tiny, example, perf, decode)" >&2
        ;;
    esac
done
trap - INT TERM

# ----------------------------------------------------------------------------- 4. report and archive
[ "$STEP_INDEX" -gt 0 ] || die "no step ran (GPU_CHECK_STEPS=$GROUPS_TO_RUN)"
write_report
archive=$WORK/gpu-check-logs.tar.gz
(
    cd "$WORK" || exit 1
    find logs steps.tsv runs -type f -size -8M \
        \( -name '*.log' -o -name '*.tsv' -o -name '*.jsonl' -o -name '*.json' -o -name '*.yaml' \
        -o -name '*.md' -o -name '*.csv' -o -name '*.txt' \) \
        -not -path '*/checkpoints/*' -not -path 'runs/cache/*' -print0 2>/dev/null \
        | tar -czf "$archive" --null -T -
) || echo "gpu_check: could not write $archive" >&2
if [ -n "$OUT_DIR" ]; then
    [ -f "$archive" ] && cp "$archive" "$OUT_DIR/"
    [ -f "$KERNELS_MD" ] && [ "$KERNELS_MD" -nt "$WORK/started" ] && cp "$KERNELS_MD" "$OUT_DIR/"
fi

echo
"$PYTHON" scripts/gpu_report.py table --steps "$STEPS_TSV"
echo "report: $REPORT   logs: $LOGS   archive: $archive${OUT_DIR:+   (copied to \$OUT)}"
failed=$(awk -F'\t' '$2 != "PASS"' "$STEPS_TSV" | wc -l)
[ "$failed" -eq 0 ] || exit 1
exit 0
