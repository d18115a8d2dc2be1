"""Where a peer's torch work runs, and how its outgoing messages leave without blocking it.

[Note: torch off the loop] Every forward, backward, optimizer step and aggregation runs on one
worker thread, so the event loop keeps answering heartbeats and moving bytes while a layer
computes (SPEC §3). One thread, because a peer's parts share its state and its CPU budget.

[Note: small tasks on the loop] A training task that took less than `INLINE_SECONDS` the last
time runs on the event loop itself when the worker thread is idle: handing a millisecond of
work to a thread and back costs about as much as the work (two thread wake-ups, two context
switches), and the split model's round is made of thousands of such tasks. Nothing runs beside
it (the loop is blocked, the thread idle, and a thread task counts as running until the thread
is done with it, even when its caller was cancelled), so torch work stays serial and in order.
After each such task the loop runs whatever is ready before the caller goes on, so a chain of
them (a federated-averaging owner's local steps) holds heartbeats and messages up for one task
at most. "Took less last time" is judged per function and input shapes, so a small last batch
does not let a full one onto the loop, and on a CPU by the task's own CPU time: peers that share
a machine's cores preempt each other, and a 3 ms task that took 6 ms of wall time because
another peer ran meanwhile is still a 3 ms task (judged by wall time, a fifth of the digits
owners' "loss+backward" went to the thread, and the two threads then traded the GIL through
the whole task). On an accelerator the wall time judges, since the CPU time there leaves out
the waiting for the device. Measured with 4 owners, 2 compute nodes and the digits CNN on two
cores: a round 0.93–1.10 s with every task on the thread, 0.71–0.76 s with this. A padded peer
([Note: emulated speed]) always uses the thread, since it sleeps there.

[Note: emulated speed] A peer with ``speed`` s < 1 in the topology stretches every torch task by
sleeping (1/s − 1) times its duration afterwards, as the paper's authors padded compute time to
emulate their Raspberry Pis. Sleeping leaves the CPU to other peers, so several emulated slow
devices can share two cores without measuring each other's contention. Only the work a profile
describes is stretched (`PADDED`): building parts or writing checkpoints is not.

`Outbox` keeps one ordered, bounded queue per destination with its own sender task: a compute
node hands off an activation and goes straight to its next task while the bytes are sent; a slow
link fills its queue and then applies backpressure instead of growing memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from collections.abc import Awaitable, Callable

from p2psl.errors import P2PSLError, PeerTimeout
from p2psl.wire.messages import Routed
from p2psl.runtime.trace import LOOP, WORKER, Tracer, now_us


#: the tasks a peer's `speed` stretches: those its per-layer profile times
PADDED = frozenset({"forward", "backward", "optimize", "loss+backward", "evaluate", "local step"})
#: a padded task that took less than this last time runs on the event loop ([Note: small tasks on the loop])
INLINE_SECONDS = 0.005


class TorchWorker:
    """Runs callables on the single torch thread, recording a trace span for each."""

    def __init__(self, tracer: Tracer, speed: float = 1.0, cpu_clock: bool = True):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2psl-torch")
        self._tracer = tracer
        self._pad = max(0.0, 1.0 / speed - 1.0)
        self.busy_seconds = 0.0
        self._closed = False
        self._in_flight = 0                 # tasks handed to the worker thread and not yet done
        self._last: dict[tuple, float] = {}  # the last seconds of each padded task's kind (`_kind`)
        #: how a task's seconds are judged for the loop: its thread's CPU time, or the wall clock
        self._clock = time.thread_time if cpu_clock else time.perf_counter
        #: called with (task name, wall seconds, span arguments) after every task ([Note: calibration])
        self.observe: Callable[[str, float, dict], None] | None = None

    async def run(self, name: str, fn: Callable[..., Any], *args: Any, **span: Any) -> Any:
        kind = _kind(name, fn, args)
        if self._inline(kind):  # [Note: small tasks on the loop]
            result = self._timed(name, kind, span, fn, args)
            await asyncio.sleep(0)  # whatever else is ready runs before this task's caller goes on
            return result
        self._in_flight += 1
        try:
            work = self._pool.submit(self._timed, name, kind, span, fn, args)
        except BaseException:
            self._in_flight -= 1
            raise
        loop = asyncio.get_running_loop()
        # counted down once the thread is done with it, not when a cancelled caller stops waiting
        work.add_done_callback(lambda _: loop.call_soon_threadsafe(self._done))
        return await asyncio.wrap_future(work)

    def _done(self) -> None:
        self._in_flight -= 1

    def _inline(self, kind: tuple) -> bool:
        """Whether a task runs on the loop: a training task that took less than `INLINE_SECONDS`
        (CPU time on a CPU, [Note: small tasks on the loop]) the last time the same function ran
        on inputs of the same shapes, no padding, and nothing
        on the worker thread (so torch work stays serial)."""
        last = self._last.get(kind)
        return (last is not None and last < INLINE_SECONDS and not self._in_flight and not self._pad
                and not self._closed)

    def _timed(self, name: str, kind: tuple, span: dict, fn: Callable[..., Any], args: tuple) -> Any:
        start, clock = now_us(), self._clock()
        try:
            return fn(*args)
        except StopIteration as exc:  # an asyncio future cannot carry it: the awaiting task would hang
            raise RuntimeError(f"{name}: StopIteration escaped {getattr(fn, '__name__', fn)!s}") from exc
        finally:
            if self._pad and name in PADDED:  # [Note: emulated speed]
                time.sleep((now_us() - start) / 1e6 * self._pad)
            end = now_us()
            if name in PADDED:
                self._last[kind] = self._clock() - clock
            self.busy_seconds += (end - start) / 1e6
            self._tracer.add(name, "compute", start, end, WORKER, **span)
            if self.observe is not None:
                self.observe(name, (end - start) / 1e6, span)

    def slow_down(self, factor: float) -> None:
        """From now on every padded task takes `factor` times as long (a deliberate fault)."""
        self._pad = (1.0 + self._pad) * factor - 1.0

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def aclose(self) -> None:
        """`close` from the event loop: the wait for the task on the thread (a layer being
        profiled may take seconds) must not stall the loop, which in one process serves every
        other peer's heartbeats too."""
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(None, self.close)


