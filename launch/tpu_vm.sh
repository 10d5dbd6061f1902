#!/usr/bin/env bash
# Cloud TPU VM lifecycle for ssr_jax: create, set up, fetch data, train,
# evaluate, sync, delete; `all` re-creates a preempted VM and resumes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [options] COMMAND [-- extra ssr_jax.main flags]

Commands:
  create   create the TPU VM (--spot; --queued uses queued resources)
  setup    on every worker: ship the code (git archive of HEAD, or --repo),
           Python 3.11 venv, pip install -r requirements.txt -e . jax[tpu]
  data     on every worker: copy the dataset and weights from GCS
           (--data-mode rsync, default) or mount the bucket (gcsfuse)
  train    on every worker: python -m ssr_jax.main (resumes from the latest
           checkpoint in gs://.../runs/RUN/checkpoints automatically)
  eval     on every worker: the same with --config.mode=eval
  sync     copy worker 0's workdir (metrics, logs, tables) to GCS
  status   print the VM state (READY, PREEMPTED, ...)
  delete   delete the VM (and its queued resource)
  all      create (if missing), setup, data, train; if the VM was
           preempted, delete + re-create + resume (up to --max-restarts);
           then eval, sync and delete (unless --keep)

Options (environment variable in brackets):
  --name NAME          TPU VM name [TPU_NAME] (ssr-jax)
  --zone ZONE          [ZONE] (us-central2-b)
  --project PROJECT    [PROJECT] (gcloud's default)
  --accelerator TYPE   [ACCELERATOR] (v4-8)
  --runtime VERSION    TPU software version [TPU_RUNTIME]
                       (tpu-ubuntu2204-base)
  --spot               spot VM (cheaper, preemptible)
  --queued             create through `gcloud compute tpus queued-resources`
  --bucket gs://B/P    base of data, weights and runs [BUCKET] (required
                       for data/train/eval/sync/all)
  --data-src gs://...  dataset root in GCS [DATA_SRC] (BUCKET/data/DATASET;
                       VOC: the VOC2012 directory with SegmentationClassAug)
  --tfds-src gs://...  read a TFDS dataset instead of the raw files
                       [TFDS_SRC]: the data.tfds_dir it was built into,
                       copied to GCS (see below); `data` copies (rsync) or
                       mounts (gcsfuse) it, `train`/`eval` pass
                       --config.data.source=tfds, `setup` installs
                       requirements-tfds.txt
  --weights-src gs://  [WEIGHTS_SRC] (BUCKET/weights, holding the Hugging
                       Face snapshots clip-vit-base-patch16/ dino-vits16/)
  --data-mode MODE     rsync (copy to local disk) | gcsfuse (mount)
  --config SPEC        [CONFIG] (configs/voc.py:paper)
  --run NAME           run name [RUN_NAME] (DATASET-PRESET); the workdir is
                       ~/runs/NAME on the VM, synced to BUCKET/runs/NAME/
                       workdir; checkpoints go straight to
                       BUCKET/runs/NAME/checkpoints (every host writes its
                       shards; survives preemption)
  --repo URL           git URL to clone instead of shipping local HEAD
  --ref REF            branch or tag for --repo (default branch)
  --max-restarts N     [MAX_RESTARTS] (5), for `all`; after training
                       `all` waits PREEMPT_SETTLE_S (30) seconds before
                       asking the VM state, as a preempted VM can still
                       answer READY for a moment
  --keep               `all` leaves the VM running at the end
  --dry-run            print the commands instead of running them
  -h, --help           this text

Example:
  launch/tpu_vm.sh --spot --bucket gs://my-bucket/ssr --accelerator v4-8 all

TFDS (superpixels precomputed, no SLIC on the hosts): build it once on any
machine with the raw dataset, then copy it to the bucket:
  python -m ssr_jax.data.build --config configs/voc.py \
      --config.data.root=/data/VOC2012 --config.data.tfds_dir=/data/tfds
  gcloud storage rsync -r /data/tfds gs://my-bucket/ssr/tfds
  launch/tpu_vm.sh --bucket gs://my-bucket/ssr \
      --tfds-src gs://my-bucket/ssr/tfds all
