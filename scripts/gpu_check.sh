#!/usr/bin/env bash
# The GPU check: one command on a machine with an NVIDIA GPU and no network.
#
#   bash scripts/gpu_check.sh OUT_DIR
#
# 1. Installs the wheels that travel with the checkout ($WHEELS, default ./wheels, made by
#    scripts/gpu_wheels.sh where the registry is reachable: hydra-core, omegaconf, the antlr4 runtime and
#    the pinned timm) into a folder of their own (pip --no-index: nothing is downloaded), and names any
#    package still missing.
# 2. pytest -m cuda (tests/test_cuda.py): reducer logits CUDA vs CPU, no host sync in a training step,
#    a bf16-mixed training step of every model config, a 2-step train.py trainer=gpu run, SDPA's fused
#    kernels, the FFCV loader's GPU branch. Log and JUnit XML in OUT_DIR/pytest.*.
# 3. scripts/benchmark.py --device cuda --dtype bf16 on DeiT-S, EViT kr 0.5…0.9, Evo-ViT, ToMe r 13 and
#    the explicit-attention variants: eager (inference at batch 256 and a training step at batch 128) in
#    OUT_DIR/eager/, then torch.compile'd inference of DeiT-S, EViT kr 0.7, Evo-ViT and ToMe r 13 in
#    OUT_DIR/compile/, and eager inference of the baselines (Top-K, ATS padded to the batch's widest and
#    with static_width, DynamicViT, DiffRate 2.9, K-Medoids, DPC-KNN, PatchMerger) against DeiT-S in
#    OUT_DIR/baselines/ (benchmark.csv, benchmark.png in each).
#
# Bounded to well inside 9 minutes: every step runs under `timeout` (pytest 200 s, eager benchmark
# 100 s, compiled benchmark 130 s, baselines 60 s: 490 s at most, plus the installs), with few timed rounds (RUNS=5,
# WARMUP=2). A step that fails or times out is recorded in OUT_DIR/summary.txt and the next one still
# runs; the exit status is non-zero if any step failed.
#
# Settings (environment): PYTHON (default .venv/bin/python if present, else python3), WHEELS, DEVICE
# (cuda), DTYPE (bf16), BATCH (256), TRAIN_BATCH (128), RUNS (5), WARMUP (2), SKIP_PYTEST=1,
# PYTEST_TIMEOUT, EAGER_TIMEOUT, COMPILE_TIMEOUT, BASELINES_TIMEOUT. A dry run of the benchmark calls on a CPU:
#   DEVICE=cpu DTYPE=fp32 BATCH=1 TRAIN_BATCH=2 RUNS=1 WARMUP=0 SKIP_PYTEST=1 bash scripts/gpu_check.sh /tmp/x
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash scripts/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$ROOT"

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WHEELS="${WHEELS:-$ROOT/wheels}"
DEVICE="${DEVICE:-cuda}"
DTYPE="${DTYPE:-bf16}"
BATCH="${BATCH:-256}"
TRAIN_BATCH="${TRAIN_BATCH:-128}"
RUNS="${RUNS:-5}"
WARMUP="${WARMUP:-2}"
# The project is imported from the checkout (an editable install would need the network to build).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline HF_HUB_OFFLINE=1

SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to OUT/NAME.log, record the outcome
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUT/$name.log"
    if [ $rc -ne 0 ]; then FAILED=1; fi
    [ $rc -eq 124 ] && echo "   TIMED OUT after ${limit}s" | tee -a "$SUMMARY"
    echo "   exit $rc in $(( $(date +%s) - start ))s" | tee -a "$SUMMARY"
}

# --- the machine --------------------------------------------------------------------------------
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" | tee -a "$SUMMARY"

