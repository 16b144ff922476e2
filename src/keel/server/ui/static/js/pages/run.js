// A run: its step graph (live), timeline, params, result, tracked data, actions.

import { ApiError, errorBox, get, seg } from "../api.js";
import { DagView, statusLegend } from "../dag.js";
import {
  FINISHED,
  clear,
  duration,
  facts,
  fmtBytes,
  fmtDuration,
  h,
  keepFocus,
  ownerLostBadge,
  section,
  statusBadge,
  tagChips,
  timeEl,
} from "../dom.js";
import { follow } from "../live.js";
import { timeline } from "../timeline.js";
import { actionButton, downloadLink, kvTable, loadPreview, metricEntries } from "../widgets.js";

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
          ["Status", h("span", {}, statusBadge(run.status), ownerLostBadge(run))],
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
    const lost = run.owner_lost;
    if (lost && !FINISHED.has(run.status)) {
      errorSlot.append(
        h(
          "div",
          { class: "error-box", role: "alert", id: "owner-lost" },
          h("strong", {}, "Owner lost"),
          h("p", {}, "Since ", timeEl(lost.since), `, nothing drives this run: ${lost.owner} stopped renewing its lease. A server or worker that takes runs over continues it; or resume it with:`),
          h("pre", {}, lost.resume_command),
        ),
      );
    }
  }

  let stepRows = 200; // more on request: a big map has thousands
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
            steps.slice(0, stepRows).map((st) =>
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
    if (steps.length > stepRows) {
      const more = h("button", { type: "button" }, `Show ${Math.min(500, steps.length - stepRows)} more of ${steps.length - stepRows} not shown`);
      more.addEventListener("click", () => {
        stepRows += 500;
        drawSteps();
        const row = stepsSlot.querySelectorAll("tbody tr")[stepRows - 500];
        const link = row && row.querySelector("a");
        if (link) link.focus();
      });
      stepsSlot.append(h("p", {}, more));
    }
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
            h("ul", {}, artifacts.map((a) => h("li", {}, downloadLink(a.content_url, a.path.split("/").pop(), a.path), ` (${a.kind}, ${fmtBytes(a.size)})`))),
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

  // Redraws keep the keyboard focus where it was, and parts that did not change
  // are left alone (a live run redraws often).
  const drawn = {};
  function changed(part, signature) {
    if (drawn[part] === signature) return false;
    drawn[part] = signature;
    return true;
  }
  function drawAll() {
    const live = !FINISHED.has(run.status);
    if (changed("status", `${run.status}|${run.cancel_requested}`)) {
      clear(badge).append(statusBadge(run.status));
      keepFocus(actions, drawActions);
    }
    const stepSig = steps.map((st) => `${st.seq}:${st.status}:${st.attempts}:${st.ended_at}`).join(",");
    // While the run goes on, durations move: redraw those at most once a second.
    const tick = live ? Math.floor(Date.now() / 1000) : 0;
    const lostSig = run.owner_lost ? run.owner_lost.since : "";
    if (changed("summary", `${run.status}|${run.started_at}|${run.ended_at}|${run.error_message}|${lostSig}|${stepSig}|${tick}`)) {
      keepFocus(summary, drawSummary);
    }
    dag.update(steps);
    if (changed("steps", stepSig)) keepFocus(view, drawSteps);
    if (changed("children", (run.children || []).join(","))) keepFocus(childrenSlot, drawChildren);
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
  ctx.every(1000, () => {
    if (!FINISHED.has(run.status)) drawAll(); // running durations move on
  });

  // Live updates from the event stream are applied in place: a step event patches
  // that step (a new step, or a new attempt, is fetched alone); a run event patches
  // the run. Only a finished run is read again whole (for its result and error).
  let frame = 0;
  function scheduleDraw() {
    if (frame) return;
    frame = window.requestAnimationFrame(() => {
      frame = 0;
      if (ctx.alive()) drawAll();
    });
  }
  let fetchingNew = null;
  function fetchNewSteps() {
    if (fetchingNew) return;
    const after = steps.length ? Math.max(...steps.map((st) => st.seq)) : undefined;
    fetchingNew = get(`/runs/${seg(run.id)}/steps`, { after, limit: 5000 })
      .then((page) => {
        const known = new Set(steps.map((st) => st.seq));
        steps = [...steps, ...page.steps.filter((st) => !known.has(st.seq))].sort((a, b) => a.seq - b.seq);
        scheduleDraw();
        if (page.next_after !== null && page.next_after !== undefined) window.setTimeout(fetchNewSteps, 0);
      })
      .catch(() => {})
      .finally(() => {
        fetchingNew = null;
      });
  }
  function onEvent(kind, data) {
    if (data.run_id !== run.id) return true; // a child run: its own page shows it
    if (kind === "run") {
      if (FINISHED.has(data.status)) return false; // read it whole: result, traceback
      for (const k of ["status", "started_at", "ended_at", "error_type", "error_message"]) run[k] = data[k];
      scheduleDraw();
      return true;
    }
    const i = steps.findIndex((st) => st.seq === data.seq);
    if (i < 0) {
      fetchNewSteps();
      return true;
    }
    const st = { ...steps[i] };
    const newAttempt = data.attempts !== st.attempts;
    for (const k of ["status", "attempts", "started_at", "ended_at", "child_run_id", "cached_from"]) st[k] = data[k];
    st.duration = st.started_at !== null && st.ended_at !== null ? st.ended_at - st.started_at : null;
    steps = steps.map((x, j) => (j === i ? st : x));
    scheduleDraw();
    if (newAttempt || FINISHED.has(st.status)) {
      get(`/runs/${seg(run.id)}/steps/${st.seq}`)
        .then((fresh) => {
          steps = steps.map((x) => (x.seq === fresh.seq ? fresh : x));
          scheduleDraw();
        })
        .catch(() => {});
    }
    return true;
  }

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
      { onEvent },
    );
  }
  ctx.afterMount(() => {
    if (!FINISHED.has(run.status)) startFollow();
  });
  // A finished run can be resumed or retried from elsewhere: notice that too.
  // An owner is lost without any event (nothing writes when a process dies), so the
  // run is read again every few seconds while it is not finished.
  ctx.every(5000, async () => {
    if (following && FINISHED.has(run.status)) return;
    try {
      const next = await get(`/runs/${seg(run.id)}`);
      if (!ctx.alive()) return;
      if ((next.owner_lost?.since ?? null) !== (run.owner_lost?.since ?? null)) {
        run.owner_lost = next.owner_lost;
        scheduleDraw();
      }
      if (!following && next.status !== run.status) {
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
