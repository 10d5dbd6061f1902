"""Tests for ssr_jax.checkpointing on 8 fake CPU devices: policy and keep-N,
sharded restore, NaN refusal, corrupt/uncommitted fallback, partial restore,
clear mismatch errors, and SIGTERM preemption of a subprocess training loop
whose resumed result is bitwise equal to an uninterrupted run."""

import gc
import logging as py_logging
import os
import re
import shutil
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ssr_jax import __version__, checkpointing
from tests import preemption_utils, toy_train


def _mesh():
    return Mesh(np.array(jax.devices()), ("data",))


def _state(scale=1.0):
    mesh = _mesh()
    rows = NamedSharding(mesh, P("data"))
    rep = NamedSharding(mesh, P())
    params = {
        "w": jax.device_put(scale * jnp.arange(32.0).reshape(8, 4), rows),
        "b": jax.device_put(scale * jnp.ones(3), rep),
    }
    return {"params": params,
            "opt": {"mu": jax.tree.map(lambda x: 0.5 * x, params),
                    "count": jax.device_put(jnp.int32(7), rep)}}


def _target(state):
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
        state)


def _assert_tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_steps(ckpt, steps, scale_of=float):
    for s in steps:
        ckpt.save(s, _state(scale_of(s)), {"next": s + 1}, {"run": "t"})
    ckpt.wait_until_finished()


def test_policy_keep_and_sharded_restore(tmp_path):
    with checkpointing.Checkpointer(str(tmp_path), save_every=2,
                                    keep=2) as ckpt:
        saved = [s for s in range(1, 8)
                 if ckpt.save(s, _state(s), {"next": s + 1}, {"run": "t"})]
        ckpt.wait_until_finished()
        assert saved == [2, 4, 6]
        assert ckpt.all_steps() == [4, 6] == ckpt.complete_steps()
        assert ckpt.latest_step() == 6
        target = _target(_state())
        r = ckpt.restore(target)
    assert r.step == 6
    _assert_tree_equal(r.state, _state(6.0))
    assert r.state["params"]["w"].sharding == target["params"]["w"].sharding
    assert r.state["params"]["b"].sharding.spec == P()
    assert r.data_state == {"next": 7}
    assert r.meta["step"] == 6 and r.meta["run"] == "t"
    assert r.meta["ssr_jax_version"] == __version__


def test_restore_into_real_arrays_and_explicit_step(tmp_path):
    with checkpointing.Checkpointer(str(tmp_path), save_every=1, keep=3,
                                    async_save=False) as ckpt:
        _save_steps(ckpt, [1, 2])
        r = ckpt.restore(_state(0.0), step=1)
        assert r.step == 1
        _assert_tree_equal(r.state, _state(1.0))
        with pytest.raises(checkpointing.CheckpointError, match="step 5"):
            ckpt.restore(_state(), step=5)


def test_force_saves_off_grid_but_not_twice(tmp_path):
    with checkpointing.Checkpointer(str(tmp_path), save_every=10,
                                    async_save=False) as ckpt:
        assert not ckpt.save(3, _state())
        assert ckpt.save(3, _state(), force=True)
        assert not ckpt.save(3, _state(), force=True)
        assert ckpt.all_steps() == [3]


def test_nan_state_is_never_saved(tmp_path, caplog):
    with checkpointing.Checkpointer(str(tmp_path), save_every=2,
                                    async_save=False) as ckpt:
        assert ckpt.save(2, _state())
        bad = _state()
        bad["opt"]["mu"]["w"] = bad["opt"]["mu"]["w"].at[3, 1].set(jnp.nan)
        with caplog.at_level(py_logging.WARNING):
            assert not ckpt.save(4, bad)
            inf = _state(jnp.inf)
            assert not ckpt.save(5, inf, force=True)
        assert "NaN/Inf" in caplog.text
        assert ckpt.all_steps() == [2]
        r = ckpt.restore(_target(_state()))
    assert r.step == 2
    assert checkpointing.state_is_finite({"i": jnp.arange(3), "f": 1.0})
    assert not checkpointing.state_is_finite({"h": np.array([np.nan])})


def test_uncommitted_latest_falls_back(tmp_path, caplog):
    with checkpointing.Checkpointer(str(tmp_path), save_every=2,
                                    async_save=False) as ckpt:
        _save_steps(ckpt, [2, 4])
    os.remove(tmp_path / "4" / checkpointing.COMMIT_MARKER)
    with checkpointing.Checkpointer(str(tmp_path), save_every=2) as ckpt:
        assert ckpt.complete_steps() == [2]
        with caplog.at_level(py_logging.WARNING):
            r = ckpt.restore(_target(_state()))
    assert r.step == 2
    _assert_tree_equal(r.state, _state(2.0))
    assert "step 4" in caplog.text and "commit_success" in caplog.text


