#!/usr/bin/env bash
# The whole GPU benchmark in one script: ssr_jax (float32 and bfloat16)
# against the PyTorch eager reference on one GPU, about 8 minutes on an H100.
#
#   bash benchmarks/gpu.sh
#
# Run from anywhere; it works in the repository root. Writes to $OUT (the
# device tool's folder; default ./gpu_out): gpu.json (the rows), gpu.log
# (this script's output) and workers.log (every worker's output).
#
# Nothing is downloaded. The machine's python3 must have CUDA jax and torch;
# packages the image lacks are installed from the wheels in .whl/ (see
# benchmarks/gpu_wheels.txt for the list and the download command), into
# /tmp/ssr_site, only when they are missing, or (flax, optax, orbax) when
# ssr_jax's CPU smoke test fails with the image's own versions.
#
# Environment: BENCH_BUDGET_S (seconds for benchmarks/run.py, default 420),
# BENCH_ROWS (default train_step,pseudo_labels,segment_ops,input_pipeline,
# eval), BENCH_DEVICE (default gpu; `cpu` tries this script on a CPU box),
# BENCH_ARGS (more run.py arguments, e.g. --quick), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
BUDGET="${BENCH_BUDGET_S:-420}"
ROWS="${BENCH_ROWS:-train_step,pseudo_labels,segment_ops,input_pipeline,eval}"
PY="${PYTHON:-python3}"
DEVICE="${BENCH_DEVICE:-gpu}"
SITE=/tmp/ssr_site
SCRATCH=/tmp/ssr_bench
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
exec > >(tee -a "$OUT/gpu.log") 2>&1
say() { echo "[gpu.sh $(date +%H:%M:%S)] $*"; }
START=$(date +%s)

say "repo $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  || say "nvidia-smi failed"

# --- 1. what the image has -----------------------------------------------------
"$PY" - <<'EOF'
import importlib
import sys

print("python", sys.version.split()[0], sys.executable)
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint",
             "ml_collections", "grain", "array_record", "portpicker",
             "transformers", "safetensors", "tokenizers", "skimage", "scipy",
             "PIL", "tqdm", "absl", "psutil", "torch", "pydensecrf"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:18s} {getattr(m, '__version__', 'ok')}")
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"  {name:18s} MISSING ({type(e).__name__}: {e})")
EOF

# --- 2. missing packages from the carried wheels -------------------------------
install() {  # wheel-name prefixes (as in the .whl file names)
  local files=() n f
  for n in "$@"; do
    for f in .whl/"$n"-*.whl; do [ -e "$f" ] && files+=("$f"); done
  done
  if [ ${#files[@]} -eq 0 ]; then
    say "no carried wheels for: $* (carry .whl, see benchmarks/gpu_wheels.txt)"
    return 1
  fi
  say "installing ${files[*]} into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" "${files[@]}" || return 1
  case ":${PYTHONPATH:-}:" in
    *":$SITE:"*) ;;
    *) export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" ;;
  esac
}
missing=()
for pair in grain:grain array_record:array_record portpicker:portpicker \
            ml_collections:ml_collections; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "missing: ${missing[*]}"
  install "${missing[@]}"
fi

# --- 3. does ssr_jax train here? (CPU, tiny encoders, ~20 s) -------------------
if ! JAX_PLATFORMS=cpu "$PY" benchmarks/run.py --smoke \
     --workdir /tmp/ssr_smoke 2>&1 | grep -v '^@@'; then
  say "smoke test failed with the image's flax/optax/orbax: using the pinned wheels"
  install flax optax orbax_checkpoint
  JAX_PLATFORMS=cpu "$PY" benchmarks/run.py --smoke --workdir /tmp/ssr_smoke2 \
    2>&1 | grep -v '^@@' || say "smoke test still fails; the rows will say why"
fi
"$PY" -c "import jax, torch; print('jax devices', jax.devices()); \
print('torch cuda', torch.cuda.is_available())" || say "device check failed"
say "setup took $(( $(date +%s) - START )) s; benchmark budget ${BUDGET} s"

# --- 3b. XLA self-check and real-shape GradCAM parity on this device -----------
# docs/known_issues.md: jit(vmap(vjp)) through LayerNorm vs float64 NumPy on
# the default backend (what main checks before training), then
# cam.initial_cams at ViT-B/16 shapes (401 tokens, width 768; B*K = 12, 24,
# 18) vs a per-class jax.grad loop and the torch reference, with JAX on the
# device (JAX_PLATFORMS unset for pytest, whose conftest would pick cpu) and
# float32 matmuls (no TF32: the tolerances are float32's). ~2 min.
"$PY" -c "import json, ssr_jax; from ssr_jax import xla_guard; \
print('xla self-check', json.dumps(xla_guard.report()))" \
  || say "XLA self-check FAILED (or could not run) on this device"
if "$PY" -c "import pytest" 2>/dev/null; then
  JAX_PLATFORMS="" JAX_DEFAULT_MATMUL_PRECISION=highest \
    "$PY" -m pytest -q -s -p no:cacheprovider -m "slow or not slow" \
    tests/test_gradcam_real_shapes.py 2>&1 | tail -n 20 \
    || say "real-shape GradCAM parity FAILED on this device"
else
  say "pytest missing: real-shape GradCAM parity skipped"
fi

# --- 4. the benchmark ----------------------------------------------------------
# shellcheck disable=SC2086 # BENCH_ARGS is a list of words
"$PY" benchmarks/run.py --device "$DEVICE" --rows "$ROWS" \
  --budget-s "$BUDGET" --workers "$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))" \
  --workdir "$SCRATCH" --json "$OUT/gpu.json" ${BENCH_ARGS:-}
status=$?
if [ -f "$SCRATCH/workers.log" ]; then
  tail -c 15000000 "$SCRATCH/workers.log" > "$OUT/workers.log"
fi
say "done in $(( $(date +%s) - START )) s (run.py exit $status)"
exit $status
