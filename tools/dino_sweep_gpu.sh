#!/usr/bin/env bash
# DINO variants of the embedded default, pretrained and reported on one GPU
# (issue 10). Run from the repository root on the device machine with the
# carried world + cached encoders in .gpu_cache (XDG cache layout) and the
# wheels the image lacks in .whl (benchmarks/gpu_wheels.txt, first group):
#
#   bash tools/dino_sweep_gpu.sh            # writes to $OUT (default ./gpu_out)
#
# Every variant: tools/dino_sweep.py → pretrain_report (train split, 500
# images, no oracle CMPA). Deterministic GPU ops, so a variant trained twice
# (ibot1500 and ibot1500_rep) shows whether the snapshot is reproducible.
# base_s1 / ibot1500_s1 draw another pair (pretrain.seed=1, so the CLIP is
# pretrained too): a DINO gain must hold across encoder draws, whose spread
# is as large as the Table 3 steps on CPU (docs/diagnostics.md, session 23).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/sweep.log") 2>&1
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$PWD/.gpu_cache}"
PY="${PYTHON:-python3}"
echo "[sweep $(date +%T)] $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null), $(nproc) cores"
for w in grain array_record portpicker ml_collections; do
  "$PY" -c "import $w" 2>/dev/null || need=1
done
if [ -n "${need:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
if XLA_FLAGS=--xla_gpu_deterministic_ops=true "$PY" -c \
    "import jax; print('jax', jax.__version__, jax.devices())"; then
  export XLA_FLAGS=--xla_gpu_deterministic_ops=true
else
  echo "[sweep] --xla_gpu_deterministic_ops unknown here: running without"
fi
L=pretrain.dino
LONG="$L.steps=${LONG_STEPS:-1500},$L.warmup_steps=100,$L.teacher_momentum=0.996"
"$PY" tools/dino_sweep.py --config "${CONFIG:-configs/synthetic.py}" \
  --seed_cache "$XDG_CACHE_HOME/ssr_jax/encoders" --work /tmp/sweep \
  --jobs "${JOBS:-8}" --out "$OUT/summary.json" --tar "$OUT/encoders.tar" \
  --variant base: \
  --variant "ibot150:$L.ibot_weight=1" \
  --variant "long1500:$LONG" \
  --variant "ibot1500:$LONG,$L.ibot_weight=1" \
  --variant "ibot1500_rep:$LONG,$L.ibot_weight=1" \
  --variant "ibot1500_lr5e-4:$LONG,$L.ibot_weight=1,$L.lr=5e-4" \
  --variant "base_s1:pretrain.seed=1" \
  --variant "ibot1500_s1:$LONG,$L.ibot_weight=1,pretrain.seed=1" \
  ${SWEEP_ARGS:-}
rc=$?
tail -n 3 /tmp/sweep/*.log > "$OUT/variant_logs_tail.txt" 2>/dev/null
sha256sum /tmp/sweep/cache/*/dino-*/model.safetensors | sed "s|/tmp/sweep/cache/||"
echo "[sweep $(date +%T)] done, rc $rc"
exit $rc
