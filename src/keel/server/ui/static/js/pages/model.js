// One registered model: its versions (with aliases), the lineage of a chosen
// version back to the run, the step and the data that made it, the requests it
// answered (the inference log of `keel serve --log-requests`), the servers
// (`keel serve`) serving it with their traffic, and its history.

import { errorBox, get, seg } from "../api.js";
import { clear, facts, fmtBytes, fmtNumber, fmtValue, h, section, statusBadge, tagChips, timeEl } from "../dom.js";
import { kvTable, metricValue } from "../widgets.js";
import { aliasChips } from "./models.js";

export async function render(view, { name }, ctx) {
  const model = await get(`/models/${seg(name)}`);
  ctx.setTitle(`Model ${model.name}`);
  const versions = [...model.version_list].sort((a, b) => b.version - a.version);
  const fromHash = /^#v(\d+)$/.exec(window.location.hash);
  let chosen = fromHash ? Number(fromHash[1]) : model.aliases.champion ?? model.latest_version;
  if (!versions.some((v) => v.version === chosen) && versions.length) chosen = versions[0].version;

  const lineageSlot = h("div", { id: "model-lineage" });
  const historySlot = h("div");
  const deploymentsSlot = h("div", { id: "model-deployments" });
  const rows = new Map();

  view.append(
    h("nav", { class: "breadcrumbs", "aria-label": "Breadcrumbs" }, h("ol", {}, h("li", {}, h("a", { href: "/models" }, "Models")))),
    h(
      "div",
      { class: "page-head" },
      h(
        "div",
        { class: "title" },
        h("h1", {}, model.name),
        h("p", { class: "subtitle" }, `${model.versions} version${model.versions === 1 ? "" : "s"}`, aliasChips(model.aliases), tagChips(model.tags)),
      ),
    ),
    model.description ? h("p", {}, model.description) : null,
  );

  const table = h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "versions" },
      h("caption", { class: "visually-hidden" }, "Versions, newest first"),
      h("thead", {}, h("tr", {}, ["Version", "Aliases", "Flavor", "From", "Created", ""].map((t, i) => h("th", { scope: "col", class: i === 3 || i === 4 ? "" : "" }, t)))),
      h(
        "tbody",
        {},
        versions.map((v) => {
          const button = h("button", { type: "button", class: "link", "aria-pressed": String(v.version === chosen) }, "Lineage");
          button.addEventListener("click", () => choose(v.version));
          const tr = h(
            "tr",
            { id: `v${v.version}`, "data-version": String(v.version) },
            h("td", {}, h("strong", {}, `v${v.version}`), v.status !== "READY" ? [" ", statusBadge(v.status)] : null),
            h("td", {}, v.aliases.length ? h("ul", { class: "chips" }, v.aliases.map((a) => h("li", { class: "chip alias" }, `@${a}`))) : "—"),
            h("td", { class: "mono" }, v.flavor),
            h(
              "td",
              {},
              v.run_id ? h("a", { href: v.step_key ? `/runs/${seg(v.run_id)}/steps/${seg(v.step_key)}` : `/runs/${seg(v.run_id)}`, class: "mono" }, v.step_key ? `${v.run_id.slice(0, 10)}… / ${v.step_key}` : v.run_id) : h("span", { class: "muted" }, "—"),
            ),
            h("td", {}, timeEl(v.created_at), v.created_by ? h("div", { class: "muted" }, v.created_by) : null),
            h("td", {}, button),
          );
          rows.set(v.version, { tr, button });
          return tr;
        }),
      ),
    ),
  );
  view.append(section("Versions", table), deploymentsSlot, lineageSlot, historySlot);
  await showDeployments(model.name, deploymentsSlot);

  async function choose(version) {
    chosen = version;
    for (const [n, { tr, button }] of rows) {
      button.setAttribute("aria-pressed", String(n === version));
      tr.classList.toggle("chosen", n === version);
    }
    window.history.replaceState(null, "", `${window.location.pathname}${window.location.search}#v${version}`);
    clear(lineageSlot).append(h("p", { class: "loading" }, "Loading the lineage…"));
    try {
      const [v, lin, logged] = await Promise.all([
        get(`/models/${seg(model.name)}/versions/${version}`),
        get(`/models/${seg(model.name)}/versions/${version}/lineage`),
        get(`/models/${seg(model.name)}/versions/${version}/inferences?limit=${SHOWN_REQUESTS}`),
      ]);
      if (!ctx.alive() || chosen !== version) return;
      clear(lineageSlot).append(...[lineageView(model.name, v, lin), inferencesView(logged.inferences)].filter(Boolean));
    } catch (err) {
      clear(lineageSlot).append(errorBox(err, `the lineage of version ${version}`));
    }
  }

  if (chosen) await choose(chosen);

  try {
    const events = await get(`/models/${seg(model.name)}/history`);
    historySlot.append(
      section(
        "History",
        events.length
          ? h(
              "ol",
              { class: "history" },
              [...events].reverse().slice(0, 100).map((e) =>
                h("li", {}, timeEl(e.at), " ", h("strong", {}, e.action.replace(/_/g, " ")), e.version ? ` v${e.version}` : "", e.alias ? ` @${e.alias}` : "", e.previous_version ? ` (was v${e.previous_version})` : "", e.actor ? h("span", { class: "muted" }, ` by ${e.actor}`) : ""),
              ),
            )
          : h("p", { class: "empty" }, "No changes recorded."),
      ),
    );
  } catch (err) {
    historySlot.append(errorBox(err, "the model's history"));
  }
}

