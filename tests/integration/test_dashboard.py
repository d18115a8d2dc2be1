"""The live dashboard: its JSON in process, then the real page in headless chromium during a real
`p2psl run`, and the run's pictures and trace once it has finished.

The browser test drives Debian's chromium over the DevTools protocol (a WebSocket, with aiohttp):
no browser is downloaded, no extra Python package is needed. Without chromium it skips, saying
how to install it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import matplotlib.image
import pytest

from p2psl.cli.dashboard import Dashboard
from p2psl.planning.plan import plan_from_cuts
from p2psl.topology import load_topology
from tests.helpers import make_topology
from tests.integration.harness import write_topology

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs a headless browser: install Debian's "
                                    "chromium (apt-get install chromium) to test the dashboard page")
ROUNDS = 8


# -- the JSON, in process --------------------------------------------------------------------------

def statuses_at(round_: int, batch: int) -> dict[str, dict]:
    plan = plan_from_cuts([2, 3, 4], ["c1", "c2"], ["alice", "bob"], 6, period_seconds=0.01).to_json()
    owner = {"role": "data_owner", "state": "training", "round": round_, "rounds": 4, "batch": batch, "batches": 30,
             "loss": 0.5, "rss_bytes": 300 * 2**20, "busy_seconds": 1.0, "started": time.time() - 5, "plan": plan}
    node = {**owner, "role": "compute", "state": "forward", "batch": 40}
    return {"alice": {**owner, "name": "alice"}, "bob": {**owner, "name": "bob"},
            "c1": {**node, "name": "c1"}, "c2": {**node, "name": "c2"}}


async def fetch_json(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url) as response:
        assert response.status == 200
        return await response.json()


async def test_status_json_follows_the_peers_live():
    topology = make_topology(["alice", "bob"], ["c1", "c2"], training={"rounds": 4})
    statuses = statuses_at(2, 10)
    dashboard = Dashboard(topology, lambda: statuses, 0)
    await dashboard.start()
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", dashboard.url)
        async with aiohttp.ClientSession() as session:
            first = await fetch_json(session, dashboard.url + "api/status")
            assert (first["round"], first["rounds"], first["finished"]) == (2, 4, False)
            assert [p["name"] for p in first["peers"]] == ["alice", "bob", "c1", "c2"]
            alice = first["peers"][0]
            assert (alice["batch"], alice["batches"], alice["capacity_bytes"]) == (10, 30, 4 * 2**30)
            assert 0 < alice["utilisation_total"] < 1 and "plan" not in alice
            assert first["plan"]["chain"] == ["c1", "c2"]
            assert {n["name"] for n in first["scene"]["nodes"]} == {"alice", "bob", "c1", "c2"}
            assert 0 < first["fraction"] < 1
            statuses.update(statuses_at(3, 2))
            second = await fetch_json(session, dashboard.url + "api/status")
            assert second["round"] == 3 and second["peers"][0]["batch"] == 2
    finally:
        await dashboard.stop()


async def test_the_last_look_waits_for_a_watching_page_only():
    topology = make_topology(["alice", "bob"], ["c1", "c2"], training={"rounds": 4})
    statuses = statuses_at(2, 10)
    dashboard = Dashboard(topology, lambda: statuses, 0)
    await dashboard.start()
    try:
        await asyncio.wait_for(dashboard.last_look(timeout=3600), 30)  # nobody watches: no wait
        dashboard._last_answer = time.monotonic() - 60
        await asyncio.wait_for(dashboard.last_look(timeout=3600), 30)  # a page closed a minute ago: no wait
        async with aiohttp.ClientSession() as session:
            await fetch_json(session, dashboard.url + "api/status")     # now a page watches
            looking = asyncio.ensure_future(dashboard.last_look(timeout=3600))
            for _ in range(20):
                await asyncio.sleep(0)
            assert not looking.done()                                   # it waits for the page's next look
            statuses.update({name: {**s, "state": "finished"} for name, s in statuses.items()})
            final = await fetch_json(session, dashboard.url + "api/status")
            await asyncio.wait_for(looking, 30)
        assert {p["state"] for p in final["peers"]} == {"finished"}
    finally:
        await dashboard.stop()


async def test_page_and_its_assets_are_served():
    topology = make_topology(["alice"], ["c1"])
    dashboard = Dashboard(topology, dict, 0)
    await dashboard.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(dashboard.url) as page:
                html = await page.text()
                assert page.status == 200 and '<script src="/static/app.js"></script>' in html
            for asset, needle in (("app.js", "/api/status"), ("style.css", "#topology")):
                async with session.get(dashboard.url + "static/" + asset) as response:
                    assert response.status == 200 and needle in await response.text()
            topo = await fetch_json(session, dashboard.url + "api/topology")
            assert [p["name"] for p in topo["peers"]] == ["alice", "c1"]
            status = await fetch_json(session, dashboard.url + "api/status")
            assert status["round"] == 0 and status["peers"][0]["state"] == "starting"
    finally:
        await dashboard.stop()
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession() as session:
            await fetch_json(session, dashboard.url + "api/status")


async def test_a_busy_port_is_an_oserror_and_leaves_nothing_running():
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        dashboard = Dashboard(make_topology(["alice"], ["c1"]), dict, holder.getsockname()[1])
        with pytest.raises(OSError):
            await dashboard.start()
        await dashboard.stop()
        assert dashboard.url is None


def many_owner_statuses(owners: list[str]) -> dict[str, dict]:
    """Owner k has done k % 9 + 1 of 12 batches in round 2; owner013 has failed."""
    plan = plan_from_cuts([1, 3, 4], ["c1", "c2"], owners, 6, period_seconds=0.01).to_json()
    out = {}
    for k, name in enumerate(owners):
        out[name] = {"name": name, "role": "data_owner", "state": "failed" if name == "owner013" else "training",
                     "round": 2, "rounds": 4, "batch": k % 9 + 1, "batches": 12, "rss_bytes": 300 * 2**20,
                     "busy_seconds": 1.0, "started": time.time() - 5, "plan": plan}
    for name in ("c1", "c2"):
        out[name] = {**out[owners[0]], "name": name, "role": "compute", "state": "forward", "batch": 40}
    return out


MANY = [f"owner{k:03d}" for k in range(1, 31)]


async def test_many_owners_are_one_box_one_row_and_the_five_furthest_behind():
    topology = make_topology(MANY, ["c1", "c2"], training={"rounds": 4})
    dashboard = Dashboard(topology, lambda: many_owner_statuses(MANY), 0)
    await dashboard.start()
    try:
        async with aiohttp.ClientSession() as session:
            status = await fetch_json(session, dashboard.url + "api/status")
    finally:
        await dashboard.stop()
    summary = status["owners_summary"]
    assert summary["name"] == "30 data owners" and summary["states"] == {"training": 29, "failed": 1}
    assert summary["batches"] == 30 * 12 and summary["batch"] == sum(k % 9 + 1 for k in range(30))
    # failed first, then the fewest batches done (owners 1, 10, 19, 28 have done one), by name
    assert summary["slowest"] == ["owner013", "owner001", "owner010", "owner019", "owner028"]
    names = [n["name"] for n in status["scene"]["nodes"]]
    assert names == ["30 data owners", "c1", "c2"]
    assert {frozenset((e["a"], e["b"])) for e in status["scene"]["edges"] if e["kind"] == "owner"} == {
        frozenset(("30 data owners", "c1")), frozenset(("30 data owners", "c2"))}
    assert len(status["peers"]) == 32                                  # the API still has every peer
    few = Dashboard(make_topology(["alice", "bob"], ["c1"]), dict, 0).status_json()
    assert few["owners_summary"] is None


@needs_chromium
async def test_page_with_many_owners_shows_one_owner_box_and_six_owner_rows(tmp_path):
    topology = make_topology(MANY, ["c1", "c2"], training={"rounds": 4})
    dashboard = Dashboard(topology, lambda: many_owner_statuses(MANY), 0)
    await dashboard.start()
    try:
        async with Browser(tmp_path / "profile") as browser:
            await browser.call("Page.navigate", url=dashboard.url)
            await browser.wait_for("document.body.dataset.updated", time.monotonic() + 60, "any status")
            shown = await browser.evaluate("""(() => ({
              rows: Array.from(document.querySelectorAll('#peers tbody tr')).filter(tr => !tr.hidden)
                         .map(tr => tr.dataset.peer),
              boxes: Array.from(document.querySelectorAll('#topology g.node')).map(g => g.dataset.peer),
              group: document.querySelector('#topology g.owner_group').textContent}))()""")
            assert browser.errors == []
    finally:
        await dashboard.stop()
    assert shown["rows"] == ["30 data owners", "owner013", "owner001", "owner010", "owner019", "owner028", "c1", "c2"]
    assert shown["boxes"] == ["30 data owners", "c1", "c2"]
    assert "29 training, 1 failed" in shown["group"]


# -- a real run --------------------------------------------------------------------------------------

class Run:
    """`p2psl run` in a subprocess, its stdout collected by a thread (so the pipe never fills)."""

    def __init__(self, topology: Path, out: Path):
        self.topology, self.out = topology, out
        self.lines: list[str] = []
        self.url_seen = threading.Event()
        self.url: str | None = None
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "P2PSL_SECRET": "dashboard-test-secret"}
        self.proc = subprocess.Popen([sys.executable, "-m", "p2psl", "run", "--topology", str(topology),
                                      "--out", str(out), "--no-baseline", "--dashboard"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            match = re.search(r"dashboard: (http://\S+)", line)
            if match:
                self.url = match.group(1)
                self.url_seen.set()

    def output(self) -> str:
        return "\n".join(self.lines[-40:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.reader.join(10)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    topology = write_topology(tmp, ["alice", "bob"], ["c1", "c2"],
                              training={"model": "cnn", "dataset": "digits", "rounds": ROUNDS, "batch_size": 16})
    run = Run(topology, tmp / "out")
    try:
        assert run.url_seen.wait(60), f"no dashboard address printed:\n{run.output()}"
        yield run
    finally:
        run.stop()


async def wait_for_training(url: str, deadline: float) -> dict:
    """The first /api/status in which an owner trains in round 1 or later."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            try:
                status = await fetch_json(session, url + "api/status")
            except (TimeoutError, aiohttp.ClientError):
                status = None
            if status and status["round"] >= 1 and any(p["state"] == "training" for p in status["peers"]):
                return status
            await asyncio.sleep(0.2)
    raise AssertionError("the run never started training")


