"""The topology and plan in one picture (tools/visualize.py).

    ┌ layer strip ────────────────────────────────────────────────┐
    │ the model's layers 1..L, cut into the owners' and each node's parts │
    ├ peers and links ─────────────────────┬ memory ──────────────┤
    │ owners │ → c1 → c2 → … → cN → owners   │ predicted / capacity │
    └──────────────────────────────────────┴──────────────────────┘

Link labels never collide: the links along the chain are labelled beside the chain column, and
every other link is listed inside the box of its data owner (an owner's links usually all look
alike, so they collapse into one line). The picture grows with the number of peers, so 30 peers
stay as readable as 3.
"""

from __future__ import annotations

import html
import io
import json
from collections import defaultdict
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

from p2psl.errors import ConfigError
from p2psl.planning.plan import Plan
from p2psl.topology import Topology
from p2psl.units import format_bytes, layers, plural, span
from p2psl.viz import OVER, ROLE_COLOURS, ROLE_EDGES, SVG_TEXT, format_seconds, save
from p2psl.viz.layout import Edge, Scene, scene

FONT = 8.0
WIDTH = 11.0
LINE_IN = FONT * 1.25 / 72   # one text line in a box, inches
PAD_IN = 0.16                # a box's padding plus the gap to its neighbour


def draw_topology(topology: Topology, plan: Plan | None) -> Figure:
    """The whole picture; `plan` None draws the topology alone (no layers, no memory)."""
    sc = scene(topology, plan)
    texts = _texts(topology, plan, sc)
    row_in = _row_inches(sc, texts)
    margin_in = (LINE_IN * max(len(t[0].split("\n")) for t in texts.values()) + PAD_IN) / 2 + 0.1
    graph_h = max(row_in * (sc.rows - 1) + 2 * margin_in, 1.6)
    margin_rows = (graph_h - row_in * (sc.rows - 1)) / 2 / row_in
    strip_h = 0.65 if plan is not None else 0.0
    # inches from the top: title 0.6, strip (with its title) and a gap, the graph (with its title)
    heights = [0.6, strip_h + 0.45 if strip_h else 0.0, graph_h + 0.55, 0.35]
    fig = Figure(figsize=(WIDTH, sum(heights)))
    total = sum(heights)

    def axes(left_in: float, top_in: float, width_in: float, height_in: float):
        return fig.add_axes((left_in / WIDTH, 1 - (top_in + height_in) / total, width_in / WIDTH, height_in / total))

    if plan is not None:
        _layer_strip(axes(0.3, heights[0] + 0.3, WIDTH - 0.6, strip_h), plan)
    graph_top = heights[0] + heights[1] + 0.45
    _graph(axes(0.3, graph_top, 7.0, graph_h), topology, sc, texts, margin_rows)
    _memory(axes(8.1, graph_top, WIDTH - 8.1 - 0.3, graph_h), topology, plan, sc)
    fig.text(0.3 / WIDTH, 1 - 0.15 / total, _title(topology, plan), fontsize=10, va="top")
    return fig


def _texts(topology: Topology, plan: Plan | None, sc: Scene) -> dict[str, tuple[str, bool]]:
    extra = _owner_link_lines(sc, topology)
    return {n.name: _node_text(n.name, topology, plan, extra.get(n.name, [])) for n in sc.nodes}


def _row_inches(sc: Scene, texts: dict[str, tuple[str, bool]]) -> float:
    """Row spacing so that neither column's boxes overlap."""
    def box(names) -> float:
        return max((LINE_IN * len(texts[n][0].split("\n")) + PAD_IN for n in names), default=0.0)

    owners = [n.name for n in sc.nodes if n.role == "data_owner"]
    compute = [n.name for n in sc.nodes if n.role == "compute"]
    need = [box(owners) if len(owners) > 1 else 0.0]
    if len(compute) > 1:  # and room for the chain's arrows between the boxes
        need.append((box(compute) + 0.3) * (len(compute) - 1) / max(sc.rows - 1, 1))
    return max(need + [0.3])


