"""Layer-streamed evaluation reads layer i + 1 on a worker thread while layer i computes
(trtconv.stages.evaluate_streamed.prefetched): in order, never more than two layers alive, and a
failed read surfaces in the caller. No model needed: the loader here records what it was asked."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from trtconv.stages.evaluate_streamed import prefetched


class Layer:
    """Counts the instances alive, as a layer's tensors would be."""

    alive = 0
    lock = threading.Lock()

    def __init__(self, i: int):
        self.i = i
        with Layer.lock:
            Layer.alive += 1

    def __del__(self):
        with Layer.lock:
            Layer.alive -= 1


def test_layers_come_in_order_read_ahead_on_another_thread_two_at_most():
    threads, seen, most = set(), [], 0

    def load(i):
        threads.add(threading.get_ident())
        return Layer(i)

    with ThreadPoolExecutor(max_workers=1) as pool:
        for layer in prefetched(pool, load, 6):
            seen.append(layer.i)
            most = max(most, Layer.alive)
            del layer  # as LayerStreamedPair.compute does, before asking for the next
    assert seen == list(range(6))
    assert threads and threading.get_ident() not in threads
    assert most <= 2
    assert Layer.alive == 0


def test_a_failed_read_is_raised_to_the_caller():
    def load(i):
        if i == 2:
            raise OSError("rank0.safetensors: truncated")
        return i

    with ThreadPoolExecutor(max_workers=1) as pool:
        got = []
        with pytest.raises(OSError, match="truncated"):
            for item in prefetched(pool, load, 4):
                got.append(item)  # noqa: PERF402 (the items before the failure are the point)
    assert got == [0, 1]


def test_no_layers_reads_nothing():
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert list(prefetched(pool, lambda i: pytest.fail("read"), 0)) == []