# --- packages: the wheels that travel with the checkout, then what is still missing ----------------
# Installed into a folder of their own, put first on the path: the image's packages stay as they are,
# and the pinned timm is the one imported even where the image has another.
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    SITE="${SITE:-${TMPDIR:-/tmp}/accel-gpu-site}"
    step install 120 "$PYTHON" -m pip install --no-index --no-deps --no-compile --upgrade --target "$SITE" \
        "$WHEELS"/*.whl
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
fi
missing=$("$PYTHON" - <<'EOF'
import importlib.util
mods = {"hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime", "timm": "timm",
        "pytorch_lightning": "pytorch-lightning", "torchmetrics": "torchmetrics", "pytest": "pytest",
        "rich": "rich", "matplotlib": "matplotlib"}
print(" ".join(p for m, p in mods.items() if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "missing packages: $missing. Make their wheels where the registry is reachable" \
         "(bash scripts/gpu_wheels.sh) and bring ./wheels with the checkout; the steps below will fail" | tee -a "$SUMMARY"
    FAILED=1
fi
"$PYTHON" -c "import importlib.metadata as m; print(*(f'{p} {m.version(p)}' for p in ('torch', 'timm', 'hydra-core', 'omegaconf', 'pytorch-lightning', 'torchmetrics')), sep=', ')" \
    2>&1 | tee -a "$OUT/machine.txt" "$SUMMARY"

# --- the cuda tests ------------------------------------------------------------------------------
if [ "${SKIP_PYTEST:-0}" != 1 ]; then
    step pytest "${PYTEST_TIMEOUT:-200}" "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider \
        --junitxml="$OUT/pytest.xml" tests/test_cuda.py
fi

# --- the benchmark -------------------------------------------------------------------------------
MODELS=(deit_s
        "evit_deit_s keep_rate=0.5,0.6,0.7,0.8,0.9"
        evo_deit_s
        "tome_deit_s reducer.r=13"
        "evit_deit_s keep_rate=0.7 reducer.explicit_attention=true"
        "evo_deit_s reducer.explicit_attention=true"
        "tome_deit_s reducer.r=13 reducer.explicit_attention=true")
COMMON=(--device "$DEVICE" --dtype "$DTYPE" --batch "$BATCH" --runs "$RUNS" --warmup "$WARMUP")
step bench_eager "${EAGER_TIMEOUT:-100}" "$PYTHON" scripts/benchmark.py "${MODELS[@]}" "${COMMON[@]}" \
    --train-batch "$TRAIN_BATCH" --out-dir "$OUT/eager"
# Compiled: inference only (benchmark.py compiles the inference forward; its training columns would
# repeat the eager ones), and one keep rate per method: each model is a separate inductor compilation
# (~20-40 s), and the explicit-attention comparison is the eager one.
COMPILED=(deit_s "evit_deit_s keep_rate=0.7" evo_deit_s "tome_deit_s reducer.r=13")
step bench_compile "${COMPILE_TIMEOUT:-130}" "$PYTHON" scripts/benchmark.py "${COMPILED[@]}" "${COMMON[@]}" \
    --compile --no-train --out-dir "$OUT/compile"
# The baselines at their papers' settings, eager inference only (their training is in the cuda tests).
BASELINES=(deit_s "topk_deit_s keep_rate=0.7" ats_deit_s "ats_deit_s reducer.static_width=true"
           "dynamicvit_deit_s keep_rate=0.7"
           "diffrate_deit_s reducer.schedule=2.9" "kmedoids_deit_s keep_rate=0.7" "dpcknn_deit_s keep_rate=0.7"
           "patchmerger_deit_s keep_rate=0.7")
step bench_baselines "${BASELINES_TIMEOUT:-60}" "$PYTHON" scripts/benchmark.py "${BASELINES[@]}" "${COMMON[@]}" \
    --no-train --out-dir "$OUT/baselines"

echo "== files" | tee -a "$SUMMARY"
(cd "$OUT" && ls -1 */benchmark.* pytest.xml 2>/dev/null) | tee -a "$SUMMARY"
exit $FAILED