async def test_dashboard_json_shows_the_running_round(live_run):
    status = await wait_for_training(live_run.url, time.monotonic() + 120)
    assert status["round"] <= ROUNDS and status["rounds"] == ROUNDS and not status["finished"]
    owners = [p for p in status["peers"] if p["role"] == "data_owner"]
    assert {p["round"] for p in owners} <= {status["round"], status["round"] - 1}
    # alice's own /status, read just after: the dashboard showed her round as it was, not a stale one
    alice = load_topology(live_run.topology).peer("alice")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        try:
            own = await fetch_json(session, f"http://{alice.host}:{alice.port}/status")
        except aiohttp.ClientError as exc:
            raise AssertionError(f"alice's /status: {exc}; the run so far:\n{live_run.output()}") from exc
    shown = next(p["round"] for p in owners if p["name"] == "alice")
    assert shown <= own["round"] <= status["round"] + 1
    assert status["plan"] is not None and status["plan"]["owners"] == ["alice", "bob"]
    assert all(p.get("rss_bytes", 0) > 50 * 2**20 for p in status["peers"])   # live numbers from each peer


class Browser:
    """Headless chromium driven over the DevTools protocol: navigate, evaluate, collect errors."""

    def __init__(self, profile: Path):
        self.profile = profile
        self.errors: list[str] = []
        self._next = 0
        self._waiting: dict[int, asyncio.Future] = {}

    async def __aenter__(self) -> Browser:
        self.proc = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        port = await self._devtools_port(time.monotonic() + 30)
        self.session = aiohttp.ClientSession()
        targets = await fetch_json(self.session, f"http://127.0.0.1:{port}/json/list")
        page = next(t for t in targets if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self.reader = asyncio.get_running_loop().create_task(self._read())
        await self.call("Runtime.enable")
        await self.call("Page.enable")
        return self

    async def __aexit__(self, *exc) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.ws.close()
        await self.session.close()
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    async def _devtools_port(self, deadline: float) -> int:
        active = self.profile / "DevToolsActivePort"   # chromium writes its chosen port here
        while time.monotonic() < deadline:
            if active.exists() and active.read_text().strip():
                return int(active.read_text().split()[0])
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        raise AssertionError("chromium did not open its DevTools port")

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self._waiting:
                self._waiting.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(data["params"]["exceptionDetails"])[:500])

    async def call(self, method: str, **params) -> dict:
        self._next += 1
        future = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = future
        await self.ws.send_json({"id": self._next, "method": method, "params": params})
        reply = await asyncio.wait_for(future, 30)
        assert "error" not in reply, reply
        return reply["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, deadline: float, what: str, run: Run | None = None):
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"the page never showed {what}" + (f"; the run so far:\n{run.output()}" if run else ""))


