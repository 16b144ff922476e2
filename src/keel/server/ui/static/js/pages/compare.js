// Compare runs (or steps, which are nested runs) side by side: params with the
// differences marked, latest metrics, and each metric's history overlaid.
// The URL names them: /compare?runs=<run>,<run>/<step key>,...

import { errorBox, get, seg } from "../api.js";
import { metricChart } from "../chart.js";
import { clear, fmtDuration, h, shortId, statusBadge, timeEl } from "../dom.js";
import { historyOf, refHref } from "./experiment.js";
import { metricValue } from "../widgets.js";

const MAX_CHARTS = 12;

async function load(ref) {
  const [runId, stepKey] = ref.split("/", 2);
  const run = await get(`/runs/${seg(runId)}`);
  const step = stepKey ? await get(`/runs/${seg(run.id)}/steps/${seg(stepKey)}`) : null;
  const data = await get(`/runs/${seg(run.id)}/data`, { step: stepKey });
  return {
    ref: step ? `${run.id}/${step.key}` : run.id,
    run,
    step,
    status: step ? step.status : run.status,
    start: step ? step.started_at : run.started_at,
    end: step ? step.ended_at : run.ended_at,
    // A workflow run's own params are its arguments; a step's are what it logged.
    params: { ...(step ? {} : Object.fromEntries(Object.entries(run.params || {}).map(([k, v]) => [k, typeof v === "string" ? v : JSON.stringify(v)]))), ...data.params },
    metrics: Object.fromEntries((data.metrics || []).map((m) => [m.key, m.value])),
    tags: { ...(step ? {} : run.tags || {}), ...data.tags },
  };
}

