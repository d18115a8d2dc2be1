"""The command line as a user meets it: clear messages and exit codes, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import free_ports, topology_toml

pytestmark = pytest.mark.timeout(300)


def p2psl(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "p2psl", *args], capture_output=True, text=True, env=environment,
                          timeout=timeout)


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr


def test_validate_lists_every_problem_and_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("""
[training]
model = "gpt"
rounds = -1
[[peer]]
name = "alice"
role = "owner"
address = "127.0.0.1:99999"
memory = "lots"
[[link]]
peers = ["alice", "zed"]
""")
    result = p2psl("validate", "--topology", str(bad))
    assert result.returncode == 2
    no_traceback(result)
    assert result.stderr.startswith("TopologyError:")
    for fragment in ("model", "rounds", "role", "address", "memory", "zed"):
        assert fragment in result.stderr
    assert result.stderr.count("\n  - ") >= 6


def test_validate_accepts_the_bundled_default():
    result = p2psl("validate", "--topology", "topologies/ring.toml")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_timing_the_layers_for_a_first_plan_is_said_then_cached(tmp_path):
    path = tmp_path / "pair.toml"
    path.write_text(topology_toml(["alice"], ["c1"]))
    env = {"P2PSL_CACHE_DIR": str(tmp_path / "cache")}
    first = p2psl("validate", "--topology", str(path), env=env)
    assert first.returncode == 0, first.stderr
    assert "timing the model's 6 layers on this machine, once (later runs read them from the cache)" in first.stderr
    again = p2psl("validate", "--topology", str(path), env=env)
    assert again.returncode == 0 and "timing" not in again.stderr


def test_validate_counts_in_words(tmp_path):
    path = tmp_path / "pair.toml"
    path.write_text(topology_toml(["alice"], ["c1"], links=[("alice", "c1")]))
    result = p2psl("validate", "--topology", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok — 1 data owner, 1 compute node, 1 link")


def test_validate_reports_a_model_that_cannot_fit_in_memory(tmp_path):
    path = tmp_path / "tight.toml"
    path.write_text(topology_toml(["a"], ["c1"], memory="1KiB"))
    result = p2psl("validate", "--topology", str(path))
    assert result.returncode == 2
    no_traceback(result)
    assert "no plan fits" in result.stderr


def test_run_refuses_a_model_that_cannot_fit_before_starting_any_peer(tmp_path):
    path = tmp_path / "tight.toml"
    path.write_text(topology_toml(["a"], ["c1"], memory="1KiB"))
    result = p2psl("run", "--topology", str(path), "--out", str(tmp_path / "out"), "--no-baseline",
                   "--no-dashboard", env={"P2PSL_SECRET": "s"})
    assert result.returncode == 2
    no_traceback(result)
    assert "no plan fits" in result.stderr
    assert not (tmp_path / "out" / "peers").exists()  # no peer was started


def test_plan_json_is_one_object_and_nothing_else(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(topology_toml(["a", "b"], ["c1", "c2"]))
    result = p2psl("plan", "--topology", str(path), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert set(plan["assignments"]) == {"c1", "c2"}
    for key in ("owner_layers", "period_seconds", "round_seconds", "peak_memory_bytes", "digest"):
        assert key in plan
    assert set(plan["peak_memory_bytes"]) == {"a", "b", "c1", "c2"}


def test_plan_table_is_readable(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(topology_toml(["a", "b"], ["c1", "c2"]))
    result = p2psl("plan", "--topology", str(path))
    assert result.returncode == 0, result.stderr
    for name in ("a", "b", "c1", "c2"):
        assert name in result.stdout


def test_plan_hints_at_chains_that_are_predicted_faster(tmp_path):
    """Two owners and two nodes of one two-core machine, the digits CNN's layer times (a table,
    so the hint does not depend on this machine's speed): two chains of one node cross four links
    a batch, not six."""
    table = tmp_path / "digits_bs32.csv"
    rows = zip((0.19, 0.83, 0.21, 0.52, 0.057, 0.026), (0.16, 0.72, 0.37, 0.55, 0.11, 0.068),
               (128, 64, 64, 32, 8, 1.25), (0.625, 18.1, 36.1, 72.3, 64.3, 2.5))
    table.write_text("layer,act_KiB,param_KiB,box_fwd_ms,box_bwd_ms,box_opt_ms\n" + "".join(
        f"{i},{act},{par},{fwd},{bwd},0.1\n" for i, (fwd, bwd, act, par) in enumerate(rows, start=1)))
    path = tmp_path / "t.toml"
    path.write_text(topology_toml(["a", "b"], ["c1", "c2"], training={
        "model": "cnn", "dataset": "digits", "batch_size": 32, "profile": str(table)})
        + '[[machine]]\nname = "127.0.0.1"\ncores = 2\n')
    result = p2psl("plan", "--topology", str(path))
    assert result.returncode == 0, result.stderr
    assert "hint: 2 chains of 1 compute node each are predicted" in result.stdout
    assert 'set [training] chains = "auto"' in result.stdout
    path.write_text(path.read_text().replace("[training]", '[training]\nchains = "auto"', 1))
    result = p2psl("plan", "--topology", str(path))
    assert result.returncode == 0, result.stderr
    assert "2 chains" in result.stdout and "hint" not in result.stdout


def test_a_peer_alone_says_whom_it_waits_for_then_gives_up_clearly(tmp_path):
    ports = free_ports(2)
    path = tmp_path / "t.toml"
    path.write_text(topology_toml(["a"], ["c1"], ports=ports, timeouts={"connect": "4s"}))
    result = p2psl("peer", "--topology", str(path), "--name", "a", "--out", str(tmp_path / "a"),
                   env={"P2PSL_SECRET": "s"})
    assert result.returncode == 1
    no_traceback(result)
    assert "waiting for c1" in result.stderr
    assert f"dialling 127.0.0.1:{ports[1]}" in result.stderr
    assert "connection refused" in result.stderr
    assert "PeerTimeout:" in result.stderr.splitlines()[-1]


def test_unknown_peer_name_and_missing_secret_are_config_errors(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(topology_toml(["a"], ["c1"]))
    env = {k: v for k, v in os.environ.items() if k != "P2PSL_SECRET"}
    result = subprocess.run([sys.executable, "-m", "p2psl", "peer", "--topology", str(path), "--name", "a"],
                            capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "no secret" in result.stderr
    no_traceback(result)
    result = subprocess.run([sys.executable, "-m", "p2psl", "peer", "--topology", str(path), "--name", "zed"],
                            capture_output=True, text=True, env={**env, "P2PSL_SECRET": "s"}, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "no peer named 'zed'" in result.stderr
    no_traceback(result)
    assert not (tmp_path / "runs").exists()  # no output folder for a peer that is not one


def test_bad_flags_exit_2_with_usage():
    result = p2psl("run", "--no-such-flag")
    assert result.returncode == 2
    assert "no such option" in result.stderr.lower()
    no_traceback(result)


@pytest.mark.parametrize("args,named", [(("peer", "--name", "alice", "--threads", "0"), "'--threads'"),
                                        (("run", "--dashboard-port", "70000"), "'--dashboard-port'")])
def test_numbers_out_of_range_exit_2_naming_the_flag(args, named):
    result = p2psl(*args, "--topology", "topologies/ring.toml") if args[0] == "peer" else p2psl(*args)
    assert result.returncode == 2 and named in result.stderr and "is not in the range" in result.stderr
    no_traceback(result)


def test_missing_topology_file():
    result = p2psl("validate", "--topology", "does/not/exist.toml")
    assert result.returncode == 2
    no_traceback(result)
    assert "cannot read" in result.stderr


def one_line_exit_2(result: subprocess.CompletedProcess, *words: str) -> None:
    """Bad local input: exit 2 and one line on stderr naming it (no traceback, no log noise)."""
    assert result.returncode == 2, result.stderr
    no_traceback(result)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(w in result.stderr for w in words), result.stderr


def test_an_output_folder_that_cannot_be_created_is_bad_local_input(tmp_path):
    """`--out` under a regular file: the same one line and exit 2 from `peer` and from `run`."""
    path = tmp_path / "t.toml"
    path.write_text(topology_toml(["a"], ["c1"], ports=free_ports(2)))
    (tmp_path / "file").write_text("not a folder")
    out = str(tmp_path / "file" / "out")
    for args in (["peer", "--topology", str(path), "--name", "a", "--out", out],
                 ["run", "--topology", str(path), "--out", out, "--no-dashboard", "--no-baseline"]):
        one_line_exit_2(p2psl(*args, env={"P2PSL_SECRET": "s"}), "ConfigError: cannot create the output folder",
                        out, "Not a directory")


def test_a_port_in_use_is_bad_local_input_for_peer_and_run(tmp_path):
    """Another program holds a's port: `peer a` and `run` both exit 2 and name the port."""
    import socket

    ports = free_ports(2)
    path = tmp_path / "t.toml"
    path.write_text(topology_toml(["a"], ["c1"], ports=ports))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[0]))
        holder.listen()
        one_line_exit_2(p2psl("peer", "--topology", str(path), "--name", "a", "--out", str(tmp_path / "a"),
                              env={"P2PSL_SECRET": "s"}), f"127.0.0.1:{ports[0]}", "in use")
        one_line_exit_2(p2psl("run", "--topology", str(path), "--out", str(tmp_path / "run"), "--no-dashboard",
                              "--no-baseline"), f"127.0.0.1:{ports[0]}", "in use")


