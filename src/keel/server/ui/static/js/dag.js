// The step graph of a run, laid out left to right in layers and drawn as SVG.
//
// Layout (a small Sugiyama-style pass, written for keel's graphs, which are
// mostly chains and fan-outs):
//   1. layer = 1 + the largest layer among a step's dependencies (steps come in
//      call order, so every dependency is seen before the steps that use it);
//   2. order inside each layer: a few down/up sweeps sorting by the mean position
//      of the neighbours in the previous layer (barycentre), which removes most
//      crossings;
//   3. vertical placement: each node wants the mean height of its predecessors;
//      overlaps are pushed apart, then the whole layer is centred on its wishes.
// Many steps of one task with the same inputs in one layer (a `map`) fold into
// one group node past FOLD_AT members; a click on the group unfolds it.

import { fmtDuration, h, s } from "./dom.js";

const NODE_W = 190;
const NODE_H = 44;
const GAP_X = 70;
const GAP_Y = 14;
const PAD = 16;
const FOLD_AT = 12;

const STATUS_ORDER = ["FAILED", "RUNNING", "PENDING", "CANCELLED", "SKIPPED", "CACHED", "SUCCEEDED"];

/** Build the graph to draw: nodes (steps or folded groups) and edges between them. */
function graphOf(steps, unfolded) {
  const bySeq = new Map(steps.map((st) => [st.seq, st]));
  const layerOf = new Map();
  for (const st of steps) {
    let layer = 0;
    for (const d of st.deps || []) if (layerOf.has(d)) layer = Math.max(layer, layerOf.get(d) + 1);
    layerOf.set(st.seq, layer);
  }
  // Fold big maps: same layer, same task, same dependencies.
  const families = new Map();
  for (const st of steps) {
    const fam = `${layerOf.get(st.seq)}|${st.task}|${[...(st.deps || [])].sort((a, b) => a - b).join(",")}`;
    if (!families.has(fam)) families.set(fam, []);
    families.get(fam).push(st);
  }
  const nodeOfSeq = new Map();
  const nodes = [];
  for (const [fam, members] of families) {
    if (members.length > FOLD_AT && !unfolded.has(fam)) {
      const node = { id: `g:${fam}`, group: fam, members, layer: layerOf.get(members[0].seq), preds: new Set() };
      nodes.push(node);
      members.forEach((m) => nodeOfSeq.set(m.seq, node));
    } else {
      for (const st of members) {
        const node = { id: `s:${st.seq}`, step: st, layer: layerOf.get(st.seq), preds: new Set() };
        nodes.push(node);
        nodeOfSeq.set(st.seq, node);
      }
    }
  }
  const edges = new Map();
  for (const st of steps) {
    const to = nodeOfSeq.get(st.seq);
    for (const d of st.deps || []) {
      const from = nodeOfSeq.get(d);
      if (!from || from === to || !bySeq.has(d)) continue;
      to.preds.add(from);
      edges.set(`${from.id}>${to.id}`, { from, to });
    }
  }
  return { nodes, edges: [...edges.values()] };
}

function order(layers, edges) {
  const succ = new Map();
  const pred = new Map();
  for (const n of layers.flat()) {
    succ.set(n, []);
    pred.set(n, []);
  }
  for (const e of edges) {
    succ.get(e.from).push(e.to);
    pred.get(e.to).push(e.from);
  }
  const pos = new Map();
  const index = () => layers.forEach((layer) => layer.forEach((n, i) => pos.set(n, i)));
  index();
  const sweep = (range, neighbours) => {
    for (const li of range) {
      const layer = layers[li];
      const key = new Map();
      layer.forEach((n, i) => {
        const ns = neighbours.get(n).filter((m) => pos.has(m));
        key.set(n, ns.length ? ns.reduce((a, m) => a + pos.get(m), 0) / ns.length : i);
      });
      layer.sort((a, b) => key.get(a) - key.get(b) || pos.get(a) - pos.get(b));
      layer.forEach((n, i) => pos.set(n, i));
    }
  };
  const down = [...layers.keys()].slice(1);
  const up = [...layers.keys()].reverse().slice(1);
  for (let i = 0; i < 4; i += 1) {
    sweep(down, pred);
    sweep(up, succ);
  }
  sweep(down, pred);
}