function lineageView(name, v, lin) {
  const run = lin.run;
  const step = lin.step;
  const stepHref = (key) => `/runs/${seg(run.id)}/steps/${seg(key)}`;
  const chain = h(
    "ol",
    { class: "lineage-chain", "aria-label": "Where this version came from" },
    lin.inputs.length
      ? h(
          "li",
          {},
          h("span", { class: "muted" }, "data "),
          lin.inputs.map((inp, i) => [i ? ", " : "", run ? h("a", { href: stepHref(inp.step) }, inp.step) : inp.step, inp.type ? h("span", { class: "muted" }, ` (${inp.type}${inp.size ? `, ${fmtBytes(inp.size)}` : ""})`) : ""]),
        )
      : null,
    step ? h("li", {}, h("span", { class: "muted" }, "step "), run ? h("a", { href: stepHref(step.key) }, step.key) : step.key, " ", statusBadge(step.status)) : null,
    run ? h("li", {}, h("span", { class: "muted" }, "run "), h("a", { href: `/runs/${seg(run.id)}`, class: "mono" }, run.id), ` (${run.workflow}) `, statusBadge(run.status)) : null,
    h("li", {}, h("span", { class: "muted" }, "model "), h("strong", {}, `${name} v${v.version}`), v.aliases.length ? ` @${v.aliases.join(", @")}` : ""),
  );
  const parts = [
    facts([
      ["URI", h("code", {}, v.uri)],
      ["Flavor", v.flavor],
      ["Status", v.status],
      ["Experiment", run && run.experiment ? run.experiment : null],
      ["Created", timeEl(v.created_at)],
      ["Created by", v.created_by],
      ["Source", v.source_uri ? h("code", {}, v.source_uri) : null],
      ["Description", v.description],
    ]),
    h("h3", {}, "Lineage"),
    run || step || lin.inputs.length ? chain : h("p", { class: "empty" }, "This version was registered from outside a run: no lineage recorded."),
  ];
  const grids = [];
  if (Object.keys(lin.params || {}).length) grids.push(section("Run parameters", kvTable(lin.params, { caption: "Run parameters" })));
  if (Object.keys(lin.metrics || {}).length) grids.push(section("Run metrics", kvTable(Object.entries(lin.metrics).map(([k, x]) => [k, metricValue(x)]), { caption: "Run metrics" })));
  if (Object.keys(lin.step_params || {}).length) grids.push(section("Step parameters", kvTable(lin.step_params, { caption: "Step parameters" })));
  if (Object.keys(lin.step_metrics || {}).length) grids.push(section("Step metrics", kvTable(Object.entries(lin.step_metrics).map(([k, x]) => [k, metricValue(x)]), { caption: "Step metrics" })));
  if (v.signature) grids.push(section("Signature", h("pre", {}, JSON.stringify(v.signature, null, 2))));
  if (lin.logged && lin.logged.length) grids.push(section("Files", h("ul", { class: "mono" }, lin.logged.map((f) => h("li", {}, `${f.path} (${fmtBytes(f.size)})`)))));
  return h(
    "section",
    { class: "card", "aria-labelledby": "lin-h", "data-version": String(v.version) },
    h("h2", { id: "lin-h" }, `Version ${v.version}`),
    ...parts,
    grids.length ? h("div", { class: "grid" }, grids) : null,
  );
}