def test_a_dashboard_port_that_is_a_peers_or_in_use_is_bad_local_input(tmp_path):
    import socket

    ports = free_ports(3)
    path = tmp_path / "t.toml"
    path.write_text(topology_toml(["a"], ["c1"], ports=ports[:2]))
    one_line_exit_2(p2psl("run", "--topology", str(path), "--out", str(tmp_path / "run"), "--no-baseline",
                          "--dashboard-port", str(ports[0])), f"dashboard on port {ports[0]}: it is a's")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[2]))
        holder.listen()
        one_line_exit_2(p2psl("run", "--topology", str(path), "--out", str(tmp_path / "run"), "--no-baseline",
                              "--dashboard-port", str(ports[2])), f"dashboard on port {ports[2]}", "in use")


def test_the_peers_of_run_end_when_run_is_killed(tmp_path):
    """SIGKILL leaves `p2psl run` no chance to stop its peers: they notice its death themselves."""
    import time

    import psutil

    path = tmp_path / "t.toml"
    path.write_text(topology_toml(["a"], ["c1"], ports=free_ports(2), timeouts={"connect": "120s"}))
    # both peers freeze at their first batch: only their parent's death can end them
    env = {**os.environ, "P2PSL_FAULTS": "freeze:round=1:batch=1:seconds=600"}
    run = subprocess.Popen([sys.executable, "-m", "p2psl", "run", "--topology", str(path), "--out",
                            str(tmp_path / "out"), "--no-dashboard", "--no-baseline"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    peers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while len(peers := psutil.Process(run.pid).children()) < 2:  # another process: nothing to await
            assert time.monotonic() < deadline and run.poll() is None, "p2psl run did not start its peers"
            time.sleep(0.05)
        run.kill()
        run.wait()
        gone, alive = psutil.wait_procs(peers, timeout=30)
        assert not alive, f"peers outlived p2psl run: {[p.pid for p in alive]}"
    finally:
        run.kill()
        for proc in peers:
            if proc.is_running():
                proc.kill()


def test_a_peer_asked_for_cuda_where_torch_has_none_stops_at_start(tmp_path):
    """No CUDA device is visible (CUDA_VISIBLE_DEVICES empty, or a CPU build of torch): the peer
    exits 2 with one line naming itself, the accelerator asked and the torch it found."""
    import torch

    path = tmp_path / "t.toml"
    path.write_text(topology_toml(["a"], ["c1"], ports=free_ports(2), peer_keys={"c1": {"accelerator": "cuda"}}))
    result = p2psl("peer", "--topology", str(path), "--name", "c1", "--out", str(tmp_path / "c1"),
                   env={"P2PSL_SECRET": "s", "CUDA_VISIBLE_DEVICES": ""})
    one_line_exit_2(result, "ConfigError: c1: accelerator 'cuda' asked, but this torch",
                    f"({torch.__version__})")
    assert "no CUDA" in result.stderr


def test_validate_names_bad_accelerator_keys(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(topology_toml(["a"], ["c1", "c2"], peer_keys={
        "c1": {"accelerator": "gpu"}, "c2": {"accelerator_memory": "8GiB"}}))
    result = p2psl("validate", "--topology", str(path))
    assert result.returncode == 2
    no_traceback(result)
    assert "peer 'c1'.accelerator: must be 'cpu', 'cuda', 'cuda:N' (a device index) or 'auto', got 'gpu'" in result.stderr
    assert "peer 'c2'.accelerator_memory: is only meaningful with an accelerator" in result.stderr


def test_run_in_process_trains_every_peer_in_one_process(tmp_path):
    """`p2psl run --in-process`: the peers share one process and still train over loopback
    WebSockets; the run's outputs are those of a run of separate processes."""
    from tests.integration.harness import write_topology

    topology = write_topology(tmp_path, ["alice", "bob", "carol"], ["c1", "c2"],
                              training={"rounds": 2, "batch_size": 16})
    out = tmp_path / "run"
    result = p2psl("run", "--topology", str(topology), "--out", str(out), "--in-process", "--no-dashboard",
                   timeout=280)
    no_traceback(result)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "centralized" in result.stdout.lower()
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r.get("event") == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["aggregated"] == ["alice", "bob", "carol"] for r in rounds)
    for name in ("alice", "bob", "carol", "c1", "c2"):
        assert json.loads((out / "peers" / name / "exit.json").read_text()) == {"code": 0}
        log = (out / "peers" / name / "peer.log").read_text().splitlines()
        assert log and all(f" {name} " in line for line in log if line[:2].isdigit())


def test_run_twice_into_the_same_folder_starts_afresh(tmp_path):
    """The README's first command run again: the second run writes where the first did. Its
    round-1 checkpoint must not give way to the first run's newer rounds, and what it leaves is
    its own."""
    from p2psl.wire import checkpoint
    from tests.integration.harness import write_topology

    topology = write_topology(tmp_path, ["alice", "bob"], ["c1"], training={"rounds": 3, "batch_size": 32})
    out = tmp_path / "run"
    for attempt in (1, 2):
        result = p2psl("run", "--topology", str(topology), "--out", str(out), "--no-dashboard", "--no-baseline",
                       env={"P2PSL_SECRET": "cli-test-secret"}, timeout=280)
        no_traceback(result)
        assert result.returncode == 0, f"run {attempt}:\n{result.stdout}{result.stderr}"
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds if r.get("event") == "round"] == [1, 2, 3]
    for name in ("alice", "bob", "c1"):
        assert checkpoint.rounds(out / "peers" / name / "checkpoints") == [2, 3]
        assert "removed 2 round checkpoints of an earlier run" in (out / "peers" / name / "stderr.log").read_text()


def test_plan_predicts_for_peers_in_one_process(tmp_path):
    """`p2psl plan --in-process`: the same plan, the round predicted as `p2psl run --in-process`
    will run it (every message cheaper than between two processes)."""
    path = tmp_path / "t.toml"
    path.write_text(topology_toml([f"o{k}" for k in range(8)], ["c1", "c2"]))
    apart, together = (p2psl("plan", "--topology", str(path), "--json", *flag) for flag in ((), ("--in-process",)))
    assert apart.returncode == 0 and together.returncode == 0, apart.stderr + together.stderr
    apart, together = json.loads(apart.stdout), json.loads(together.stdout)
    assert together["digest"] == apart["digest"]
    assert together["round_seconds"] < apart["round_seconds"]


def test_together_names_each_peer_that_failed_and_refuses_to_run_none(tmp_path):
    """`p2psl together` (the process behind `run --in-process`, or part of a deployment split
    over machines with --except) says which of its peers failed, and where to read why."""
    path = tmp_path / "t.toml"
    path.write_text(topology_toml(["a"], ["c1"], ports=free_ports(2), timeouts={"connect": "1s"}))
    secret = tmp_path / "secret"
    secret.write_text("s")
    out = tmp_path / "out"
    result = p2psl("together", "--topology", str(path), "--out", str(out), "--secret-file", str(secret),
                   "--except", "c1")  # c1 runs nowhere: a waits for it in vain
    assert result.returncode == 1
    assert result.stderr.strip() == f"a: exit 1 (why: its last lines in {out / 'a' / 'peer.log'})"
    assert "PeerTimeout" in (out / "a" / "peer.log").read_text()
    result = p2psl("together", "--topology", str(path), "--out", str(out), "--except", "c1", "--except", "a",
                   env={"P2PSL_SECRET": "s"})
    assert result.returncode == 2 and "none is left to run here" in result.stderr
    no_traceback(result)


@pytest.mark.parametrize("in_process", [False, True], ids=["processes", "in_process"])
def test_a_stopped_run_is_resumed_by_run_resume(tmp_path, in_process):
    """Every peer dies at round 2 (a crash fault); `run --resume` trains rounds 2 and 3 from the
    round-1 checkpoints, and the summary has each round once and each peer once."""
    path = tmp_path / "t.toml"
    path.write_text(topology_toml(["a"], ["c1"], ports=free_ports(2), training={"rounds": 3}))
    out = tmp_path / "out"
    args = ["run", "--topology", str(path), "--out", str(out), "--no-baseline", "--no-dashboard",
            *(["--in-process"] if in_process else [])]
    stopped = p2psl(*args, env={"P2PSL_FAULTS": "crash:round=2:batch=1"})
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    resumed = p2psl(*args, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from the peers' last common checkpoint" in resumed.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records if r["event"] == "round"] == [1, 2, 3]
    assert sorted(r["name"] for r in records if r["event"] == "peer") == ["a", "c1"]
    assert "resuming from the checkpoint of round 1" in (out / "peers" / "a" / "peer.log").read_text()


def test_a_reader_that_stops_reading_ends_plan_as_sigpipe_would():
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before anything is written
    plan = subprocess.Popen([sys.executable, "-m", "p2psl", "plan", "--topology", "topologies/ring.toml"],
                            stdout=writer, stderr=subprocess.PIPE)
    os.close(writer)
    assert plan.wait(timeout=120) == 141
    assert plan.stderr.read() == b""
    plan.stderr.close()