# A failed tensorstore read leaves callbacks aimed at Orbax's closed asyncio
# loop ("Event loop is closed", ignored): Orbax noise on the error path only.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_falls_back(tmp_path, caplog):
    with checkpointing.Checkpointer(str(tmp_path), save_every=2,
                                    async_save=False) as ckpt:
        _save_steps(ckpt, [2, 4])
    # Truncate every array data file of step 4 (the commit marker stays).
    data_files = [os.path.join(d, f)
                  for d, _, fs in os.walk(tmp_path / "4" / "state")
                  for f in fs if os.path.basename(d) == "d"]
    assert len(data_files) >= 2
    for f in data_files:
        with open(f, "r+b") as fh:
            fh.truncate(3)
    with checkpointing.Checkpointer(str(tmp_path), save_every=2) as ckpt:
        with caplog.at_level(py_logging.WARNING):
            r = ckpt.restore(_target(_state()))
        assert r.step == 2
        assert "skipping checkpoint step 4" in caplog.text
        # Asked for step 4 explicitly: no silent fallback.
        with pytest.raises(checkpointing.CheckpointError, match="step 4"):
            ckpt.restore(_target(_state()), step=4)
    gc.collect()  # report the ignored callbacks here, not in a later test


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_is_moved_aside_and_rewritten(tmp_path, capsys):
    with checkpointing.Checkpointer(str(tmp_path), save_every=2,
                                    async_save=False) as ckpt:
        _save_steps(ckpt, [2, 4])
    for d, _, fs in os.walk(tmp_path / "4" / "state"):
        for f in fs:
            if os.path.basename(d) == "d":
                with open(os.path.join(d, f), "r+b") as fh:
                    fh.truncate(3)
    with checkpointing.Checkpointer(str(tmp_path), save_every=2,
                                    async_save=False) as ckpt:
        r = ckpt.restore(_target(_state()))
        assert r.step == 2
        err = capsys.readouterr().err
        assert "ssr_jax: warning: checkpoint step 4 is broken" in err
        assert "moved aside to" in err and "resuming from checkpoint " \
            "step 2" in err
        aside = [p for p in os.listdir(tmp_path)
                 if p.startswith("4.corrupt-")]
        assert len(aside) == 1  # kept, not deleted
        assert os.path.isdir(tmp_path / aside[0] / "state")
        # The resumed run writes step 4 again (before: a forced save of a
        # listed step returned False and the retrained step was lost).
        assert ckpt.all_steps() == [2]
        assert ckpt.save(4, _state(40.0), {"next": 5}, force=True)
        ckpt.wait_until_finished()
    with checkpointing.Checkpointer(str(tmp_path), save_every=2) as ckpt:
        r = ckpt.restore(_target(_state()))
    assert r.step == 4
    _assert_tree_equal(r.state, _state(40.0))
    gc.collect()


def test_relative_directory_saves(tmp_path, monkeypatch):
    # Orbax refuses relative paths at the first save (the README's
    # `--workdir runs/...`): the Checkpointer makes them absolute.
    monkeypatch.chdir(tmp_path)
    with checkpointing.Checkpointer("runs/x/checkpoints", save_every=1,
                                    async_save=False) as ckpt:
        assert ckpt.save(1, _state(), {"next": 2})
    assert (tmp_path / "runs" / "x" / "checkpoints" / "1" /
            checkpointing.COMMIT_MARKER).exists()


def test_read_only_restore_does_not_move_or_advise_deleting(tmp_path):
    with checkpointing.Checkpointer(str(tmp_path), save_every=2,
                                    async_save=False) as ckpt:
        _save_steps(ckpt, [2])
    os.remove(tmp_path / "2" / checkpointing.COMMIT_MARKER)
    ckpt = checkpointing.Checkpointer(str(tmp_path), save_every=0,
                                      read_only=True)
    with pytest.raises(checkpointing.CheckpointError) as e:
        ckpt.restore(_target(_state()), required=True)
    assert "Delete" not in str(e.value)
    assert "Re-run training with the same command" in str(e.value)
    assert os.listdir(tmp_path) == ["2"]