const SHOWN_REQUESTS = 20;

function fmtMs(ms) {
  return ms === null || ms === undefined ? "—" : `${fmtNumber(Number(ms.toPrecision(3)))} ms`;
}

function clip(text, max = 80) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

// The newest requests the version answered, when a server logs them (--log-requests).
function inferencesView(found) {
  if (!found.length) return null;
  const cell = (value) => {
    const text = value === null || value === undefined ? "—" : typeof value === "string" ? value : JSON.stringify(value);
    return h("td", { class: "mono", title: text.length > 80 ? text : null }, clip(text));
  };
  const inputs = (e) => (e.inputs && e.inputs.data ? e.inputs.data : e.inputs);
  return section(
    "Recent requests",
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "inferences", id: "model-inferences" },
        h("caption", { class: "visually-hidden" }, "Requests logged by the version's servers, newest first"),
        h("thead", {}, h("tr", {}, ["Time", "Status", "Latency", "Inputs", "Predictions"].map((t) => h("th", { scope: "col" }, t)))),
        h(
          "tbody",
          {},
          found.map((e) =>
            h(
              "tr",
              { "data-inference": String(e.id), "data-status": String(e.status) },
              h("td", {}, timeEl(e.time)),
              h("td", {}, String(e.status)),
              h("td", { class: "num" }, fmtMs(e.latency_ms)),
              e.truncated && e.inputs === null ? h("td", { class: "muted" }, "over the size limit") : cell(inputs(e)),
              cell(e.predictions === null ? null : fmtValue(e.predictions)),
            ),
          ),
        ),
      ),
    ),
  );
}

// The running servers of this model: which version each serves, where, since when,
// and its traffic (rate and latency over the last minute, errors since it started).
async function showDeployments(name, slot) {
  try {
    const found = await get(`/deployments?model=${encodeURIComponent(name)}`);
    if (!found.length) return;
    slot.append(
      section(
        "Deployments",
        h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            { class: "deployments" },
            h("caption", { class: "visually-hidden" }, "Servers of this model, newest first"),
            h("thead", {}, h("tr", {}, ["Version", "URL", "Workers", "State", "Requests/s", "Latency p50 / p95", "Errors", "Started", "Heartbeat"].map((t) => h("th", { scope: "col" }, t)))),
            h(
              "tbody",
              {},
              found.map((d) =>
                h(
                  "tr",
                  { "data-deployment": d.id },
                  h("td", {}, d.version ? h("a", { href: `#v${d.version}` }, `v${d.version}`) : "—"),
                  h("td", { class: "mono" }, d.url),
                  h("td", {}, String(d.workers)),
                  h("td", {}, statusBadge(d.state), d.last_error ? h("div", { class: "muted" }, d.last_error) : null),
                  h("td", { "data-stat": "rate", class: "num" }, d.rate === null ? "—" : d.rate.toFixed(2)),
                  h("td", { "data-stat": "latency", class: "num" }, d.p50_ms === null ? "—" : `${fmtMs(d.p50_ms)} / ${fmtMs(d.p95_ms)}`),
                  h("td", { "data-stat": "errors", class: "num" }, d.requests === null ? "—" : `${d.errors ?? 0} of ${d.requests}`),
                  h("td", {}, timeEl(d.started_at)),
                  h("td", {}, timeEl(d.heartbeat_at)),
                ),
              ),
            ),
          ),
        ),
      ),
    );
  } catch (err) {
    slot.append(errorBox(err, "the model's deployments"));
  }
}
