"""Tests for the launch scripts: syntax, usage, errors, and that each
--dry-run path prints the expected gcloud / pip / python commands."""

import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh"))
                 + glob.glob(os.path.join(ROOT, "launch", "*.sbatch")))
with open(os.path.join(ROOT, "requirements.txt")) as _f:
    JAX_PIN = re.search(r"^jax==(\S+)", _f.read(), re.MULTILINE).group(1)


def _sh(script, *args, env=None):
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}
    base.update(env or {})
    return subprocess.run(["bash", os.path.join(ROOT, "launch", script),
                           *args], capture_output=True, text=True,
                          env=base, timeout=30, check=False)


def _ok(script, *args, env=None):
    r = _sh(script, *args, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _lines(out):
    return [ln for ln in out.splitlines() if ln.startswith("+ ")]


def test_all_scripts_parse_and_are_strict():
    assert {os.path.basename(s) for s in SCRIPTS} >= {
        "tpu_vm.sh", "gpu.sh", "slurm_gpu.sbatch", "_common.sh"}
    for s in SCRIPTS:
        r = subprocess.run(["bash", "-n", s], capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0, (s, r.stderr)
        text = open(s).read()
        if not s.endswith("_common.sh"):
            assert "set -euo pipefail" in text, s
            assert "--dry-run" in text, s


@pytest.mark.parametrize("script", ["tpu_vm.sh", "gpu.sh",
                                    "slurm_gpu.sbatch"])
def test_help(script):
    out = _ok(script, "--help")
    assert "--dry-run" in out


def test_tpu_all_spot_sequence():
    out = _ok("tpu_vm.sh", "--dry-run", "--spot", "--bucket", "gs://bk/ssr",
              "--accelerator", "v4-16", "--zone", "us-central2-b",
              "--project", "proj", "all", "--", "--config.train.num_steps=9")
    cmds = _lines(out)
    joined = "\n".join(cmds)
    order = ["tpu-vm create ssr-jax", "git -C", "tpu-vm scp",
             "python3.11 -m venv", "gcloud storage rsync -r gs://bk/ssr/data",
             "--config.mode=train", "--config.mode=eval", "--worker=0",
             "tpu-vm delete ssr-jax"]
    pos = [joined.index(k) for k in order]
    assert pos == sorted(pos), order
    assert ("gcloud compute tpus tpu-vm create ssr-jax --zone=us-central2-b "
            "--project=proj --accelerator-type=v4-16 "
            "--version=tpu-ubuntu2204-base --spot") in joined
    assert (f'pip install -r requirements.txt -e . "jax[tpu]=={JAX_PIN}" '
            "gcsfs==2026.9.0 -f https://storage.googleapis.com/jax-releases/"
            "libtpu_releases.html") in joined
    train = next(c for c in cmds if "--config.mode=train" in c)
    for part in ["--worker=all",
                 "python -m ssr_jax.main --config configs/voc.py:paper "
                 "--workdir $HOME/runs/voc-paper",
                 "--config.train.checkpoint_dir="
                 "gs://bk/ssr/runs/voc-paper/checkpoints",
                 "--config.data.root=$HOME/data/voc",
                 "--config.model.clip_path=$HOME/weights/"
                 "clip-vit-base-patch16",
                 "--config.model.dino_path=$HOME/weights/dino-vits16",
                 "--config.distributed.initialize=yes",
                 "--config.train.num_steps=9",
                 "gcloud storage rsync -r gs://bk/ssr/runs/voc-paper/workdir"
                 " $HOME/runs/voc-paper",
                 "exit $rc"]:
        assert part in train, part


def test_tpu_queued_create_and_delete():
    out = _ok("tpu_vm.sh", "--dry-run", "--queued", "--spot", "--name", "n1",
              "create")
    assert ("gcloud compute tpus queued-resources create n1-qr --node-id=n1 "
            "--zone=us-central2-b --accelerator-type=v4-8 "
            "--runtime-version=tpu-ubuntu2204-base --spot") in out
    assert "queued-resources describe n1-qr" in out
    out = _ok("tpu_vm.sh", "--dry-run", "--queued", "--name", "n1",
              "delete")
    assert "queued-resources delete n1-qr --zone=us-central2-b --force" in out


def test_tpu_data_modes_and_repo_setup():
    out = _ok("tpu_vm.sh", "--dry-run", "--bucket", "gs://bk/p",
              "--config", "configs/coco.py:weclip", "data")
    assert ("gcloud storage rsync -r gs://bk/p/data/coco $HOME/data/coco"
            in out)
    assert "gcloud storage rsync -r gs://bk/p/weights $HOME/weights" in out
    out = _ok("tpu_vm.sh", "--dry-run", "--bucket", "gs://bk/p",
              "--data-mode", "gcsfuse", "data")
    assert "gcsfuse --implicit-dirs bk $HOME/gcs" in out
    out = _ok("tpu_vm.sh", "--dry-run", "--bucket", "gs://bk/p",
              "--data-mode", "gcsfuse", "train")
    assert "--config.data.root=$HOME/gcs/p/data/voc" in out
    out = _ok("tpu_vm.sh", "--dry-run", "--repo",
              "https://github.com/o/ssr_jax.git", "--ref", "v1", "setup")
    assert ("git clone --depth 1 --branch v1 "
            "https://github.com/o/ssr_jax.git $HOME/ssr_jax") in out
    assert "git -C" not in out
    out = _ok("tpu_vm.sh", "--dry-run", "--bucket", "gs://bk/p", "--run",
              "exp1", "eval")
    assert "--workdir $HOME/runs/exp1 --config.mode=eval" in out


@pytest.mark.parametrize("args,message", [
    (["--dry-run", "train"], "--bucket gs://"),
    (["--dry-run", "launch"], "unknown command launch"),
    (["--dry-run"], "no command given"),
    (["--dry-run", "--data-mode", "nfs", "data"], "rsync or gcsfuse"),
    (["--dry-run", "--frobnicate", "create"], "unknown option"),
])
def test_tpu_errors(args, message):
    r = _sh("tpu_vm.sh", *args)
    assert r.returncode == 2 and message in r.stderr


def test_gpu_single_node():
    out = _ok("gpu.sh", "--dry-run", "install")
    assert (f"python -m pip install -r requirements.txt -e . "
            f"'jax[cuda12]=={JAX_PIN}'") in out
    out = _ok("gpu.sh", "--dry-run", "--data-root", "/data/VOC2012",
              "--clip", "/w/clip", "--dino", "/w/dino", "train", "--",
              "--config.train.batch_size=16")
    assert _lines(out) == [
        "+ python -m ssr_jax.main --config configs/voc.py:paper --workdir "
        "runs/voc-paper --config.mode=train --config.data.root=/data/VOC2012 "
        "--config.model.clip_path=/w/clip --config.model.dino_path=/w/dino "
        "--config.train.batch_size=16"]
    out = _ok("gpu.sh", "--dry-run", "eval", env={"NUM_NODES": "1"})
    assert "--config.mode=eval" in out and "distributed" not in out


def test_gpu_multi_node_flags():
    env = {"COORDINATOR_ADDRESS": "10.0.0.1:12355", "NUM_NODES": "4",
           "NODE_RANK": "3"}
    out = _ok("gpu.sh", "--dry-run", "--workdir", "/runs/a", "train",
              env=env)
    assert ("--workdir /runs/a --config.mode=train "
            "--config.distributed.initialize=yes "
            "--config.distributed.coordinator_address=10.0.0.1:12355 "
            "--config.distributed.num_processes=4 "
            "--config.distributed.process_id=3") in out


@pytest.mark.parametrize("env,message", [
    ({"NUM_NODES": "2", "NODE_RANK": "0"}, "COORDINATOR_ADDRESS"),
    ({"NUM_NODES": "2", "COORDINATOR_ADDRESS": "h:1"}, "NODE_RANK"),
    ({"NUM_NODES": "2", "COORDINATOR_ADDRESS": "h:1", "NODE_RANK": "2"},
     "must be in 0..1"),
    ({"NUM_NODES": "2", "COORDINATOR_ADDRESS": "h", "NODE_RANK": "0"},
     "host:port"),
    ({"NUM_NODES": "x"}, "not a count"),
])
def test_gpu_multi_node_errors(env, message):
    r = _sh("gpu.sh", "--dry-run", "train", env=env)
    assert r.returncode == 2 and message in r.stderr


def test_slurm_dry_run():
    out = _ok("slurm_gpu.sbatch", "--dry-run", "--",
              "--config.train.num_steps=5",
              env={"SLURM_JOB_ID": "77", "SLURM_NNODES": "3",
                   "SLURM_JOB_NODELIST": "gpu[01-03]"})
    assert "scontrol show hostnames 'gpu[01-03]'" in out
    assert ("env COORDINATOR_ADDRESS=node0:12355 NUM_NODES=3 "
            "CONFIG=configs/voc.py:paper WORKDIR=runs/ssr_jax-77 srun "
            "--kill-on-bad-exit=1 --ntasks-per-node=1 bash -c "
            "'NODE_RANK=$SLURM_NODEID exec bash launch/gpu.sh train -- "
            "\"$@\"' ssr_jax --config.train.num_steps=5") in out
    text = open(os.path.join(ROOT, "launch", "slurm_gpu.sbatch")).read()
    assert "#SBATCH --signal=TERM@" in text and "#SBATCH --requeue" in text


_FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Stand-in for gcloud: logs each call; the VM state lives in a file; the
# first training run "gets preempted".
echo "$*" >> "$FAKE/calls"
state="$(cat "$FAKE/state")"
case "$*" in
  *"tpu-vm describe"*)
    [[ "$state" == MISSING ]] && exit 1
    echo "$state" ;;
  *"tpu-vm create"*) echo READY > "$FAKE/state" ;;
  *"tpu-vm delete"*) echo MISSING > "$FAKE/state" ;;
  *"--config.mode=train"*)
    if [[ ! -e "$FAKE/preempted" ]]; then
      touch "$FAKE/preempted"; echo PREEMPTED > "$FAKE/state"; exit 255
    fi ;;
