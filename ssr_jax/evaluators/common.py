"""What both evaluators share: global batch sizes, placement on the "data"
mesh, this process's rows, and the image accounting of a scored split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ssr_jax import logs
from ssr_jax.data import voc

Array = jax.Array
PyTree = Any


def global_batch_size(requested: int) -> int:
    """`requested` rounded up to a multiple of the device count."""
    n = jax.device_count()
    return max(n, -(-int(requested) // n) * n)


def local_rows(x: Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    shards = sorted(x.addressable_shards,
                    key=lambda s: s.index[0].start or 0)
    seen, parts = set(), []
    for s in shards:
        key = s.index[0].start or 0
        if key not in seen:
            seen.add(key)
            parts.append(np.asarray(s.data))
    return np.concatenate(parts)


def replicated(tree: PyTree, mesh) -> PyTree:
    """Places `tree` replicated on `mesh` (a no-op where it already is).

    Multi-process, `device_put` cannot send a process-local array to a
    global sharding: local leaves (e.g. freshly loaded encoders) are
    assembled with `make_array_from_process_local_data` (the same values
    on every process); global leaves (the train state) are kept.
    """
    sharding = NamedSharding(mesh, P())

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding,
                                                      np.asarray(x))

    return jax.tree.map(put, tree)


def image_accounting(data: voc.Split, scored: int, *, max_images: int,
                     beyond_max: int, without_mask: int, unreadable: int,
                     unreadable_reasons: Sequence[str] = (),
                     warn: bool = True) -> dict[str, Any]:
    """How many images of a split were scored, and why the others were not
    (recorded in metrics.json / seeds.json; with `warn`, a shortfall is
    also printed as a warning)."""
    listed = len(data.names)
    out = {
        "listed": listed,
        "scored": int(scored),
        "not_scored": {
            "unusable (data.strict=False)": int(data.summary.num_skipped),
            f"beyond eval.max_images={max_images}": int(beyond_max),
            "no mask": int(without_mask),
            "unreadable when read (data.strict=False)": int(unreadable),
        },
        "unusable_examples": list(data.summary.problems[:10]),
        "unreadable_examples": list(unreadable_reasons)[:10],
    }
    missing = {k: v for k, v in out["not_scored"].items() if v}
    if missing and warn:
        logs.warn(f"split {data.name!r}: scored {scored} of {listed} listed "
                  "images; not scored: " + ", ".join(
                      f"{v} {k}" for k, v in missing.items()))
    return out


def sum_over_processes(x: int) -> int:
    if jax.process_count() == 1:
        return int(x)
    from jax.experimental import multihost_utils
    return int(np.sum(multihost_utils.process_allgather(
        np.asarray(x, np.int32))))
