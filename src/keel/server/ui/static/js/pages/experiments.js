// Experiments: every experiment with its number of runs.

import { errorBox, get } from "../api.js";
import { h, tagChips, timeEl } from "../dom.js";
import { sortableTable } from "../widgets.js";

export async function render(view, _params, ctx) {
  ctx.setTitle("Experiments");
  view.append(
    h(
      "div",
      { class: "page-head" },
      h("div", { class: "title" }, h("h1", {}, "Experiments"), h("p", { class: "subtitle" }, "Each workflow run is a run of an experiment (by default the workflow's name); each step is a nested run.")),
    ),
  );
  let list;
  try {
    list = await get("/experiments");
  } catch (err) {
    view.append(errorBox(err, "the experiments"));
    return;
  }
  if (!list.length) {
    view.append(h("p", { class: "empty" }, "No experiments yet: run a workflow, or open one with keel.start_run()."));
    return;
  }
  view.append(
    sortableTable(
      [
        { key: "name", label: "Experiment", value: (e) => e.name, cell: (e) => h("a", { href: `/experiments/${e.id}` }, e.name) },
        { key: "id", label: "Id", value: (e) => e.id, num: true },
        { key: "runs", label: "Runs", value: (e) => e.runs, num: true },
        { key: "created", label: "Created", value: (e) => e.created_at, cell: (e) => timeEl(e.created_at) },
        { key: "updated", label: "Updated", value: (e) => e.updated_at, cell: (e) => timeEl(e.updated_at) },
        { key: "tags", label: "Tags", sortable: false, value: () => "", cell: (e) => tagChips(e.tags) },
      ],
      list,
      { caption: "Experiments", initial: { key: "updated", dir: -1 } },
    ),
  );
}
