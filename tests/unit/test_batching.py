"""The dynamic batcher: concurrent submissions share one call; failures reach every waiter."""

from __future__ import annotations

import asyncio
import threading

import pytest

from copilot.runtime.batching import DynamicBatcher


async def test_concurrent_requests_run_as_one_batch_and_keep_their_order():
    calls: list[list[int]] = []
    batcher = DynamicBatcher(
        lambda items: (calls.append(items), [i * 10 for i in items])[1], max_batch=8, max_wait_s=0.05
    )
    results = await asyncio.gather(*(batcher.submit(i) for i in range(8)))
    await batcher.close()
    assert results == [i * 10 for i in range(8)]
    assert calls == [list(range(8))]


async def test_batches_are_capped_at_max_batch():
    sizes: list[int] = []
    batcher = DynamicBatcher(lambda items: (sizes.append(len(items)), items)[1], max_batch=3, max_wait_s=0.05)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(7))) == list(range(7))
    await batcher.close()
    assert max(sizes) == 3 and sum(sizes) == 7


async def test_a_lone_request_is_dispatched_at_once_however_long_max_wait_is():
    # an hour of max_wait: were a lone request held for it, the outer timeout would fail the test
    sizes: list[int] = []
    batcher = DynamicBatcher(lambda items: (sizes.append(len(items)), items)[1], max_batch=64, max_wait_s=3600)
    assert await asyncio.wait_for(batcher.submit("x"), 60) == "x"
    with batcher.coming() as arrival:  # announced, and nothing else on the way: no wait either
        assert await asyncio.wait_for(arrival.submit("y"), 60) == "y"
    assert sizes == [1, 1]
    await batcher.close()


async def test_a_forming_batch_waits_for_announced_callers_and_goes_when_the_last_has_submitted():
    sizes: list[list[str]] = []
    batcher = DynamicBatcher(lambda items: (sizes.append(items), items)[1], max_batch=8, max_wait_s=3600)
    with batcher.coming() as first, batcher.coming() as second:
        assert batcher.incoming == 2
        one = asyncio.create_task(first.submit("a"))
        for _ in range(20):  # the worker has "a" and waits: "b" is still being prepared
            await asyncio.sleep(0)
        assert sizes == [] and not one.done()
        two = asyncio.create_task(second.submit("b"))
        assert await asyncio.wait_for(asyncio.gather(one, two), 60) == ["a", "b"]
    assert sizes == [["a", "b"]] and batcher.incoming == 0
    await batcher.close()


async def test_an_announced_caller_that_fails_before_submitting_does_not_hold_the_batch():
    sizes: list[int] = []
    batcher = DynamicBatcher(lambda items: (sizes.append(len(items)), items)[1], max_batch=8, max_wait_s=3600)
    with batcher.coming() as arrival:
        task = asyncio.create_task(arrival.submit("a"))
        with pytest.raises(ValueError), batcher.coming():
            await asyncio.sleep(0)
            raise ValueError("the image could not be decoded")
        assert await asyncio.wait_for(task, 60) == "a"
    assert sizes == [1] and batcher.incoming == 0
    await batcher.close()


async def test_the_wait_for_announced_callers_is_bounded_by_max_wait():
    batcher = DynamicBatcher(lambda items: items, max_batch=8, max_wait_s=0.01)
    with batcher.coming() as arrival, batcher.coming():  # the second never submits within the block
        assert await asyncio.wait_for(arrival.submit("a"), 60) == "a"
    await batcher.close()


async def test_requests_arriving_during_a_batch_form_the_next_one():
    gate = threading.Event()
    sizes: list[int] = []

    def slow(items):
        sizes.append(len(items))
        gate.wait(5)
        return items

    batcher = DynamicBatcher(slow, max_batch=16, max_wait_s=0.0)
    first = asyncio.create_task(batcher.submit(0))
    await asyncio.sleep(0.05)
    rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0.05)
    gate.set()
    assert await asyncio.gather(first, *rest) == list(range(6))
    await batcher.close()
    assert sizes == [1, 5]


async def test_an_error_reaches_every_waiter_and_the_batcher_goes_on():
    def failing(items):
        if "bad" in items:
            raise ValueError("bad input in batch")
        return items

    batcher = DynamicBatcher(failing, max_batch=4, max_wait_s=0.05)
    outcomes = await asyncio.gather(batcher.submit("bad"), batcher.submit("ok"), return_exceptions=True)
    assert all(isinstance(o, ValueError) for o in outcomes)
    assert await batcher.submit("fine") == "fine"
    await batcher.close()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        DynamicBatcher(lambda items: items, max_batch=0)
