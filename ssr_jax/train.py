"""SSR trainer, big_vision style: read it top to bottom.

logging → mesh → input → frozen encoders and text bank → model and
optimiser → sharding → update step → checkpoint → loop (evals, logs).

`train_and_evaluate(config, workdir)` is the entry point; `main.py` calls
it. The whole pseudo-label path (CAM, SGC, PAR) runs inside the jitted
update step; CLIP and DINO are frozen inputs, never in the optimiser.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ssr_jax import (
    build,
    cam,
    checkpointing,
    cmpa,
    config_check,
    input_pipeline,
    logs,
    ssr,
    xla_guard,
)
from ssr_jax import params as params_lib

PyTree = Any
EvalHook = Callable[[int, Any], dict[str, Any]]


# --- schedules and optimiser -------------------------------------------------
def create_learning_rate_fn(config) -> optax.Schedule:
    """WeCLIP's PolyWarmupAdamW schedule (SPEC 1.10).

    Linear warmup from `warmup_ratio`·lr to lr over `warmup_steps`, then
    lr·(1 − step/num_steps)^power on the global step (not offset by the
    warmup), as WeCLIP's optimizer.py does. power 0 = constant.
    """
    o, total = config.optim, config.train.num_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = 1.0 - (1.0 - step / max(o.warmup_steps, 1)) * (
            1.0 - o.warmup_ratio)
        poly = jnp.maximum(1.0 - step / total, 0.0) ** o.poly_power
        mult = jnp.where(step < o.warmup_steps, warm, poly)
        return o.lr * mult

    return schedule


def _param_labels(params: PyTree) -> PyTree:
    """"decoder" for decoder params (×decoder_lr_mult), "base" for the rest
    of SSRModel: the CMPA heads and their log τ (×heads_lr_mult). The label
    is "base", not "heads", so that optimiser states in checkpoints written
    before heads_lr_mult existed still restore."""
    def label(path, _):
        keys = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
        return "decoder" if "decoder" in keys else "base"
    return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params: PyTree) -> PyTree:
    """No weight decay on the learnable temperature log τ ([choice])."""
    def keep(path, _):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return "log_tau" not in keys
    return jax.tree_util.tree_map_with_path(keep, params)


def create_optimizer(config, params: PyTree) -> optax.GradientTransformation:
    """AdamW with the decoder group at lr × decoder_lr_mult (SPEC 1.10) and
    the CMPA heads (with log τ) at lr × heads_lr_mult."""
    o = config.optim
    base = create_learning_rate_fn(config)

    def adamw(mult):
        return optax.adamw(
            lambda s: base(s) * mult, b1=o.b1, b2=o.b2, eps=o.eps,
            weight_decay=o.weight_decay, mask=_decay_mask)

    tx = optax.multi_transform(
        {"base": adamw(o.get("heads_lr_mult", 1.0)),
         "decoder": adamw(o.decoder_lr_mult)},
        _param_labels(params))
    if o.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
    return tx


# --- state -------------------------------------------------------------------
def _tree_norm(tree: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                        for x in leaves))


def heads_state(params: PyTree, rest: PyTree) -> dict[str, PyTree]:
    """{"params", "rest"}: the CMPA heads' part of the model's split state
    (parameters with log τ; BatchNorm running statistics)."""
    return {"params": params["heads"], "rest": rest["heads"]}


# --- the train step ----------------------------------------------------------
def make_update_fn(config, model_graphdef, clip_graphdef, dino_graphdef, tx,
                   slots: int | None = None):
    """The update step: pseudo labels → losses → AdamW.

    update_fn(state, frozen, batch, text) -> (state, measurements), with
    `slots` static class slots (a bucket of `cam.slot_buckets`; None =
    `data.max_classes_per_image`).
    """
    lr_fn = create_learning_rate_fn(config)
    cp = params_lib.method_params(config).cmpa
    ema_pools, ema_decay = cp.pool_source == "ema", cp.pool_ema_decay

    def pool_heads(model, state):
        """The heads whose GradCAM makes the path's CAMs (the pooling CAMs
        of Eq. 2): the live ones, or their slow copy (`cmpa.pool_source`)."""
        if not ema_pools:
            return model.heads
        graphdef, _, _ = nnx.split(model.heads, nnx.Param, ...)
        return nnx.merge(graphdef, state["heads_ema"]["params"],
                         state["heads_ema"]["rest"])

    def update_fn(state, frozen, batch, bank):
        clip = nnx.merge(clip_graphdef, frozen["clip"])
        dino = (nnx.merge(dino_graphdef, frozen["dino"])
                if dino_graphdef is not None else None)
        model = nnx.merge(model_graphdef, state["params"], state["rest"])
        path = ssr.pseudo_label_path(
            clip, dino, pool_heads(model, state), batch, bank["fg"],
            bank["bg"], config,
            step=state["step"], rfm_feat_fn=lambda hidden, grid: model.decoder(
                hidden, grid, deterministic=True)[1], slots=slots)

        key = jax.random.fold_in(jax.random.key(config.seed + 1),
                                 state["step"])

        def loss(m):
            return ssr.loss_fn(m, path, bank["fg"], state["protos"], config,
                               dropout_key=key)

        # nnx.value_and_grad: gradients w.r.t. the nnx.Param leaves only;
        # BatchNorm statistics and dropout counters update in `model`.
        (total, meas), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        _, _, rest = build.split_model(model)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        f_img = meas.pop("f_img")
        bank_state = cmpa.update_bank(state["bank"], f_img, path["cls_ids"])
        new_state = dict(state, params=params, rest=rest, opt=opt,
                         bank=bank_state, step=state["step"] + 1)
        if ema_pools:
            new_state["heads_ema"] = cmpa.ema_update(
                state["heads_ema"], heads_state(params, rest), ema_decay)
        labels = path["labels"]
        fg = jnp.mean(((labels > 0) & (labels != 255)).astype(jnp.float32))
        meas.update(loss=total, grad_norm=_tree_norm(grads),
                    param_norm=_tree_norm(params),
                    lr=lr_fn(state["step"]), pseudo_fg_fraction=fg)
        return new_state, meas

    return update_fn


# --- setup -------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    """Everything the loop needs; `setup()` builds it (tests use it too)."""
    config: Any
    mesh: jax.sharding.Mesh
    clip: Any  # vision tower only: setup drops the text tower
    dino: Any
    bank: dict[str, jax.Array]
    frozen: dict[str, Any]
    state: dict[str, Any]
    update: Any  # jitted (state, frozen, batch, bank) -> (state, meas), kmax
    recluster: Any  # jitted (bank, key) -> protos
    model_graphdef: Any
    # Class-slot buckets (`cam.slot_buckets`) and the update per bucket
    # used so far (`update_for`; `jit_update(slots)` builds one, `update`
    # is the kmax one).
    buckets: tuple[int, ...] = ()
    jit_update: Callable[[int], Any] | None = None
    updates: dict[int, Any] = dataclasses.field(default_factory=dict)

    def slots_for(self, local_labels: np.ndarray) -> int:
        """The bucket for a batch, from this process's label rows (all
        processes agree: `cam.batch_slots`)."""
        return cam.batch_slots(local_labels, self.buckets)

    def update_for(self, slots: int):
        """The jitted update step with `slots` class slots, one per bucket
        (each compiles once, on its first call; logged once here)."""
        fn = self.updates.get(slots)
        if fn is None:
            if slots not in self.buckets:
                raise ValueError(f"{slots} class slots is not one of the "
                                 f"buckets {self.buckets}")
            logging.info("class-slot bucket %d of %s: the update step "
                         "compiles for it on this call", slots,
                         self.buckets)
            fn = (self.update if slots == self.buckets[-1]
                  else self.jit_update(slots))
            self.updates[slots] = fn
        return fn

    def batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Process-local numpy batch → global arrays sharded on "data"."""
        sharding = NamedSharding(self.mesh, P("data"))
        return {k: jax.make_array_from_process_local_data(sharding, v)
                for k, v in local.items() if k in BATCH_KEYS}

    def trained_model(self) -> ssr.SSRModel:
        """The SSRModel with the current state's parameters."""
        return build.merge_model(self.model_graphdef, self.state["params"],
                                 self.state["rest"])

    @property
    def model(self) -> ssr.SSRModel:
        """`trained_model()`: the state holds the only copy of the
        parameters (a module kept from setup would be a second one)."""
        return self.trained_model()


