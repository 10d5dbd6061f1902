"""Ahead-of-time compile of the SSR train step for a TPU slice, on a CPU.

    pip install --target /tmp/libtpu_site "libtpu==0.0.42.*"   # jax 0.10.2
    PYTHONPATH=/tmp/libtpu_site python benchmarks/aot_tpu.py \
        --topology v5e:2x2 --batch 128 --json aot.json

No TPU is needed: `jax.experimental.topologies.get_topology_desc` describes
the slice through libtpu's compiler (libtpu must be importable; it is the
`jax[tpu]` extra, pinned by jax), the train step is lowered on abstract
arguments (`jax.ShapeDtypeStruct`s with the slice's shardings: state and
frozen encoders replicated, batch sharded on "data", as `train.setup`
does) and compiled by XLA:TPU. Nothing is allocated: CLIP ViT-B/16, DINO
ViT-S/16 and the SSR model are built with `nnx.eval_shape`.

Prints and writes the compile time and XLA's per-device memory analysis
(arguments, outputs, temporaries; what must fit in HBM: 16 GiB per v5e
chip, 32 GiB per v4 chip, 95 GiB per v5p chip) and the FLOP count, so an
out-of-memory batch size or a sharding error shows up before renting the
hardware (maxtext's train_compile does the same). Without libtpu the script
says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}


def abstract_setup(config, mesh):
    """The update function and abstract (state, frozen, batch, bank)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ssr_jax import cmpa, ssr, train
    from ssr_jax.models import clip as clip_lib
    from ssr_jax.models import vit

    clip_cfg = clip_lib.CLIPConfig(
        vision=clip_lib.CLIPVisionConfig(patch_size=16),
        text=clip_lib.CLIPTextConfig(), projection_dim=512)
    dino_cfg = vit.ViTConfig(hidden_size=384, num_hidden_layers=12,
                             num_attention_heads=6, intermediate_size=1536,
                             layer_norm_eps=1e-6)
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    clip = nnx.eval_shape(lambda: clip_lib.CLIP(clip_cfg, dtype=dtype,
                                                rngs=nnx.Rngs(0)))
    dino = nnx.eval_shape(lambda: vit.ViT(dino_cfg, dtype=dtype,
                                          rngs=nnx.Rngs(0)))
    model = nnx.eval_shape(lambda: ssr.SSRModel(
        config, clip_width=768, embed_dim=512, rngs=nnx.Rngs(0)))
    clip_g, clip_s = nnx.split(clip)
    dino_g, dino_s = nnx.split(dino)
    model_g, params, rest = nnx.split(model, nnx.Param, ...)
    tx = train.create_optimizer(config, params)
    num_fg = config.data.num_classes - 1
    k = cmpa.prototype_count(config.cmpa.num_prototypes, num_fg)
    state = jax.eval_shape(lambda: {
        "params": params, "rest": rest, "opt": tx.init(params),
        "bank": cmpa.init_bank(config.cmpa.bank_size, config.cmpa.dim),
        "protos": cmpa.init_protos(k, config.cmpa.dim, num_fg),
        "step": jnp.zeros((), jnp.int32)})
    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))

    def on(tree, sharding):
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                           sharding=sharding), tree)

    b, s = config.train.batch_size, config.data.crop_size
    batch = {
        "image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
        "valid": jax.ShapeDtypeStruct((b, s, s), jnp.bool_),
        "labels": jax.ShapeDtypeStruct((b, num_fg), jnp.float32),
        "superpixels": jax.ShapeDtypeStruct((b, s, s), jnp.int32),
    }
    bank = {"fg": jax.ShapeDtypeStruct((num_fg, 512), jnp.float32),
            "bg": jax.ShapeDtypeStruct((25, 512), jnp.float32)}
    update = train.make_update_fn(config, model_g, clip_g, dino_g, tx)
    args = (on(state, repl), on({"clip": clip_s, "dino": dino_s}, repl),
            on(batch, data), on(bank, repl))
    jitted = jax.jit(update, donate_argnums=(0,),
                     in_shardings=(repl, repl, data, repl),
                     out_shardings=(repl, repl))
    return jitted, args


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="v5e:2x2",
                   help="TPU topology name, e.g. v5e:2x2, v4:2x2x1, v5p:2x2x1")
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--crop", type=int, default=320)
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   default="bfloat16")
    p.add_argument("--segment-impl", choices=("segment", "onehot"),
                   default="onehot")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        print("libtpu is not importable: install the jax[tpu] runtime "
              "beside this environment, e.g.\n  pip install --target "
              "/tmp/libtpu_site 'libtpu==0.0.42.*'\nand run with "
              "PYTHONPATH=/tmp/libtpu_site (see the module docstring).")
        return 2
    # libtpu looks for a local TPU unless told this host has none.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", args.topology.split(":")[0])
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

    import jax
    import numpy as np
    from jax.experimental import topologies

    from ssr_jax import config_defaults

    topo = topologies.get_topology_desc(args.topology, "tpu")
    devices = list(topo.devices)
    if args.batch % len(devices):
        p.error(f"--batch {args.batch} is not divisible by the "
                f"{len(devices)} devices of {args.topology}")
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    config = config_defaults.dataset_config("voc", "paper")
    config.train.batch_size = args.batch
    config.data.crop_size = args.crop
    config.model.dtype = args.dtype
    config.sgc.segment_impl = args.segment_impl

    jitted, abstract = abstract_setup(config, mesh)
    t0 = time.perf_counter()
    lowered = jitted.lower(*abstract)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes",
              "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    memory = {f: getattr(mem, f, None) for f in fields}
    per_device = sum(memory[f] or 0 for f in (
        "argument_size_in_bytes", "output_size_in_bytes",
        "temp_size_in_bytes")) - (memory["alias_size_in_bytes"] or 0)
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    kind = args.topology.split(":")[0]
    hbm = HBM_GIB.get(kind)
    result = {
        "topology": args.topology, "devices": len(devices),
        "device_kind": getattr(devices[0], "device_kind", "?"),
        "global_batch": args.batch,
        "per_device_batch": args.batch // len(devices), "crop": args.crop,
        "dtype": args.dtype, "segment_impl": args.segment_impl,
        "lower_s": lower_s, "compile_s": compile_s, "memory": memory,
        "per_device_gib": per_device / 2**30, "hbm_gib": hbm,
        "fits": None if hbm is None else per_device / 2**30 < hbm,
        "flops_per_step": flops, "jax": jax.__version__,
    }
    print(f"{args.topology} ({len(devices)} x {result['device_kind']}): "
          f"global batch {args.batch} ({result['per_device_batch']} per "
          f"device), {args.crop}px, {args.dtype}, segment_impl "
          f"{args.segment_impl}")
    print(f"  lowered in {lower_s:.1f} s, compiled in {compile_s:.1f} s")
    verdict = ""
    if hbm:
        verdict = (f" of {hbm} GiB HBM: "
                   f"{'fits' if result['fits'] else 'DOES NOT FIT'}")
    print("  per device: arguments "
          f"{(memory['argument_size_in_bytes'] or 0) / 2**30:.2f} GiB, "
          f"temporaries {(memory['temp_size_in_bytes'] or 0) / 2**30:.2f} "
          f"GiB, total {result['per_device_gib']:.2f} GiB{verdict}")
    if flops:
        print(f"  {flops / 1e12:.2f} TFLOP per step per device (XLA count)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
