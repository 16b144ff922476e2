// Pieces several pages use: key/value tables, value previews, action buttons,
// sortable tables.

import { ApiError, errorBox, get, post, token } from "./api.js";
import { announce, clear, fmtBytes, fmtNumber, fmtValue, h } from "./dom.js";

/** A two-column table of an object's entries (params, tags, metrics). */
export function kvTable(obj, { caption, empty = "None.", format = fmtValue } = {}) {
  const entries = Array.isArray(obj) ? obj : Object.entries(obj || {});
  if (!entries.length) return h("p", { class: "empty" }, empty);
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "kv" },
      caption ? h("caption", { class: "visually-hidden" }, caption) : null,
      h("tbody", {}, entries.map(([k, v]) => h("tr", {}, h("th", { scope: "row", class: "mono" }, k), h("td", { class: "mono" }, format(v))))),
    ),
  );
}

/** Render a preview reply (GET .../preview) of a value or a logged file. */
export function previewView(p, { downloadUrl, name } = {}) {
  const out = h("div", { class: "preview", "data-kind": p.kind });
  const meta = [p.media_type, fmtBytes(p.size)];
  if (p.shape) meta.push(`shape ${JSON.stringify(p.shape)}`);
  if (p.dtype) meta.push(p.dtype);
  if (p.total_rows !== null && p.total_rows !== undefined) meta.push(`${p.total_rows} rows`);
  if (p.truncated) meta.push("cut short");
  switch (p.kind) {
    case "json":
    case "array":
      out.append(h("pre", { class: "json" }, JSON.stringify(p.json_value, null, 2)));
      break;
    case "text":
      out.append(h("pre", { class: "text" }, p.text ?? ""));
      break;
    case "table":
      out.append(dataTable(p.columns || [], p.rows || []));
      break;
    case "image":
      if (p.data_base64) {
        out.append(h("img", { src: `data:${p.media_type};base64,${p.data_base64}`, alt: name ? `Image ${name}` : "Image preview" }));
      }
      break;
    default:
      break;
  }
  if (p.note) out.append(h("p", { class: "muted" }, p.note));
  out.append(
    h(
      "p",
      { class: "muted" },
      meta.join(" · "),
      downloadUrl ? [" · ", downloadLink(downloadUrl, name, "Download")] : null,
    ),
  );
  return out;
}

/**
 * A link that downloads `url`. With an API token set, a plain link would not send
 * it, so the file is fetched with the token and saved from memory.
 */
export function downloadLink(url, name, text) {
  const a = h("a", { href: url, download: name || "" }, text);
  a.addEventListener("click", async (e) => {
    if (!token()) return;
    e.preventDefault();
    try {
      const response = await fetch(url, { headers: { Authorization: `Bearer ${token()}` } });
      if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
      const blobUrl = URL.createObjectURL(await response.blob());
      const save = h("a", { href: blobUrl, download: name || "" });
      document.body.append(save);
      save.click();
      save.remove();
      window.setTimeout(() => URL.revokeObjectURL(blobUrl), 10000);
    } catch (err) {
      announce(`Download failed: ${err.message}`);
      a.after(h("span", { class: "error", role: "alert" }, ` download failed: ${err.message}`));
    }
  });
  return a;
}

export function dataTable(columns, rows) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "data" },
      h("thead", {}, h("tr", {}, columns.map((c, i) => h("th", { scope: "col", class: rows.length && typeof rows[0][i] === "number" ? "num" : "" }, c)))),
      h("tbody", {}, rows.map((r) => h("tr", {}, r.map((v) => h("td", { class: typeof v === "number" ? "num" : "" }, fmtValue(v)))))),
    ),
  );
}

/** Fetch and show a preview into `target`; a 404 shows `missing` instead of an error. */
export async function loadPreview(target, path, { downloadUrl, name, missing } = {}) {
  try {
    const p = await get(path);
    clear(target).append(previewView(p, { downloadUrl, name }));
  } catch (err) {
    if (err instanceof ApiError && err.status === 404 && missing) clear(target).append(h("p", { class: "empty" }, missing));
    else clear(target).append(errorBox(err, "the preview"));
  }
}

/**
 * A button that POSTs to the API and shows the reply: the server's message on
 * success, its error (409: "already finished", 403: needs the operator role...) otherwise.
 */
export function actionButton(label, path, { body, confirm, onDone, danger, status } = {}) {
  const btn = h("button", { type: "button", class: danger ? "danger" : "" }, label);
  btn.addEventListener("click", async () => {
    if (confirm && !window.confirm(confirm)) return;
    btn.disabled = true;
    const where = status || document.getElementById("action-status");
    try {
      const reply = await post(path, body ?? {});
      const text = reply && reply.message ? `${label}: ${reply.message}` : `${label}: done`;
      if (where) clear(where).append(h("p", { class: "notice", role: "status" }, text));
      announce(text);
      if (onDone) onDone(reply);
    } catch (err) {
      if (where) clear(where).append(errorBox(err, null));
      announce(err.message);
    } finally {
      btn.disabled = false;
    }
  });
  return btn;
}

/**
 * A table whose columns sort on click (asc, then desc). `columns`: [{key, label,
 * value(row) -> sortable, cell(row) -> node, num}]. Sorting happens in the page.
 */
export function sortableTable(columns, rows, { caption, initial, rowAttrs } = {}) {
  let sortKey = initial ? initial.key : null;
  let dir = initial ? initial.dir : 1;
  const tbody = h("tbody");
  const heads = columns.map((col) => {
    const th = h("th", { scope: "col", class: col.num ? "num" : "" });
    if (col.sortable === false) th.append(col.label);
    else {
      th.append(
        h(
          "button",
          {
            type: "button",
            class: "sort",
            onclick: () => {
              if (sortKey === col.key) dir = -dir;
              else {
                sortKey = col.key;
                dir = col.num ? -1 : 1;
              }
              draw();
            },
          },
          col.label,
        ),
      );
    }
    return th;
  });
  function cmp(a, b) {
    if (a === b) return 0;
    if (a === undefined || a === null || a === "") return 1;
    if (b === undefined || b === null || b === "") return -1;
    if (typeof a === "number" && typeof b === "number") return (a - b) * dir;
    return String(a).localeCompare(String(b), undefined, { numeric: true }) * dir;
  }
  function draw() {
    const col = columns.find((c) => c.key === sortKey);
    const sorted = col ? [...rows].sort((x, y) => cmp(col.value(x), col.value(y))) : rows;
    heads.forEach((th, i) => {
      if (columns[i].key === sortKey) th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    });
    clear(tbody).append(
      ...sorted.map((row) =>
        h("tr", rowAttrs ? rowAttrs(row) : {}, columns.map((c) => h("td", { class: c.num ? "num" : c.cls || "" }, c.cell ? c.cell(row) : fmtValue(c.value(row))))),
      ),
    );
  }
  draw();
  return h(
    "div",
    { class: "table-wrap" },
    h("table", { class: "sortable" }, caption ? h("caption", { class: "visually-hidden" }, caption) : null, h("thead", {}, h("tr", {}, heads)), tbody),
  );
}

export function metricValue(v) {
  if (typeof v === "string") return v;
  return fmtNumber(v);
}

/** Metrics of a run's /data reply as [key, value] pairs. */
export function metricEntries(data) {
  return (data.metrics || []).map((m) => [m.key, metricValue(m.value)]);
}