BATCH_KEYS = ("image", "valid", "labels", "superpixels")


def setup(config, workdir: str, devices=None) -> Setup:
    """Encoders, text bank, model, optimiser, sharded state, jitted steps."""
    # --- mesh ---
    mesh = build.make_mesh(devices)
    repl = NamedSharding(mesh, P())
    data_sh = NamedSharding(mesh, P("data"))
    if config.train.batch_size % mesh.size:
        raise config_check.ConfigError(
            f"train.batch_size={config.train.batch_size} is not divisible by "
            f"the {mesh.size} devices")

    # --- frozen encoders, text bank, model and optimiser ---
    clip, dino, model = build.build_models(config)
    build.check_models(config, clip, dino)
    bank = build.build_text_bank(config, clip, workdir)
    bank = jax.device_put({k: jnp.asarray(v) for k, v in bank.items()}, repl)
    # Nothing after the bank reads the text tower (the pseudo labels, the
    # losses and evaluation use the vision tower): free it (242 MiB for
    # ViT-B/16 in float32; issue 15).
    clip.drop_text_tower()
    clip_graphdef, clip_state = nnx.split(clip)
    dino_graphdef, dino_state = (nnx.split(dino) if dino is not None
                                 else (None, None))
    frozen = jax.device_put({"clip": clip_state, "dino": dino_state}, repl)
    # The modules now hold the replicated arrays too (evaluation uses them).
    nnx.update(clip, frozen["clip"])
    if dino is not None:
        nnx.update(dino, frozen["dino"])
    model_graphdef, params, rest = build.split_model(model)
    tx = create_optimizer(config, params)
    num_fg = config.data.num_classes - 1
    k_protos = cmpa.prototype_count(config.cmpa.num_prototypes, num_fg)

    def init_state(params, rest):
        state = {
            "params": params, "rest": rest, "opt": tx.init(params),
            "bank": cmpa.init_bank(config.cmpa.bank_size, config.cmpa.dim),
            "protos": cmpa.init_protos(k_protos, config.cmpa.dim, num_fg),
            "step": jnp.zeros((), jnp.int32),
        }
        if params_lib.method_params(config).cmpa.pool_source == "ema":
            # [choice] `cmpa.pool_source="ema"`: the slow copy of the heads
            # starts at the heads' start; replicated and checkpointed with
            # the rest of the state.
            state["heads_ema"] = jax.tree_util.tree_map(
                jnp.copy, heads_state(params, rest))
        return state

    # --- sharding: parameters and state replicated, batch on "data" ---
    # The module's parameters are arguments, not closed over: a jit keeps
    # closed-over arrays alive with its cache (a third copy of the
    # parameters after setup returned). The module's own arrays go when
    # setup returns (`Setup.model` is built from the state).
    state = jax.jit(init_state, out_shardings=repl)(params, rest)
    del model, params, rest

    # --- update step, one jit per class-slot bucket ---
    kmax = config.data.max_classes_per_image
    buckets = cam.slot_buckets(config.data.get("class_slot_buckets", ()),
                               kmax)

    def jit_update(slots):
        update_fn = make_update_fn(config, model_graphdef, clip_graphdef,
                                   dino_graphdef, tx, slots)
        return jax.jit(update_fn, donate_argnums=(0,),
                       in_shardings=(repl, repl, data_sh, repl),
                       out_shardings=(repl, repl))

    update = jit_update(kmax)
    recluster = jax.jit(
        lambda b, key: cmpa.recluster(b, k=k_protos,
                                      iters=config.cmpa.kmeans_iters,
                                      key=key, num_classes=num_fg),
        out_shardings=repl)
    return Setup(config, mesh, clip, dino, bank, frozen, state,
                 update, recluster, model_graphdef, buckets, jit_update)


