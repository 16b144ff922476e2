// A step: attempts, logs (live tail), output and inputs with previews, cache
// status, lineage (the steps it read from and the steps that read it).

import { ApiError, errorBox, get, seg, stream } from "../api.js";
import {
  FINISHED,
  clear,
  duration,
  facts,
  fmtBytes,
  fmtDuration,
  h,
  section,
  statusBadge,
  timeEl,
} from "../dom.js";
import { follow } from "../live.js";
import { kvTable, loadPreview, metricEntries, previewView } from "../widgets.js";

const LOG_PAGE = 2000;
const MAX_LOG_RECORDS = 20000;

export async function render(view, { runId, stepKey }, ctx) {
  let [run, step] = await Promise.all([
    get(`/runs/${seg(runId)}`),
    get(`/runs/${seg(runId)}/steps/${seg(stepKey)}`),
  ]);
  ctx.setTitle(`Step ${step.key} · run ${run.id}`);
  const base = `/runs/${seg(run.id)}/steps/${seg(step.key)}`;
  const stepHref = (st) => `/runs/${seg(run.id)}/steps/${seg(st.key)}`;

  const badge = h("span", {}, statusBadge(step.status));
  const liveLabel = h("span", { class: "live" }, "");
  const summary = h("div");
  const errorSlot = h("div");
  const attemptsSlot = h("div");
  const outputSlot = h("div", { id: "step-output" }, h("p", { class: "loading" }, "Loading…"));
  const inputsSlot = h("div", { id: "step-inputs" });
  const lineageSlot = h("div", { id: "step-lineage" });
  const dataSlot = h("div", { id: "step-data" });
  const logs = logView(run, step);

  view.append(
    h(
      "nav",
      { class: "breadcrumbs", "aria-label": "Breadcrumbs" },
      h(
        "ol",
        {},
        h("li", {}, h("a", { href: "/" }, "Runs")),
        h("li", {}, h("a", { href: `/?workflow=${seg(run.workflow)}` }, run.workflow)),
        h("li", {}, h("a", { href: `/runs/${seg(run.id)}`, class: "mono" }, run.id)),
      ),
    ),
    h(
      "div",
      { class: "page-head" },
      h(
        "div",
        { class: "title" },
        h("h1", {}, h("span", { class: "visually-hidden" }, "Step "), step.key),
        h("p", { class: "subtitle" }, badge, h("span", { class: "mono" }, step.task), liveLabel),
      ),
    ),
    errorSlot,
    summary,
    section("Logs", logs.element),
    h("div", { class: "grid" }, section("Output", outputSlot), section("Lineage", lineageSlot)),
    section("Inputs", inputsSlot),
    section("Attempts", attemptsSlot),
    dataSlot,
  );

  function drawSummary() {
    clear(badge).append(statusBadge(step.status));
    const cache = step.cached_from
      ? h("span", {}, "hit: reused the output of ", cachedLink(step.cached_from))
      : step.cache
        ? "miss: computed here (and kept for later runs)"
        : "not cached (the task has no cache=True)";
    clear(summary).append(
      h(
        "section",
        { class: "card", "aria-label": "Summary" },
        facts([
          ["Status", statusBadge(step.status)],
          ["Task", h("code", {}, step.task)],
          ["Kind", step.kind],
          ["Position", String(step.seq)],
          ["Attempts", String(step.attempts)],
          ["Started", timeEl(step.started_at)],
          ["Ended", step.ended_at ? timeEl(step.ended_at) : null],
          ["Duration", fmtDuration(step.duration ?? duration(step.started_at, step.ended_at))],
          ["Cache", cache],
          ["Child run", step.child_run_id ? h("a", { href: `/runs/${seg(step.child_run_id)}`, class: "mono" }, step.child_run_id) : null],
          ["Output", step.has_output ? `${step.output_type || "value"}${step.output_size ? `, ${fmtBytes(step.output_size)}` : ""}` : null],
        ]),
        step.cache ? h("details", {}, h("summary", {}, "Cache key and its parts"), kvTable(step.cache, { caption: "Cache key parts" })) : null,
      ),
    );
    clear(errorSlot);
    if (step.error_type || step.error_message) {
      const last = (step.attempt_details || []).filter((a) => a.traceback).pop();
      errorSlot.append(
        h(
          "div",
          { class: "error-box", role: "alert" },
          h("strong", {}, step.error_type || "Error"),
          h("p", {}, step.error_message || ""),
          last ? h("details", {}, h("summary", {}, `Traceback (attempt ${last.attempt})`), h("pre", {}, last.traceback)) : null,
        ),
      );
    }
  }

  function drawAttempts() {
    const list = step.attempt_details || step.attempt_list || [];
    if (!list.length) {
      clear(attemptsSlot).append(h("p", { class: "empty" }, "No attempt has started."));
      return;
    }
    clear(attemptsSlot).append(
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "attempts" },
          h("caption", { class: "visually-hidden" }, "Attempts"),
          h("thead", {}, h("tr", {}, ["#", "Status", "Started", "Duration", "Error"].map((t) => h("th", { scope: "col" }, t)))),
          h(
            "tbody",
            {},
            list.map((a) =>
              h(
                "tr",
                { "data-attempt": String(a.attempt) },
                h("td", { class: "num" }, String(a.attempt)),
                h("td", {}, statusBadge(a.status)),
                h("td", {}, timeEl(a.started_at)),
                h("td", { class: "num" }, fmtDuration(a.duration ?? duration(a.started_at, a.ended_at))),
                h(
                  "td",
                  {},
                  a.error_type ? h("strong", {}, a.error_type, ": ") : null,
                  a.error_message || "",
                  a.traceback ? h("details", {}, h("summary", {}, "Traceback"), h("pre", {}, a.traceback)) : null,
                ),
              ),
            ),
          ),
        ),
      ),
    );
  }

  async function drawOutput() {
    if (!step.has_output) {
      clear(outputSlot).append(
        h("p", { class: "empty" }, FINISHED.has(step.status) || step.status === "CACHED" || step.status === "SKIPPED" ? "No output was recorded." : "No output yet."),
      );
      return;
    }
    await loadPreview(outputSlot, `${base}/output/preview`, {
      downloadUrl: `/api/v1${base}/output/content`,
      name: `${step.key}-output`,
      missing: "No output was recorded.",
    });
  }

  async function stepsBySeq(seqs) {
    if (!seqs.length) return [];
    if (seqs.length <= 40) {
      return Promise.all(seqs.map((q) => get(`/runs/${seg(run.id)}/steps/${q}`).catch(() => ({ seq: q, key: String(q), status: "UNKNOWN", task: "?" }))));
    }
    const want = new Set(seqs);
    const found = [];
    let after;
    for (;;) {
      const page = await get(`/runs/${seg(run.id)}/steps`, { after, limit: 5000 });
      found.push(...page.steps.filter((st) => want.has(st.seq)));
      if (page.next_after === null || page.next_after === undefined || found.length === want.size) break;
      after = page.next_after;
    }
    return found;
  }

  async function drawLineage() {
    const [ups, downs] = await Promise.all([stepsBySeq(step.deps || []), stepsBySeq(step.consumers || [])]);
    const list = (title, items, empty) =>
      h(
        "div",
        {},
        h("h3", {}, title),
        items.length
          ? h("ul", { class: "lineage" }, items.map((st) => h("li", {}, h("a", { href: stepHref(st) }, st.key), " ", statusBadge(st.status))))
          : h("p", { class: "empty" }, empty),
      );
    clear(lineageSlot).append(
      list("Upstream (its inputs came from)", ups, "None: this step took no other step's output."),
      list("Downstream (read its output)", downs, FINISHED.has(run.status) ? "None." : "None yet."),
    );
    clear(inputsSlot);
    if (!ups.length) {
      inputsSlot.append(h("p", { class: "empty" }, "Only plain values: no other step's output was passed in."));
      return;
    }
    inputsSlot.append(h("p", { class: "muted" }, "Outputs of the steps this step took as inputs:"));
    for (const up of ups) {
      const body = h("div", {}, h("p", { class: "loading" }, "Loading…"));
      const det = h("details", { class: "input" }, h("summary", {}, h("a", { href: stepHref(up) }, up.key), up.output_type ? ` (${up.output_type})` : ""), body);
      let loaded = false;
      det.addEventListener("toggle", () => {
        if (det.open && !loaded) {
          loaded = true;
          loadPreview(body, `/runs/${seg(run.id)}/steps/${seg(up.key)}/output/preview`, {
            downloadUrl: `/api/v1/runs/${seg(run.id)}/steps/${seg(up.key)}/output/content`,
            name: `${up.key}-output`,
            missing: "That step recorded no output.",
          });
        }
      });
      if (ups.length <= 3) det.open = true;
      inputsSlot.append(det);
    }
  }

  async function drawData() {
    try {
      const [data, files] = await Promise.all([
        get(`/runs/${seg(run.id)}/data`, { step: step.key }),
        get(`/runs/${seg(run.id)}/artifacts`, { step: step.key }).catch(() => []),
      ]);
      const parts = [];
      const params = Object.entries(data.params || {});
      const metrics = metricEntries(data);
      if (params.length) parts.push(section("Logged params", kvTable(params, { caption: "Params logged by the step" })));
      if (metrics.length) parts.push(section("Logged metrics", kvTable(metrics, { caption: "Latest metrics logged by the step" })));
      if (Object.keys(data.tags || {}).length) parts.push(section("Tags", kvTable(data.tags, { caption: "Tags" })));
      const grid = parts.length ? h("div", { class: "grid" }, parts) : null;
      const filesPart = files.length ? section("Logged files", ...files.map((f) => fileView(f))) : null;
      clear(dataSlot).append(grid || "", filesPart || "");
    } catch (err) {
      clear(dataSlot).append(errorBox(err, "the tracked data"));
    }
  }

  drawSummary();
  drawAttempts();
  drawOutput();
  drawLineage().catch((err) => clear(lineageSlot).append(errorBox(err, "the lineage")));
  drawData();
  ctx.afterMount(() => logs.start(ctx));

  const stepDone = () => FINISHED.has(step.status) || step.status === "CACHED" || step.status === "SKIPPED";
  if (!FINISHED.has(run.status) || !stepDone()) {
    follow(
      ctx,
      run.id,
      async () => {
        const [nextRun, nextStep] = await Promise.all([get(`/runs/${seg(run.id)}`), get(`/runs/${seg(run.id)}/steps/${seg(step.key)}`)]);
        if (!ctx.alive()) return true;
        const changed = nextStep.status !== step.status || nextStep.attempts !== step.attempts;
        run = nextRun;
        step = nextStep;
        drawSummary();
        drawAttempts();
        if (changed) {
          drawOutput();
          drawLineage().catch(() => {});
          drawData();
        }
        return FINISHED.has(run.status);
      },
      liveLabel,
    );
  }
}

