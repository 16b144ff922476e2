// A run: its step graph (live), timeline, params, result, tracked data, actions.

import { ApiError, errorBox, get, seg } from "../api.js";
import { DagView, statusLegend } from "../dag.js";
import {
  FINISHED,
  clear,
  duration,
  facts,
  fmtDuration,
  h,
  section,
  statusBadge,
  tagChips,
  timeEl,
} from "../dom.js";
import { follow } from "../live.js";
import { timeline } from "../timeline.js";
import { actionButton, kvTable, loadPreview, metricEntries } from "../widgets.js";

async function allSteps(runId) {
  const steps = [];
  let after;
  for (;;) {
    const page = await get(`/runs/${seg(runId)}/steps`, { after, limit: 5000 });
    steps.push(...page.steps);
    if (page.next_after === null || page.next_after === undefined) return steps;
    after = page.next_after;
  }
}

export async function render(view, { runId }, ctx) {
  let run = await get(`/runs/${seg(runId)}`);
  let steps = await allSteps(run.id);
  ctx.setTitle(`Run ${run.id}`);
  const stepHref = (st) => `/runs/${seg(run.id)}/steps/${seg(st.key)}`;

  const badge = h("span", { id: "run-status" }, statusBadge(run.status));
  const liveLabel = h("span", { class: "live" }, "");
  const actions = h("div", { class: "actions", role: "group", "aria-label": "Run actions" });
  const actionStatus = h("div", { id: "action-status", "aria-live": "polite" });
  const summary = h("div", { id: "run-summary" });
  const errorSlot = h("div");
  const dag = new DagView({ runId: run.id, stepHref });
  const timelineSlot = h("div", { id: "run-timeline" });
  const stepsSlot = h("div", { id: "run-steps" });
  const resultSlot = h("div", { id: "run-result" }, h("p", { class: "loading" }, "Loading…"));
  const dataSlot = h("div", { id: "run-data" });
  const childrenSlot = h("div");

  view.append(
    h(
      "nav",
      { class: "breadcrumbs", "aria-label": "Breadcrumbs" },
      h("ol", {}, h("li", {}, h("a", { href: "/" }, "Runs")), h("li", {}, h("a", { href: `/?workflow=${seg(run.workflow)}` }, run.workflow))),
    ),
    h(
      "div",
      { class: "page-head" },
      h(
        "div",
        { class: "title" },
        h("h1", {}, h("span", { class: "visually-hidden" }, "Run "), h("span", { class: "mono" }, run.id)),
        h("p", { class: "subtitle" }, badge, h("span", {}, run.workflow), liveLabel, tagChips(run.tags)),
      ),
      actions,
    ),
    actionStatus,
    errorSlot,
    summary,
    section("Step graph", dag.element, statusLegend()),
    section("Timeline", timelineSlot),
    section("Steps", stepsSlot),
    h("div", { class: "grid" }, section("Parameters", h("div", { id: "run-params" }, kvTable(run.params, { caption: "Parameters", empty: "No parameters." }))), section("Result", resultSlot)),
    dataSlot,
    childrenSlot,
  );

  function drawActions() {
    clear(actions);
    const refreshSoon = () => window.setTimeout(() => refresh(), 200);
    if (!FINISHED.has(run.status)) {
      actions.append(
        actionButton("Cancel", `/runs/${seg(run.id)}/cancel`, {
          danger: true,
          confirm: `Cancel run ${run.id}? Recorded steps are kept and it can be resumed.`,
          onDone: refreshSoon,
        }),
      );
    }
    if (run.status === "FAILED" || run.status === "CANCELLED") {
      actions.append(actionButton("Resume", `/runs/${seg(run.id)}/resume`, { onDone: refreshSoon }));
    }
    if (FINISHED.has(run.status)) {
      actions.append(
        actionButton("Retry", `/runs/${seg(run.id)}/retry`, {
          onDone: (reply) => {
            if (reply && reply.run_id && reply.run_id !== run.id) window.keelNavigate(`/runs/${seg(reply.run_id)}`);
          },
        }),
      );
    }
    actions.append(h("a", { class: "button", href: `/launch?workflow=${seg(run.workflow)}&from=${seg(run.id)}` }, "Launch again…"));
  }

  function drawSummary() {
    const now = Date.now() / 1000;
    clear(summary).append(
      h(
        "section",
        { class: "card", "aria-label": "Summary" },
        facts([
          ["Status", statusBadge(run.status)],
          ["Workflow", run.workflow],
          ["Created", timeEl(run.created_at)],
          ["Started", timeEl(run.started_at)],
          ["Ended", run.ended_at ? timeEl(run.ended_at) : null],
          ["Duration", fmtDuration(run.duration ?? duration(run.started_at, run.ended_at, now))],
          ["Steps", stepCounts(steps)],
          ["Executor", run.executor],
          ["User", run.user],
          ["Experiment", run.experiment_id !== null && run.experiment_id !== undefined ? h("a", { href: `/experiments/${run.experiment_id}` }, `#${run.experiment_id}`) : null],
          ["Parent run", run.parent_id ? h("a", { href: `/runs/${seg(run.parent_id)}`, class: "mono" }, run.parent_id) : null],
          ["Retry of", run.retry_of ? h("a", { href: `/runs/${seg(run.retry_of)}`, class: "mono" }, run.retry_of) : null],
          ["Schedule", run.schedule],
          ["Trigger", run.trigger_name],
          ["Queue", run.queue],
          ["Entrypoint", run.entrypoint ? h("code", {}, run.entrypoint) : null],
        ]),
      ),
    );
    clear(errorSlot);
    if (run.error_type || run.error_message) {
      const box = h("div", { class: "error-box", role: "alert" }, h("strong", {}, run.error_type || "Error"), h("p", {}, run.error_message || ""));
      if (run.traceback) box.append(h("details", {}, h("summary", {}, "Traceback"), h("pre", {}, run.traceback)));
      errorSlot.append(box);
    }
    if (run.cancel_requested && !FINISHED.has(run.status)) errorSlot.append(h("p", { class: "notice" }, "Cancellation requested: no new steps start."));
  }

  function drawSteps() {
    timelineSlot.replaceChildren(timeline(run, steps, { stepHref }));
    if (!steps.length) {
      clear(stepsSlot).append(h("p", { class: "empty" }, "No steps recorded yet."));
      return;
    }
    const now = Date.now() / 1000;
    clear(stepsSlot).append(
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "steps" },
          h("caption", { class: "visually-hidden" }, "Steps in call order"),
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["Step", "Status", "Task", "Attempts", "Duration", "Cache"].map((label, i) =>
                h("th", { scope: "col", class: i >= 3 ? "col-opt" : "" }, label),
              ),
            ),
          ),
          h(
            "tbody",
            {},
            steps.slice(0, 2000).map((st) =>
              h(
                "tr",
                { "data-key": st.key, "data-status": st.status },
                h("td", {}, h("a", { href: stepHref(st) }, st.key), st.child_run_id ? [" → ", h("a", { href: `/runs/${seg(st.child_run_id)}`, class: "mono" }, "child run")] : null),
                h("td", {}, statusBadge(st.status)),
                h("td", { class: "mono" }, st.task),
                h("td", { class: "num col-opt" }, String(st.attempts)),
                h("td", { class: "num col-opt" }, fmtDuration(st.duration ?? duration(st.started_at, st.ended_at, now))),
                h("td", { class: "col-opt" }, st.cached_from ? h("span", { title: `from ${st.cached_from}` }, "hit") : st.cache ? "miss" : "—"),
              ),
            ),
          ),
        ),
      ),
    );
  }

  async function drawResult() {
    if (run.status !== "SUCCEEDED") {
      clear(resultSlot).append(h("p", { class: "empty" }, FINISHED.has(run.status) ? "No result: the run did not succeed." : "No result yet."));
      return;
    }
    await loadPreview(resultSlot, `/runs/${seg(run.id)}/result/preview`, {
      downloadUrl: `/api/v1/runs/${seg(run.id)}/result/content`,
      name: `${run.id}-result`,
      missing: "The run recorded no result.",
    });
  }

  async function drawData() {
    try {
      const [data, artifacts] = await Promise.all([
        get(`/runs/${seg(run.id)}/data`),
        get(`/runs/${seg(run.id)}/artifacts`).catch(() => []),
      ]);
      const metrics = metricEntries(data);
      const parts = [];
      if (metrics.length) parts.push(section("Metrics", kvTable(metrics, { caption: "Latest metric values" })));
      const extraTags = Object.entries(data.tags || {});
      if (extraTags.length) parts.push(section("Tags", kvTable(extraTags, { caption: "Tags" })));
      if (artifacts.length) {
        parts.push(
          section(
            "Logged files",
            h("ul", {}, artifacts.map((a) => h("li", {}, h("a", { href: a.content_url, download: a.path.split("/").pop() }, a.path), ` (${a.kind}, ${a.size} bytes)`))),
          ),
        );
      }
      clear(dataSlot).append(parts.length ? h("div", { class: "grid" }, parts) : "");
    } catch (err) {
      clear(dataSlot).append(errorBox(err, "the tracked data"));
    }
  }

  function drawChildren() {
    clear(childrenSlot);
    if (run.children && run.children.length) {
      childrenSlot.append(
        section("Child runs", h("ul", { class: "mono" }, run.children.map((id) => h("li", {}, h("a", { href: `/runs/${seg(id)}` }, id))))),
      );
    }
  }

  function drawAll() {
    clear(badge).append(statusBadge(run.status));
    drawActions();
    drawSummary();
    dag.update(steps);
    drawSteps();
    drawChildren();
  }

  let shownStatus = run.status;
  async function refresh() {
    const [next, nextSteps] = await Promise.all([get(`/runs/${seg(run.id)}`), allSteps(run.id)]);
    if (!ctx.alive()) return true;
    run = next;
    steps = nextSteps;
    drawAll();
    if (run.status !== shownStatus) {
      shownStatus = run.status;
      drawResult();
      drawData();
    }
    return FINISHED.has(run.status) && steps.every((st) => st.status !== "RUNNING");
  }

  drawAll();
  drawResult();
  drawData();

  let following = false;
  function startFollow() {
    if (following) return;
    following = true;
    follow(
      ctx,
      run.id,
      async () => {
        const done = await refresh();
        if (done) following = false;
        return done;
      },
      liveLabel,
    );
  }
  ctx.afterMount(() => {
    if (!FINISHED.has(run.status)) startFollow();
  });
  // A finished run can be resumed or retried from elsewhere: notice that too.
  ctx.every(5000, async () => {
    if (following) return;
    try {
      const next = await get(`/runs/${seg(run.id)}`);
      if (ctx.alive() && next.status !== run.status) {
        await refresh();
        if (!FINISHED.has(run.status)) startFollow();
      }
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
    }
  });
}

function stepCounts(steps) {
  if (!steps.length) return "none yet";
  const counts = {};
  steps.forEach((st) => {
    counts[st.status] = (counts[st.status] || 0) + 1;
  });
  return Object.entries(counts)
    .map(([st, n]) => `${n} ${st.toLowerCase()}`)
    .join(", ");
}
