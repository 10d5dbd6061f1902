"""XLA memory of the jitted train step per class-slot bucket (issue 15).

    python benchmarks/memory.py [--quick] --slots 3,6 [--vmap] --workdir DIR

Builds `train.setup` at the benchmark's shapes (random weights written to
DIR once, as `run.py` does), lowers and compiles `Setup.update_for(k)` on
`run.py`'s batch for each k, and prints `compiled.memory_analysis()`
(arguments, outputs, temporaries, MiB) and the sizes of the frozen states.
`--vmap`: GradCAM's backward over all slots in one vmap (the accelerator
default) instead of CPU's one slot at a time. `--rss`: also the live JAX
arrays after `train.setup` and, per k, the peak RSS over two update steps
measured as `run.py`'s cells do (one warm-up step, `malloc_trim`, VmHWM
reset, timed steps: `run_rss_mb`). Set XLA_FLAGS as run.py's
workers do for one thread (`--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1`) to compare with its rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--slots", default="3,6")
    p.add_argument("--vmap", action="store_true")
    p.add_argument("--rss", action="store_true")
    p.add_argument("--workdir", required=True)
    args = p.parse_args()
    shapes = bench.QUICK if args.quick else bench.FULL
    w = args.workdir
    enc = os.path.join(w, "enc")
    spec = {"shapes": dataclasses.asdict(shapes), "device": "cpu",
            "repeats": 1, "threads": 1, "workdir": w,
            "clip_path": os.path.join(enc, "clip"),
            "dino_path": os.path.join(enc, "dino"),
            "data_root": os.path.join(w, "voc"), "dtypes": ["float32"],
            "buckets": None}
    stamp = os.path.join(w, "prepared.json")
    want = dataclasses.asdict(dataclasses.replace(shapes, kmax=6))
    os.makedirs(w, exist_ok=True)
    if not os.path.exists(stamp) or json.load(open(stamp)) != want:
        bench.jax_prepare(spec)
        with open(stamp, "w") as f:
            json.dump(want, f)

    import jax  # noqa: PLC0415

    from ssr_jax import cam, train  # noqa: PLC0415

    if args.vmap:
        cam.default_slot_chunk = lambda k: k
    setup = train.setup(bench._jax_config(spec, shapes.batch),
                        tempfile.mkdtemp(dir=w), jax.devices()[:1])

    def mib(tree):
        return round(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
                     / 2**20, 1)

    clip = setup.frozen["clip"]
    print(json.dumps({"clip_vision_mib": mib(clip["vision"]),
                      # train.setup drops the text tower after the bank.
                      "clip_text_mib": mib(clip["text"] if "text" in clip
                                           else {}),
                      "dino_mib": mib(setup.frozen["dino"]),
                      "state_mib": mib(setup.state)}))
    if args.rss:
        bench._reset_peak_rss()
        print(json.dumps({"live_arrays_after_setup_mib":
                          mib(jax.live_arrays()),
                          "rss_after_setup_mb":
                          bench._peak_rss_since_reset_mb()}), flush=True)
    batch = setup.batch(bench.shapes_batch(shapes))
    for k in (int(x) for x in args.slots.split(",")):
        compiled = setup.update_for(k).lower(setup.state, setup.frozen,
                                             batch, setup.bank).compile()
        m = compiled.memory_analysis()
        out = {"slots": k, "vmap": args.vmap, **{
            a.replace("_size_in_bytes", "_mib"):
            round(getattr(m, a) / 2**20, 1)
            for a in ("argument_size_in_bytes", "output_size_in_bytes",
                      "alias_size_in_bytes", "temp_size_in_bytes")}}
        if args.rss:
            def step(compiled=compiled):
                setup.state, meas = compiled(setup.state, setup.frozen,
                                             batch, setup.bank)
                jax.block_until_ready((meas["loss"], setup.state))

            timing = bench._timed(step, 2)
            out.update(run_rss_mb=timing.get("run_rss_mb"),
                       median_s=round(timing["median_s"], 2))
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