EOF
}

NAME="${TPU_NAME:-ssr-jax}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
RUNTIME="${TPU_RUNTIME:-tpu-ubuntu2204-base}"
SPOT=0
QUEUED=0
BUCKET="${BUCKET:-}"
DATA_SRC="${DATA_SRC:-}"
TFDS_SRC="${TFDS_SRC:-}"
WEIGHTS_SRC="${WEIGHTS_SRC:-}"
DATA_MODE=rsync
CONFIG="${CONFIG:-configs/voc.py:paper}"
RUN_NAME="${RUN_NAME:-}"
REPO="${REPO:-}"
REF=""
MAX_RESTARTS="${MAX_RESTARTS:-5}"
KEEP_VM=0
COMMAND=""
EXTRA=()

while (($#)); do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --accelerator) ACCELERATOR="$2"; shift 2 ;;
    --runtime) RUNTIME="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --bucket) BUCKET="${2%/}"; shift 2 ;;
    --data-src) DATA_SRC="${2%/}"; shift 2 ;;
    --tfds-src) TFDS_SRC="${2%/}"; shift 2 ;;
    --weights-src) WEIGHTS_SRC="${2%/}"; shift 2 ;;
    --data-mode) DATA_MODE="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --run) RUN_NAME="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --ref) REF="$2"; shift 2 ;;
    --max-restarts) MAX_RESTARTS="$2"; shift 2 ;;
    --keep) KEEP_VM=1; shift ;;
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
[[ "$DATA_MODE" == rsync || "$DATA_MODE" == gcsfuse ]] ||
  die "--data-mode must be rsync or gcsfuse, not $DATA_MODE"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts must be a number"
[[ -z "$TFDS_SRC" || "$TFDS_SRC" == gs://* ]] ||
  die "--tfds-src must be a gs:// path (the built TFDS directory in GCS)"

config_names "$CONFIG"
RUN_NAME="${RUN_NAME:-$DEFAULT_RUN}"
QR_NAME="${NAME}-qr"
JAX_VERSION="$(jax_version)"
GCSFS_VERSION=2026.9.0

GCLOUD_LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_LOC+=(--project="$PROJECT")

need_bucket() {
  [[ "$BUCKET" == gs://* ]] ||
    die "--bucket gs://BUCKET[/PREFIX] is required for '$COMMAND'"
  DATA_SRC="${DATA_SRC:-$BUCKET/data/$DATASET}"
  WEIGHTS_SRC="${WEIGHTS_SRC:-$BUCKET/weights}"
  RUN_GCS="$BUCKET/runs/$RUN_NAME"
}

# Remote paths are written with $HOME, expanded by the VM's shell.
R_REPO='$HOME/ssr_jax'
R_VENV='$HOME/venv'
R_WEIGHTS='$HOME/weights'
R_WORKDIR="\$HOME/runs/$RUN_NAME"

remote_data_root() {
  if [[ "$DATA_MODE" == gcsfuse ]]; then
    local path="${DATA_SRC#gs://}"
    printf '%s' "\$HOME/gcs/${path#*/}"
  else
    printf '%s' "\$HOME/data/$DATASET"
  fi
}

# The TFDS data_dir on the VM: a local copy, or the gcsfuse mount.
remote_tfds_dir() {
  if [[ "$DATA_MODE" == gcsfuse ]]; then
    local path="${TFDS_SRC#gs://}"
    printf '%s' "\$HOME/gcs/${path#*/}"
  else
    printf '%s' "\$HOME/tfds"
  fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_LOC[@]}" \
    --worker=all --command="$1"
}

ssh_worker0() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_LOC[@]}" \
    --worker=0 --command="$1"
}

cmd_create() {
  local spot=()
  ((SPOT)) && spot=(--spot)
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources create "$QR_NAME" \
      --node-id="$NAME" "${GCLOUD_LOC[@]}" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" \
      "${spot[@]}"
    wait_queued
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_LOC[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${spot[@]}"
  fi
}

wait_queued() {
  local describe=(gcloud compute tpus queued-resources describe "$QR_NAME"
                  "${GCLOUD_LOC[@]}" --format='value(state.state)')
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${describe[@]}"
    return
  fi
  local state
  while :; do
    state="$("${describe[@]}")"
    echo "queued resource $QR_NAME: $state"
    case "$state" in
      ACTIVE) return ;;
      FAILED|SUSPENDED) die "queued resource $QR_NAME is $state" ;;
    esac
    sleep 30
  done
}

