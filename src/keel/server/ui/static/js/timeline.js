// A timeline (Gantt chart) of a run's steps: one row per step, one bar per attempt,
// placed by start and end time relative to the run. Plain HTML with percentages,
// so it reflows with the window.

import { fmtDuration, h } from "./dom.js";

const MAX_ROWS = 400;

export function timeline(run, steps, { stepHref, now } = {}) {
  const clock = now ?? Date.now() / 1000;
  const starts = steps.map((st) => st.started_at).filter((t) => t !== null && t !== undefined);
  const t0 = Math.min(run.started_at ?? Infinity, ...starts);
  if (!Number.isFinite(t0)) return h("p", { class: "empty" }, "No step has started yet.");
  const ends = steps.map((st) => st.ended_at ?? (st.started_at ? clock : null)).filter((t) => t !== null);
  const t1 = Math.max(run.ended_at ?? (run.status === "RUNNING" || run.status === "PENDING" ? clock : 0), ...ends, t0 + 0.001);
  const span = t1 - t0;
  const pct = (t) => `${(((t - t0) / span) * 100).toFixed(3)}%`;
  const width = (a, b) => `${Math.max(0.15, ((b - a) / span) * 100).toFixed(3)}%`;

  const shown = steps.filter((st) => st.started_at !== null && st.started_at !== undefined).slice(0, MAX_ROWS);
  const grid = h("div", { class: "gantt", role: "list", "aria-label": "Timeline of steps and attempts" });
  for (const st of shown) {
    const track = h("div", { class: "track" });
    const attempts = st.attempt_list && st.attempt_list.length ? st.attempt_list : [st];
    attempts.forEach((a, i) => {
      if (a.started_at === null || a.started_at === undefined) return;
      const end = a.ended_at ?? clock;
      const status = String(a.status || st.status).toLowerCase();
      const label = `${st.key}${attempts.length > 1 ? ` attempt ${a.attempt ?? i + 1}` : ""}: ${status}, ${fmtDuration(end - a.started_at)}, from +${fmtDuration(a.started_at - t0)}`;
      track.append(
        h("span", {
          class: `span ${status}`,
          style: { left: pct(a.started_at), width: width(a.started_at, end) },
          title: label,
          "aria-label": label,
          role: "img",
        }),
      );
    });
    grid.append(
      h(
        "div",
        { class: "label", role: "listitem" },
        stepHref ? h("a", { href: stepHref(st), title: st.key }, st.key) : st.key,
      ),
      track,
    );
  }
  grid.append(
    h(
      "div",
      { class: "axis", "aria-hidden": "true" },
      h("span", {}, "0"),
      h("span", {}, fmtDuration(span / 2)),
      h("span", {}, fmtDuration(span)),
    ),
  );
  const out = h("div", {}, grid);
  const hidden = steps.length - shown.length;
  if (hidden > 0) {
    out.append(h("p", { class: "muted" }, `${hidden} more step${hidden === 1 ? "" : "s"} not shown (not started, or past the first ${MAX_ROWS}).`));
  }
  return out;
}