def test_missing_file_and_all_broken(tmp_path):
    with checkpointing.Checkpointer(str(tmp_path), save_every=2,
                                    async_save=False) as ckpt:
        _save_steps(ckpt, [2, 4])
    shutil.rmtree(tmp_path / "4" / "data")
    with checkpointing.Checkpointer(str(tmp_path), save_every=2) as ckpt:
        assert ckpt.restore(_target(_state())).step == 2
    os.remove(tmp_path / "2" / checkpointing.COMMIT_MARKER)
    with checkpointing.Checkpointer(str(tmp_path), save_every=2) as ckpt:
        with pytest.raises(checkpointing.CheckpointError,
                           match="no readable checkpoint"):
            ckpt.restore(_target(_state()))


def test_empty_or_missing_directory(tmp_path):
    with checkpointing.Checkpointer(str(tmp_path / "new"),
                                    save_every=2) as ckpt:
        assert ckpt.restore(_target(_state())) is None
        assert ckpt.restore_subset({"params": _target(_state())["params"]}
                                   ) is None
        assert ckpt.latest_step() is None


def test_read_only_required_and_no_periodic_saves(tmp_path):
    with pytest.raises(checkpointing.CheckpointError, match="does not exist"):
        checkpointing.Checkpointer(str(tmp_path / "nope"), save_every=1,
                                   read_only=True)
    assert not (tmp_path / "nope").exists()
    with checkpointing.Checkpointer(str(tmp_path), save_every=0,
                                    async_save=False) as ckpt:
        with pytest.raises(checkpointing.CheckpointError,
                           match="no checkpoint in"):
            ckpt.restore(_target(_state()), required=True)
        assert not any(ckpt.save(s, _state()) for s in range(1, 6))
        assert ckpt.save(6, _state(6.0), force=True)
    with checkpointing.Checkpointer(str(tmp_path), save_every=1,
                                    read_only=True) as ckpt:
        step, sub = ckpt.restore_subset(
            {"params": _target(_state())["params"]}, required=True)
        assert step == 6
        _assert_tree_equal(sub["params"], _state(6.0)["params"])
        with pytest.raises(checkpointing.CheckpointError, match="read_only"):
            ckpt.save(7, _state(), force=True)


def test_partial_restore(tmp_path):
    with checkpointing.Checkpointer(str(tmp_path), save_every=2,
                                    async_save=False) as ckpt:
        _save_steps(ckpt, [2, 4])
        target = {"params": _target(_state())["params"]}
        step, sub = ckpt.restore_subset(target)
        assert step == 4
        assert set(sub) == {"params"}
        _assert_tree_equal(sub, {"params": _state(4.0)["params"]})
        assert sub["params"]["w"].sharding == target["params"]["w"].sharding
        step, sub = ckpt.restore_subset({"opt": {"count": _target(
            _state())["opt"]["count"]}}, step=2)
        assert step == 2 and int(sub["opt"]["count"]) == 7


def test_mismatch_errors_name_keys_and_shapes(tmp_path):
    with checkpointing.Checkpointer(str(tmp_path), save_every=2,
                                    async_save=False) as ckpt:
        _save_steps(ckpt, [2])
        target = _target(_state())
        rows = target["params"]["w"].sharding
        target["params"]["w"] = jax.ShapeDtypeStruct((16, 4), jnp.float32,
                                                     sharding=rows)
        target["params"]["extra"] = target["params"]["b"]
        with pytest.raises(checkpointing.CheckpointMismatchError) as e:
            ckpt.restore(target)
        msg = str(e.value)
        assert "params/extra" in msg and "not in the checkpoint" in msg
        assert re.search(r"params/w: checkpoint \(8, 4\), model \(16, 4\)",
                         msg)
        assert "restore_subset" in msg
        with pytest.raises(checkpointing.CheckpointMismatchError,
                           match="params/w"):
            ckpt.restore_subset({"params": {"w": target["params"]["w"]}})
        no_sharding = {"params": {"b": jax.ShapeDtypeStruct((3,),
                                                            jnp.float32)}}
        with pytest.raises(ValueError, match="has no sharding"):
            ckpt.restore_subset(no_sharding)


def test_guard_turns_sigterm_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with checkpointing.PreemptionGuard(sigint=True) as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop(2) and guard.reason == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # second Ctrl-C: quit now
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_config_hash_is_stable():
    from ssr_jax import config_defaults

    a = config_defaults.base_config()
    b = config_defaults.base_config()
    assert checkpointing.config_hash(a) == checkpointing.config_hash(b)
    b.seed = 1
    assert checkpointing.config_hash(a) != checkpointing.config_hash(b)


