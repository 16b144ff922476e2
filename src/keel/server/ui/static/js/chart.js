// Line charts of metric histories (value over step), several runs overlaid,
// drawn by uPlot (vendored, loaded on first use). Each chart also offers its
// numbers as a table, for screen readers and for copying.

import { fmtNumber, h, s as svg } from "./dom.js";

export const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];

let loading = null;

/** uPlot, once its script and stylesheet are in the page. */
export function loadUplot() {
  if (window.uPlot) return Promise.resolve(window.uPlot);
  if (!loading) {
    loading = new Promise((resolve, reject) => {
      const css = document.createElement("link");
      css.rel = "stylesheet";
      css.href = "/static/vendor/uplot/uPlot.min.css";
      document.head.append(css);
      const script = document.createElement("script");
      script.src = "/static/vendor/uplot/uPlot.iife.min.js";
      script.onload = () => resolve(window.uPlot);
      script.onerror = () => reject(new Error("could not load the chart library (/static/vendor/uplot)"));
      document.head.append(script);
    });
  }
  return loading;
}

const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

/**
 * series: [{label, points: [{step, value}]}]. Returns an element; the chart is
 * drawn into it once it is in the document (its width comes from the layout).
 */
export function metricChart(title, series, { height = 240 } = {}) {
  const steps = [...new Set(series.flatMap((s) => s.points.map((p) => p.step)))].sort((a, b) => a - b);
  const index = new Map(steps.map((st, i) => [st, i]));
  const columns = series.map((s) => {
    const col = new Array(steps.length).fill(null);
    for (const p of s.points) col[index.get(p.step)] = num(p.value);
    return col;
  });
  if (steps.length === 1) return dotPlot(title, series, steps, columns);
  const few = steps.length <= 3;
  const plot = h("div", {
    class: "plot",
    role: "img",
    "aria-label": `${title}: ${series.length} series over ${steps.length} step${steps.length === 1 ? "" : "s"}`,
  });
  const wrap = h(
    "figure",
    { class: "chart", "data-metric": title, "data-series": String(series.length) },
    h("h3", {}, title),
    plot,
    dataTable(title, series, steps, columns),
  );
  wrap.style.margin = "0";

  let chart = null;
  const draw = async () => {
    const uPlot = await loadUplot();
    const width = Math.max(240, plot.clientWidth || wrap.clientWidth || 400);
    const fg = getComputedStyle(document.body).color;
    const opts = {
      width,
      height,
      scales: { x: { time: false, range: (_u, min, max) => (min === max ? [min - 1, max + 1] : [min, max]) } },
      axes: [
        { label: "step", stroke: fg, grid: { stroke: "rgba(128,128,128,.15)" }, ticks: { stroke: "rgba(128,128,128,.3)" } },
        { stroke: fg, grid: { stroke: "rgba(128,128,128,.15)" }, ticks: { stroke: "rgba(128,128,128,.3)" }, size: 60, values: (_u, vals) => vals.map((v) => fmtNumber(v)) },
      ],
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      series: [
        { label: "step" },
        ...series.map((s, i) => ({
          label: s.label,
          stroke: PALETTE[i % PALETTE.length],
          width: 1.6,
          spanGaps: true,
          points: { show: few || s.points.length <= 30, size: few ? 8 : 5 },
          value: (_u, v) => (v === null || v === undefined ? "—" : fmtNumber(v)),
        })),
      ],
    };
    if (chart) chart.destroy();
    chart = new uPlot(opts, [steps, ...columns], plot);
  };
  wrap.draw = draw;
  let last = 0;
  const observer = new ResizeObserver(() => {
    const w = plot.clientWidth;
    if (chart && Math.abs(w - last) > 4) {
      last = w;
      chart.setSize({ width: Math.max(240, w), height });
    }
  });
  wrap.mount = async () => {
    await draw();
    last = plot.clientWidth;
    observer.observe(plot);
  };
  wrap.destroy = () => {
    observer.disconnect();
    if (chart) chart.destroy();
  };
  return wrap;
}