class Outbox:
    """Ordered, bounded, per-destination sending. `post` returns once the message is queued.

    Each destination has one FIFO and a sender task. Messages posted with `post` take one of
    `depth` places in the queue, given back once the sender takes the message out, so a slow link applies
    backpressure instead of growing memory; `post` waits at most `deadline` for a place.
    `post_nowait` (small control messages from synchronous code: `Gone`) takes no place and
    never waits, so the FIFO itself is unbounded; it holds at most `depth` posted messages plus
    those few control messages."""

    def __init__(self, send: Callable[[Routed], Awaitable[None]], tracer: Tracer, log: logging.LoggerAdapter,
                 on_failure: Callable[[Routed, Exception], None], depth: int = 8, deadline: float = 3600.0):
        self._send, self._tracer, self._log = send, tracer, log
        self._on_failure = on_failure
        self._depth, self._deadline = depth, deadline
        self._lanes: dict[str, _Lane] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._closed = False

    async def post(self, message: Routed) -> None:
        if self._closed:
            return self._dropped(message)
        lane = self._lane(message.dst)
        if lane.places.locked():  # a deadline (a timer) only where there is a wait
            try:
                async with asyncio.timeout(self._deadline):
                    await lane.places.acquire()
            except TimeoutError:
                raise PeerTimeout(f"nothing could be sent to {message.dst} for {self._deadline:g} s") from None
        else:
            await lane.places.acquire()
        lane.queue.put_nowait((message, True))

    def post_nowait(self, message: Routed) -> None:
        """Queue a small control message from synchronous code; it is never dropped (but after
        `close`, when nothing is sent any more)."""
        if self._closed:
            return self._dropped(message)
        self._lane(message.dst).queue.put_nowait((message, False))

    def _dropped(self, message: Routed) -> None:
        """The peer is stopping (news of a link going down as its network stops, say): a new
        sender task now would outlive the peer."""
        self._log.debug("not sent, the peer is stopping: %s to %s", message.KIND, message.dst)

    def _lane(self, dst: str) -> _Lane:
        lane = self._lanes.get(dst)
        if lane is None:
            lane = self._lanes[dst] = _Lane(asyncio.Queue(), asyncio.Semaphore(self._depth))
            self._tasks[dst] = asyncio.get_running_loop().create_task(self._pump(lane))
        return lane

    async def _pump(self, lane: _Lane) -> None:
        while True:
            message, placed = await lane.queue.get()
            if placed:
                lane.places.release()  # the place is in the queue: this message has left it
            start = now_us()
            try:
                await self._send(message)
            except (P2PSLError, OSError) as exc:
                self._on_failure(message, exc)
            finally:
                self._tracer.add(f"send {message.KIND}", "network", start, now_us(), LOOP, dst=message.dst,
                                 **_ids(message))
                lane.queue.task_done()

    async def flush(self) -> None:
        """Wait until everything posted so far has been handed to the network."""
        try:
            async with asyncio.timeout(self._deadline):
                for lane in list(self._lanes.values()):
                    await lane.queue.join()
        except TimeoutError:
            raise PeerTimeout(f"messages still unsent after {self._deadline:g} s") from None

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


@dataclass
class _Lane:
    """One destination's FIFO and the places `post` may take in it."""

    queue: asyncio.Queue  # unbounded on purpose: `places` bounds it (see `Outbox`)
    places: asyncio.Semaphore


def _ids(message: Routed) -> dict:
    return {k: getattr(message, k) for k in ("owner", "round", "batch") if hasattr(message, k)}


def _kind(name: str, fn: Callable[..., Any], args: tuple) -> tuple:
    """What makes two tasks alike in duration: the task's name, its function and the shapes of
    its tensor arguments (an evaluation's last, smaller batch is another kind)."""
    shapes = tuple(tuple(a.shape) for a in args if hasattr(a, "shape"))
    return name, getattr(fn, "__qualname__", None) or repr(fn), shapes
