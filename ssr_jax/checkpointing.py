"""Orbax checkpoints of the train state, the data-iterator state and metadata.

API:
  Checkpointer(directory, *, save_every, keep=3, async_save=True,
               read_only=False)
      Orbax 0.12 `CheckpointManager` over a composite of three items:
        "state": a pytree of arrays (StandardSave / StandardRestore),
        "data":  the data-iterator state, a JSON-able dict (JsonSave),
        "meta":  JSON: {"step", "wall_time", "ssr_jax_version", ...caller's
                 `meta` dict, e.g. {"config_hash": config_hash(config)}}.
      Step directories `<directory>/<step>/{state,data,meta}`; `directory`
      may be local or gs:// (gs:// needs the gcsfs package, which
      launch/tpu_vm.sh installs). `save_every=0`: no periodic saves (only
      forced and preemption ones). `read_only=True` (eval): never creates
      or writes; a missing directory raises CheckpointError at once.
    .should_save(step) -> bool     every `save_every` steps or a preemption
                                   sync point (multi-host TPU)
    .save(step, state, data_state=None, meta=None, force=False) -> bool
        Saves when the policy (or `force`) says so and the state is all
        finite (a NaN/Inf state is never written: a warning, False). Keeps
        the latest `keep` steps. Every process must call it (Orbax
        coordinates the hosts; the finiteness check is a replicated jitted
        reduction, so all processes take the same branch).
    .restore(target_state, step=None, required=False)
        -> Restored(step, state, data_state, meta) | None
        `target_state`: the state pytree with `jax.ShapeDtypeStruct` leaves
        carrying `.sharding` (from `jax.eval_shape` + shardings) or real
        arrays; restored arrays get those shardings. step=None: the latest
        complete step, falling back to older ones (with a warning) when the
        latest lacks its commit marker or fails to read; None if the
        directory holds no step at all (CheckpointError if `required`).
        Explicit `step`: that step or CheckpointError, no fallback. A
        target whose tree or shapes differ from the checkpoint raises
        CheckpointMismatchError naming the keys.
    .restore_subset(target_subset, step=None, required=False)
        -> (step, subset) | None
        Restores only the leaves in `target_subset` (a sub-tree of the saved
        state, e.g. {"params": ...} for eval without the optimiser).
    .latest_step() -> int | None, .all_steps() -> list[int] (as Orbax
        lists them), .complete_steps() -> list[int] (with commit marker)
    .wait_until_finished(), .close(); also a context manager.
  PreemptionGuard(sigint=False, sync_every=1)
      Turns SIGTERM (and optionally SIGINT) into a flag checked at step
      boundaries: `if guard.should_stop(step): ckpt.save(step, ...,
      force=True); ckpt.close(); return`. Multi-process: JAX's preemption
      sync point (when JAX's preemption service runs, it owns SIGTERM) and
      an all-process OR of the flags every `sync_every` steps, so every
      process stops at the same step.
  config_hash(config) -> str
  CheckpointError, CheckpointMismatchError

A restored step is "complete" when `<step>/commit_success.txt` exists:
Orbax 0.12.8 writes it last on every file system (with the atomic rename on
local disks, as the only commit signal on GCS). A step directory copied
half-way (an interrupted `gsutil rsync`) has no marker, or misses files,
and is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_managers

from ssr_jax import __version__

PyTree = Any
COMMIT_MARKER = "commit_success.txt"
_ITEMS = ("state", "data", "meta")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tree differs from the state to restore."""


class Restored(NamedTuple):
    step: int
    state: PyTree
    data_state: dict[str, Any]
    meta: dict[str, Any]


def warn(message: str) -> None:
    """A warning for the log file and the terminal (`logs.warn`)."""
    from ssr_jax import logs

    logs.warn(message)


class PreemptedError(Exception):
    """Raised after a preemption save: the run stops here (no evaluation);
    re-running the same command resumes and finishes it."""


