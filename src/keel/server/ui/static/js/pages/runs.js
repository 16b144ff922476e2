// Runs (the home page): newest first, filters and search in the URL, server-side
// pages through the API's cursor. The first page refreshes itself while shown.

import { errorBox, get } from "../api.js";
import {
  STATUSES,
  clear,
  duration,
  fmtDuration,
  h,
  keepFocus,
  shortId,
  ownerLostBadge,
  statusBadge,
  tagChips,
  timeEl,
} from "../dom.js";

const PAGE_SIZES = [25, 50, 100, 200];

export async function render(view, _params, ctx) {
  ctx.setTitle("Runs");
  const q = ctx.query;
  const filters = {
    status: q.get("status") || "",
    workflow: q.get("workflow") || "",
    q: q.get("q") || "",
    cursor: q.get("cursor") || "",
    limit: Math.min(1000, Math.max(1, Number.parseInt(q.get("limit") || "50", 10) || 50)),
  };
  // Cursors of the pages before this one, so "Newer" can go back without a reverse query.
  const back = (q.get("back") || "").split(",").filter(Boolean);

  const statusSelect = h(
    "select",
    { id: "f-status", name: "status" },
    h("option", { value: "" }, "Any status"),
    STATUSES.map((st) => h("option", { value: st, selected: st === filters.status }, st.toLowerCase())),
  );
  const workflowInput = h("input", {
    id: "f-workflow",
    name: "workflow",
    value: filters.workflow,
    list: "workflow-names",
    placeholder: "any workflow",
    autocomplete: "off",
  });
  const searchInput = h("input", {
    id: "f-q",
    name: "q",
    type: "search",
    value: filters.q,
    placeholder: "run id, workflow or name",
  });
  const datalist = h("datalist", { id: "workflow-names" });
  const sizes = PAGE_SIZES.includes(filters.limit) ? PAGE_SIZES : [...PAGE_SIZES, filters.limit].sort((a, b) => a - b);
  const sizeSelect = h(
    "select",
    { id: "f-limit", name: "limit" },
    sizes.map((n) => h("option", { value: String(n), selected: n === filters.limit }, String(n))),
  );

  const form = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter runs", onsubmit: (e) => apply(e) },
    h("div", { class: "field" }, h("label", { for: "f-q" }, "Search"), searchInput),
    h("div", { class: "field" }, h("label", { for: "f-status" }, "Status"), statusSelect),
    h("div", { class: "field" }, h("label", { for: "f-workflow" }, "Workflow"), workflowInput, datalist),
    h("div", { class: "field" }, h("label", { for: "f-limit" }, "Per page"), sizeSelect),
    h("button", { type: "submit", class: "primary" }, "Apply"),
    filters.status || filters.workflow || filters.q
      ? h("a", { class: "button", href: "/" }, "Clear")
      : null,
  );
  statusSelect.addEventListener("change", () => form.requestSubmit());
  sizeSelect.addEventListener("change", () => form.requestSubmit());

  function apply(e) {
    e.preventDefault();
    const next = new URLSearchParams();
    if (statusSelect.value) next.set("status", statusSelect.value);
    if (workflowInput.value.trim()) next.set("workflow", workflowInput.value.trim());
    if (searchInput.value.trim()) next.set("q", searchInput.value.trim());
    if (sizeSelect.value !== "50") next.set("limit", sizeSelect.value);
    const text = next.toString();
    window.keelNavigate(text ? `/?${text}` : "/");
  }

  const live = h("span", { class: "live", "aria-live": "off" }, "");
  const results = h("div", { id: "runs-results" });
  view.append(
    h(
      "div",
      { class: "page-head" },
      h("div", { class: "title" }, h("h1", {}, "Runs"), h("p", { class: "subtitle" }, live)),
      h("div", { class: "actions" }, h("a", { class: "button", href: "/launch" }, "Launch a run")),
    ),
    form,
    results,
  );

  async function load() {
    const page = await get("/runs", {
      status: filters.status || undefined,
      workflow: filters.workflow || undefined,
      q: filters.q || undefined,
      cursor: filters.cursor || undefined,
      limit: filters.limit,
    });
    return page;
  }

  function linkWith(changes) {
    const next = new URLSearchParams(q);
    for (const [k, v] of Object.entries(changes)) {
      if (v) next.set(k, v);
      else next.delete(k);
    }
    const text = next.toString();
    return text ? `/?${text}` : "/";
  }

  let shown = null;
  function draw(page) {
    // The refresh redraws only when something changed, keeping the focus in place.
    const running = (page.runs || []).some((r) => r.status === "RUNNING");
    const signature = JSON.stringify(page) + (running ? Math.floor(Date.now() / 3000) : "");
    if (signature === shown) return;
    shown = signature;
    keepFocus(results, () => fill(page));
  }

  function fill(page) {
    clear(results);
    const rows = page.runs || [];
    if (!rows.length) {
      results.append(
        h(
          "p",
          { class: "empty" },
          filters.status || filters.workflow || filters.q
            ? "No runs match these filters."
            : "No runs yet. Start one with `keel run file.py:workflow`, from Python, or from the Launch page.",
        ),
      );
    } else {
      results.append(runsTable(rows));
    }
    const pager = h("nav", { class: "pager", "aria-label": "Pages of runs" });
    const pageNo = back.length + 1;
    pager.append(h("span", { class: "muted" }, `Page ${pageNo}: ${rows.length} run${rows.length === 1 ? "" : "s"}`));
    if (filters.cursor) {
      // `back` holds the cursors of the pages before this one ("-": the first page).
      const previous = back[back.length - 1];
      if (back.length > 1) pager.append(h("a", { class: "button", href: linkWith({ cursor: "", back: "" }) }, "⇤ Newest"));
      pager.append(
        h("a", { class: "button", rel: "prev", href: linkWith({ cursor: previous === "-" ? "" : previous, back: back.slice(0, -1).join(",") }) }, "← Newer"),
      );
    }
    if (page.next_cursor) {
      pager.append(
        h("a", { class: "button", rel: "next", href: linkWith({ cursor: page.next_cursor, back: [...back, filters.cursor || "-"].join(",") }) }, "Older →"),
      );
    }
    results.append(pager);
  }

  try {
    draw(await load());
  } catch (err) {
    results.append(errorBox(err, "the runs"));
    return;
  }

  get("/workflows")
    .then((body) => {
      const names = new Set((body.workflows || []).map((w) => w.name));
      names.forEach((name) => datalist.append(h("option", { value: name })));
    })
    .catch(() => {});

  // The newest page follows new runs and status changes.
  if (!filters.cursor) {
    live.classList.add("on");
    live.textContent = "updating";
    let busy = false;
    ctx.every(3000, async () => {
      if (busy) return;
      busy = true;
      try {
        const page = await load();
        if (ctx.alive()) draw(page);
      } catch {
        /* keep the last good page; the next tick tries again */
      } finally {
        busy = false;
      }
    });
  }
}