def _title(topology: Topology, plan: Plan | None) -> str:
    cfg = topology.training
    head = (f"{Path(topology.source).name} — model {cfg.model} on {Path(cfg.dataset).name}, "
            f"{plural(len(topology.owners), 'data owner')}, {plural(len(topology.compute_nodes), 'compute node')}")
    if plan is None:
        return head + "\n(no plan)"
    chains = f", {plan.chains} chains" if plan.chains > 1 else ""
    return (f"{head}\nplan ({plan.method}, {plan.num_layers} layers{chains}, digest {plan.digest[:10]}): the planner's "
            f"period {format_seconds(plan.period_seconds)}, round {format_seconds(plan.round_seconds)} (without the "
            "runtime's costs)")


# -- the layer strip -------------------------------------------------------------------------------

def _segments(plan: Plan) -> list[tuple[str, str, int, int]]:
    """(label, role, first, last) for every part along the forward path."""
    out = [("owners", "data_owner", *plan.owner_first)]
    # with several chains, each segment is run by one node per chain ([Note: several chains])
    out += [(" | ".join(path[i].node for path in plan.paths), "compute", s.first, s.last)
            for i, s in enumerate(plan.paths[0])]
    return out + [("owners", "data_owner", *plan.owner_last)]


def _layer_strip(ax, plan: Plan) -> None:
    total = plan.num_layers
    width_in = ax.get_position().width * ax.figure.get_figwidth()
    for label, role, first, last in _segments(plan):
        ax.add_patch(Rectangle((first - 1, 0), last - first + 1, 1, facecolor=ROLE_COLOURS[role],
                               edgecolor=ROLE_EDGES[role], linewidth=1.0))
        seg_in = (last - first + 1) / total * width_in
        text = f"{label}\n{span(first, last)}"
        size = FONT if seg_in >= 0.6 else 6.5
        rotation = 0 if seg_in >= 0.32 else 90
        ax.text((first - 1 + last) / 2, 0.5, text, ha="center", va="center", fontsize=size, rotation=rotation,
                linespacing=1.1)
    ax.set_xlim(0, total)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xticks([])
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"layers 1–{total} along the forward path: every data owner keeps layers "
                 f"{span(*plan.owner_first)} and {span(*plan.owner_last)}; each compute node one segment, "
                 + ("one copy per owner" if plan.chains == 1 else f"one copy per owner of its chain ({plan.chains} chains)"),
                 fontsize=FONT, loc="left")



# -- the graph -----------------------------------------------------------------------------------

def _graph(ax, topology: Topology, sc: Scene, texts: dict[str, tuple[str, bool]], margin: float) -> None:
    pos = {n.name: (n.x, n.y) for n in sc.nodes}
    boxes = {n.name: _box(ax, n, pos, *texts[n.name]) for n in sc.nodes}
    ax.axis("off")
    ax.set_ylim(sc.rows - 1 + margin, -margin)
    ax.set_xlim(-0.5, 1.5)
    inner = [e for e in sc.edges if e.kind == "other" and _column(e.a, sc) == _column(e.b, sc)]
    extents = _fit(ax, boxes, sc, *_room(sc, inner, pos))
    ports = _ports(sc, extents)
    _stubs(ax, sc, extents, ports, bracketed={n for e in inner for n in (e.a, e.b)})
    # [Note: arrows after boxes] an arrow is clipped to its end boxes' outlines as they were last
    # drawn; drawing arrows above the boxes (zorder 4 > 3) makes that the same draw, which matters
    # because savefig(bbox_inches="tight") draws again with shifted display coordinates.
    for edge in sc.edges:
        _edge(ax, edge, pos, boxes, sc, ports)
    note = ("no [[link]] tables: every pair of peers is connected and links are free; the links a batch "
            "uses are drawn" if topology.fully_connected else "links labelled with bandwidth · latency")
    ways = " or ".join(f"owner → {' → '.join(path)} → owner" for path in sc.chains)
    several = f" ({len(sc.chains)} chains: each owner uses its own)" if len(sc.chains) > 1 else ""
    ax.set_title(f"peers and links — a batch goes {ways}{several}\n{note}", fontsize=FONT, loc="left")


def _box(ax, node, pos: dict, text: str, over: bool):
    """A peer as a rounded box of text; a red, thicker outline when its memory is over capacity."""
    return ax.text(*pos[node.name], text, ha="center", va="center", fontsize=FONT, zorder=3, linespacing=1.25,
                   bbox=dict(boxstyle="round,pad=0.45", facecolor=ROLE_COLOURS[node.role],
                             edgecolor=OVER if over else ROLE_EDGES[node.role], linewidth=2.2 if over else 1.0))


