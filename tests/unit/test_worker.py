"""The torch worker thread and the per-destination outbox ([Note: torch off the loop],
[Note: emulated speed]), in one process with fake work and a fake network."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from p2psl.errors import BrokenError
from p2psl.runtime import worker as worker_module
from p2psl.runtime.trace import LOOP, WORKER, Tracer
from p2psl.runtime.worker import PADDED, Outbox, TorchWorker
from p2psl.wire.messages import Cut

# -- TorchWorker -------------------------------------------------------------------------------


@pytest.fixture
def tracer():
    return Tracer("me")


@pytest.fixture
def worker(tracer):
    w = TorchWorker(tracer)
    yield w
    w.close()


async def test_stop_iteration_in_a_task_fails_the_await_instead_of_hanging_it(worker):
    """An asyncio future cannot take StopIteration: left as is, the awaiting task never wakes."""
    with pytest.raises(RuntimeError, match="StopIteration"):
        async with asyncio.timeout(10):
            await worker.run("plan", next, iter(()))


async def test_closing_from_the_loop_waits_for_the_running_task_without_blocking_the_loop(worker):
    """A peer that stops while its thread runs a long task (a layer being profiled) must not
    freeze the loop meanwhile: in one process, that loop carries every peer's heartbeats."""
    import threading

    started, gate = threading.Event(), threading.Event()

    def long_task():
        started.set()
        gate.wait()
        return "done"

    running = asyncio.ensure_future(worker.run("profile", long_task))
    await asyncio.get_running_loop().run_in_executor(None, started.wait)
    closing = asyncio.ensure_future(worker.aclose())
    for _ in range(20):  # the loop goes round while the task still holds the thread
        await asyncio.sleep(0)
    assert not closing.done() and not running.done()
    gate.set()
    await closing
    assert await running == "done"


async def test_tasks_run_on_one_thread_in_the_order_given(worker):
    """Parts share a peer's state: two tasks must never overlap or reorder."""
    ran, busy = [], threading.Lock()

    def task(n):
        assert busy.acquire(blocking=False), "two tasks at once"
        ran.append((n, threading.get_ident()))
        busy.release()
        return n * 10

    results = await asyncio.gather(*(worker.run("forward", task, n) for n in range(20)))
    assert results == [n * 10 for n in range(20)]
    assert [n for n, _ in ran] == list(range(20))
    threads = {ident for _, ident in ran}
    assert len(threads) == 1 and threading.get_ident() not in threads


async def test_a_small_training_task_runs_on_the_loop_once_timed(worker):
    """[Note: small tasks on the loop]: a training task that took under INLINE_SECONDS last time
    skips the thread hand-off; other tasks never do."""
    here = threading.get_ident()
    assert await worker.run("forward", threading.get_ident) != here  # not timed yet
    assert await worker.run("forward", threading.get_ident) == here
    assert await worker.run("checkpoint", threading.get_ident) != here
    assert await worker.run("checkpoint", threading.get_ident) != here


async def test_the_loop_runs_what_is_ready_between_tasks_on_it(worker):
    """An owner of a federated-averaging run chains its steps with no network wait between
    them: each task on the loop must let heartbeats and messages through after it."""
    await worker.run("forward", int)
    ran = []
    asyncio.get_running_loop().call_soon(ran.append, "heartbeat")
    await worker.run("forward", int)  # on the loop now
    assert ran == ["heartbeat"]


def burn(seconds: float) -> int:
    """Spend `seconds` of this thread's CPU time; the thread's identity."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    return threading.get_ident()


def doze(seconds: float) -> int:
    """Take `seconds` of wall time and next to no CPU, as a task preempted by other peers
    (or one waiting for an accelerator) does; the thread's identity."""
    time.sleep(seconds)
    return threading.get_ident()


async def test_a_task_slower_than_the_bound_goes_back_to_the_worker(worker):
    here = threading.get_ident()
    await worker.run("backward", burn, 0)
    assert await worker.run("backward", burn, worker_module.INLINE_SECONDS * 2) == here  # fast last time
    assert await worker.run("backward", burn, 0) != here


async def test_on_a_cpu_a_task_is_judged_by_its_cpu_time_not_by_the_wall_clock(worker, tracer):
    """Peers sharing cores preempt each other: a task whose wall time another peer stretched
    stays on the loop. On an accelerator the CPU time leaves out the device: the wall judges."""
    here = threading.get_ident()
    await worker.run("backward", doze, 0)
    assert await worker.run("backward", doze, worker_module.INLINE_SECONDS * 2) == here
    assert await worker.run("backward", doze, 0) == here  # 10 ms of wall time, ~0 of CPU
    device = TorchWorker(tracer, cpu_clock=False)
    try:
        await device.run("backward", doze, 0)
        assert await device.run("backward", doze, worker_module.INLINE_SECONDS * 2) == here
        assert await device.run("backward", doze, 0) != here
    finally:
        device.close()


async def test_a_function_on_inputs_of_other_shapes_is_timed_anew(worker):
    here = threading.get_ident()

    def task(x):
        return threading.get_ident()

    await worker.run("evaluate", task, torch.zeros(256, 4))
    assert await worker.run("evaluate", task, torch.zeros(256, 4)) == here
    assert await worker.run("evaluate", task, torch.zeros(40, 4)) != here  # another shape: not timed yet