esac
exit 0
"""


def test_tpu_all_recreates_a_preempted_vm(tmp_path):
    """The real (not dry-run) `all` path against a fake gcloud."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    gcloud = fake_bin / "gcloud"
    gcloud.write_text(_FAKE_GCLOUD)
    gcloud.chmod(0o755)
    (tmp_path / "state").write_text("MISSING\n")
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "FAKE": str(tmp_path),
           "TMPDIR": str(tmp_path), "PREEMPT_SETTLE_S": "0"}
    r = _sh("tpu_vm.sh", "--bucket", "gs://bk/p", "all", env=env)
    assert r.returncode == 0, r.stderr
    assert "re-creating and resuming (restart 1 of 5)" in r.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    verbs = []
    for c in calls:
        if "tpu-vm create" in c:
            verbs.append("create")
        elif "tpu-vm delete" in c:
            verbs.append("delete")
        elif "--config.mode=train" in c:
            verbs.append("train")
        elif "--config.mode=eval" in c:
            verbs.append("eval")
    assert verbs == ["create", "train", "delete", "create", "train", "eval",
                     "delete"]
    assert (tmp_path / "ssr_jax-src.tar.gz").exists()  # git archive ran


def test_tpu_all_gives_up_on_a_real_failure(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    gcloud = fake_bin / "gcloud"
    # Training fails while the VM stays READY: no restart, exit non-zero.
    gcloud.write_text(_FAKE_GCLOUD.replace(
        'echo PREEMPTED > "$FAKE/state"; exit 255', "exit 3").replace(
        'touch "$FAKE/preempted"; ', ""))
    gcloud.chmod(0o755)
    (tmp_path / "state").write_text("READY\n")
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "FAKE": str(tmp_path),
           "TMPDIR": str(tmp_path), "PREEMPT_SETTLE_S": "0"}
    r = _sh("tpu_vm.sh", "--bucket", "gs://bk/p", "all", env=env)
    assert r.returncode == 2
    assert "training failed (exit 3) on a healthy VM" in r.stderr
    calls = (tmp_path / "calls").read_text()
    assert "tpu-vm create" not in calls and "tpu-vm delete" not in calls