def _room(sc: Scene, inner: list[Edge], pos: dict) -> tuple[float, float]:
    """Inches needed left of the owners (brackets) and right of the compute nodes (labels)."""
    left_in = max((_arm(e, pos) / 72 for e in inner if _column(e.a, sc) == "data_owner"), default=0.0)
    right_in = max((_arm(e, pos) / 72 + 1.2 for e in inner if _column(e.a, sc) == "compute"), default=0.0)
    if any(e.kind == "chain" for e in sc.edges):
        right_in = max(right_in, 1.2)  # the chain links' labels
    return left_in, right_in


def _stubs(ax, sc: Scene, extents: dict, ports: dict[str, float], bracketed: set[str]) -> None:
    """Short lines from each box to its column's common port lines."""
    for node in sc.nodes:
        left, right = extents[node.name]
        if node.role == "data_owner" and right < ports["right"]:
            ax.plot([right, ports["right"]], [node.y, node.y], color="#718096", linewidth=0.9, zorder=4)
        if node.name in bracketed:
            side, edge = (ports["left"], left) if node.role == "data_owner" else (ports["compute_right"], right)
            ax.plot([side, edge], [node.y, node.y], color="#718096", linewidth=0.9, zorder=4)


def _fit(ax, boxes: dict, sc: Scene, left_in: float, right_in: float) -> dict[str, tuple[float, float]]:
    """Place the two columns (x = 0 and x = 1) so that the boxes, `left_in` inches left of the
    owners and `right_in` inches right of the compute nodes fit the axes; lay out again so the box
    outlines are final, and return each box's (left, right) in data units."""
    fig = ax.figure

    def extents() -> dict[str, tuple[float, float]]:
        fig.draw_without_rendering()
        to_data = ax.transData.inverted()
        out = {}
        for name, text in boxes.items():
            xs = to_data.transform(text.get_bbox_patch().get_window_extent())[:, 0]
            out[name] = (float(min(xs)), float(max(xs)))
        return out

    fig.draw_without_rendering()
    half = {"data_owner": 0.0, "compute": 0.0}
    for node in sc.nodes:
        width_px = boxes[node.name].get_bbox_patch().get_window_extent().width
        half[node.role] = max(half[node.role], width_px / fig.dpi / 2)
    width = ax.get_position().width * fig.get_figwidth()
    need_left, need_right = half["data_owner"] + left_in + 0.05, half["compute"] + right_in + 0.05
    scale = max(width - need_left - need_right, 0.8)  # inches between the two columns' centres
    ax.set_xlim(-need_left / scale, 1.0 + need_right / scale)
    return extents()


def _arm(edge: Edge, pos: dict) -> float:
    """How far (points) a link inside one column bends out: farther for peers farther apart, so
    several such links do not share one line."""
    return 10.0 + 6.0 * abs(pos[edge.a][1] - pos[edge.b][1])


