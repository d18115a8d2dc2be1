"""The live dashboard of `p2psl run`: a read-only page on loopback, and its numbers as JSON.

    GET /              the page (p2psl/static/index.html, app.js, style.css)
    GET /api/status    everything the page shows, as one JSON object (below)
    GET /api/topology  the topology and its layout, without live numbers

The dashboard is not a master: it only reads what the launcher already polls from each peer's
public /status, so a deployment trains the same with or without it. It samples those snapshots on
its own clock (every `SAMPLE_SECONDS`) into a `progress.Live`, which gives recent utilisation and
the per-round accuracy and loss even when no browser is watching.

/api/status: {"time", "elapsed_seconds", "round", "rounds", "fraction", "eta_seconds", "finished"
(every peer done), "ended" (every peer done or failed), "plan" (plan.json or null), "scene" (layout
of peers and links for that plan), "pipeline": {"utilisation"}, "history": [{"round", "accuracy",
"loss", "seconds", "predicted"}], "peers": [{each peer's /status fields, plus "address",
"capacity_bytes", "utilisation" (recent), "utilisation_total" (since it started); once its process
has ended, "state" is "finished" or "failed" and "exit_code" its status}],
"owners_summary": null, or beyond `MANY_OWNERS` owners {"name", "count", "states": {state: owners},
"batch", "batches", "slowest": [the owners furthest behind]} — the scene then draws every owner
as one box of that name}
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from collections.abc import Callable

from aiohttp import web

from p2psl.planning.plan import Plan
from p2psl.cli.progress import ENDED, MANY_OWNERS, Live, owners_tally
from p2psl.topology import Topology
from p2psl.viz.layout import collapsed, scene


def owner_group_name(topology: Topology) -> str:
    """The name of the box that stands for every owner where there are too many to draw."""
    return f"{len(topology.owners)} data owners"

STATIC = Path(__file__).parent / "static"
SAMPLE_SECONDS = 0.5
#: a page asks every second, or every few after failures: one that asked this recently is open
WATCHING_SECONDS = 5.0


class Dashboard:
    def __init__(self, topology: Topology, get_statuses: Callable[[], dict[str, dict]], port: int = 0,
                 host: str = "127.0.0.1"):
        self.topology = topology
        self._get = get_statuses
        self.host, self.port = host, port
        self.live = Live(topology)
        self.url: str | None = None
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task | None = None
        self._started = time.time()
        self._scenes: dict[str | None, dict] = {}
        self._answered = asyncio.Event()         # set at every answer of /api/status
        self._last_answer: float | None = None   # when (monotonic), if ever

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Serve; returns once listening, with `url` set to the real address (port 0 picks one)."""
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/topology", self._topology)
        app.router.add_static("/static/", STATIC, append_version=False)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/"
        self._sampler = asyncio.get_running_loop().create_task(self._sample())

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def last_look(self, timeout: float = 2.5) -> None:
        """Once the run has ended: a page that is watching gets one more answer, with every peer's
        final state and the last round, before the server goes (it asks every second)."""
        if self._last_answer is None or time.monotonic() - self._last_answer > WATCHING_SECONDS:
            return  # nobody asked lately: no page is open
        self._answered.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._answered.wait()
        except TimeoutError:
            pass  # the page was closed meanwhile

    async def _sample(self) -> None:
        while True:
            self.live.observe(self._snapshot())
            await asyncio.sleep(SAMPLE_SECONDS)

    def _snapshot(self) -> dict[str, dict]:
        return {name: dict(status) for name, status in dict(self._get()).items()}

    # -- handlers ---------------------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def _topology(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.topology_json(None))

    async def _status(self, request: web.Request) -> web.StreamResponse:
        response = web.json_response(self.status_json(), headers={"Cache-Control": "no-store"})
        self._last_answer = time.monotonic()
        self._answered.set()
        return response

    # -- the JSON ---------------------------------------------------------------------------------
    def status_json(self) -> dict:
        statuses = self._snapshot()
        self.live.observe(statuses)  # so the round history is never behind the round shown
        plan = next((s["plan"] for s in statuses.values() if isinstance(s.get("plan"), dict)), None)
        fraction = self.live.fraction(statuses)
        finished = bool(statuses) and all(s.get("state") in ENDED for s in statuses.values())
        ended = bool(statuses) and all(s.get("state") in ENDED or s.get("state") == "failed"
                                       for s in statuses.values())
        return {
            "time": time.time(),
            "elapsed_seconds": time.time() - self._started,
            "source": Path(self.topology.source).name,
            "model": self.topology.training.model,
            "round": min(self.live.current_round(statuses), self.topology.training.rounds),
            "rounds": self.topology.training.rounds,
            "fraction": 1.0 if finished else fraction,
            "eta_seconds": None if finished else self.live.eta(fraction),
            "finished": finished,
            "ended": ended,  # every peer finished or failed: the run is over either way
            "plan": plan,
            "scene": self.topology_json(plan),
            "pipeline": {"utilisation": self.live.pipeline_utilisation()},
            "history": self.live.rounds_seen(),
            "peers": [self._peer(p.name, statuses.get(p.name)) for p in self.topology.peers],
            "owners_summary": self.owners_summary(statuses) if self._many else None,
        }

    @property
    def _many(self) -> bool:
        return len(self.topology.owners) > MANY_OWNERS

    def owners_summary(self, statuses: dict[str, dict]) -> dict:
        """Every owner in one object, as the terminal's one line (`progress.owners_tally`), which
        the page shows instead of a row per owner, then only the furthest behind."""
        tally = owners_tally(self.topology, self.live, statuses, {})
        return {"name": owner_group_name(self.topology), "count": len(self.topology.owners),
                "states": tally.states, "batch": tally.batch, "batches": tally.batches, "slowest": tally.slowest}

    def topology_json(self, plan: dict | None) -> dict:
        """Peers, links and their layout; cached per plan (the layout follows the chain order)."""
        digest = plan.get("digest") if plan else None
        if digest not in self._scenes:
            the_plan = Plan.from_json(plan) if plan else None
            drawn = scene(self.topology, the_plan)
            if self._many:
                drawn = collapsed(drawn, [o.name for o in self.topology.owners], owner_group_name(self.topology))
            self._scenes[digest] = {
                **drawn.to_json(),
                "fully_connected": self.topology.fully_connected,
                "peers": [{"name": p.name, "role": p.role, "address": p.address, "capacity_bytes": p.memory}
                          for p in self.topology.peers],
            }
        return self._scenes[digest]

    def _peer(self, name: str, status: dict | None) -> dict:
        spec = self.topology.peer(name)
        out = {"name": name, "role": spec.role, "state": "starting"}
        if status:
            out.update({k: v for k, v in status.items() if k != "plan"})
            started, busy = status.get("started"), status.get("busy_seconds")
            if isinstance(started, (int, float)) and isinstance(busy, (int, float)) and time.time() > started:
                out["utilisation_total"] = min(1.0, busy / (time.time() - started))
        out.update(address=spec.address, capacity_bytes=spec.memory, utilisation=self.live.utilisation(name))
        return out