@pytest.mark.slow
def test_sigterm_mid_run_then_resume_is_bitwise_equal(tmp_path):
    work = str(tmp_path / "run")
    script = os.path.join(os.path.dirname(__file__), "toy_train.py")
    argv = [sys.executable, script, "--workdir", work, "--steps", "30",
            "--save_every", "5", "--sleep", "0.05"]
    first = preemption_utils.preempt(argv, marker=r"^step 7$", timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.signalled_at == "step 7"
    stopped = re.search(r"preempted at step (\d+)", first.stdout)
    assert stopped, first.stdout
    k = int(stopped.group(1))
    assert 7 <= k < 30  # the save happened at a step boundary, mid-run
    assert not os.path.exists(os.path.join(work, "final_w.npy"))
    ckpt_steps = sorted(int(d) for d in os.listdir(os.path.join(work, "ckpt"))
                        if d.isdigit())
    assert ckpt_steps[-1] == k  # saved off the 5-step grid, at the stop

    second = preemption_utils.run(argv, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from step {k}" in second.stdout
    assert f"step {k + 1}\n" in second.stdout
    assert not re.search(rf"^step {k}$", second.stdout, re.MULTILINE)
    resumed = np.load(os.path.join(work, "final_w.npy"), allow_pickle=False)

    reference = toy_train.train(str(tmp_path / "ref"), 30, save_every=5)
    np.testing.assert_array_equal(resumed, reference)  # bitwise
    assert resumed.tobytes() == reference.tobytes()


_MULTIPROCESS_PREEMPTION = """
import os, signal, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ssr_jax import checkpointing
pid = jax.process_index()
rows = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
guard = checkpointing.PreemptionGuard().install()
w = jax.make_array_from_process_local_data(
    rows, np.full((4, 3), pid + 1.0, np.float32))
ckpt = checkpointing.Checkpointer(WORK, save_every=2, keep=2)
stop = None
for step in range(1, 200):
    w = w + 1.0
    if pid == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGTERM)   # only process 1 is told
    if guard.should_stop(step):
        stop = step
        ckpt.save(step, {"w": w}, {"next": step + 1}, force=True)
        break
    ckpt.save(step, {"w": w}, {"next": step + 1})
    time.sleep(0.02)
ckpt.close()
target = {"w": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=rows)}
r = checkpointing.Checkpointer(WORK, save_every=2).restore(target)
local = np.concatenate([np.asarray(s.data)
                        for s in r.state["w"].addressable_shards])
emit({"stop": stop, "reason": guard.reason, "restored": r.step,
      "data": r.data_state, "local": np.unique(local).tolist()})
"""


@pytest.mark.slow
@pytest.mark.parametrize("service", ["true", "false"])
def test_two_process_preemption_and_save(tmp_path, service):
    """SIGTERM reaches one of two processes; both stop at the same step,
    save together (Orbax multi-process) and restore their shards. With
    JAX's preemption service the stop step is its sync point; without it,
    the guard's all-process OR of the flags."""
    from tests import multiprocess_utils

    code = _MULTIPROCESS_PREEMPTION.replace("WORK", repr(str(tmp_path)))
    outs = multiprocess_utils.run_processes(
        code, num_processes=2, devices_per_process=2, timeout=180,
        extra_env={"JAX_ENABLE_PREEMPTION_SERVICE": service})
    stops = {o["stop"] for o in outs}
    assert len(stops) == 1 and None not in stops
    k = stops.pop()
    assert k >= 3
    if service == "false":
        assert k == 3  # the flag is shared at the very step it was set
        assert outs[1]["reason"] == "SIGTERM"
        assert outs[0]["reason"] == "signal on another process"
    else:
        assert all(o["reason"] == "preemption sync point" for o in outs)
    for pid, o in enumerate(outs):
        assert o["restored"] == k and o["data"] == {"next": k + 1}
        assert o["local"] == [pid + 1.0 + k]


def test_tmp_directory_of_an_interrupted_save_is_removed(tmp_path):
    with checkpointing.Checkpointer(str(tmp_path), save_every=2,
                                    async_save=False) as ckpt:
        _save_steps(ckpt, [2])
    # What a save killed half-way (Ctrl-C twice, a crash) leaves behind.
    leftover = tmp_path / "4.orbax-checkpoint-tmp-1733380000000000"
    (leftover / "state").mkdir(parents=True)
    with checkpointing.Checkpointer(str(tmp_path), save_every=2) as ckpt:
        # Removed in the background from the start (Orbax's
        # cleanup_tmp_directories, awaited before the first save).
        assert ckpt.all_steps() == [2]
        assert ckpt.save(4, _state(4.0), {"next": 5}, force=True)
        ckpt.wait_until_finished()
        assert ckpt.complete_steps() == [2, 4]
    assert not leftover.exists()