vm_state() {
  if [[ "$DRY_RUN" == 1 ]]; then
    run gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_LOC[@]}" \
      --format='value(state)' >&2
    echo READY
    return
  fi
  gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_LOC[@]}" \
    --format='value(state)' 2>/dev/null || echo MISSING
}

cmd_delete() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$QR_NAME" \
      "${GCLOUD_LOC[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_LOC[@]}" --quiet
  fi
}

cmd_setup() {
  if [[ -n "$REPO" ]]; then
    local branch=""
    [[ -n "$REF" ]] && branch="--branch $(_quote "$REF") "
    ssh_all "rm -rf $R_REPO && git clone --depth 1 ${branch}$(_quote "$REPO") $R_REPO"
  else
    if [[ "$DRY_RUN" != 1 ]] && [[ -n "$(git -C "$REPO_ROOT" status --porcelain)" ]]; then
      echo "warning: uncommitted changes are not shipped (git archive HEAD)" >&2
    fi
    local tarball="${TMPDIR:-/tmp}/ssr_jax-src.tar.gz"
    run git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" HEAD
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:ssr_jax-src.tar.gz" \
      "${GCLOUD_LOC[@]}" --worker=all
    ssh_all "rm -rf $R_REPO && mkdir -p $R_REPO && tar -xzf \$HOME/ssr_jax-src.tar.gz -C $R_REPO"
  fi
  # Ubuntu 22.04 ships Python 3.10; ssr_jax needs >= 3.11. gcsfs lets
  # Orbax (through etils.epath) list and commit gs:// checkpoint
  # directories; its version must equal fsspec's (2026.9.0 resolves with
  # requirements.txt).
  local tfds=""
  [[ -n "$TFDS_SRC" ]] && tfds=" -r requirements-tfds.txt"
  ssh_all "sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv && python3.11 -m venv $R_VENV && . $R_VENV/bin/activate && pip install -q -U pip && cd $R_REPO && pip install -r requirements.txt -e . \"jax[tpu]==$JAX_VERSION\" gcsfs==$GCSFS_VERSION$tfds -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
}

cmd_data() {
  need_bucket
  local weights="mkdir -p $R_WEIGHTS && gcloud storage rsync -r $WEIGHTS_SRC $R_WEIGHTS"
  if [[ "$DATA_MODE" == gcsfuse ]]; then
    local bucket_name="${BUCKET#gs://}"
    bucket_name="${bucket_name%%/*}"
    ssh_all "(command -v gcsfuse >/dev/null || (echo deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse)) && mkdir -p \$HOME/gcs && (mountpoint -q \$HOME/gcs || gcsfuse --implicit-dirs $bucket_name \$HOME/gcs) && $weights"
  elif [[ -n "$TFDS_SRC" ]]; then
    ssh_all "mkdir -p \$HOME/tfds && gcloud storage rsync -r $TFDS_SRC \$HOME/tfds && $weights"
  else
    ssh_all "mkdir -p \$HOME/data/$DATASET && gcloud storage rsync -r $DATA_SRC \$HOME/data/$DATASET && $weights"
  fi
}

