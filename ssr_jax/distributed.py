"""Multi-process start-up: `jax.distributed.initialize` only when asked.

API:
  maybe_initialize(config, environ=None) -> bool
      Calls `jax.distributed.initialize` at most once per process and never
      on a plain single-process run; True if it did so now.
  plan(config, environ=None) -> InitPlan | None
      The decision without side effects (what `maybe_initialize` would do).
  class InitPlan: kwargs (dict for jax.distributed.initialize), reason (str)

Decision (`config.distributed`, fields `initialize`, `coordinator_address`,
`num_processes`, `process_id`), first match wins:
  1. initialize == "no": nothing.
  2. The three config fields, all set (address "host:port", num_processes
     >= 1, 0 <= process_id < num_processes): initialize with them. Some but
     not all set: ConfigError naming the missing ones.
  3. The environment triple SSR_JAX_COORDINATOR ("host:port"),
     SSR_JAX_NUM_PROCESSES, SSR_JAX_PROCESS_ID, all set: initialize with
     them (the launch scripts map COORDINATOR_ADDRESS/NUM_NODES/NODE_RANK to
     flags instead; this is for wrappers that prefer the environment). Some
     but not all: ConfigError.
  4. A multi-process environment that JAX's own cluster detection handles,
     initialised with no arguments (JAX reads the rest itself):
       - JAX_COORDINATOR_ADDRESS is set (JAX reads it);
       - SLURM: SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS,
         SLURM_PROCID, SLURM_LOCALID all set and SLURM_NTASKS > 1;
       - Open MPI (mpirun): OMPI_MCA_orte_hnp_uri set and
         OMPI_COMM_WORLD_SIZE > 1;
       - TPU pod slice: TPU_WORKER_HOSTNAMES lists more than one host
         (GKE sets it), or MEGASCALE_NUM_SLICES > 1 (multislice).
     On a plain Cloud TPU VM the worker list lives only in the metadata
     server, which "auto" does not query: launch/tpu_vm.sh passes
     `--config.distributed.initialize=yes`, and JAX then reads the metadata.
  5. initialize == "yes" with nothing above: no arguments (a Cloud TPU VM).
  6. Otherwise ("auto", nothing detected): nothing; single process.

CPU multi-process (tests, laptops): jax 0.10.2 runs cross-process CPU
collectives with Gloo by default (`jax_cpu_collectives_implementation`
defaults to "gloo"); nothing to configure. See tests/multiprocess_utils.py.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from absl import logging


class ConfigError(ValueError):
    """Inconsistent multi-process settings; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class InitPlan:
    kwargs: dict[str, Any]
    reason: str


_ENV_TRIPLE = ("SSR_JAX_COORDINATOR", "SSR_JAX_NUM_PROCESSES",
               "SSR_JAX_PROCESS_ID")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
               "SLURM_PROCID", "SLURM_LOCALID")


def _check_triple(address: str, num: int, pid: int, source: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            f"{source}: coordinator address {address!r} must be 'host:port', "
            "e.g. 10.0.0.2:1234 (the address of process 0)")
    if num < 1:
        raise ConfigError(f"{source}: num_processes must be >= 1, got {num}")
    if not 0 <= pid < num:
        raise ConfigError(
            f"{source}: process_id {pid} is not in [0, {num}); give each "
            "process its own rank 0..num_processes-1")


def _from_config(dist: Any) -> dict[str, Any] | None:
    address = str(dist.coordinator_address or "")
    num = int(dist.num_processes)
    pid = int(dist.process_id)
    given = {"coordinator_address": bool(address),
             "num_processes": num > 0, "process_id": pid >= 0}
    if not any(given.values()):
        return None
    if not all(given.values()):
        missing = [f"config.distributed.{k}" for k, v in given.items()
                   if not v]
        raise ConfigError(
            "multi-process settings are incomplete: missing "
            + ", ".join(missing) + ". Give all three of "
            "--config.distributed.coordinator_address=HOST:PORT, "
            "--config.distributed.num_processes=N and "
            "--config.distributed.process_id=I, or none of them "
            "(auto-detection / Cloud TPU VM).")
    _check_triple(address, num, pid, "config.distributed")
    return {"coordinator_address": address, "num_processes": num,
            "process_id": pid}