function place(layers) {
  const pitch = NODE_H + GAP_Y;
  const tallest = Math.max(1, ...layers.map((l) => l.length));
  layers.forEach((layer, li) => {
    const x = PAD + li * (NODE_W + GAP_X);
    const top = PAD + ((tallest - layer.length) * pitch) / 2;
    layer.forEach((n, i) => {
      n.x = x;
      n.y = top + i * pitch;
    });
  });
  // Pull each layer towards its predecessors, keeping the order and the spacing.
  for (let pass = 0; pass < 3; pass += 1) {
    for (const layer of layers.slice(1)) {
      const wish = layer.map((n) => {
        const ps = [...n.preds];
        return ps.length ? ps.reduce((a, p) => a + p.y, 0) / ps.length : n.y;
      });
      const ys = wish.slice();
      for (let i = 1; i < ys.length; i += 1) ys[i] = Math.max(ys[i], ys[i - 1] + pitch);
      const shift = wish.reduce((a, w, i) => a + (w - ys[i]), 0) / ys.length;
      layer.forEach((n, i) => {
        n.y = ys[i] + shift;
      });
    }
  }
  const minY = Math.min(...layers.flat().map((n) => n.y));
  layers.flat().forEach((n) => {
    n.y += PAD - minY;
  });
}

export function layout(steps, unfolded = new Set()) {
  const { nodes, edges } = graphOf(steps, unfolded);
  const layers = [];
  for (const n of nodes) (layers[n.layer] ||= []).push(n);
  for (let i = 0; i < layers.length; i += 1) layers[i] ||= [];
  order(layers, edges);
  place(layers);
  const width = PAD * 2 + Math.max(1, layers.length) * (NODE_W + GAP_X) - GAP_X;
  const height = Math.max(NODE_H + PAD * 2, ...nodes.map((n) => n.y + NODE_H + PAD));
  return { nodes, edges, width, height };
}

function clip(text, max) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

function groupStatus(members) {
  const counts = new Map();
  members.forEach((m) => counts.set(m.status, (counts.get(m.status) || 0) + 1));
  const main = STATUS_ORDER.find((st) => counts.has(st) && st !== "SUCCEEDED" && st !== "CACHED")
    || (counts.has("SUCCEEDED") ? "SUCCEEDED" : "CACHED");
  return { counts, main };
}

function edgePath(e) {
  const x1 = e.from.x + NODE_W;
  const y1 = e.from.y + NODE_H / 2;
  const x2 = e.to.x;
  const y2 = e.to.y + NODE_H / 2;
  const dx = Math.max(30, (x2 - x1) / 2);
  return `M${x1},${y1} C${x1 + dx},${y1} ${x2 - dx},${y2} ${x2},${y2}`;
}

/**
 * A live DAG view. `update(steps)` redraws: in place when only statuses and
 * times changed, with a new layout when steps or edges were added.
 */
export class DagView {
  constructor({ runId, stepHref }) {
    this.runId = runId;
    this.stepHref = stepHref;
    this.unfolded = new Set();
    this.shape = "";
    this.svg = s("svg", { class: "dag", role: "group", "aria-label": "Step graph" });
    this.element = h("div", { class: "dag-wrap" }, this.svg);
    this.nodeEls = new Map();
    this.steps = [];
  }

  update(steps) {
    this.steps = steps;
    this.bySeq = new Map(steps.map((st) => [st.seq, st]));
    const shape = `${[...this.unfolded].join(";")}#${steps.map((st) => `${st.seq}:${(st.deps || []).join(",")}`).join("|")}`;
    if (shape !== this.shape) {
      this.shape = shape;
      this.redraw();
      return;
    }
    for (const n of this.layout.nodes) this.paint(n);
  }

  redraw() {
    const focused = document.activeElement && document.activeElement.closest && document.activeElement.closest(".dag .node");
    const focusId = focused ? focused.dataset.id : null;
    const bySeq = this.bySeq;
    this.layout = layout(this.steps, this.unfolded);
    const { nodes, edges, width, height } = this.layout;
    const svg = this.svg;
    while (svg.firstChild) svg.firstChild.remove();
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const edgeLayer = s("g", { class: "edges", "aria-hidden": "true" });
    this.edgeEls = edges.map((e) => {
      const path = s("path", { class: "edge", d: edgePath(e) });
      path.dataset.from = e.from.id;
      path.dataset.to = e.to.id;
      edgeLayer.append(path);
      return path;
    });
    svg.append(edgeLayer);
    const nodeLayer = s("g", { class: "nodes" });
    this.nodeEls = new Map();
    for (const n of nodes) {
      if (n.step) n.step = bySeq.get(n.step.seq) || n.step;
      const el = this.nodeElement(n);
      nodeLayer.append(el);
      this.nodeEls.set(n.id, el);
      this.paint(n);
    }
    svg.append(nodeLayer);
    if (focusId && this.nodeEls.has(focusId)) {
      const target = this.nodeEls.get(focusId).querySelector("a, [tabindex]");
      if (target) target.focus({ preventScroll: true });
    }
  }

