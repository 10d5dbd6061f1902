"""A tiny deterministic training loop with ssr_jax.checkpointing, for the
preemption tests (the pattern the real trainer follows).

  python tests/toy_train.py --workdir DIR --steps 60 [--sleep 0.05]

Prints "step N" after every update, saves every `--save_every` steps,
resumes from the latest checkpoint in DIR, and on SIGTERM saves at the next
step boundary, prints "preempted at step N" and exits 0. A finished run
writes DIR/final_w.npy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ssr_jax import checkpointing


def _shardings():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    return NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


def init_state():
    """{"params": {"w" [8, 4] sharded on rows, "b" [4]}, "mom", "step"}."""
    rows, rep = _shardings()
    w = jax.device_put(jnp.linspace(-1.0, 1.0, 32).reshape(8, 4), rows)
    b = jax.device_put(jnp.zeros(4), rep)
    params = {"w": w, "b": b}
    return {"params": params, "mom": jax.tree.map(jnp.zeros_like, params),
            "step": jax.device_put(jnp.int32(0), rep)}


def batch(step: int):
    """Deterministic data for `step` (the "data iterator")."""
    rng = np.random.default_rng(step)
    return (rng.normal(size=(16, 8)).astype(np.float32),
            rng.normal(size=(16, 4)).astype(np.float32))


@jax.jit
def update(state, x, y):
    def loss(p):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    grads = jax.grad(loss)(state["params"])
    mom = jax.tree.map(lambda m, g: 0.9 * m + g, state["mom"], grads)
    params = jax.tree.map(lambda p, m: p - 0.05 * m, state["params"], mom)
    return {"params": params, "mom": mom, "step": state["step"] + 1}


def abstract_state():
    """The restore target: shapes from eval_shape, the train shardings."""
    rows, rep = _shardings()
    shapes = jax.eval_shape(init_state)

    def with_sharding(path, s):
        sharding = rows if jax.tree_util.keystr(path).endswith("['w']") \
            else rep
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(with_sharding, shapes)


def train(workdir: str, steps: int, save_every: int = 5,
          sleep: float = 0.0) -> np.ndarray | None:
    """Runs to `steps`; returns the final w, or None when preempted."""
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "ckpt"),
                                      save_every=save_every, keep=2)
    guard = checkpointing.PreemptionGuard().install()
    try:
        state = init_state()
        restored = ckpt.restore(abstract_state())
        start = 1
        if restored is not None:
            state = restored.state
            start = restored.data_state["next_step"]
            assert start == restored.step + 1 == int(state["step"]) + 1
            print(f"resumed from step {restored.step}", flush=True)
        for step in range(start, steps + 1):
            state = update(state, *batch(step))
            print(f"step {step}", flush=True)
            if guard.should_stop(step):
                ckpt.save(step, state, {"next_step": step + 1}, force=True)
                ckpt.close()
                print(f"preempted at step {step}", flush=True)
                return None
            ckpt.save(step, state, {"next_step": step + 1})
            if sleep:
                time.sleep(sleep)
        ckpt.save(steps, state, {"next_step": steps + 1}, force=True)
        ckpt.close()
        return np.asarray(state["params"]["w"])
    finally:
        guard.uninstall()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save_every", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args(argv)
    w = train(args.workdir, args.steps, args.save_every, args.sleep)
    if w is not None:
        np.save(os.path.join(args.workdir, "final_w.npy"), w)
        print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
