#!/usr/bin/env bash
# ssr_jax on GPUs: one process per node sees all of the node's GPUs; several
# nodes join through COORDINATOR_ADDRESS / NUM_NODES / NODE_RANK.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh [options] COMMAND [-- extra ssr_jax.main flags]

Commands:
  install  pip install -r requirements.txt -e . "jax[cuda12]==<pinned jax>"
           into the active Python environment (+ requirements-tfds.txt
           with --tfds-dir)
  build    build the TFDS dataset once: python -m ssr_jax.data.build
           --config CONFIG --config.data.root=DATA_ROOT
           --config.data.tfds_dir=TFDS_DIR (needs --data-root, --tfds-dir)
  train    python -m ssr_jax.main --config CONFIG --workdir WORKDIR ...
  eval     the same with --config.mode=eval

Options:
  --config SPEC      [CONFIG] (configs/voc.py:paper)
  --workdir DIR      [WORKDIR] (runs/DATASET-PRESET); resuming is automatic
                     from the latest checkpoint in it
  --data-root DIR    [DATA_ROOT] -> --config.data.root
  --tfds-dir DIR     [TFDS_DIR] read the TFDS dataset built there (local
                     path or gs:// bucket) instead of the raw files:
                     -> --config.data.source=tfds --config.data.tfds_dir
  --clip DIR         [CLIP_PATH] -> --config.model.clip_path
  --dino DIR         [DINO_PATH] -> --config.model.dino_path
  --dry-run          print the commands instead of running them
  -h, --help         this text

Several nodes: run this script once per node (e.g. under srun, see
launch/slurm_gpu.sbatch) with, in the environment,
  COORDINATOR_ADDRESS  host:port of node 0 (reachable from every node)
  NUM_NODES            number of nodes (processes)
  NODE_RANK            this node's rank, 0 .. NUM_NODES-1
which become --config.distributed.{coordinator_address,num_processes,
process_id} with --config.distributed.initialize=yes. With NUM_NODES unset
or 1, the run is single-process (all local GPUs, data parallel). Restrict
the GPUs with CUDA_VISIBLE_DEVICES.
EOF
}

CONFIG="${CONFIG:-configs/voc.py:paper}"
WORKDIR="${WORKDIR:-}"
DATA_ROOT="${DATA_ROOT:-}"
TFDS_DIR="${TFDS_DIR:-}"
CLIP_PATH="${CLIP_PATH:-}"
DINO_PATH="${DINO_PATH:-}"
COMMAND=""
EXTRA=()

while (($#)); do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --data-root) DATA_ROOT="$2"; shift 2 ;;
    --tfds-dir) TFDS_DIR="$2"; shift 2 ;;
    --clip) CLIP_PATH="$2"; shift 2 ;;
    --dino) DINO_PATH="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) usage >&2; die "unknown option $1" ;;
    *)
      [[ -z "$COMMAND" ]] || die "one command at a time (got $COMMAND, $1)"
      COMMAND="$1"; shift ;;
  esac
done
[[ -n "$COMMAND" ]] || { usage >&2; die "no command given"; }

config_names "$CONFIG"
WORKDIR="${WORKDIR:-runs/$DEFAULT_RUN}"

distributed_flags() {
  local n="${NUM_NODES:-1}"
  [[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 ]] || die "NUM_NODES=$n is not a count"
  if ((n == 1)); then
    return
  fi
  [[ -n "${COORDINATOR_ADDRESS:-}" ]] ||
    die "NUM_NODES=$n but COORDINATOR_ADDRESS (host:port of node 0) is unset"
  [[ "$COORDINATOR_ADDRESS" == *:* ]] ||
    die "COORDINATOR_ADDRESS=$COORDINATOR_ADDRESS must be host:port"
  [[ -n "${NODE_RANK:-}" ]] ||
    die "NUM_NODES=$n but NODE_RANK (this node's rank 0..$((n - 1))) is unset"
  [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$n" ]] ||
    die "NODE_RANK=$NODE_RANK must be in 0..$((n - 1))"
  DIST=(--config.distributed.initialize=yes
        "--config.distributed.coordinator_address=$COORDINATOR_ADDRESS"
        "--config.distributed.num_processes=$n"
        "--config.distributed.process_id=$NODE_RANK")
}

cmd_main() {
  local mode="$1" args
  DIST=()
  distributed_flags
  args=(-m ssr_jax.main --config "$CONFIG" --workdir "$WORKDIR"
        "--config.mode=$mode")
  if [[ -n "$TFDS_DIR" ]]; then
    args+=(--config.data.source=tfds "--config.data.tfds_dir=$TFDS_DIR")
  elif [[ -n "$DATA_ROOT" ]]; then
    args+=("--config.data.root=$DATA_ROOT")
  fi
  [[ -n "$CLIP_PATH" ]] && args+=("--config.model.clip_path=$CLIP_PATH")
  [[ -n "$DINO_PATH" ]] && args+=("--config.model.dino_path=$DINO_PATH")
  cd "$REPO_ROOT"
  # exec: the trainer itself receives SIGTERM (preemption, SLURM's
  # --signal) and saves a checkpoint before exiting.
  if [[ "$DRY_RUN" == 1 ]]; then
    run python "${args[@]}" "${DIST[@]+"${DIST[@]}"}" \
      "${EXTRA[@]+"${EXTRA[@]}"}"
  else
    exec python "${args[@]}" "${DIST[@]+"${DIST[@]}"}" \
      "${EXTRA[@]+"${EXTRA[@]}"}"
  fi
}

case "$COMMAND" in
  install)
    cd "$REPO_ROOT"
    tfds=()
    [[ -n "$TFDS_DIR" ]] && tfds=(-r requirements-tfds.txt)
    run python -m pip install -r requirements.txt -e . \
      "jax[cuda12]==$(jax_version)" "${tfds[@]+"${tfds[@]}"}"
    ;;
  build)
    [[ -n "$DATA_ROOT" ]] || die "build needs --data-root (the raw dataset)"
    [[ -n "$TFDS_DIR" ]] || die "build needs --tfds-dir (where to write it)"
    [[ "$TFDS_DIR" != *://* ]] ||
      die "build into a local --tfds-dir, then copy it to the bucket"
    cd "$REPO_ROOT"
    run python -m ssr_jax.data.build --config "$CONFIG" \
      "--config.data.root=$DATA_ROOT" "--config.data.tfds_dir=$TFDS_DIR" \
      "${EXTRA[@]+"${EXTRA[@]}"}"
    ;;
  train) cmd_main train ;;
  eval) cmd_main eval ;;
  *) usage >&2; die "unknown command $COMMAND" ;;
esac
