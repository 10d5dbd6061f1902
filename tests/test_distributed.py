"""Tests for ssr_jax.distributed: when `jax.distributed.initialize` is called
(with a patched initialize; env given explicitly), plus a real two-process
CPU run through tests/multiprocess_utils.py."""

import jax
import numpy as np
import pytest

from ssr_jax import config_defaults, distributed
from tests import multiprocess_utils


def _config(**dist):
    c = config_defaults.base_config()
    for k, v in dist.items():
        setattr(c.distributed, k, v)
    return c


@pytest.fixture
def calls(monkeypatch):
    got = []
    monkeypatch.setattr(jax.distributed, "initialize",
                        lambda **kw: got.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed, "_DONE", False)
    return got


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]",
         "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def test_plain_single_process_run_does_nothing(calls):
    assert not distributed.maybe_initialize(_config(), environ={})
    # A one-task SLURM job or a one-host TPU list is still single process.
    env = dict(SLURM, SLURM_NTASKS="1", TPU_WORKER_HOSTNAMES="h0")
    assert not distributed.maybe_initialize(_config(), environ=env)
    assert calls == []


@pytest.mark.parametrize("env,reason", [
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR"),
    (SLURM, "SLURM"),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}, "MPI"),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}, "4 workers"),
    ({"MEGASCALE_NUM_SLICES": "2"}, "multislice"),
])
def test_auto_detects_clusters(calls, env, reason):
    p = distributed.plan(_config(), env)
    assert p is not None and reason in p.reason and p.kwargs == {}
    assert distributed.maybe_initialize(_config(), environ=env)
    assert calls == [{}]


def test_never_twice(calls, monkeypatch):
    env = {"TPU_WORKER_HOSTNAMES": "a,b"}
    assert distributed.maybe_initialize(_config(), environ=env)
    assert not distributed.maybe_initialize(_config(), environ=env)
    monkeypatch.setattr(distributed, "_DONE", False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert not distributed.maybe_initialize(_config(), environ=env)
    assert calls == [{}]


def test_explicit_config_triple(calls):
    c = _config(coordinator_address="10.1.2.3:8476", num_processes=4,
                process_id=2)
    assert distributed.maybe_initialize(c, environ=SLURM)  # config wins
    assert calls == [{"coordinator_address": "10.1.2.3:8476",
                      "num_processes": 4, "process_id": 2}]


def test_env_triple(calls):
    env = {"SSR_JAX_COORDINATOR": "host:99", "SSR_JAX_NUM_PROCESSES": "2",
           "SSR_JAX_PROCESS_ID": "0"}
    assert distributed.maybe_initialize(_config(), environ=env)
    assert calls == [{"coordinator_address": "host:99", "num_processes": 2,
                      "process_id": 0}]


def test_yes_without_settings_calls_with_no_arguments(calls):
    assert distributed.maybe_initialize(_config(initialize="yes"),
                                        environ={})
    assert calls == [{}]


def test_no_overrides_everything(calls):
    c = _config(initialize="no", coordinator_address="h:1", num_processes=2,
                process_id=0)
    assert not distributed.maybe_initialize(c, environ=SLURM)
    assert calls == []


@pytest.mark.parametrize("dist,match", [
    ({"coordinator_address": "h:1"}, "num_processes, .*process_id"),
    ({"num_processes": 2, "process_id": 0}, "coordinator_address"),
    ({"coordinator_address": "nohost", "num_processes": 2, "process_id": 0},
     "host:port"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2},
     r"not in \[0, 2\)"),
    ({"initialize": "maybe"}, "'auto', 'yes' or 'no'"),
])
def test_bad_config(calls, dist, match):
    with pytest.raises(distributed.ConfigError, match=match):
        distributed.maybe_initialize(_config(**dist), environ={})
    assert calls == []


def test_bad_env(calls):
    with pytest.raises(distributed.ConfigError, match="SSR_JAX_PROCESS_ID"):
        distributed.plan(_config(), {"SSR_JAX_COORDINATOR": "h:1",
                                     "SSR_JAX_NUM_PROCESSES": "2"})
    with pytest.raises(distributed.ConfigError, match="not an integer"):
        distributed.plan(_config(), {"SSR_JAX_COORDINATOR": "h:1",
                                     "SSR_JAX_NUM_PROCESSES": "two",
                                     "SSR_JAX_PROCESS_ID": "0"})


_GLOBAL_SUM_WORKER = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ssr_jax import metrics
pid = jax.process_index()
mesh = Mesh(np.array(jax.devices()), ("data",))
rng = np.random.default_rng(0)
batch = rng.normal(size=(8, 3)).astype(np.float32)   # the global batch
per = 8 // jax.process_count()
local = batch[pid * per:(pid + 1) * per]
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")),
                                           local)
s, m = jax.jit(lambda a: (a.sum(), a.mean(axis=0)),
               out_shardings=NamedSharding(mesh, P()))(x)
labels = rng.integers(0, 3, size=(2, 4, 4))
acc = metrics.ConfusionAccumulator(3)
acc.add(labels[pid] * 0, labels[pid])   # pred, gt: one image each
emit({"pid": pid, "devices": jax.device_count(), "shape": list(x.shape),
      "sum": float(s), "mean": np.asarray(m).tolist(),
      "conf": acc.result().tolist()})
"""


@pytest.mark.slow
def test_two_cpu_processes_agree_with_one():
    outs = multiprocess_utils.run_processes(
        _GLOBAL_SUM_WORKER, num_processes=2, devices_per_process=2,
        timeout=120)
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(8, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 4, 4))
    want_conf = np.zeros((3, 3), np.int64)
    for g in labels.ravel():
        want_conf[g, 0] += 1
    ref_sum = float(jax.jit(jax.numpy.sum)(batch))
    ref_mean = np.asarray(jax.jit(lambda a: a.mean(axis=0))(batch))
    assert [o["pid"] for o in outs] == [0, 1]
    for o in outs:
        assert o["devices"] == 4 and o["shape"] == [8, 3]
        # Same numbers up to float32 reduction order (4 vs 8 devices).
        assert o["sum"] == pytest.approx(ref_sum, rel=1e-6, abs=1e-5)
        np.testing.assert_allclose(o["mean"], ref_mean, rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_array_equal(o["conf"], want_conf)
