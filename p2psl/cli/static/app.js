// The p2psl live dashboard: polls /api/status every second and updates the page in place.
// Read-only; every value from the API is written with textContent (never parsed as HTML).
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
const BOX_W = 280, BOX_H = 70, COL_GAP = 420, ROW_H = 104, PAD = 16;

const $ = (id) => document.getElementById(id);
let sceneKey = null;
const nodes = {};   // name -> {group, lines: [text...], mem, busy}
const rows = {};    // name -> {tr, cells}

// -- formatting ------------------------------------------------------------------------------------
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
  for (const [unit, size] of units) if (Math.abs(n) >= size) return (n / size).toFixed(1) + " " + unit;
  return Math.round(n) + " B";
}
const pct = (x) => (x === null || x === undefined) ? "–" : Math.round(100 * x) + " %";
const num = (x, d = 3) => (x === null || x === undefined) ? "–" : Number(x).toFixed(d);
function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return (h ? h + ":" + String(m).padStart(2, "0") : m) + ":" + String(sec).padStart(2, "0");
}
function seconds(s) {
  if (s === null || s === undefined) return "–";
  return s >= 1 ? s.toPrecision(3) + " s" : (s * 1000).toPrecision(3) + " ms";
}
function el(name, attrs = {}, parent = null) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}
function span(layers) { return layers[0] === layers[1] ? String(layers[0]) : layers[0] + "–" + layers[1]; }

// -- topology --------------------------------------------------------------------------------------
function position(node) {
  return { x: PAD + node.x * COL_GAP, y: PAD + node.y * ROW_H };
}

function layersOf(name, role, plan) {
  if (!plan) return "";
  if (role === "data_owner" || role === "owner_group") return "layers " + span(plan.owner_layers.first) + " + " + span(plan.owner_layers.last);
  const mine = plan.assignments[name];
  if (!mine) return "not in the chain";
  const chains = plan.chains || 1, hops = plan.chain.length / chains, at = plan.chain.indexOf(name);
  return "part " + (at % hops + 1) + (chains > 1 ? " of chain " + (Math.floor(at / hops) + 1) : "") +
    " · layers " + span(mine);
}

function drawTopology(scene, plan) {
  const svg = $("topology");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const defs = el("defs", {}, svg);
  const marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "7",
                                markerHeight: "7", orient: "auto-start-reverse" }, defs);
  el("path", { d: "M0,0 L10,5 L0,10 z", fill: "#4a5568" }, marker);
  const where = {};
  for (const n of scene.nodes) where[n.name] = position(n);
  const chain = scene.chain, paths = scene.paths || [chain];
  const firsts = new Set(paths.map((p) => p[0]));
  for (const e of scene.edges) {
    // arrows follow the forward path: owner -> first node -> ... -> last node -> owner
    let [a, b] = [e.a, e.b];
    if (e.kind === "chain" && chain.indexOf(a) > chain.indexOf(b)) [a, b] = [b, a];
    if (e.kind === "owner") {
      const node = chain.includes(a) ? a : b, owner = node === a ? b : a;
      [a, b] = firsts.has(node) ? [owner, node] : [node, owner];
    }
    const pa = where[a], pb = where[b];
    const sameColumn = pa.x === pb.x;
    const x1 = pa.x + (sameColumn ? BOX_W / 2 : (pa.x < pb.x ? BOX_W : 0));
    const x2 = pb.x + (sameColumn ? BOX_W / 2 : (pa.x < pb.x ? 0 : BOX_W));
    const y1 = pa.y + (sameColumn ? (pa.y < pb.y ? BOX_H : 0) : BOX_H / 2);
    const y2 = pb.y + (sameColumn ? (pa.y < pb.y ? 0 : BOX_H) : BOX_H / 2);
    const cls = "edge " + e.kind + (e.implicit ? " implicit" : "");
    const line = el("line", { x1, y1, x2, y2, class: cls }, svg);
    if (e.kind !== "other") line.setAttribute("marker-end", "url(#arrow)");
    el("title", {}, line).textContent = e.a + " – " + e.b + ": " + e.label;
    if (e.kind === "chain") {  // beside the chain; every other link is listed under the picture
      el("text", { x: Math.max(x1, x2) + 8, y: (y1 + y2) / 2 + 4, class: "label" }, svg).textContent = e.label;
    }
  }
  listLinks(scene);
  for (const n of scene.nodes) {
    const p = where[n.name];
    const g = el("g", { class: "node " + n.role, transform: `translate(${p.x},${p.y})` }, svg);
    g.dataset.peer = n.name;
    el("rect", { width: BOX_W, height: BOX_H, class: "box" }, g);
    const lines = [0, 1, 2].map((i) => el("text", { x: 8, y: 17 + i * 16, class: i ? "" : "title" }, g));
    lines[0].textContent = n.name + (layersOf(n.name, n.role, plan) ? " · " + layersOf(n.name, n.role, plan) : "");
    el("rect", { x: 8, y: BOX_H - 12, width: (BOX_W - 24) / 2, height: 5, class: "bar-bg" }, g);
    el("rect", { x: 16 + (BOX_W - 24) / 2, y: BOX_H - 12, width: (BOX_W - 24) / 2, height: 5, class: "bar-bg" }, g);
    const mem = el("rect", { x: 8, y: BOX_H - 12, width: 0, height: 5, class: "bar-mem" }, g);
    const busy = el("rect", { x: 16 + (BOX_W - 24) / 2, y: BOX_H - 12, width: 0, height: 5, class: "bar-busy" }, g);
    nodes[n.name] = { group: g, lines, mem, busy };
  }
  const width = PAD * 2 + COL_GAP + BOX_W + 160;
  const height = PAD * 2 + Math.max(0, scene.rows - 1) * ROW_H + BOX_H;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.style.maxWidth = width + "px";
}