def _ports(sc: Scene, extents: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Where edges leave a column: owners' links to compute nodes leave from one vertical line
    right of every owner box, so no edge crosses another owner's box; links inside a column
    leave from its outer side and bend outwards."""
    owners = [extents[n.name] for n in sc.nodes if n.role == "data_owner"]
    compute = [extents[n.name] for n in sc.nodes if n.role == "compute"]
    return {"right": max(r for _, r in owners), "left": min(left for left, _ in owners),
            "compute_right": max((r for _, r in compute), default=1.0)}


def _node_text(name: str, topology: Topology, plan: Plan | None, links: list[str]) -> tuple[str, bool]:
    spec = topology.peer(name)
    lines = [name]
    if not spec.is_owner:
        if plan is not None and name in plan.nodes:
            stage = plan.chain[plan.nodes.index(name)]
            lines[0] += f" · part {plan.part_of(name)}" + (f" of chain {plan.nodes.index(name) // plan.hops + 1}"
                                                          if plan.chains > 1 else "")
            lines.append(layers(stage.first, stage.last))
        elif plan is not None:
            lines.append("not in the chain")
    if spec.speed != 1.0:
        lines.append(f"speed ×{spec.speed:g}")
    predicted = plan.peak_memory_bytes.get(name) if plan is not None else None
    if predicted is not None:
        lines.append(f"{format_bytes(predicted)} of {format_bytes(spec.memory)}")
    else:
        lines.append(f"memory {format_bytes(spec.memory)}")
    lines += links
    return "\n".join(lines), predicted is not None and predicted > spec.memory


def _owner_link_lines(sc: Scene, topology: Topology) -> dict[str, list[str]]:
    """Each owner's non-chain links as text lines for its box: '↔ c1, c2: 8 Mbit/s · 20 ms'."""
    owners = {p.name for p in topology.owners}
    by_owner: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for edge in sc.edges:
        if edge.kind == "chain" or edge.implicit:
            continue
        holder, other = (edge.a, edge.b) if edge.a in owners else (edge.b, edge.a)
        if holder in owners:
            by_owner[holder][edge.label].append(other)
    return {owner: [f"↔ {', '.join(sorted(peers))}: {label}" for label, peers in sorted(groups.items())]
            for owner, groups in by_owner.items()}


def _direction(edge: Edge, sc: Scene) -> tuple[str, str, str]:
    """(from, to, arrow style): arrows follow the forward path owner → c1 → … → cN → owner (of
    the owner's chain, where there are several)."""
    chain = sc.chain
    if edge.kind == "chain":
        a, b = sorted((edge.a, edge.b), key=chain.index)
        return a, b, "-|>"
    if edge.kind == "owner":
        node, owner = (edge.a, edge.b) if edge.a in chain else (edge.b, edge.a)
        firsts, lasts = {p[0] for p in sc.chains if p}, {p[-1] for p in sc.chains if p}
        if node in firsts and node in lasts:
            return owner, node, "<|-|>"
        return (owner, node, "-|>") if node in firsts else (node, owner, "-|>")
    return edge.a, edge.b, "-"


def _column(name: str, sc: Scene) -> str:
    return next(n.role for n in sc.nodes if n.name == name)


def _edge(ax, edge: Edge, pos: dict, boxes: dict, sc: Scene, ports: dict[str, float]) -> None:
    a, b, arrowstyle = _direction(edge, sc)
    style = dict(color="#2d3748", linewidth=1.8) if edge.kind == "chain" else \
        dict(color="#718096", linewidth=0.9, alpha=0.8)
    if edge.implicit:  # a free link of a fully connected topology: drawn lighter
        style.update(alpha=0.45)
    role_a, role_b = _column(a, sc), _column(b, sc)
    connection = "arc3,rad=0"
    if role_a != role_b:  # owner ↔ compute: the owner end is on the owners' port line
        ends = [((ports["right"], pos[n][1]), None) if _column(n, sc) == "data_owner"
                else (pos[n], boxes[n].get_bbox_patch()) for n in (a, b)]
    elif edge.kind == "chain":
        ends = [(pos[n], boxes[n].get_bbox_patch()) for n in (a, b)]
    else:  # inside one column: a bracket on the outer side
        x, angle = (ports["left"], 180) if role_a == "data_owner" else (ports["compute_right"], 0)
        ends = [((x, pos[n][1]), None) for n in (a, b)]
        arm = _arm(edge, pos)
        connection = f"arc,angleA={angle},angleB={angle},armA={arm},armB={arm},rad=4"
    ax.add_patch(FancyArrowPatch(ends[0][0], ends[1][0], patchA=ends[0][1], patchB=ends[1][1],
                                 arrowstyle=arrowstyle, mutation_scale=9, connectionstyle=connection,
                                 zorder=4, **style))
    mid = (pos[a][1] + pos[b][1]) / 2
    if edge.kind == "chain":
        ax.annotate(edge.label, (pos[a][0], mid), xytext=(7, 0), textcoords="offset points", ha="left",
                    va="center", fontsize=FONT - 0.5, color="#2d3748", zorder=5)
    elif role_a == role_b == "compute":
        ax.annotate(edge.label, (ports["compute_right"], mid), xytext=(_arm(edge, pos) + 3, 0),
                    textcoords="offset points", ha="left", va="center", fontsize=FONT - 0.5, color="#2d3748",
                    zorder=5)


# -- memory --------------------------------------------------------------------------------------

def _memory(ax, topology: Topology, plan: Plan | None, sc: Scene) -> None:
    names = [n.name for n in sc.nodes]
    ys = range(len(names))
    worst = 1.0
    for y, name in zip(ys, names):
        spec = topology.peer(name)
        predicted = plan.peak_memory_bytes.get(name) if plan is not None else None
        ax.barh(y, 1.0, color="#edf2f7", edgecolor="#a0aec0", height=0.6)
        if predicted is None:
            ax.text(0.02, y, f"no prediction · capacity {format_bytes(spec.memory)}", va="center", fontsize=FONT - 1)
            continue
        share = predicted / spec.memory
        worst = max(worst, share)
        colour = OVER if share > 1 else ROLE_EDGES[spec.role]
        ax.barh(y, share, color=colour, height=0.6, alpha=0.85)
        ax.text(max(share, 1.0) + 0.03, y, f"{format_bytes(predicted)} / {format_bytes(spec.memory)} ({share:.0%})",
                va="center", fontsize=FONT - 1)
    ax.axvline(1.0, color="#4a5568", linewidth=0.8, linestyle=":")
    ax.set_yticks(list(ys), names, fontsize=FONT)
    ax.set_ylim(len(names) - 0.4, -0.6)
    ax.set_xlim(0, worst + 0.95)
    ax.set_xticks([0, 0.5, 1.0], ["0", "50 %", "100 %"], fontsize=FONT - 1)
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title("predicted peak memory / capacity", fontsize=FONT, loc="left")


# -- output --------------------------------------------------------------------------------------

def write_picture(topology: Topology, plan: Plan | None, out: str | Path) -> Path:
    """PNG, SVG or standalone HTML by the extension of `out`."""
    out = Path(out)
    fig = draw_topology(topology, plan)
    if out.suffix.lower() in (".html", ".htm"):
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(_html(topology, plan, fig), encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot write {out}: {exc.strerror or exc}") from None
        return out
    return save(fig, out)


def _html(topology: Topology, plan: Plan | None, fig: Figure) -> str:
    svg = io.StringIO()
    with matplotlib.rc_context(SVG_TEXT):
        fig.savefig(svg, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg_text = svg.getvalue()
    svg_text = svg_text[svg_text.index("<svg"):]
    e = html.escape
    rows = []
    for peer in topology.peers:
        held = "—"
        if plan is not None and peer.is_owner:
            held = f"{span(*plan.owner_first)} and {span(*plan.owner_last)}"
        elif plan is not None and peer.name in plan.nodes:
            stage = plan.chain[plan.nodes.index(peer.name)]
            held = span(stage.first, stage.last)
        predicted = plan.peak_memory_bytes.get(peer.name) if plan is not None else None
        share = f"{predicted / peer.memory:.0%}" if predicted else "—"
        rows.append(f"<tr><td>{e(peer.name)}</td><td>{e(peer.role)}</td><td>{e(peer.address)}</td>"
                    f"<td>{e(held)}</td><td>{format_bytes(predicted) if predicted else '—'}</td>"
                    f"<td>{format_bytes(peer.memory)}</td><td>{share}</td></tr>")
    links = "".join(f"<tr><td>{e(link.a)}</td><td>{e(link.b)}</td><td>{e(_label(link))}</td></tr>"
                    for link in topology.links)
    plan_json = json.dumps(plan.to_json(), indent=2) if plan is not None else "no plan"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(Path(topology.source).name)} — p2psl</title>
<style>body{{font:14px system-ui,sans-serif;margin:1.5em;color:#1a202c}} svg{{max-width:100%;height:auto}}
table{{border-collapse:collapse;margin:1em 0}} td,th{{border:1px solid #cbd5e0;padding:3px 8px;text-align:left}}
th{{background:#edf2f7}} pre{{background:#f7fafc;padding:1em;overflow:auto}}</style></head>
<body><h1>{e(Path(topology.source).name)}</h1>
{svg_text}
<h2>Peers</h2><table><tr><th>peer</th><th>role</th><th>address</th><th>layers</th><th>predicted memory</th>
<th>capacity</th><th>share</th></tr>{''.join(rows)}</table>
<h2>Links</h2>{f'<table><tr><th>peer</th><th>peer</th><th>bandwidth · latency</th></tr>{links}</table>'
               if links else '<p>No [[link]] tables: every pair of peers is directly connected, and links are free.</p>'}
<h2>Plan</h2><pre>{e(plan_json, quote=False)}</pre></body></html>
"""


def _label(link) -> str:
    from p2psl.viz.layout import link_label

    return link_label(link)