function dataTable(title, series, steps, columns) {
  const shown = steps.slice(0, 500);
  return h(
    "details",
    { class: "chart-data" },
    h("summary", {}, "Data"),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        {},
        h("caption", { class: "visually-hidden" }, `${title} by step`),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "step"), series.map((s) => h("th", { scope: "col", class: "num" }, s.label)))),
        h(
          "tbody",
          {},
          shown.map((st, i) => h("tr", {}, h("td", { class: "num" }, String(st)), columns.map((col) => h("td", { class: "num" }, col[i] === null ? "—" : fmtNumber(col[i]))))),
        ),
      ),
      steps.length > shown.length ? h("p", { class: "muted" }, `First ${shown.length} of ${steps.length} steps.`) : null,
    ),
  );
}

/**
 * One value per run (a metric logged once, at one step): a line has nothing to
 * join, so each run is a row with a dot on a shared axis, best first.
 */
function dotPlot(title, series, steps, columns) {
  const rows = series
    .map((ser, i) => ({ label: ser.label, value: columns[i][0], color: PALETTE[i % PALETTE.length] }))
    .filter((r) => r.value !== null)
    .sort((a, b) => b.value - a.value);
  const values = rows.map((r) => r.value);
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (lo === hi) {
    lo -= Math.abs(lo) * 0.1 || 1;
    hi += Math.abs(hi) * 0.1 || 1;
  }
  const pad = (hi - lo) * 0.08;
  lo -= pad;
  hi += pad;
  const rowH = 22;
  const left = 8;
  const width = 1000;
  const height = rows.length * rowH + 4;
  const x = (v) => left + ((v - lo) / (hi - lo)) * (width - left - 8);
  const ticks = niceTicks(lo, hi, 4);
  const pct = (v) => ((v - lo) / (hi - lo)) * 100;
  const plot = svg(
    "svg",
    { class: "dotplot", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img", "aria-label": `${title}: one value for each of ${rows.length} runs` },
    ticks.map((t) => svg("line", { x1: x(t), x2: x(t), y1: 0, y2: rows.length * rowH, class: "grid" })),
    rows.map((r, i) => {
      const y = i * rowH + rowH / 2;
      return [
        svg("line", { x1: x(lo), x2: x(r.value), y1: y, y2: y, class: "stem", stroke: r.color }),
        // A zero-length line with round caps and a stroke that does not scale: a dot
        // that stays round however the plot is stretched.
        svg("line", { x1: x(r.value), x2: x(r.value) + 0.01, y1: y, y2: y, class: "dot", stroke: r.color }, svg("title", {}, `${r.label}: ${fmtNumber(r.value)}`)),
      ];
    }),
  );
  const axis = h(
    "div",
    { class: "dot-axis", "aria-hidden": "true" },
    ticks.map((t) => h("span", { style: { left: `${pct(t)}%` } }, fmtNumber(t))),
  );
  const labels = h(
    "ol",
    { class: "dot-labels" },
    rows.map((r) => h("li", { style: { height: `${rowH}px` } }, h("span", { class: "swatch", style: { background: r.color } }), h("span", { class: "name", title: r.label }, r.label), h("span", { class: "val" }, fmtNumber(r.value)))),
  );
  const wrap = h(
    "figure",
    { class: "chart dots", "data-metric": title, "data-series": String(series.length) },
    h("h3", {}, title, h("span", { class: "muted small" }, ` (step ${steps[0]})`)),
    h("div", { class: "dot-body" }, labels, h("div", { class: "dot-plot" }, plot, axis)),
    dataTable(title, series, steps, columns),
  );
  wrap.style.margin = "0";
  plot.style.height = `${height}px`;
  wrap.mount = async () => {};
  wrap.destroy = () => {};
  return wrap;
}

/** About `count` round tick values (steps of 1, 2 or 5 times a power of ten) in [lo, hi]. */
function niceTicks(lo, hi, count) {
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((st) => st >= raw) || raw;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Number(t.toPrecision(12)));
  return out;
}