function listLinks(scene) {
  // links other than the chain's, grouped by label: "alice, bob ↔ big: 50 Mbit/s · 5 ms"
  const groups = new Map();
  for (const e of scene.edges) {
    if (e.kind === "chain" || e.implicit) continue;
    const key = e.b + "\u0000" + e.label;
    if (!groups.has(key)) groups.set(key, { b: e.b, label: e.label, peers: [] });
    groups.get(key).peers.push(e.a);
  }
  const list = $("links");
  while (list.firstChild) list.removeChild(list.firstChild);
  for (const g of groups.values()) {
    const li = document.createElement("li");
    li.textContent = `${g.peers.join(", ")} ↔ ${g.b}: ${g.label}`;
    list.appendChild(li);
  }
}

function updateNode(p) {
  const n = nodes[p.name];
  if (!n) return;
  n.group.classList.toggle("active", ["training", "forward", "backward", "optimize", "aggregate"].includes(p.state));
  n.group.classList.toggle("failed", p.state === "failed");
  const progress = p.role === "data_owner" && p.batches ? ` · batch ${p.batch}/${p.batches}` :
                   p.role === "compute" && p.batch ? ` · ${p.batch} served` : "";
  n.lines[1].textContent = `${stateText(p)} · round ${p.round ?? 0}${progress}`;
  n.lines[2].textContent = `mem ${bytes(p.rss_bytes)} / ${bytes(p.capacity_bytes)} · busy ${pct(p.utilisation)}`;
  const w = (BOX_W - 24) / 2;
  n.mem.setAttribute("width", Math.min(1, (p.rss_bytes || 0) / p.capacity_bytes) * w);
  n.busy.setAttribute("width", Math.min(1, p.utilisation || 0) * w);
}

// "failed (exit -9)" for a peer whose process ended badly: the launcher adds its exit status
function stateText(p) {
  return p.state === "failed" && p.exit_code != null ? `failed (exit ${p.exit_code})` : p.state;
}

function statesText(states) {
  return Object.entries(states).map(([state, n]) => `${n} ${state}`).join(", ");
}

function updateGroup(summary) {
  // the one box that stands for every owner of a deployment too big to draw an owner a box
  const n = nodes[summary.name];
  if (!n) return;
  n.lines[1].textContent = statesText(summary.states);
  n.lines[2].textContent = `batches ${summary.batch}/${summary.batches || "?"} this round`;
  n.group.classList.toggle("active", "training" in summary.states);
  n.group.classList.toggle("failed", "failed" in summary.states);
}