def config_hash(config: Any) -> str:
    """A short stable hash of a config (ml_collections or JSON-able)."""
    if hasattr(config, "to_json_best_effort"):
        text = config.to_json_best_effort(sort_keys=True)
    else:
        text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def state_is_finite(state: PyTree) -> bool:
    """True if every floating leaf of `state` is free of NaN and Inf.

    One jitted reduction over the device arrays (replicated result, so every
    process agrees); host leaves are checked with NumPy.
    """
    device, host = [], []
    for x in jax.tree.leaves(state):
        dtype = getattr(x, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            continue
        (device if isinstance(x, jax.Array) else host).append(x)
    ok = all(bool(np.isfinite(np.asarray(x)).all()) for x in host)
    if device:
        ok = ok and bool(_all_finite(device))
    return ok


def _key_str(key: tuple) -> str:
    return "/".join(str(k) for k in key)


def _abstract_target(target: PyTree) -> PyTree:
    """ShapeDtypeStructs with shardings; a clear error where one is missing.
    """
    def convert(path, x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
            raise ValueError(
                f"restore target leaf {jax.tree_util.keystr(path)} has no "
                "sharding; build the target as jax.ShapeDtypeStruct(shape, "
                "dtype, sharding=...) (e.g. jax.eval_shape(init) plus the "
                "train shardings) so arrays land where the step expects them")
        return x

    return jax.tree_util.tree_map_with_path(convert, target)


def _describe_mismatch(target: PyTree, saved: PyTree, partial: bool
                       ) -> list[str]:
    want = ocp.tree.to_flat_dict(target)
    have = ocp.tree.to_flat_dict(saved)
    problems = []
    missing = [k for k in want if k not in have]
    extra = [] if partial else [k for k in have if k not in want]
    for label, keys in (("in the model but not in the checkpoint", missing),
                        ("in the checkpoint but not in the model", extra)):
        if keys:
            shown = ", ".join(_key_str(k) for k in keys[:10])
            more = f" (+{len(keys) - 10} more)" if len(keys) > 10 else ""
            problems.append(f"{label}: {shown}{more}")
    for k, w in want.items():
        h = have.get(k)
        if h is None or not hasattr(w, "shape") or not hasattr(h, "shape"):
            continue
        if tuple(w.shape) != tuple(h.shape):
            problems.append(f"shape of {_key_str(k)}: checkpoint "
                            f"{tuple(h.shape)}, model {tuple(w.shape)}")
    return problems


class Checkpointer:
    """Periodic, NaN-safe, resumable checkpoints (see the module docstring).
    """

    def __init__(self, directory: str, *, save_every: int, keep: int = 3,
                 async_save: bool = True, read_only: bool = False):
        if save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {save_every}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        directory = str(directory)
        if "://" not in directory:
            # Orbax refuses relative paths ("Checkpoint path should be
            # absolute") only at the first save, after all the training.
            directory = os.path.abspath(os.path.expanduser(directory))
        self.directory = epath.Path(directory)
        if read_only and not self.directory.exists():
            raise CheckpointError(
                f"checkpoint directory {self.directory} does not exist; "
                "train first, or point the run at the directory holding the "
                "step folders (config.train.checkpoint_dir / "
                "config.eval.checkpoint)")
        self.save_every = save_every
        self.read_only = read_only
        policies = [ocp_managers.PreemptionCheckpointingPolicy()]
        if save_every:
            policies.append(ocp_managers.FixedIntervalPolicy(save_every))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp_managers.AnySavePolicy(policies),
            preservation_policy=ocp_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
            # A save interrupted by a crash or a kill leaves a
            # `<step>.orbax-checkpoint-tmp-*` directory: removed at the
            # next start.
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=_ITEMS, options=options)

    # --- inspection ---------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def _is_complete(self, step: int) -> bool:
        step_dir = self.directory / str(step)
        return (step_dir / COMMIT_MARKER).exists() and all(
            (step_dir / item).exists() for item in _ITEMS)

    def complete_steps(self) -> list[int]:
        return [s for s in self.all_steps() if self._is_complete(s)]

    # --- save ---------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def save(self, step: int, state: PyTree,
             data_state: Mapping[str, Any] | None = None,
             meta: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Saves `state` at `step` if due (or `force`) and finite.

        Args:
          step: the number of completed updates in `state`.
          state: pytree of arrays.
          data_state: JSON-able iterator state (restored with the step).
          meta: extra JSON fields for the "meta" item.
          force: save even off the `save_every` grid (preemption, last step);
            a step already on disk is not written again.

        Returns:
          True if a save started (it may finish asynchronously).
        """
        if self.read_only:
            raise CheckpointError(
                f"{self.directory} was opened read_only; cannot save")
        if force:
            if step in self._manager.all_steps():
                return False
        elif not self._manager.should_save(step):
            return False
        if not state_is_finite(state):
            logging.warning(
                "step %d: the state has NaN/Inf values; NOT saving it, so the "
                "last good checkpoint (step %s) stays the latest", step,
                self.latest_step())
            return False
        full_meta = {"step": int(step), "wall_time": time.time(),
                     "ssr_jax_version": __version__, **dict(meta or {})}
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(dict(data_state or {})),
                meta=ocp.args.JsonSave(full_meta),
            ),
            force=True,
        )

    # --- restore ------------------------------------------------------------

    def _saved_tree(self, step: int) -> PyTree:
        md = ocp.StandardCheckpointHandler().metadata(
            self.directory / str(step) / "state")
        return md.tree if hasattr(md, "tree") else md

    def _check_tree(self, step: int, target: PyTree, partial: bool) -> None:
        problems = _describe_mismatch(target, self._saved_tree(step),
                                      partial)
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not match the state "
                "to restore:\n  - " + "\n  - ".join(problems) + "\nIf the "
                "model config changed (e.g. data.num_classes, "
                "model.decoder.*, cmpa.dim), start a new --workdir or "
                "restore the old config; to load only part of the state "
                "(e.g. params for eval) use restore_subset.")

    def _candidates(self, step: int | None) -> list[int]:
        self._manager.reload()
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"no checkpoint for step {step} in {self.directory}; "
                    f"steps present: {steps or 'none'}")
            return [step]
        return steps[::-1]

    def _move_aside(self, step: int, why: str) -> str | None:
        """Renames a broken step to `<step>.corrupt-<time>` (never deletes
        it) so that the run can write that step again; returns the new
        path (None when read-only or the rename failed)."""
        if self.read_only:
            return None
        src = self.directory / str(step)
        dst = self.directory / (
            f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        moved = None
        if jax.process_index() == 0:
            try:
                src.rename(dst)
                moved = str(dst)
            except OSError as e:
                logging.warning("could not move %s aside: %s", src, e)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"ssr_jax_aside_{step}")
            moved = str(dst) if dst.exists() else None
        if moved:
            warn(f"checkpoint step {step} is broken ({why}); moved aside to "
                 f"{moved} (not deleted); this run will write step {step} "
                 "again")
        return moved

    def _restore_loop(self, step: int | None, restore_one,
                      required: bool) -> Any:
        candidates = (self._candidates(step) if self.directory.exists()
                      else [])
        if not candidates:
            if required:
                raise CheckpointError(
                    f"no checkpoint in {self.directory}; train first or "
                    "point the run at the directory holding the step "
                    "folders")
            return None
        failures = []
        moved = False
        for s in candidates:
            if not self._is_complete(s):
                why = f"step {s}: no {COMMIT_MARKER} (incomplete or copied " \
                      "half-way)"
            else:
                try:
                    result = restore_one(s)
                    if failures:
                        warn(f"resuming from checkpoint step {s}, the "
                             "latest readable one (newer steps: "
                             + "; ".join(failures) + ")")
                    if moved:
                        self._manager.reload()
                    return result
                except CheckpointMismatchError:
                    raise
                except Exception as e:  # noqa: BLE001 - any read failure
                    first = (str(e).strip().splitlines() or [""])[0]
                    first = first.split(" See full TensorStore")[0]
                    why = f"step {s}: {type(e).__name__}: {first}"[:300]
                    logging.info("reading step %d failed:\n%s", s, e)
            failures.append(why)
            if step is not None:
                break
            logging.warning("skipping checkpoint %s", why)
            if self._move_aside(s, why):
                moved = True
        if moved:
            self._manager.reload()
        if self.read_only:
            advice = ("Re-run training with the same command (it moves "
                      "broken steps aside to <step>.corrupt-<time> and "
                      "writes them again), or point eval.checkpoint at "
                      "another checkpoint.")
        else:
            advice = ("The broken steps were moved aside (not deleted); "
                      "re-run to start over, or restore them by hand.")
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}:\n  - "
            + "\n  - ".join(failures) + "\n" + advice)

    def restore(self, target_state: PyTree, step: int | None = None,
                required: bool = False) -> Restored | None:
        """Restores (state, data_state, meta); see the module docstring.

        Returns None when there is no checkpoint yet (a fresh run), or
        raises CheckpointError if `required`.
        """
        target = _abstract_target(target_state)

        def restore_one(s: int) -> Restored:
            self._check_tree(s, target, partial=False)
            out = self._manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ))
            return Restored(s, out.state, dict(out.data or {}),
                            dict(out.meta or {}))

        result = self._restore_loop(step, restore_one, required)
        if result is not None:
            logging.info("restored checkpoint %s/%d", self.directory,
                         result.step)
        return result

    def restore_subset(self, target_subset: PyTree, step: int | None = None,
                       required: bool = False
                       ) -> tuple[int, PyTree] | None:
        """Restores only the leaves of `target_subset` (a sub-tree of the
        saved state with sharded ShapeDtypeStruct or array leaves); None or
        CheckpointError (`required`) when there is no checkpoint."""
        target = _abstract_target(target_subset)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)

        def restore_one(s: int) -> tuple[int, PyTree]:
            self._check_tree(s, target, partial=True)
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as c:
                out = c.restore(
                    self.directory / str(s) / "state",
                    args=ocp.args.PyTreeRestore(
                        target, restore_args=restore_args,
                        partial_restore=True))
            return s, out

        return self._restore_loop(step, restore_one, required)

    # --- lifecycle ----------------------------------------------------------

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _preemption_service_active() -> bool:
    try:
        from jax._src import distributed as jax_distributed
    except ImportError:
        return False
    state = jax_distributed.global_state
    return (getattr(state, "client", None) is not None
            and getattr(state, "preemption_sync_manager", None) is not None)


class PreemptionGuard:
    """SIGTERM/SIGINT → a flag the training loop checks at step boundaries.

    Single process: `should_stop(step)` is True once a handled signal
    arrived. Multi-process: True on every process at the same step, when
    JAX's preemption sync point is reached (JAX's preemption service then
    owns SIGTERM and this guard leaves it alone) or when any process got a
    handled signal (an all-process OR, every `sync_every` steps; the
    all-gather is a host round trip, raise `sync_every` if it shows).
    A second SIGINT raises KeyboardInterrupt (Ctrl-C twice quits at once).
    """

    def __init__(self, sigint: bool = False, sync_every: int = 1):
        self.sigint = sigint
        self.sync_every = max(1, sync_every)
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> PreemptionGuard:
        signals = []
        multi = jax.process_count() > 1
        if not (multi and _preemption_service_active()):
            signals.append(signal.SIGTERM)
        if self.sigint:
            signals.append(signal.SIGINT)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionGuard:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.reason is None:
            self.reason = signal.Signals(signum).name
            again = (" (Ctrl-C again to stop at once)"
                     if signum == signal.SIGINT else "")
            warn(f"{self.reason} received: saving at the next step "
                 f"boundary and stopping{again}")

    @property
    def requested(self) -> bool:
        """True once this process received a handled signal."""
        return self.reason is not None

    def should_stop(self, step: int) -> bool:
        """Whether the loop should save and exit after `step` (collective
        when multi-process: call it on every process at every step)."""
        if jax.process_count() == 1:
            return self.requested
        stop = False
        if _preemption_service_active():
            from jax.experimental import multihost_utils

            try:
                stop = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:
                stop = False
            if stop and self.reason is None:
                self.reason = "preemption sync point"
        if step % self.sync_every == 0:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(
                np.asarray(self.requested, np.int32))
            if np.asarray(flags).any():
                stop = True
                self.reason = self.reason or "signal on another process"
        return stop