PAGE_STATE = """(() => {
  const rows = Array.from(document.querySelectorAll('#peers tbody tr')).map(tr => ({
    peer: tr.dataset.peer, round: tr.querySelector('.round').textContent,
    batch: tr.querySelector('.batch').textContent, memory: tr.querySelector('.memory').textContent}));
  return {round: document.getElementById('round').textContent, updated: document.body.dataset.updated || '',
          badge: document.getElementById('connection').textContent, rows,
          nodes: document.querySelectorAll('#topology g.node').length,
          plan: document.getElementById('plan-line').textContent};
})()"""


@needs_chromium
async def test_page_in_chromium_shows_live_values_during_a_run(live_run, tmp_path):
    deadline = time.monotonic() + 120
    await wait_for_training(live_run.url, deadline)
    async with Browser(tmp_path / "profile") as browser, aiohttp.ClientSession() as session:
        await browser.call("Page.navigate", url=live_run.url)
        await browser.wait_for("document.body.dataset.updated", deadline, "any status", live_run)
        before = await fetch_json(session, live_run.url + "api/status")
        shown = await browser.evaluate(PAGE_STATE)
        after = await fetch_json(session, live_run.url + "api/status")
        # the round on the page is the run's current round, as of the page's last refresh (once a
        # second): never ahead of the API, and at most a round behind it when rounds are short
        assert before["round"] - 1 <= int(shown["round"]) <= after["round"], (shown, before["round"], after["round"])
        assert int(shown["round"]) >= 1 and shown["badge"] in ("live", "finished")
        assert [r["peer"] for r in shown["rows"]] == ["alice", "bob", "c1", "c2"]
        for row in shown["rows"]:
            assert re.fullmatch(rf"\d+/{ROUNDS}", row["round"]) and "GiB" in row["memory"], row
        assert shown["nodes"] == 4 and shown["plan"].startswith("plan ")
        # and it keeps updating: the batch counters move on while the run trains
        first = {r["peer"]: (r["round"], r["batch"]) for r in shown["rows"]}
        await browser.wait_for(f"""(() => {{ const s = {PAGE_STATE};
            return s.updated !== {json.dumps(shown['updated'])} &&
                   s.rows.some(r => JSON.stringify([r.round, r.batch]) !==
                                    JSON.stringify({json.dumps(first)}[r.peer])); }})()""",
                               time.monotonic() + 30, "new values")
        assert browser.errors == []