// -- the peers table -------------------------------------------------------------------------------
const COLUMNS = ["name", "role", "state", "round", "batch", "loss", "accuracy", "memory", "peak", "sent",
                 "received", "busy", "busy_total"];

function meter(cell, text, fraction) {
  cell.textContent = text;
  const m = document.createElement("span");
  m.className = "meter" + (fraction > 1 ? " over" : "");
  const i = document.createElement("i");
  i.style.width = Math.min(100, 100 * (fraction || 0)) + "%";
  m.appendChild(i);
  cell.appendChild(m);
}

function summaryRow(summary) {
  // many owners: one row for all of them, then only the few furthest behind
  let row = rows[summary.name];
  if (!row) {
    const tr = document.createElement("tr");
    tr.className = "owner_group";
    tr.dataset.peer = summary.name;
    const name = document.createElement("td"), rest = document.createElement("td");
    rest.colSpan = COLUMNS.length - 1;
    rest.className = "group-detail";
    tr.append(name, rest);
    $("peers").tBodies[0].prepend(tr);
    row = rows[summary.name] = { tr, cells: { name, rest } };
  }
  row.cells.name.textContent = summary.name;
  row.cells.rest.textContent = `${statesText(summary.states)}; batches ${summary.batch}/${summary.batches || "?"} ` +
    `this round; furthest behind, below: ${summary.slowest.join(", ")}`;
}

function updateRow(p) {
  let row = rows[p.name];
  if (!row) {
    const tr = document.createElement("tr");
    tr.dataset.peer = p.name;
    tr.className = p.role;
    const cells = {};
    for (const c of COLUMNS) { cells[c] = document.createElement("td"); cells[c].className = c; tr.appendChild(cells[c]); }
    $("peers").tBodies[0].appendChild(tr);
    row = rows[p.name] = { tr, cells };
  }
  const c = row.cells;
  c.name.textContent = p.name;
  c.role.textContent = p.role === "data_owner" ? "data owner" : "compute";
  c.state.textContent = stateText(p);
  c.state.title = p.detail || "";
  c.state.className = "state " + p.state;
  c.round.textContent = `${p.round ?? 0}/${p.rounds ?? "–"}`;
  c.batch.textContent = p.role === "data_owner" ? (p.batches ? `${p.batch}/${p.batches}` : "–") : (p.batch ? `${p.batch} served` : "–");
  c.loss.textContent = num(p.loss);
  c.accuracy.textContent = num(p.accuracy);
  meter(c.memory, `${bytes(p.rss_bytes)} / ${bytes(p.capacity_bytes)}`, (p.rss_bytes || 0) / p.capacity_bytes);
  c.peak.textContent = bytes(p.peak_rss_bytes);
  c.sent.textContent = bytes(p.bytes_sent);
  c.received.textContent = bytes(p.bytes_received);
  meter(c.busy, pct(p.utilisation), p.utilisation);
  c.busy_total.textContent = pct(p.utilisation_total);
}

// -- charts ----------------------------------------------------------------------------------------
function chart(svg, points, colour, fixedMax, others = []) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const W = 420, H = 200, L = 42, B = 24, T = 10, R = 10;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const data = points.filter((p) => p.y !== null && p.y !== undefined);
  const other = others.filter((p) => p.y !== null && p.y !== undefined);
  const xs = data.map((p) => p.x), ys = [...data, ...other].map((p) => p.y);
  const xmax = Math.max(2, ...xs), ymax = fixedMax ?? Math.max(1e-9, ...ys) * 1.1;
  const X = (x) => L + (x - 1) / (xmax - 1) * (W - L - R), Y = (y) => H - B - y / ymax * (H - B - T);
  for (let k = 0; k <= 4; k++) {
    const y = ymax * k / 4;
    el("line", { x1: L, x2: W - R, y1: Y(y), y2: Y(y), class: "grid" }, svg);
    el("text", { x: L - 6, y: Y(y) + 4, "text-anchor": "end" }, svg).textContent = y.toFixed(2);
  }
  el("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }, svg);
  const step = Math.max(1, Math.ceil(xmax / 10));
  for (let x = 1; x <= xmax; x += step) el("text", { x: X(x), y: H - 6, "text-anchor": "middle" }, svg).textContent = x;
  if (!data.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, svg).textContent = "after the first round";
    return;
  }
  if (other.length) el("polyline", { points: other.map((p) => `${X(p.x)},${Y(p.y)}`).join(" "), stroke: "#718096",
    "stroke-dasharray": "5 4" }, svg);
  el("polyline", { points: data.map((p) => `${X(p.x)},${Y(p.y)}`).join(" "), stroke: colour }, svg);
  for (const p of data) el("circle", { cx: X(p.x), cy: Y(p.y), r: 3, fill: colour }, svg).appendChild(
    Object.assign(document.createElementNS(SVG, "title"), { textContent: `round ${p.x}: ${p.y.toFixed(4)}` }));
}