export async function render(view, _params, ctx) {
  ctx.setTitle("Compare runs");
  const refs = (ctx.query.get("runs") || "")
    .split(",")
    .map((r) => decodeURIComponent(r.trim()))
    .filter(Boolean);
  view.append(
    h("div", { class: "page-head" }, h("div", { class: "title" }, h("h1", {}, "Compare runs"), h("p", { class: "subtitle" }, `${refs.length} run${refs.length === 1 ? "" : "s"} side by side`))),
  );
  if (refs.length < 2) {
    view.append(
      h("p", { class: "empty" }, "Pick two or more runs to compare: select them in an ", h("a", { href: "/experiments" }, "experiment"), "'s table, or list them in the address: /compare?runs=<id>,<id>."),
    );
    if (!refs.length) return;
  }
  const results = await Promise.allSettled(refs.map(load));
  const runs = [];
  results.forEach((res, i) => {
    if (res.status === "fulfilled") runs.push(res.value);
    else view.append(errorBox(res.reason, `run ${refs[i]}`));
  });
  if (!runs.length) return;

  const head = h(
    "thead",
    {},
    h(
      "tr",
      {},
      h("th", { scope: "col" }, ""),
      runs.map((r) => h("th", { scope: "col" }, h("a", { href: refHref(r.ref), class: "mono", title: r.ref }, r.step ? `${shortId(r.run.id)}/${r.step.key}` : shortId(r.run.id)))),
    ),
  );
  const row = (label, cells, attrs = {}) => h("tr", attrs, h("th", { scope: "row", class: "mono" }, label), cells.map((c) => h("td", {}, c)));
  const summary = [
    row("status", runs.map((r) => statusBadge(r.status))),
    row("workflow", runs.map((r) => r.run.workflow)),
    row("started", runs.map((r) => timeEl(r.start))),
    row("duration", runs.map((r) => (r.start && r.end ? fmtDuration(r.end - r.start) : "—"))),
  ];
  const paramKeys = [...new Set(runs.flatMap((r) => Object.keys(r.params)))].sort();
  const metricKeys = [...new Set(runs.flatMap((r) => Object.keys(r.metrics)))].sort();
  const tagKeys = [...new Set(runs.flatMap((r) => Object.keys(r.tags)))].sort();
  const differs = (values) => new Set(values.map((v) => (v === undefined ? "\u0000" : String(v)))).size > 1;

  const onlyDiff = h("input", { type: "checkbox", id: "only-diff" });
  const paramRows = paramKeys.map((k) => {
    const values = runs.map((r) => r.params[k]);
    const changed = differs(values);
    return h("tr", { class: changed ? "changed-row" : "same-row", "data-param": k }, h("th", { scope: "row", class: "mono" }, k), values.map((v) => h("td", { class: changed ? "mono changed" : "mono" }, v ?? "—")));
  });
  onlyDiff.addEventListener("change", () => {
    for (const tr of paramRows) if (tr.classList.contains("same-row")) tr.hidden = onlyDiff.checked;
  });

  const metricRows = metricKeys.map((k) => {
    const values = runs.map((r) => r.metrics[k]);
    const nums = values.filter((v) => typeof v === "number");
    const hi = nums.length > 1 ? Math.max(...nums) : null;
    const lo = nums.length > 1 ? Math.min(...nums) : null;
    return h(
      "tr",
      { "data-metric": k },
      h("th", { scope: "row", class: "mono" }, k),
      values.map((v) =>
        h("td", { class: `num${hi !== lo && v === hi ? " best" : ""}`, title: hi !== lo && v === hi ? "highest" : hi !== lo && v === lo ? "lowest" : "" }, v === undefined ? "—" : metricValue(v)),
      ),
    );
  });

  const grid = (caption, rows) =>
    h("div", { class: "table-wrap" }, h("table", { class: "diff compare" }, h("caption", { class: "visually-hidden" }, caption), head.cloneNode(true), h("tbody", {}, rows)));

  view.append(
    h("section", { class: "card", "aria-labelledby": "cmp-sum" }, h("h2", { id: "cmp-sum" }, "Runs"), grid("Runs compared", summary)),
    h(
      "section",
      { class: "card", "aria-labelledby": "cmp-params" },
      h("h2", { id: "cmp-params" }, "Parameters"),
      paramKeys.length
        ? [h("p", {}, h("label", { for: "only-diff" }, onlyDiff, " Only the parameters that differ"), " ", h("span", { class: "muted" }, `(${paramRows.filter((r) => r.classList.contains("changed-row")).length} of ${paramKeys.length} differ, marked)`)), grid("Parameters compared", paramRows)]
        : h("p", { class: "empty" }, "No parameters."),
    ),
    h(
      "section",
      { class: "card", "aria-labelledby": "cmp-metrics" },
      h("h2", { id: "cmp-metrics" }, "Metrics (latest values; the highest in bold)"),
      metricKeys.length ? grid("Metrics compared", metricRows) : h("p", { class: "empty" }, "No metrics."),
    ),
    tagKeys.length
      ? h(
          "section",
          { class: "card", "aria-labelledby": "cmp-tags" },
          h("h2", { id: "cmp-tags" }, "Tags"),
          grid("Tags compared", tagKeys.map((k) => row(k, runs.map((r) => r.tags[k] ?? "—")))),
        )
      : null,
  );

  if (!metricKeys.length) return;
  const chartsSlot = h("div", { class: "charts", id: "compare-charts" }, h("p", { class: "loading" }, "Loading charts…"));
  view.append(h("section", { class: "card", "aria-labelledby": "cmp-charts" }, h("h2", { id: "cmp-charts" }, "Metric histories"), chartsSlot));
  const charts = [];
  ctx.onLeave(() => charts.forEach((c) => c.destroy()));
  ctx.afterMount(async () => {
    try {
      for (const key of metricKeys.slice(0, MAX_CHARTS)) {
        const having = runs.filter((r) => r.metrics[key] !== undefined);
        const series = await Promise.all(
          having.map(async (r) => ({ label: r.step ? `${r.run.id}/${r.step.key}` : r.run.id, points: await historyOf(r.ref, key) })),
        );
        if (!ctx.alive()) return;
        charts.push(metricChart(key, series));
      }
      clear(chartsSlot).append(...charts);
      for (const c of charts) await c.mount();
    } catch (err) {
      clear(chartsSlot).append(errorBox(err, "the metric histories"));
    }
  });
}
