"""The intake between sources and pipeline: bounded, in order, batch hand-over, join = all finished."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from edge_node.errors import IntakeFull
from edge_node.input.intake import InputItem, Intake
from edge_node.input.sources import InputIds, MqttInputSource
from schemas import Input, encode, encode_tensor, new_msg_id


def _items(n: int, prefix: str = "in") -> list[InputItem]:
    return [InputItem(f"{prefix}-{i}", np.zeros(2, np.float32), 0.0) for i in range(n)]


def _ids(items: list[InputItem]) -> list[str]:
    return [item.input_id for item in items]


async def test_batches_come_out_in_order_and_no_larger_than_asked() -> None:
    intake = Intake(maxsize=10)
    await intake.put_many(_items(7))
    assert intake.qsize() == 7 and not intake.full()
    assert _ids(intake.get_batch_nowait(3)) == ["in-0", "in-1", "in-2"]
    assert _ids(intake.get_batch_nowait(10)) == ["in-3", "in-4", "in-5", "in-6"]
    assert intake.get_batch_nowait(10) == [] and intake.empty()


async def test_put_nowait_refuses_past_the_bound_and_keeps_what_it_holds() -> None:
    intake = Intake(maxsize=2)
    first, second, third = _items(3)
    intake.put_nowait(first)
    intake.put_nowait(second)
    with pytest.raises(IntakeFull, match="holds 2 inputs"):
        intake.put_nowait(third)
    assert _ids(intake.get_batch_nowait(5)) == ["in-0", "in-1"]


async def test_put_many_longer_than_the_bound_goes_in_as_room_frees() -> None:
    intake = Intake(maxsize=4)
    producer = asyncio.create_task(intake.put_many(_items(10)))
    taken: list[InputItem] = []
    while len(taken) < 10:
        await intake.nonempty()
        assert intake.qsize() <= 4
        taken += intake.get_batch_nowait(3)
    await asyncio.wait_for(producer, 5)
    assert _ids(taken) == [f"in-{i}" for i in range(10)]


async def test_resize_keeps_what_waits_and_a_larger_bound_lets_a_waiting_producer_in() -> None:
    intake = Intake(maxsize=4)
    await intake.put_many(_items(4))
    intake.resize(2)  # lower than what waits: nothing is dropped, nothing more goes in
    assert intake.qsize() == 4 and intake.full()
    with pytest.raises(IntakeFull):
        intake.put_nowait(_items(1, "late")[0])
    producer = asyncio.create_task(intake.put_many(_items(4, "more")))
    await asyncio.sleep(0)  # the producer runs up to its wait for room
    assert not producer.done()
    intake.resize(8)  # room now: the waiting producer is woken and puts all four
    await asyncio.wait_for(producer, 5)
    assert _ids(intake.get_batch_nowait(8)) == [*(f"in-{i}" for i in range(4)), *(f"more-{i}" for i in range(4))]
    with pytest.raises(ValueError, match="at least 1"):
        intake.resize(0)


async def test_join_waits_until_every_input_put_is_finished() -> None:
    intake = Intake(maxsize=8)
    await intake.put_many(_items(5))
    join = asyncio.create_task(intake.join())
    batch = intake.get_batch_nowait(8)
    intake.task_done(3)
    await asyncio.sleep(0)
    assert not join.done() and intake.unfinished == 2  # taken is not finished
    intake.task_done(len(batch) - 3)
    await asyncio.wait_for(join, 5)
    with pytest.raises(ValueError, match="unfinished"):
        intake.task_done()


async def test_a_cancelled_waiting_producer_does_not_swallow_the_next_ones_wake_up() -> None:
    intake = Intake(maxsize=1)
    intake.put_nowait(_items(1, "held")[0])
    cancelled = asyncio.create_task(intake.put(_items(1, "cancelled")[0]))
    waiting = asyncio.create_task(intake.put(_items(1, "waiting")[0]))
    await asyncio.sleep(0)
    cancelled.cancel()
    assert _ids(intake.get_batch_nowait(1)) == ["held-0"]  # room for one: it must reach `waiting`
    await asyncio.wait_for(waiting, 5)
    assert cancelled.cancelled()
    assert _ids(intake.get_batch_nowait(5)) == ["waiting-0"]


async def test_a_waiting_consumer_wakes_on_the_first_input() -> None:
    intake = Intake(maxsize=4)
    consumer = asyncio.create_task(intake.nonempty())
    await asyncio.sleep(0)
    assert not consumer.done()
    await intake.put(_items(1)[0])
    await asyncio.wait_for(consumer, 5)
    assert intake.qsize() == 1


async def test_the_mqtt_source_drops_and_counts_what_a_full_intake_cannot_take() -> None:
    """The MQTT source must never block the connection behind inference: an input that finds the
    intake full is dropped and counted (telemetry reports it as rejected 'overloaded')."""
    intake = Intake(maxsize=2)
    source = MqttInputSource(intake, InputIds())
    for i in range(5):
        payload = encode(
            Input(
                msg_id=new_msg_id(),
                fleet_id="f1",
                device_id="dev-1",
                ts=time.time(),
                input_id=f"in-{i}",
                tensor=encode_tensor(np.zeros(64, np.float32)),
            )
        )
        source.offer(payload, "fleet/f1/dev-1/input")
    assert source.overloaded == 3
    assert _ids(intake.get_batch_nowait(5)) == ["in-0", "in-1"]  # the first ones kept, in order