function cachedLink(ref) {
  // `cached_from` names the run and step that computed the value ("<run>/<key>" or "<run>:<seq>").
  const m = /^([^/:]+)[/:](.+)$/.exec(ref);
  if (!m) return h("code", {}, ref);
  return h("a", { href: `/runs/${seg(m[1])}/steps/${seg(m[2])}`, class: "mono" }, ref);
}

function fileView(f) {
  const body = h("div", {}, h("p", { class: "loading" }, "Loading…"));
  const det = h("details", { class: "file", "data-path": f.path }, h("summary", {}, h("span", { class: "mono" }, f.path), ` (${f.kind}, ${fmtBytes(f.size)})`), body);
  let loaded = false;
  det.addEventListener("toggle", async () => {
    if (!det.open || loaded) return;
    loaded = true;
    try {
      const p = await get(f.preview_url.replace(/^\/api\/v1/, ""));
      clear(body).append(previewView(p, { downloadUrl: f.content_url, name: f.path.split("/").pop() }));
    } catch (err) {
      clear(body).append(errorBox(err, "the preview"));
    }
  });
  return det;
}

/** The step's log: all records so far, then a live tail while the run goes on. */
function logView(run, step) {
  const pre = h("pre", { class: "log", id: "step-log", tabindex: "0", "aria-label": "Log output", "aria-live": "off" });
  const attemptSelect = h("select", { id: "log-attempt" }, h("option", { value: "" }, "All attempts"));
  for (let i = 1; i <= Math.max(1, step.attempts); i += 1) attemptSelect.append(h("option", { value: String(i) }, `Attempt ${i}`));
  const streamSelect = h(
    "select",
    { id: "log-stream" },
    h("option", { value: "" }, "All streams"),
    h("option", { value: "stdout" }, "stdout"),
    h("option", { value: "stderr" }, "stderr"),
    h("option", { value: "log" }, "log"),
  );
  const followBox = h("input", { type: "checkbox", id: "log-follow", checked: true });
  const state = h("span", { class: "live" }, "");
  const controls = h(
    "div",
    { class: "filters" },
    h("div", { class: "field" }, h("label", { for: "log-attempt" }, "Attempt"), attemptSelect),
    h("div", { class: "field" }, h("label", { for: "log-stream" }, "Stream"), streamSelect),
    h("div", { class: "field" }, h("label", { for: "log-follow" }, followBox, " Follow the end")),
    state,
  );
  const element = h("div", { id: "step-logs" }, controls, pre);
  let records = [];
  let closeStream = null;
  let ctxRef = null;

  function draw() {
    const wanted = streamSelect.value;
    const frag = document.createDocumentFragment();
    const shown = records.filter((r) => !wanted || r.stream === wanted);
    for (const r of shown) {
      frag.append(r.stream === "stderr" ? h("span", { class: "stderr" }, r.text) : document.createTextNode(r.text));
    }
    clear(pre).append(frag);
    if (!shown.length) pre.append(h("span", { class: "muted" }, records.length ? "Nothing on this stream." : "No log output yet."));
    if (followBox.checked) pre.scrollTop = pre.scrollHeight;
  }

  function addRecords(more) {
    if (!more.length) return;
    records.push(...more);
    if (records.length > MAX_LOG_RECORDS) records = records.slice(-MAX_LOG_RECORDS);
    draw();
  }

  async function start(ctx) {
    ctxRef = ctx;
    if (closeStream) closeStream();
    closeStream = null;
    records = [];
    const attempt = attemptSelect.value || undefined;
    let after;
    try {
      for (;;) {
        const page = await get(`/runs/${seg(run.id)}/logs`, { step: step.key, attempt, after, limit: LOG_PAGE });
        if (!ctx.alive()) return;
        records.push(...page.records);
        if (page.next_after === null || page.next_after === undefined) break;
        after = page.next_after;
        if (records.length > MAX_LOG_RECORDS) records = records.slice(-MAX_LOG_RECORDS);
      }
    } catch (err) {
      clear(pre).append(errorBox(err, "the logs"));
      return;
    }
    draw();
    const lastId = records.length ? records[records.length - 1].id : undefined;
    const current = await get(`/runs/${seg(run.id)}`).catch(() => run);
    if (FINISHED.has(current.status) || !ctx.alive()) return;
    state.classList.add("on");
    state.textContent = "tailing";
    closeStream = stream(`/runs/${seg(run.id)}/logs/stream`, { step: step.key, attempt, after: lastId }, {
      onEvent: (ev) => {
        if (ev.event === "log" && ev.data && typeof ev.data === "object") addRecords([ev.data]);
        else if (ev.event === "end") {
          state.classList.remove("on");
          state.textContent = "run finished";
          if (closeStream) closeStream();
          closeStream = null;
        }
      },
      onError: (err) => {
        if (err instanceof ApiError) {
          state.classList.remove("on");
          state.textContent = `tail stopped: ${err.message}`;
        }
      },
    });
    ctx.onLeave(() => {
      if (closeStream) closeStream();
    });
  }

  attemptSelect.addEventListener("change", () => ctxRef && start(ctxRef));
  streamSelect.addEventListener("change", draw);
  followBox.addEventListener("change", () => {
    if (followBox.checked) pre.scrollTop = pre.scrollHeight;
  });
  return { element, start };
}