async def test_a_watched_dashboard_shows_the_end_of_the_run_and_every_round(tmp_path):
    """Rounds far shorter than the launcher's look at the peers' /status all reach the charts (read
    from the peers' metrics), and a page that watches gets the final state before the server goes:
    every peer finished, every round."""
    rounds = 6
    topology = write_topology(tmp_path, ["alice"], ["c1"], training={"model": "cnn", "dataset": "digits",
                                                                     "rounds": rounds, "batch_size": 64})
    run = Run(topology, tmp_path / "out")
    try:
        assert run.url_seen.wait(60), f"no dashboard address printed:\n{run.output()}"
        last = None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while True:  # as the page does, only faster: until the server has gone
                try:
                    last = await fetch_json(session, run.url + "api/status")
                except (TimeoutError, aiohttp.ClientError):
                    break
                await asyncio.sleep(0.2)
        assert run.proc.wait(60) == 0, run.output()
    finally:
        run.stop()
    assert last is not None and last["finished"] and last["fraction"] == 1.0, last
    assert [h["round"] for h in last["history"]] == list(range(1, rounds + 1))
    assert {p["name"]: p["state"] for p in last["peers"]} == {"alice": "finished", "c1": "finished"}


def test_finished_run_leaves_curves_and_a_trace_of_every_peer(live_run):
    """After the live tests: the run ends by itself, with its pictures and trace in the output."""
    try:
        code = live_run.proc.wait(240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run did not finish:\n{live_run.output()}")
    assert code == 0, live_run.output()
    assert "accuracy and loss per round:" in live_run.output()
    assert re.search(r"checkpoints: [\d.]+ \w+ written, [\d.]+ \w+ kept on disk \(the newest 2 rounds per peer",
                     live_run.output()), live_run.output()
    from p2psl.wire import checkpoint

    for name in ("alice", "bob", "c1", "c2"):  # keep_checkpoints = 2 by default
        assert checkpoint.rounds(live_run.out / "peers" / name / "checkpoints") == [ROUNDS - 1, ROUNDS], name
    image = matplotlib.image.imread(live_run.out / "curves.png")
    assert image.shape[1] >= 1000 and image.shape[0] >= 300
    from p2psl.viz.timeline import load_trace, measured_period, owners_of

    trace = load_trace(live_run.out / "trace.json")
    assert set(trace.peers) == {"alice", "bob", "c1", "c2"}
    for peer in trace.peers:
        spans = trace.of(peer)
        assert any(s.name == "forward" for s in spans) and any("backward" in s.name for s in spans), peer
        assert {s.round for s in spans if s.training} == set(range(1, ROUNDS + 1)), peer
    owners = owners_of(trace)
    assert owners == ["alice", "bob"]
    assert measured_period(trace, owners) > 0
