// Models: every registered model with its latest version and aliases.

import { errorBox, get, seg } from "../api.js";
import { h, tagChips, timeEl } from "../dom.js";
import { sortableTable } from "../widgets.js";

export function aliasChips(aliases, name) {
  const entries = Object.entries(aliases || {});
  if (!entries.length) return h("span", { class: "muted" }, "—");
  return h(
    "ul",
    { class: "chips", "aria-label": "aliases" },
    entries.map(([alias, version]) =>
      h("li", { class: "chip alias" }, name ? h("a", { href: `/models/${seg(name)}#v${version}` }, `@${alias} → v${version}`) : `@${alias} → v${version}`),
    ),
  );
}

export async function render(view, _params, ctx) {
  ctx.setTitle("Models");
  view.append(
    h(
      "div",
      { class: "page-head" },
      h("div", { class: "title" }, h("h1", {}, "Models"), h("p", { class: "subtitle" }, "The model registry: versions, aliases and where each version came from.")),
    ),
  );
  let models;
  try {
    models = await get("/models");
  } catch (err) {
    view.append(errorBox(err, "the models"));
    return;
  }
  if (!models.length) {
    view.append(h("p", { class: "empty" }, "No registered model yet: call keel.register_model(...) in a step, or `keel models register`."));
    return;
  }
  view.append(
    sortableTable(
      [
        { key: "name", label: "Model", value: (m) => m.name, cell: (m) => h("a", { href: `/models/${seg(m.name)}` }, m.name) },
        { key: "latest", label: "Latest", num: true, value: (m) => m.latest_version, cell: (m) => (m.latest_version ? `v${m.latest_version}` : "—") },
        { key: "versions", label: "Versions", num: true, value: (m) => m.versions },
        { key: "aliases", label: "Aliases", sortable: false, value: () => "", cell: (m) => aliasChips(m.aliases, m.name) },
        { key: "updated", label: "Updated", value: (m) => m.updated_at, cell: (m) => timeEl(m.updated_at) },
        { key: "desc", label: "Description", value: (m) => m.description || "", cls: "col-opt", cell: (m) => [m.description || "", tagChips(m.tags)] },
      ],
      models,
      { caption: "Registered models", initial: { key: "updated", dir: -1 }, rowAttrs: (m) => ({ "data-model": m.name }) },
    ),
  );
}