function lastRound(history) {
  const h = history.length ? history[history.length - 1] : null;
  if (!h || h.seconds == null) return "";
  return `; round ${h.round} took ${seconds(h.seconds)}` + (h.predicted != null ? `, predicted ${seconds(h.predicted)}` : "");
}

// -- the loop --------------------------------------------------------------------------------------
function render(s) {
  $("source").textContent = `${s.source} · model ${s.model}`;
  const round = $("round");
  round.textContent = s.round;
  round.dataset.round = s.round;
  $("rounds").textContent = s.rounds;
  $("progress-bar").style.width = (100 * s.fraction) + "%";
  $("fraction").textContent = pct(s.fraction);
  $("elapsed").textContent = duration(s.elapsed_seconds);
  $("eta").textContent = s.finished ? "done" : s.ended ? "—" : duration(s.eta_seconds);
  $("pipeline").textContent = pct(s.pipeline.utilisation);
  const key = s.plan ? s.plan.digest : "no plan";
  if (key !== sceneKey) { drawTopology(s.scene, s.plan); sceneKey = key; }
  if (s.plan) {
    const ways = (s.scene.paths || [s.plan.chain]).map((p) => `owner → ${p.join(" → ")} → owner`).join(" or ");
    $("plan-line").textContent = `plan ${s.plan.digest.slice(0, 10)} (${s.plan.method}): ${ways}; ` +
      `predicted period ${seconds(s.plan.expected_period_seconds ?? s.plan.period_seconds)}, round ${seconds(s.plan.round_seconds)}` +
      lastRound(s.history) +
      (s.scene.fully_connected ? "; every pair of peers is connected (free links), the links a batch uses are drawn" : "");
  }
  const summary = s.owners_summary;
  if (summary) { updateGroup(summary); summaryRow(summary); }
  for (const p of s.peers) {
    updateNode(p);
    const shown = !summary || p.role !== "data_owner" || summary.slowest.includes(p.name);
    if (shown) updateRow(p);
    if (rows[p.name]) rows[p.name].tr.hidden = !shown;
  }
  if (summary) {  // the owners' row, the furthest behind in order, then the compute nodes
    const body = $("peers").tBodies[0];
    const order = [summary.name, ...summary.slowest, ...s.peers.filter((p) => p.role !== "data_owner").map((p) => p.name)];
    for (const name of order) if (rows[name]) body.appendChild(rows[name].tr);
  }
  chart($("chart-accuracy"), s.history.map((h) => ({ x: h.round, y: h.accuracy })), "#2f855a", 1);
  chart($("chart-loss"), s.history.map((h) => ({ x: h.round, y: h.loss })), "#c05621", null);
  chart($("chart-seconds"), s.history.map((h) => ({ x: h.round, y: h.seconds })), "#2b6cb0", null,
        s.history.map((h) => ({ x: h.round, y: h.predicted })));
  const badge = $("connection");
  badge.textContent = s.finished ? "finished" : s.ended ? "ended: a peer failed" : "live";
  badge.className = "badge " + (s.ended ? "ended" : "live");
  document.body.dataset.updated = String(s.time);
}

let failures = 0;
async function poll() {
  try {
    const response = await fetch("/api/status", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    failures = 0;
  } catch (err) {
    failures += 1;
    const badge = $("connection");
    badge.textContent = "no contact — the run has ended or stopped (last values shown)";
    badge.className = "badge lost";
  }
  setTimeout(poll, Math.min(POLL_MS * (1 + failures), 5000));
}
poll();