def test_tpu_all_resumes_after_exit_75_on_a_healthy_vm(tmp_path):
    """The trainer stopped by SIGTERM (a maintenance event) exits 75
    (docs/errors.md) while the VM stays READY: train again, no re-create."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    gcloud = fake_bin / "gcloud"
    gcloud.write_text(_FAKE_GCLOUD.replace(
        'echo PREEMPTED > "$FAKE/state"; exit 255', "exit 75"))
    gcloud.chmod(0o755)
    (tmp_path / "state").write_text("READY\n")
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "FAKE": str(tmp_path),
           "TMPDIR": str(tmp_path), "PREEMPT_SETTLE_S": "0"}
    r = _sh("tpu_vm.sh", "--bucket", "gs://bk/p", "all", env=env)
    assert r.returncode == 0, r.stderr
    assert "stopped by a signal (exit 75) on a healthy VM" in r.stderr
    calls = (tmp_path / "calls").read_text()
    assert calls.count("--config.mode=train") == 2
    assert "tpu-vm create" not in calls and "--config.mode=eval" in calls


def test_gpu_tfds_build_and_train():
    out = _ok("gpu.sh", "--dry-run", "--data-root", "/data/VOC2012",
              "--tfds-dir", "/data/tfds", "build")
    assert _lines(out) == [
        "+ python -m ssr_jax.data.build --config configs/voc.py:paper "
        "--config.data.root=/data/VOC2012 --config.data.tfds_dir=/data/tfds"]
    out = _ok("gpu.sh", "--dry-run", "--tfds-dir", "gs://b/tfds", "train")
    assert ("--config.mode=train --config.data.source=tfds "
            "--config.data.tfds_dir=gs://b/tfds") in out
    assert "data.root" not in out
    out = _ok("gpu.sh", "--dry-run", "--tfds-dir", "/t", "install")
    assert out.rstrip().endswith("-r requirements-tfds.txt")
    for args, message in (((), "--data-root"), (("--data-root", "/d"),
                                                "--tfds-dir"),
                          (("--data-root", "/d", "--tfds-dir", "gs://b"),
                           "local --tfds-dir")):
        r = _sh("gpu.sh", "--dry-run", *args, "build")
        assert r.returncode == 2 and message in r.stderr


def test_tpu_tfds_source():
    base = ("tpu_vm.sh", "--dry-run", "--bucket", "gs://bk/p",
            "--tfds-src", "gs://bk/p/tfds")
    out = _ok(*base, "data")
    assert "gcloud storage rsync -r gs://bk/p/tfds $HOME/tfds" in out
    assert "data/voc" not in out
    out = _ok(*base, "train")
    assert ("--config.data.source=tfds --config.data.tfds_dir=$HOME/tfds"
            in out)
    assert "data.root" not in out
    out = _ok(*base, "--data-mode", "gcsfuse", "train")
    assert "--config.data.tfds_dir=$HOME/gcs/p/tfds" in out
    out = _ok(*base, "setup")
    assert "-r requirements-tfds.txt" in out
    r = _sh("tpu_vm.sh", "--dry-run", "--tfds-src", "/local", "setup")
    assert r.returncode == 2 and "gs:// path" in r.stderr
