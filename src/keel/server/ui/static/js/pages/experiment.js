// One experiment: its runs as a sortable table of params and metrics, a filter in
// the search_runs grammar, metric charts of the chosen runs overlaid, and a way to
// compare the chosen runs side by side.

import { errorBox, get, seg } from "../api.js";
import { metricChart } from "../chart.js";
import { clear, fmtDuration, h, shortId, statusBadge, timeEl } from "../dom.js";
import { metricValue, sortableTable } from "../widgets.js";

const CHART_RUNS = 10;
const CHART_KEYS = 4;

export function runRef(r) {
  return r.seq >= 0 && r.step_key ? `${r.run_id}/${r.step_key}` : r.run_id;
}

export function refHref(ref) {
  const [runId, stepKey] = ref.split("/", 2);
  return stepKey ? `/runs/${seg(runId)}/steps/${seg(stepKey)}` : `/runs/${seg(runId)}`;
}

/** The points of a metric for a run ref ("run" or "run/step"). */
export async function historyOf(ref, key) {
  const [runId, stepKey] = ref.split("/", 2);
  const body = await get(`/runs/${seg(runId)}/metrics/history`, { key, step: stepKey, max_points: 1000 });
  return body.points || [];
}

export async function render(view, { experimentId }, ctx) {
  const q = ctx.query;
  const filter = q.get("filter") || "";
  let includeSteps = q.get("steps") === "1";
  const exp = await get(`/experiments/${seg(experimentId)}`);
  ctx.setTitle(`Experiment ${exp.name}`);

  let table;
  let filterError = null;
  try {
    table = await get(`/experiments/${exp.id}/runs`, { filter, include_steps: includeSteps, limit: 500 });
  } catch (err) {
    filterError = err;
    table = { runs: [], param_keys: [], metric_keys: [] };
  }
  // Workflows often log metrics in their steps (nested runs): show those when the
  // runs themselves have none, unless the URL says otherwise.
  if (!filterError && !includeSteps && !q.has("steps") && !table.metric_keys.length && table.runs.length) {
    const nested = await get(`/experiments/${exp.id}/runs`, { filter, include_steps: true, limit: 500 }).catch(() => null);
    if (nested && nested.metric_keys.length) {
      table = nested;
      includeSteps = true;
    }
  }

  const filterInput = h("input", { id: "exp-filter", name: "filter", value: filter, placeholder: "metrics.accuracy > 0.9 and params.model = 'svc'", size: 40, "aria-describedby": "exp-filter-help" });
  const stepsBox = h("input", { type: "checkbox", id: "exp-steps", checked: includeSteps });
  const form = h(
    "form",
    {
      class: "filters",
      role: "search",
      "aria-label": "Filter runs",
      onsubmit: (e) => {
        e.preventDefault();
        const next = new URLSearchParams();
        if (filterInput.value.trim()) next.set("filter", filterInput.value.trim());
        next.set("steps", stepsBox.checked ? "1" : "0");
        window.keelNavigate(`/experiments/${exp.id}?${next}`);
      },
    },
    h("div", { class: "field", style: { flex: "1 1 320px" } }, h("label", { for: "exp-filter" }, "Filter"), filterInput, h("span", { id: "exp-filter-help", class: "help" }, "The grammar of keel.search_runs: params.x, metrics.y, tags.z, attributes.status with = != < > LIKE, joined by and.")),
    h("div", { class: "field" }, h("label", { for: "exp-steps" }, stepsBox, " Include steps (nested runs)")),
    h("button", { type: "submit", class: "primary" }, "Apply"),
  );
  stepsBox.addEventListener("change", () => form.requestSubmit());

  const selected = new Set();
  const compareBtn = h("button", { type: "button", class: "primary", disabled: true }, "Compare selected");
  const selInfo = h("span", { class: "muted", "aria-live": "polite" }, "Select runs to compare them and to chart them.");
  compareBtn.addEventListener("click", () => {
    window.keelNavigate(`/compare?runs=${[...selected].map(encodeURIComponent).join(",")}`);
  });

  const keyBoxes = h("fieldset", { class: "metric-keys" }, h("legend", {}, "Metrics to chart"));
  const chartsSlot = h("div", { class: "charts", id: "exp-charts" });
  const byRef = new Map(table.runs.map((r) => [runRef(r), r]));

  view.append(
    h(
      "nav",
      { class: "breadcrumbs", "aria-label": "Breadcrumbs" },
      h("ol", {}, h("li", {}, h("a", { href: "/experiments" }, "Experiments"))),
    ),
    h(
      "div",
      { class: "page-head" },
      h("div", { class: "title" }, h("h1", {}, exp.name), h("p", { class: "subtitle" }, `experiment #${exp.id} · ${exp.runs} run${exp.runs === 1 ? "" : "s"}`)),
      h("div", { class: "actions" }, compareBtn),
    ),
    form,
  );
  if (filterError) view.append(errorBox(filterError, "the runs"));

  const rows = table.runs;
  const paramCols = table.param_keys.map((k) => ({
    key: `p:${k}`,
    label: k,
    value: (r) => {
      const v = r.params[k];
      const n = Number(v);
      return v !== undefined && v !== "" && !Number.isNaN(n) ? n : v;
    },
    cell: (r) => r.params[k] ?? "",
    cls: "mono",
  }));
  const metricCols = table.metric_keys.map((k) => ({
    key: `m:${k}`,
    label: k,
    num: true,
    value: (r) => (typeof r.metrics[k] === "number" ? r.metrics[k] : null),
    cell: (r) => (r.metrics[k] === undefined ? "" : metricValue(r.metrics[k])),
  }));
  const columns = [
    {
      key: "sel",
      label: h("span", { class: "visually-hidden" }, "Select"),
      sortable: false,
      value: () => "",
      cell: (r) => {
        const ref = runRef(r);
        const box = h("input", { type: "checkbox", "aria-label": `Select ${ref}`, checked: selected.has(ref), "data-ref": ref });
        box.addEventListener("change", () => {
          if (box.checked) selected.add(ref);
          else selected.delete(ref);
          selectionChanged();
        });
        return box;
      },
    },
    {
      key: "run",
      label: "Run",
      value: (r) => runRef(r),
      cell: (r) =>
        r.step_key
          ? [h("a", { href: refHref(runRef(r)), title: runRef(r) }, r.step_key), h("div", { class: "muted mono small" }, `run …${r.run_id.slice(-6)}`)]
          : h("a", { href: refHref(runRef(r)), class: "mono", title: r.run_id }, shortId(r.run_id)),
    },
    { key: "status", label: "Status", value: (r) => r.status, cell: (r) => statusBadge(r.status) },
    { key: "name", label: "Name", value: (r) => r.run_name || "", cls: "col-opt" },
    { key: "start", label: "Started", value: (r) => r.start_time, cell: (r) => timeEl(r.start_time) },
    { key: "dur", label: "Duration", num: true, value: (r) => (r.start_time && r.end_time ? r.end_time - r.start_time : null), cell: (r) => (r.start_time && r.end_time ? fmtDuration(r.end_time - r.start_time) : "—") },
    ...paramCols,
    ...metricCols,
  ];

  if (!rows.length && !filterError) {
    view.append(h("p", { class: "empty" }, filter ? "No runs match this filter." : "No runs in this experiment yet."));
    return;
  }
  view.append(
    h(
      "section",
      { class: "card", "aria-labelledby": "exp-runs-h" },
      h("h2", { id: "exp-runs-h" }, "Runs", h("span", { class: "muted" }, ` (${rows.length}${rows.length === 500 ? ", the newest 500" : ""})`)),
      h("div", { class: "pager" }, selInfo),
      sortableTable(columns, rows, { caption: "Runs with their params and metrics", rowAttrs: (r) => ({ "data-ref": runRef(r) }) }),
    ),
  );

  if (table.metric_keys.length) {
    table.metric_keys.forEach((k, i) => {
      const box = h("input", { type: "checkbox", id: `mk-${i}`, value: k, checked: i < CHART_KEYS });
      box.addEventListener("change", scheduleCharts);
      keyBoxes.append(h("label", { for: `mk-${i}`, class: "check" }, box, ` ${k}`));
    });
    view.append(
      h(
        "section",
        { class: "card", "aria-labelledby": "exp-charts-h" },
        h("h2", { id: "exp-charts-h" }, "Metric charts"),
        h("p", { class: "muted", id: "exp-charts-who" }),
        keyBoxes,
        chartsSlot,
      ),
    );
  }

  let charts = [];
  let chartTimer = null;
  let chartGen = 0;
  function scheduleCharts() {
    if (chartTimer) window.clearTimeout(chartTimer);
    chartTimer = window.setTimeout(drawCharts, 150);
  }
  ctx.onLeave(() => charts.forEach((c) => c.destroy()));

  async function drawCharts() {
    if (!table.metric_keys.length) return;
    const gen = (chartGen += 1);
    const keys = [...keyBoxes.querySelectorAll("input:checked")].map((b) => b.value);
    const who = view.querySelector("#exp-charts-who");
    if (who) who.textContent = selected.size ? `The ${selected.size} selected run${selected.size === 1 ? "" : "s"}.` : `Up to ${CHART_RUNS} runs of the table for each metric (select runs to choose).`;
    const having = (key) => {
      const refs = selected.size ? [...selected] : rows.map(runRef);
      const found = refs.filter((ref) => byRef.get(ref) && byRef.get(ref).metrics[key] !== undefined);
      return selected.size ? found : found.slice(0, CHART_RUNS);
    };
    const made = [];
    for (const key of keys) {
      const withKey = having(key);
      if (!withKey.length) continue;
      // Steps of one run are told apart by their keys alone.
      const oneRun = new Set(withKey.map((ref) => ref.split("/")[0])).size === 1;
      const series = await Promise.all(
        withKey.map(async (ref) => {
          const r = byRef.get(ref);
          return { label: oneRun && r.step_key ? r.step_key : labelOf(r), points: await historyOf(ref, key).catch(() => []) };
        }),
      );
      if (gen !== chartGen || !ctx.alive()) return;
      made.push(metricChart(key, series));
    }
    charts.forEach((c) => c.destroy());
    charts = made;
    clear(chartsSlot).append(...made);
    if (!made.length) chartsSlot.append(h("p", { class: "empty" }, "None of these runs logged the chosen metrics."));
    for (const c of made) await c.mount();
  }

  function selectionChanged() {
    compareBtn.disabled = selected.size < 2;
    selInfo.textContent = selected.size ? `${selected.size} selected${selected.size < 2 ? ": select one more to compare" : ""}.` : "Select runs to compare them and to chart them.";
    scheduleCharts();
  }

  ctx.afterMount(drawCharts);
}

export function labelOf(r) {
  return r.step_key ? `${r.run_id}/${r.step_key}` : r.run_id;
}