export function runsTable(rows, { showWorkflow = true } = {}) {
  const now = Date.now() / 1000;
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "runs" },
      h("caption", { class: "visually-hidden" }, "Runs, newest first"),
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", { scope: "col" }, "Run"),
          h("th", { scope: "col" }, "Status"),
          showWorkflow ? h("th", { scope: "col" }, "Workflow") : null,
          h("th", { scope: "col" }, "Started"),
          h("th", { scope: "col", class: "num col-opt" }, "Duration"),
          h("th", { scope: "col", class: "col-opt" }, "Tags"),
        ),
      ),
      h(
        "tbody",
        {},
        rows.map((run) =>
          h(
            "tr",
            { "data-run-id": run.id, "data-status": run.status },
            h(
              "td",
              { class: "id" },
              h("a", { href: `/runs/${encodeURIComponent(run.id)}`, title: run.id }, shortId(run.id)),
              run.run_name && run.run_name !== run.workflow ? h("div", { class: "muted" }, run.run_name) : null,
            ),
            h("td", {}, statusBadge(run.status), ownerLostBadge(run)),
            showWorkflow
              ? h("td", {}, h("a", { href: `/?workflow=${encodeURIComponent(run.workflow)}` }, run.workflow))
              : null,
            h("td", {}, timeEl(run.started_at ?? run.created_at)),
            h(
              "td",
              { class: "num col-opt" },
              fmtDuration(run.duration ?? duration(run.started_at, run.ended_at, run.ended_at ? null : now)),
            ),
            h("td", { class: "col-opt" }, tagChips(run.tags)),
          ),
        ),
      ),
    ),
  );
}
