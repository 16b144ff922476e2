// Line charts of metric histories (value over step), several runs overlaid,
// drawn by uPlot (vendored, loaded on first use). Each chart also offers its
// numbers as a table, for screen readers and for copying.

import { fmtNumber, h } from "./dom.js";

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