async def test_a_cancelled_caller_does_not_free_the_thread_for_tasks_on_the_loop(worker):
    """The thread finishes a task whose caller gave up; until then nothing runs beside it."""
    here = threading.get_ident()
    await worker.run("forward", threading.get_ident)
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        return release.wait(10.0)

    waiting = asyncio.ensure_future(worker.run("backward", hold))
    assert await asyncio.to_thread(started.wait, 10.0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    beside = asyncio.ensure_future(worker.run("forward", threading.get_ident))
    for _ in range(3):  # on the loop it would be done after one turn
        await asyncio.sleep(0)
    assert not beside.done()  # queued behind the running backward, not run on the loop
    release.set()
    assert await beside != here


async def test_nothing_runs_on_the_loop_while_the_worker_is_busy_or_the_peer_is_padded(worker, tracer):
    here = threading.get_ident()
    await worker.run("forward", threading.get_ident)
    release = threading.Event()
    busy = asyncio.ensure_future(worker.run("checkpoint", release.wait, 10.0))
    await asyncio.sleep(0)  # the checkpoint is on the worker thread now
    beside = asyncio.ensure_future(worker.run("forward", threading.get_ident))
    release.set()
    await busy
    assert await beside != here  # queued behind the checkpoint, in order
    slow_peer = TorchWorker(tracer, speed=0.5)
    try:
        await slow_peer.run("forward", threading.get_ident)
        assert await slow_peer.run("forward", threading.get_ident) != here
    finally:
        slow_peer.close()


async def test_the_loop_keeps_running_while_a_task_computes(worker):
    """The task can only finish if the event loop runs meanwhile (it waits for the loop)."""
    answered = threading.Event()
    asyncio.get_running_loop().call_soon(answered.set)
    assert await worker.run("forward", answered.wait, 10.0)


async def test_each_task_leaves_a_span_with_its_ids(worker, tracer):
    await worker.run("forward", lambda: None, owner="alice", round=2, batch=3)
    await worker.run("aggregate", lambda: None, round=2)
    spans = [(e["name"], e["cat"], e["tid"], e["args"]) for e in tracer.events]
    assert spans == [("forward", "compute", WORKER, {"owner": "alice", "round": 2, "batch": 3}),
                     ("aggregate", "compute", WORKER, {"round": 2})]


async def test_a_failing_task_raises_in_the_caller_and_still_leaves_its_span(worker, tracer):
    def boom():
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        await worker.run("forward", boom)
    assert [e["name"] for e in tracer.events] == ["forward"]
    assert await worker.run("forward", lambda: 7) == 7  # the thread survives


async def test_a_slow_peer_stretches_its_profiled_work_by_one_over_speed(tracer):
    """speed 1/3: a 20 ms forward pass takes at least 3 × 20 ms, and counts as busy time."""
    slow = TorchWorker(tracer, speed=1 / 3)
    try:
        await slow.run("forward", time.sleep, 0.02)
    finally:
        slow.close()
    assert slow.busy_seconds >= 0.05
    assert tracer.events[0]["dur"] >= 50_000


async def test_only_profiled_task_names_are_stretched(tracer, monkeypatch):
    """Building parts or writing checkpoints is not padded: the sleep that pads is recorded, not slept."""
    pads = []
    monkeypatch.setattr(worker_module, "time", SimpleNamespace(sleep=pads.append, thread_time=time.thread_time,
                                                          perf_counter=time.perf_counter))
    slow = TorchWorker(tracer, speed=0.25)
    try:
        for name in sorted(PADDED) + ["checkpoint", "load", "state", "aggregate"]:
            pads.clear()
            await slow.run(name, time.sleep, 0.005)
            assert bool(pads) == (name in PADDED), name
            if pads:
                assert pads[0] >= 3 * 0.005  # (1/speed − 1) × the task's own duration
    finally:
        slow.close()


async def test_full_speed_pads_nothing(worker, monkeypatch):
    pads = []
    monkeypatch.setattr(worker_module, "time", SimpleNamespace(sleep=pads.append, thread_time=time.thread_time,
                                                          perf_counter=time.perf_counter))
    await worker.run("forward", lambda: None)
    assert pads == []


async def test_close_lets_the_running_task_finish_and_drops_the_queued_ones(tracer):
    w = TorchWorker(tracer)
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        return release.wait(10.0)

    running = asyncio.ensure_future(w.run("forward", hold))
    queued = asyncio.ensure_future(w.run("forward", lambda: "never"))
    assert await asyncio.to_thread(started.wait, 10.0)
    closing = asyncio.ensure_future(asyncio.to_thread(w.close))
    with pytest.raises(asyncio.CancelledError):
        await queued  # dropped as soon as close begins
    assert await still_pending(closing)  # close waits for the task under way
    release.set()
    await closing
    assert await running is True
    with pytest.raises(RuntimeError):
        await w.run("forward", lambda: None)


# -- Outbox ------------------------------------------------------------------------------------


def msg(dst: str, n: int) -> Cut:
    return Cut(src="me", dst=dst, epoch=0, round=n, owners=[])


class Network:
    """A fake `send`: records (dst, n); while `gate` is clear every send waits at it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.failing: dict[int, Exception] = {}

    async def __call__(self, message: Cut) -> None:
        self.entered.set()
        await self.gate.wait()
        if message.round in self.failing:
            raise self.failing[message.round]
        self.sent.append((message.dst, message.round))

    def hold(self) -> None:
        """Close the gate: the next send waits there (and sets `entered`)."""
        self.gate.clear()
        self.entered.clear()


@pytest.fixture
def net():
    return Network()


@pytest.fixture
def failures():
    return []


@pytest.fixture
async def outbox(net, tracer, failures):
    box = Outbox(net, tracer, logging.LoggerAdapter(logging.getLogger("test"), {}),
                 lambda m, e: failures.append((m.round, e)), depth=2)
    yield box
    await box.close()


async def still_pending(task: asyncio.Future) -> bool:
    """Whether `task` is still waiting after everything ready to run has run (yields to the
    loop a few times; no clock involved: what is checked cannot happen until the test acts)."""
    for _ in range(20):
        await asyncio.sleep(0)
    return not task.done()


async def test_order_per_destination_is_kept(outbox, net):
    for n in range(1, 7):
        await outbox.post(msg("c1" if n % 2 else "c2", n))
    await outbox.flush()
    assert [n for d, n in net.sent if d == "c1"] == [1, 3, 5]
    assert [n for d, n in net.sent if d == "c2"] == [2, 4, 6]


async def test_each_send_leaves_a_network_span(outbox, tracer):
    await outbox.post(msg("c1", 4))
    await outbox.flush()
    [span] = tracer.events
    assert (span["name"], span["cat"], span["tid"]) == ("send cut", "network", LOOP)
    assert span["args"] == {"dst": "c1", "round": 4}


async def test_a_failed_send_is_reported_and_the_rest_still_go(outbox, net, failures):
    net.failing = {2: BrokenError("link broke"), 3: OSError("reset")}
    for n in range(1, 6):
        await outbox.post(msg("c1", n))
    await outbox.flush()
    assert net.sent == [("c1", 1), ("c1", 4), ("c1", 5)]
    assert [(n, type(e)) for n, e in failures] == [(2, BrokenError), (3, OSError)]


async def test_flush_waits_for_every_message_posted(outbox, net):
    net.hold()
    await outbox.post(msg("c1", 1))
    await outbox.post(msg("c2", 2))
    await net.entered.wait()
    flushing = asyncio.ensure_future(outbox.flush())
    assert await still_pending(flushing)
    net.gate.set()
    await flushing
    assert sorted(net.sent) == [("c1", 1), ("c2", 2)]


async def test_a_full_destination_holds_the_poster_until_its_pump_drains(outbox, net):
    """depth 2: one message in the send, two queued, the fourth post waits; other destinations don't."""
    net.hold()
    await outbox.post(msg("c1", 1))
    await net.entered.wait()
    await outbox.post(msg("c1", 2))
    await outbox.post(msg("c1", 3))
    blocked = asyncio.ensure_future(outbox.post(msg("c1", 4)))
    assert await still_pending(blocked)
    await asyncio.wait_for(outbox.post(msg("c2", 5)), 5.0)  # another destination has room
    net.gate.set()
    await blocked
    await outbox.flush()
    assert [n for d, n in net.sent if d == "c1"] == [1, 2, 3, 4]


async def test_post_nowait_never_drops_a_control_message(outbox, net):
    net.hold()
    await outbox.post(msg("c1", 1))
    await net.entered.wait()
    await outbox.post(msg("c1", 2))
    await outbox.post(msg("c1", 3))  # the queue is full
    for n in range(4, 9):
        outbox.post_nowait(msg("c1", n))
    net.gate.set()
    await outbox.flush()
    assert net.sent == [("c1", n) for n in range(1, 9)]


async def test_the_depth_limit_holds_again_after_a_control_message_overflow(outbox, net):
    net.hold()
    await outbox.post(msg("c1", 1))
    await net.entered.wait()
    await outbox.post(msg("c1", 2))
    await outbox.post(msg("c1", 3))
    outbox.post_nowait(msg("c1", 4))
    net.gate.set()
    await outbox.flush()
    net.hold()
    await outbox.post(msg("c1", 5))
    await net.entered.wait()
    await outbox.post(msg("c1", 6))
    await outbox.post(msg("c1", 7))
    blocked = asyncio.ensure_future(outbox.post(msg("c1", 8)))
    try:
        assert await still_pending(blocked)
    finally:
        net.gate.set()
        await blocked


async def test_nothing_posted_after_close_starts_a_sender(outbox, net):
    await outbox.post(msg("c1", 1))
    await outbox.flush()
    await outbox.close()
    await outbox.post(msg("c2", 2))
    outbox.post_nowait(msg("c3", 3))
    assert set(outbox._tasks) == {"c1"} and all(task.done() for task in outbox._tasks.values())
    assert net.sent == [("c1", 1)]