# --- main entry --------------------------------------------------------------
def train_and_evaluate(config, workdir: str, devices=None,
                       eval_hook: EvalHook | None = None,
                       make_eval_hook: Callable[..., EvalHook] | None = None,
                       ) -> Setup:
    """Trains SSR (resuming from the latest checkpoint in the workdir).

    Args:
      config: the run config (validated by `config_check`).
      workdir: checkpoints, metrics.jsonl, TensorBoard events, logs.
      devices: devices of the "data" mesh (default: all).
      eval_hook: called as `eval_hook(step, state)` every
        `train.eval_every` steps and at the end (it logs its own scalars).
      make_eval_hook: builds the hook once the encoders are loaded, called
        as `evaluate.make_eval_hook` is (main passes it; the trainer does
        not import the evaluator, docs/DESIGN.md "Layers"). Neither given
        with `train.eval_every` > 0: no in-training eval (a warning).

    Returns:
      The `Setup` holding the final state (`setup.trained_model()`).
    """
    # --- logging ---
    logs.setup_logging(workdir)
    logging.info("devices: %s (%d processes)", jax.devices(),
                 jax.process_count())

    # --- input ---
    train_iter = input_pipeline.train_iterator(config)

    # --- model, sharding, update step ---
    s = setup(config, workdir, devices)

    # --- checkpoint ---
    ckpt = checkpointing.Checkpointer(
        config.train.checkpoint_dir or f"{workdir}/checkpoints",
        save_every=config.train.checkpoint_every,
        keep=config.train.keep_checkpoints)
    restored = ckpt.restore(s.state)
    if restored is not None:
        s.state = restored.state
        train_iter.set_state(restored.data_state)
        checkpointing.warn(f"resumed from step {restored.step} "
                           f"({ckpt.directory}/{restored.step})")
    # Records past the restored step (a preempted or crashed run, or an
    # earlier run in this workdir) would be drawn twice.
    first = int(jax.device_get(s.state["step"]))
    if jax.process_index() == 0:
        dropped = logs.truncate_metrics(workdir, first)
        if dropped:
            logging.info("metrics.jsonl: dropped %d records after step %d",
                         dropped, first)
    writer = logs.MetricWriter(workdir)
    # Backend, versions and the XLA self-check (ssr_jax/xla_guard.py), at
    # the step this run starts from (the file stays in step order).
    writer.write_text(first, {"xla": json.dumps(xla_guard.report())})
    if eval_hook is None and config.train.eval_every:
        if make_eval_hook is not None:
            eval_hook = make_eval_hook(
                config, workdir, clip=s.clip, dino=s.dino,
                model_graphdef=s.model_graphdef, bank=s.bank, writer=writer)
        else:
            logging.warning("train.eval_every=%d but no eval hook was given:"
                            " no in-training evaluation",
                            config.train.eval_every)
    # SIGTERM (preemption, SLURM --signal) and Ctrl-C: save at the next step
    # boundary, then stop (PreemptedError); a second Ctrl-C stops at once.
    guard = checkpointing.PreemptionGuard(sigint=True).install()
    meta = {"config_hash": checkpointing.config_hash(config)}

    # --- loop ---
    total = config.train.num_steps
    progress = tqdm.tqdm(range(first, total), desc="train", initial=first,
                         total=total, disable=not config.train.progress)
    last_checked, saved = first, first
    stopped_at = None
    t0 = time.time()
    rng = jax.random.key(config.seed)
    try:
        for step in progress:
            if step > 0 and step % config.cmpa.recluster_every == 0:
                s.state["protos"] = s.recluster(
                    s.state["bank"], jax.random.fold_in(rng, step))
            local = next(train_iter)
            update = s.update_for(s.slots_for(local["labels"]))
            s.state, meas = update(s.state, s.frozen, s.batch(local),
                                   s.bank)
            done = step + 1
            if done % config.train.log_every == 0 or done == total:
                scalars = {k: float(v)
                           for k, v in jax.device_get(meas).items()}
                bad = sorted(k for k, v in scalars.items()
                             if not math.isfinite(v))
                if bad:
                    raise FloatingPointError(
                        f"non-finite {bad} between steps {last_checked} and "
                        f"{done}; checkpoints keep the last finite state. "
                        "Lower optim.lr or check the data.")
                last_checked = done
                scalars["steps_per_sec"] = (done - first) / (time.time()
                                                             - t0)
                writer.write_scalars(done, scalars)
                progress.set_postfix(loss=f"{scalars['loss']:.4f}")
                if not config.train.progress:
                    print(f"step {done} loss {scalars['loss']:.5f}",
                          flush=True)
            stop = guard.should_stop(done)
            if ckpt.save(done, s.state, train_iter.get_state(), meta,
                         force=stop or done == total):
                saved = done
            if eval_hook is not None and config.train.eval_every and (
                    done % config.train.eval_every == 0 or done == total):
                eval_hook(done, s.state)
            if stop:
                stopped_at = done
                break
        ckpt.wait_until_finished()
    finally:
        # Errors included: an in-flight save is waited for (a failed one
        # leaves a tmp directory that the next start removes).
        progress.close()
        try:
            ckpt.close()
        except Exception as e:  # noqa: BLE001 - the first error wins
            logging.warning("closing the checkpointer: %s", e)
        # A signal that came after the last step boundary still stops the
        # run before evaluation (the last step is saved: `force` above).
        reason = guard.reason
        guard.uninstall()
        train_iter.close()
        writer.close()
    if reason is not None:
        step_now = stopped_at if stopped_at is not None else total
        print(f"preempted at step {step_now}; resume with the same command",
              flush=True)
        raise checkpointing.PreemptedError(
            f"stopped by {reason} at step {step_now} (checkpoint "
            f"{ckpt.directory}/{saved} saved). Re-run the same command to "
            "resume; evaluation runs when training completes. Exit code 75.")
    return s
