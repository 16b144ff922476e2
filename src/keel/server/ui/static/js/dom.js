// Building DOM nodes and formatting values. Text always goes in as text nodes,
// never as HTML, so recorded values (logs, params, errors) cannot inject markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "style" && typeof value === "object") Object.assign(node.style, value);
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, String(value));
  }
  append(node, children);
  return node;
}

const nativeAppend = Element.prototype.append;

export function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    nativeAppend.call(node, child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function appendSkippingEmpty(...children) {
  append(this, children);
}

/**
 * h("a", {href: "/"}, "text", child, [more]). Like h's own children, what is later
 * passed to the element's append() may be nested arrays, and null/undefined/false
 * are skipped (the DOM's append would show them as text).
 */
export function h(tag, attrs, ...children) {
  const node = build(document.createElement(tag), attrs, children);
  node.append = appendSkippingEmpty;
  return node;
}

/** The same for SVG elements. */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function clear(node) {
  while (node.firstChild) node.firstChild.remove();
  return node;
}

// -- formatting ---------------------------------------------------------------

export function fmtTime(epoch) {
  if (epoch === null || epoch === undefined) return "—";
  const d = new Date(epoch * 1000);
  const now = new Date();
  const sameDay = d.toDateString() === now.toDateString();
  const pad = (n) => String(n).padStart(2, "0");
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  if (sameDay) return time;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
}

export function isoTime(epoch) {
  return epoch === null || epoch === undefined ? "" : new Date(epoch * 1000).toISOString();
}

/** A <time> element: local time shown, ISO in the title and datetime attribute. */
export function timeEl(epoch) {
  if (epoch === null || epoch === undefined) return h("span", { class: "muted" }, "—");
  const iso = isoTime(epoch);
  return h("time", { datetime: iso, title: iso }, fmtTime(epoch));
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  if (seconds < 0) seconds = 0;
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
  const m = Math.floor(seconds / 60);
  const sec = Math.round(seconds % 60);
  if (m < 60) return `${m}m ${String(sec).padStart(2, "0")}s`;
  const hr = Math.floor(m / 60);
  if (hr < 48) return `${hr}h ${String(m % 60).padStart(2, "0")}m`;
  return `${Math.floor(hr / 24)}d ${hr % 24}h`;
}

/** Duration of something that started and maybe ended (a running one counts to now). */
export function duration(startedAt, endedAt, serverNow) {
  if (startedAt === null || startedAt === undefined) return null;
  const end = endedAt ?? serverNow ?? Date.now() / 1000;
  return end - startedAt;
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

export function fmtNumber(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "string") return v; // "NaN", "Infinity" come as strings
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(3);
  return String(Number(v.toPrecision(5)));
}

/** A value of unknown shape (params, results) as short text. */
export function fmtValue(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") return fmtNumber(v);
  if (typeof v === "string") return v;
  return JSON.stringify(v);
}

export const STATUSES = ["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"];
export const FINISHED = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);

export function statusBadge(status) {
  const st = String(status || "UNKNOWN").toUpperCase();
  return h("span", { class: `badge status-${st.toLowerCase()}`, "data-status": st }, st.toLowerCase());
}

// Next to the status of a run whose owner died (its lease ran out): says so, and how
// to continue it.
export function ownerLostBadge(run) {
  const lost = run.owner_lost;
  if (!lost) return null;
  const since = new Date(lost.since * 1000).toLocaleString();
  const title = `Owner lost since ${since}: ${lost.owner} stopped renewing its lease. Resume it with: ${lost.resume_command}`;
  return h("span", { class: "badge owner-lost", "data-owner-lost": "", title }, "owner lost");
}

export function tagChips(tags) {
  const entries = Object.entries(tags || {});
  if (!entries.length) return null;
  return h(
    "ul",
    { class: "chips", "aria-label": "tags" },
    entries.map(([k, v]) => h("li", { class: "chip" }, v === "" ? k : `${k}: ${v}`)),
  );
}

export function shortId(id) {
  return id && id.length > 16 ? `${id.slice(0, 16)}…` : id;
}

/** Say something to screen readers (page changes, live updates). */
export function announce(text) {
  const el = document.getElementById("announcer");
  if (!el) return;
  el.textContent = "";
  window.setTimeout(() => {
    el.textContent = text;
  }, 30);
}

/** A definition list from [label, value] pairs, skipping empty values. */
export function facts(pairs) {
  return h(
    "dl",
    { class: "facts" },
    pairs
      .filter(([, v]) => v !== undefined && v !== null && v !== "")
      .map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))),
  );
}

/** A section with a heading (a landmark when labelled). */
export function section(title, ...children) {
  const id = `sec-${title.toLowerCase().replace(/[^a-z0-9]+/g, "-")}`;
  return h("section", { class: "card", "aria-labelledby": id }, h("h2", { id }, title), ...children);
}

export function emptyState(text) {
  return h("p", { class: "empty" }, text);
}

/** Run `draw`, then give the focus back to the same link or control if it was inside `root`. */
export function keepFocus(root, draw) {
  const active = document.activeElement;
  const inside = active && active !== document.body && root.contains(active);
  const key = inside ? active.getAttribute("href") || active.id || active.textContent : null;
  draw();
  if (!inside || root.contains(active)) return;
  const again = [...root.querySelectorAll("a, button, input, select, [tabindex]")].find(
    (el) => (el.getAttribute("href") || el.id || el.textContent) === key,
  );
  if (again) again.focus({ preventScroll: true });
}

