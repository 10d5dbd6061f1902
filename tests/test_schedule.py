"""The suite's run order (tests/conftest.py `schedule_order`): under
pytest-xdist's worksteal scheduler every worker starts on heavy modules,
modules stay whole, and `chunk_sizes` is what xdist really sends."""

from __future__ import annotations

import types

import conftest
import pytest


class _Item:
    def __init__(self, nodeid: str, seconds: float | None = None):
        self.nodeid = nodeid
        self.mark = (None if seconds is None else types.SimpleNamespace(
            kwargs={} if seconds == 0 else {"seconds": seconds}))

    def get_closest_marker(self, name):
        return self.mark if name == "slow" else None

    def __repr__(self):
        return self.nodeid


def _suite():
    """Fast modules first in collection order, as in the real suite, and
    the slow tests in the middle of their modules."""
    items = [_Item(f"tests/test_fast{m}.py::t{i}") for m in range(6)
             for i in range(20)]
    items += [_Item("tests/test_a.py::t0"),
              _Item("tests/test_a.py::long", 170),
              _Item("tests/test_a.py::t1")]
    items += [_Item(f"tests/test_b.py::s{i}", 0) for i in range(4)]  # 4x30
    items += [_Item("tests/test_c.py::long", 150)]
    items += [_Item("tests/test_d.py::t0"), _Item("tests/test_d.py::s", 0)]
    return items


def _chunks(order, workers):
    out, start = [], 0
    for size in conftest.chunk_sizes(len(order), workers):
        out.append(order[start:start + size])
        start += size
    return out


def _modules(seq):
    return [i.nodeid.split("::")[0].split("_", 1)[1][:-3] for i in seq]


def test_serial_order_is_heaviest_module_first():
    items = _suite()
    order = conftest.schedule_order(items, 1)
    assert sorted(map(id, order)) == sorted(map(id, items))
    assert list(dict.fromkeys(_modules(order)))[:4] == ["a", "c", "b", "d"]
    # Modules stay whole and in their own order.
    assert [i.nodeid for i in order[:3]] == [
        "tests/test_a.py::t0", "tests/test_a.py::long", "tests/test_a.py::t1"]


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_every_worker_starts_on_a_heavy_module(workers):
    items = _suite()
    order = conftest.schedule_order(items, workers)
    assert sorted(map(id, order)) == sorted(map(id, items))
    chunks = _chunks(order, workers)
    assert [len(c) for c in chunks] == conftest.chunk_sizes(len(items),
                                                            workers)
    heads = [_modules(c)[0] for c in chunks]
    assert all(h in "abcd" for h in heads), heads
    # The two longest tests start first, on different workers.
    assert heads[:2] == ["a", "c"]
    for m in "abcd":  # each heavy module whole, in one chunk
        assert sum(m in _modules(c) for c in chunks) == 1, m
    # The fast tests close the chunks (what idle workers steal).
    for c in chunks:
        mods = _modules(c)
        first_fast = next((k for k, x in enumerate(mods)
                           if x.startswith("fast")), len(mods))
        assert all(x.startswith("fast") for x in mods[first_fast:])


def test_chunk_sizes_are_what_worksteal_sends():
    """The initial distribution of pytest-xdist's WorkStealingScheduling,
    run on fake workers: contiguous chunks of the sizes `chunk_sizes`
    gives, in the order the workers came up."""
    WorkStealingScheduling = pytest.importorskip(
        "xdist.scheduler").WorkStealingScheduling  # noqa: N806

    class Node:
        shutting_down = False

        def __init__(self, name):
            self.sent = []
            self.gateway = types.SimpleNamespace(id=name)

        def send_runtest_some(self, indices):
            self.sent.extend(indices)

    for total, workers in ((734, 2), (733, 3), (10, 4)):
        config = types.SimpleNamespace(
            getvalue=lambda name, w=workers: [f"{w}*popen"])
        sched = WorkStealingScheduling(config)
        nodes = [Node(f"gw{k}") for k in range(workers)]
        names = [f"t{i}" for i in range(total)]
        for node in nodes:
            sched.add_node(node)
        for node in nodes:
            sched.add_node_collection(node, names)
        sched.schedule()
        sizes = conftest.chunk_sizes(total, workers)
        start = 0
        for node, size in zip(nodes, sizes, strict=True):
            assert node.sent == list(range(start, start + size))
            start += size
        assert start == total