  nodeElement(n) {
    const g = s("g", { class: "node", transform: `translate(${n.x},${n.y})` });
    g.dataset.id = n.id;
    const body = [
      s("rect", { class: "box", width: NODE_W, height: NODE_H, rx: 6 }),
      s("rect", { class: "bar", x: 0, y: 0, width: 5, height: NODE_H, rx: 2 }),
      s("text", { class: "title", x: 14, y: 18 }),
      s("text", { class: "sub", x: 14, y: 34 }),
    ];
    let target;
    if (n.step) {
      target = s("a", { href: this.stepHref(n.step) }, ...body);
      g.dataset.key = n.step.key;
      g.dataset.seq = String(n.step.seq);
    } else {
      body.push(s("g", { class: "segments" }));
      target = s("g", { tabindex: "0", role: "button" }, ...body);
      const unfold = () => {
        this.unfolded.add(n.group);
        this.shape = "";
        this.update(this.steps);
      };
      target.addEventListener("click", unfold);
      target.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") {
          e.preventDefault();
          unfold();
        }
      });
    }
    g.append(s("title", {}), target);
    const hot = (on) => {
      for (const p of this.edgeEls) {
        if (p.dataset.from === n.id || p.dataset.to === n.id) p.classList.toggle("hot", on);
      }
    };
    g.addEventListener("mouseenter", () => hot(true));
    g.addEventListener("mouseleave", () => hot(false));
    target.addEventListener("focus", () => hot(true));
    target.addEventListener("blur", () => hot(false));
    return g;
  }

  paint(n) {
    const g = this.nodeEls.get(n.id);
    if (!g) return;
    const title = g.querySelector("text.title");
    const sub = g.querySelector("text.sub");
    const tip = g.querySelector("title");
    const target = g.querySelector("a, [role=button]");
    if (n.step) {
      const st = this.bySeq.get(n.step.seq) || n.step;
      n.step = st;
      const status = String(st.status).toUpperCase();
      g.setAttribute("class", `node ${status.toLowerCase()}`);
      g.dataset.status = status;
      title.textContent = clip(st.key, 24);
      const parts = [status.toLowerCase()];
      const took = st.duration ?? (st.started_at && !st.ended_at ? Date.now() / 1000 - st.started_at : null);
      if (took !== null && took !== undefined) parts.push(fmtDuration(took));
      if (st.attempts > 1) parts.push(`${st.attempts} tries`);
      if (st.cached_from) parts.push("cached");
      sub.textContent = clip(parts.join(" · "), 30);
      tip.textContent = `${st.key} (${st.task}): ${status.toLowerCase()}`;
      target.setAttribute("aria-label", `Step ${st.key}, ${status.toLowerCase()}`);
    } else {
      const members = n.members.map((m) => this.bySeq.get(m.seq) || m);
      const { counts, main } = groupStatus(members);
      g.setAttribute("class", `node group ${main.toLowerCase()}`);
      g.dataset.status = main;
      title.textContent = clip(`${members[0].task} ×${members.length}`, 24);
      const summary = STATUS_ORDER.filter((st) => counts.has(st)).map((st) => `${counts.get(st)} ${st.toLowerCase()}`);
      sub.textContent = clip(summary.join(", "), 30);
      tip.textContent = `${members.length} steps of ${members[0].task}: ${summary.join(", ")}. Click to show each.`;
      target.setAttribute("aria-label", `${members.length} steps of ${members[0].task}: ${summary.join(", ")}; press to show each`);
      const segs = g.querySelector(".segments");
      while (segs.firstChild) segs.firstChild.remove();
      let x = 14;
      const w = NODE_W - 24;
      for (const st of STATUS_ORDER) {
        if (!counts.has(st)) continue;
        const part = (counts.get(st) / members.length) * w;
        segs.append(s("rect", { class: `seg bar-${st.toLowerCase()}`, x, y: NODE_H - 7, width: part, height: 3, style: { fill: `var(--st-${st.toLowerCase()})`, stroke: "none" } }));
        x += part;
      }
    }
  }
}

export function statusLegend() {
  return h(
    "ul",
    { class: "legend", "aria-label": "Status colours" },
    ["PENDING", "RUNNING", "SUCCEEDED", "CACHED", "FAILED", "CANCELLED", "SKIPPED"].map((st) =>
      h("li", {}, h("span", { class: `badge status-${st.toLowerCase()}` }, st.toLowerCase())),
    ),
  );
}