main_flags() {
  local mode="$1" flags a
  flags="--config $(_quote "$CONFIG") --workdir $R_WORKDIR"
  flags+=" --config.mode=$mode"
  flags+=" --config.train.checkpoint_dir=$RUN_GCS/checkpoints"
  if [[ -n "$TFDS_SRC" ]]; then
    flags+=" --config.data.source=tfds --config.data.tfds_dir=$(remote_tfds_dir)"
  else
    flags+=" --config.data.root=$(remote_data_root)"
  fi
  flags+=" --config.model.clip_path=$R_WEIGHTS/clip-vit-base-patch16"
  flags+=" --config.model.dino_path=$R_WEIGHTS/dino-vits16"
  # Every worker runs one process; JAX reads the slice layout from the TPU
  # metadata server (a one-host slice gives one process).
  flags+=" --config.distributed.initialize=yes"
  for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do
    flags+=" $(_quote "$a")"
  done
  printf '%s' "$flags"
}

# The workdir is local (metrics, logs) and synced to GCS every 5 minutes
# and at the end; a re-created VM first pulls it back, so metrics.jsonl
# continues. Checkpoints are written to GCS directly.
remote_main() {
  local mode="$1"
  printf '%s' "set -u; . $R_VENV/bin/activate && cd $R_REPO && mkdir -p $R_WORKDIR && (gcloud storage rsync -r $RUN_GCS/workdir $R_WORKDIR >/dev/null 2>&1 || true); (while sleep 300; do gcloud storage rsync -r $R_WORKDIR $RUN_GCS/workdir >/dev/null 2>&1; done) & sync_pid=\$!; rc=0; python -m ssr_jax.main $(main_flags "$mode") || rc=\$?; kill \$sync_pid 2>/dev/null; gcloud storage rsync -r $R_WORKDIR $RUN_GCS/workdir; exit \$rc"
}

cmd_train() {
  need_bucket
  ssh_all "$(remote_main train)"
}

cmd_eval() {
  need_bucket
  ssh_all "$(remote_main eval)"
}

cmd_sync() {
  need_bucket
  ssh_worker0 "gcloud storage rsync -r $R_WORKDIR $RUN_GCS/workdir"
}

cmd_all() {
  need_bucket
  local restarts=0 rc state
  while :; do
    if [[ "$DRY_RUN" == 1 ]]; then
      cmd_create
    else
      state="$(vm_state)"
      if [[ "$state" != READY ]]; then
        # A VM left PREEMPTED/STOPPED by an earlier run is replaced.
        [[ "$state" == MISSING ]] || cmd_delete || true
        cmd_create
      fi
    fi
    cmd_setup
    cmd_data
    rc=0
    cmd_train || rc=$?
    [[ "$DRY_RUN" == 1 ]] || sleep "${PREEMPT_SETTLE_S:-30}"
    state="$(vm_state)"
    # Exit 75: the trainer got SIGTERM, saved and stopped (docs/errors.md).
    if [[ "$state" == READY && "$rc" != 75 ]]; then
      ((rc == 0)) || die "training failed (exit $rc) on a healthy VM; see $RUN_GCS/workdir/logs"
      break
    fi
    restarts=$((restarts + 1))
    ((restarts <= MAX_RESTARTS)) ||
      die "VM $NAME is $state after $MAX_RESTARTS restarts; giving up"
    if [[ "$state" == READY ]]; then
      echo "training was stopped by a signal (exit 75) on a healthy VM:" \
        "resuming (restart $restarts of $MAX_RESTARTS)" >&2
      continue
    fi
    echo "VM $NAME is $state (preempted?): re-creating and resuming" \
      "(restart $restarts of $MAX_RESTARTS)" >&2
    cmd_delete || true
  done
  cmd_eval
  cmd_sync
  ((KEEP_VM)) || cmd_delete
}

case "$COMMAND" in
  create) cmd_create ;;
  setup) cmd_setup ;;
  data) cmd_data ;;
  train) cmd_train ;;
  eval) cmd_eval ;;
  sync) cmd_sync ;;
  status) vm_state ;;
  delete) cmd_delete ;;
  all) cmd_all ;;
  *) usage >&2; die "unknown command $COMMAND" ;;
esac