def _int_env(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError as e:
        raise ConfigError(
            f"environment variable {name}={environ[name]!r} is not an "
            "integer") from e


def _from_env_triple(environ: Mapping[str, str]) -> dict[str, Any] | None:
    present = [k for k in _ENV_TRIPLE if environ.get(k, "") != ""]
    if not present:
        return None
    if len(present) != len(_ENV_TRIPLE):
        missing = [k for k in _ENV_TRIPLE if k not in present]
        raise ConfigError(
            f"{', '.join(present)} set but {', '.join(missing)} missing: "
            "set all three (or none) of " + ", ".join(_ENV_TRIPLE))
    address = environ["SSR_JAX_COORDINATOR"]
    num = _int_env(environ, "SSR_JAX_NUM_PROCESSES")
    pid = _int_env(environ, "SSR_JAX_PROCESS_ID")
    _check_triple(address, num, pid, "SSR_JAX_* environment")
    return {"coordinator_address": address, "num_processes": num,
            "process_id": pid}


def _int_or_zero(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _detect_cluster(environ: Mapping[str, str]) -> str | None:
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    if all(k in environ for k in _SLURM_VARS) and _int_or_zero(
            environ.get("SLURM_NTASKS")) > 1:
        return f"SLURM job with {environ['SLURM_NTASKS']} tasks"
    if "OMPI_MCA_orte_hnp_uri" in environ and _int_or_zero(
            environ.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return f"Open MPI with {environ['OMPI_COMM_WORLD_SIZE']} ranks"
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",")
             if h.strip()]
    if len(hosts) > 1:
        return f"TPU slice with {len(hosts)} workers"
    if _int_or_zero(environ.get("MEGASCALE_NUM_SLICES")) > 1:
        return f"TPU multislice ({environ['MEGASCALE_NUM_SLICES']} slices)"
    return None


def plan(config: Any, environ: Mapping[str, str] | None = None
         ) -> InitPlan | None:
    """What `maybe_initialize` would do (module docstring), no side effects.

    Args:
      config: the run config (uses `config.distributed`).
      environ: the environment; default `os.environ`.

    Returns:
      An InitPlan, or None for a single-process run.
    """
    environ = os.environ if environ is None else environ
    dist = config.distributed
    mode = str(dist.initialize).lower()
    if mode not in ("auto", "yes", "no"):
        raise ConfigError(
            f"config.distributed.initialize={dist.initialize!r}: use "
            "'auto', 'yes' or 'no'")
    if mode == "no":
        return None
    kwargs = _from_config(dist)
    if kwargs is not None:
        return InitPlan(kwargs, "config.distributed")
    kwargs = _from_env_triple(environ)
    if kwargs is not None:
        return InitPlan(kwargs, "SSR_JAX_* environment")
    cluster = _detect_cluster(environ)
    if cluster is not None:
        return InitPlan({}, cluster)
    if mode == "yes":
        return InitPlan({}, "initialize=yes (JAX auto-detects, e.g. a Cloud "
                            "TPU VM)")
    return None


_DONE = False


def maybe_initialize(config: Any, environ: Mapping[str, str] | None = None
                     ) -> bool:
    """Initialises the JAX distributed system when the config/env asks.

    Must run before any JAX computation. A second call (or a call after
    someone else initialised JAX's distributed system) does nothing.

    Returns:
      True if `jax.distributed.initialize` was called by this call.
    """
    global _DONE
    decision = plan(config, environ)
    if decision is None:
        return False
    import jax

    if _DONE or jax.distributed.is_initialized():
        logging.info("jax.distributed already initialised; not again")
        return False
    logging.info("jax.distributed.initialize(%s): %s",
                 ", ".join(f"{k}={v!r}" for k, v in decision.kwargs.items()),
                 decision.reason)
    jax.distributed.initialize(**decision.kwargs)
    _DONE = True
    logging.info("process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True
