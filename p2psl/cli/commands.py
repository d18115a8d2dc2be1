"""The `p2psl` command: peer, run, plan, validate (SPEC §7).

Every deliberate failure is a `P2PSLError`; `main` prints it as "TypeName: message" on stderr and
exits with its `exit_code` (2 for bad local input, 1 otherwise) — never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

import click

from p2psl import __version__
from p2psl.errors import ConfigError, P2PSLError, TopologyError, report
from p2psl.topology import Topology, load_topology
from p2psl.units import plural

DEFAULT_TOPOLOGY = Path(__file__).parents[1] / "topologies" / "ring.toml"


class _PeerField(logging.Filter):
    """Log records without a peer name (library loggers) get the process's peer name."""

    def __init__(self, name: str):
        super().__init__()
        self.peer = name

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "peer"):
            record.peer = self.peer
        return True


def setup_logging(peer: str, level: str, logfile: Path | None = None) -> None:
    fmt = logging.Formatter("%(asctime)s %(peer)-8s %(levelname)-7s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logfile, encoding="utf-8"))
    root = logging.getLogger("p2psl")
    root.setLevel(level.upper())
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(_PeerField(peer))
        root.addHandler(handler)


def _out_dir(path: Path) -> Path:
    """The output folder, created now: a folder that cannot be is bad local input (exit 2),
    said before any peer starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {path}: {exc.strerror or exc}") from None
    return path


def _timing(done: int, total: int) -> None:
    """What a first plan of a model on this machine spends its time on (a large model's layers
    take a while; later runs read them from the cache): told before each layer, `done` so far."""
    if done == 0:
        click.echo(f"timing the model's {plural(total, 'layer')} on this machine, once (later runs read "
                   "them from the cache)...", err=True)
    elif total >= 8 and done % (total // 4) == 0:
        click.echo(f"  {done}/{total} timed", err=True)


def _topology(path: str | None) -> Topology:
    return load_topology(path or DEFAULT_TOPOLOGY)


topology_option = click.option("--topology", "topology_path", type=click.Path(dir_okay=False),
                               help="Topology file (TOML). Default: the bundled ring.toml.")
secret_option = click.option("--secret-file", type=click.Path(dir_okay=False),
                             help="File holding the deployment secret (default: $P2PSL_SECRET).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="p2psl")
def cli() -> None:
    """p2psl: peer-to-peer multihop parallel split learning."""


@cli.command()
@click.option("--topology", "topology_path", type=click.Path(dir_okay=False), required=True,
              help="Topology file (TOML) shared by every peer.")
@click.option("--name", required=True, help="Which [[peer]] of the file this process is.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: runs/NAME).")
@secret_option
@click.option("--resume", is_flag=True, help="Continue from the last round every peer checkpointed.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]),
              show_default=True)
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="torch threads for this peer.")
def peer(topology_path: str, name: str, out: str | None, secret_file: str | None, resume: bool,
         log_level: str, threads: int) -> None:
    """Run one peer until training completes."""
    from p2psl.cli.parent import follow_parent

    follow_parent()  # first: importing torch takes a while, and a launcher may die meanwhile
    from p2psl.net.auth import load_secret
    from p2psl.runtime.heap import Settle
    from p2psl.runtime.peer import Peer, PeerOptions

    topology = _topology(topology_path)
    topology.check_name(name)  # before the output folder is made for it
    secret = load_secret(secret_file)
    out_dir = _out_dir(Path(out or Path("runs") / name))
    setup_logging(name, log_level, out_dir / "peer.log")
    the_peer = Peer(topology, name, secret, PeerOptions(out_dir, resume=resume, torch_threads=threads,
                                                        settled=Settle()))
    asyncio.run(the_peer.run())
    record = the_peer.status
    done = "came back too late to train" if the_peer.state.too_late else f"finished {plural(record.rounds, 'round')}"
    click.echo(f"{name}: {done}"
               + (f", test accuracy {record.accuracy:.4f}" if record.accuracy is not None else "")
               + f"; outputs in {out_dir}")


@cli.command()
@topology_option
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: runs/<topology name>).")
@secret_option
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also train the same model centrally and print its accuracy beside p2psl's.")
@click.option("--dashboard/--no-dashboard", default=True, show_default=True,
              help="Serve a live dashboard on loopback while the run lasts (its address is printed).")
@click.option("--dashboard-port", default=0, show_default=True, type=click.IntRange(0, 65535), help="Port for the dashboard (0: any free port).")
@click.option("--in-process", is_flag=True,
              help="Run every peer in one process (real loopback WebSockets, one torch thread): many peers "
                   "fit in memory; memory figures are then the whole process's.")
@click.option("--resume", is_flag=True, help="Continue a stopped run of this file in --out from the last round "
                                            "every peer checkpointed.")
def run(topology_path: str | None, out: str | None, secret_file: str | None, baseline: bool, dashboard: bool,
        dashboard_port: int, in_process: bool, resume: bool) -> None:
    """Start every peer of a topology on this machine, show progress, print a summary."""
    from p2psl.cli.launcher import Launcher, machine_memory_warnings
    from p2psl.learning.local_plan import check_locally

    topology = _topology(topology_path)
    out_dir = _out_dir(Path(out or Path("runs") / Path(topology.source).stem))
    launcher = Launcher(topology, out_dir, secret_file, baseline=baseline, dashboard=dashboard,
                        dashboard_port=dashboard_port, in_process=in_process, resume=resume)
    launcher.check_ports()  # the quick checks before the plan, which may time the model's layers first
    problems, overruns, the_plan = check_locally(topology, _timing)  # a plan that cannot fit stops here
    if problems:
        raise TopologyError(problems, topology.source)
    for warning in overruns + ([] if in_process else machine_memory_warnings(topology, the_plan)):
        click.echo(f"warning: {warning}", err=True)
    sys.exit(launcher.run())


@cli.command(hidden=True)
@click.option("--topology", "topology_path", type=click.Path(dir_okay=False), required=True)
@click.option("--out", type=click.Path(file_okay=False), required=True)
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--except", "skip", multiple=True, help="A peer not to run here (it runs elsewhere); repeatable.")
@secret_option
@click.option("--resume", is_flag=True, help="Continue from the last round every peer checkpointed.")
def together(topology_path: str, out: str, log_level: str, skip: tuple[str, ...], secret_file: str | None,
             resume: bool) -> None:
    """Every peer of the topology in this process (what `p2psl run --in-process` starts), but
    those named by --except."""
    from p2psl.cli.together import log_each_peer, run_together
    from p2psl.net.auth import load_secret

    topology = _topology(topology_path)
    unknown = sorted(set(skip) - set(topology.names))
    if unknown:
        raise click.UsageError(f"--except names no peer of {topology.source}: {', '.join(unknown)}")
    if set(skip) == set(topology.names):
        raise click.UsageError("--except names every peer: none is left to run here")
    secret = load_secret(secret_file)
    out_dir = _out_dir(Path(out))
    log_each_peer(topology, out_dir, log_level, set(skip))
    codes = asyncio.run(run_together(topology, out_dir, secret, set(skip), resume))
    for name, code in codes.items():
        if code:
            click.echo(f"{name}: exit {code} (why: its last lines in {out_dir / name / 'peer.log'})", err=True)
    sys.exit(max(codes.values(), default=0))


@cli.command()
@click.option("--topology", "topology_path", type=click.Path(dir_okay=False), required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object and nothing else.")
@click.option("--in-process", is_flag=True, help="Predict for every peer in one process (as `p2psl run --in-process`).")
def plan(topology_path: str, as_json: bool, in_process: bool) -> None:
    """Show the plan: each peer's layers, predicted round time and period, peak memory."""
    from p2psl.learning.local_plan import plan_locally

    topology = _topology(topology_path)
    if in_process:
        topology = topology.in_one_process()
    the_plan, profiles, samples = plan_locally(topology, _timing)
    if as_json:
        click.echo(json.dumps(the_plan.to_json()))
    else:
        from p2psl.planning.costmodel import predict
        from p2psl.planning.table import format_plan

        if topology.training.mode == "fedavg":  # [Note: the federated-averaging baseline]
            from p2psl.planning.memory import whole_model_memory
            from p2psl.units import format_bytes

            click.echo(f"mode fedavg: every data owner trains the whole model (layers 1-{the_plan.num_layers}, peak "
                       f"memory about {format_bytes(whole_model_memory(topology, profiles))}) and the compute nodes "
                       "train nothing;\nthe split below is what mode \"split\" would train, and its predictions are "
                       "for that split.\n")
        elif the_plan.micro_batches > 1:
            chosen = " (chosen by the planner)" if topology.training.micro_batches == 0 else ""
            click.echo(f"{the_plan.micro_batches} micro-batches per batch{chosen}: the cuts are chosen for them, and "
                       "the predictions below count them.\n")
        click.echo(format_plan(the_plan, predict(the_plan, topology, profiles, samples), topology))
        _suggest_chains(topology, profiles, samples, the_plan)


def _suggest_chains(topology, profiles, samples, the_plan) -> None:
    """A line naming a faster number of chains, where the planner finds one quickly."""
    from p2psl.planning.planner import faster_chains

    other = faster_chains(topology, profiles, samples, the_plan)
    if other is not None:
        gain = 1 - other.round_seconds / the_plan.round_seconds
        click.echo(f"\nhint: {other.chains} chains of {plural(other.hops, 'compute node')} each are predicted "
                   f"{other.round_seconds:.3g} s a round, {gain:.0%} shorter than this plan's "
                   f"{the_plan.round_seconds:.3g} s (each batch crosses {2 * (other.hops + 1)} links instead of "
                   f"{2 * (the_plan.hops + 1)}): set [training] chains = \"auto\" to let the planner choose")


@cli.command()
@click.option("--topology", "topology_path", type=click.Path(dir_okay=False), required=True)
def validate(topology_path: str) -> None:
    """Check a topology file: exit 0, or exit 2 listing every problem."""
    from p2psl.learning.local_plan import deep_problems

    topology = load_topology(topology_path)
    problems = deep_problems(topology, _timing)
    if problems:
        raise TopologyError(problems, topology.source)
    chains = topology.training.chains
    formed = {1: "", 0: " (chains chosen by the planner)"}.get(chains, f" in {chains} chains")
    click.echo(f"{topology.source}: ok — {plural(len(topology.owners), 'data owner')}, "
               f"{plural(len(topology.compute_nodes), 'compute node')}{formed}, "
               f"{plural(len(topology.links), 'link') if topology.links else 'no links'}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the click group, turning P2PSLError into a one-line message + exit code."""
    try:
        cli.main(args=argv, prog_name="p2psl", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 1 and type(sys.stdout).__name__.endswith("PacifyFlushWrapper"):  # click's answer to a closed pipe
            sys.exit(141)  # (`p2psl plan | head -1`): the status of a process SIGPIPE ends
        raise
    except (P2PSLError, OSError) as exc:
        sys.exit(report(exc))
    except Exception as exc:  # a bug in p2psl: say so plainly, keep the details for the report
        if logging.getLogger("p2psl").handlers:  # a peer: the traceback goes to its log
            logging.getLogger("p2psl").exception("internal error")
        click.echo(f"InternalError: {type(exc).__name__}: {exc} — this is a bug in p2psl; the traceback is in "
                   "the peer's log (peer.log) when logging to a file, please report it", err=True)
        sys.exit(70)
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])

