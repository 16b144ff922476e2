// Calls to the REST API under /api/v1: JSON in and out, the server's error
// replies turned into ApiError, an optional API token, and Server-Sent Events
// read through fetch (so that the token travels in a header, not in the URL).

import { h } from "./dom.js";

export const BASE = "/api/v1";
const TOKEN_KEY = "keel.token";

export class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

export function token() {
  try {
    return window.localStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

export function setToken(value) {
  try {
    if (value) window.localStorage.setItem(TOKEN_KEY, value);
    else window.localStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage disabled: the token lasts for this page only */
  }
}

function headers(extra) {
  const out = { Accept: "application/json", ...extra };
  const t = token();
  if (t) out.Authorization = `Bearer ${t}`;
  return out;
}

/** A query string from an object; arrays repeat the key; empty values are left out. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v === undefined || v === null || v === "") continue;
    if (Array.isArray(v)) v.forEach((item) => q.append(k, item));
    else q.append(k, String(v));
  }
  const text = q.toString();
  return text ? `?${text}` : "";
}

export function url(path, params) {
  return `${BASE}${path}${query(params)}`;
}

/** Encode one path segment (run ids, step keys, model names). */
export const seg = (v) => encodeURIComponent(String(v));

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    /* not JSON: a proxy's page, say */
  }
  const err = body && body.error;
  if (err && typeof err === "object") {
    return new ApiError(response.status, err.code || "error", err.message || response.statusText, err.details);
  }
  const detail = body && body.detail;
  return new ApiError(
    response.status,
    "http_error",
    typeof detail === "string" ? detail : `${response.status} ${response.statusText || "error"}`,
    detail,
  );
}

export async function request(method, path, { params, body, signal } = {}) {
  let response;
  try {
    response = await fetch(url(path, params), {
      method,
      headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (exc) {
    if (exc && exc.name === "AbortError") throw exc;
    throw new ApiError(0, "unreachable", "The keel server did not answer. Is `keel server` still running?");
  }
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

export const get = (path, params, opts) => request("GET", path, { ...opts, params });
export const post = (path, body, opts) => request("POST", path, { ...opts, body });

/** Fetch a raw response (artifacts, logs as text) with the token. */
export async function raw(path, params, opts = {}) {
  const response = await fetch(url(path, params), { headers: headers(opts.headers), signal: opts.signal });
  if (!response.ok) throw await errorFrom(response);
  return response;
}

/**
 * Read a Server-Sent Events stream. `onEvent({event, data, id})` gets each event
 * (data parsed as JSON when it is). Reconnects after a drop, with Last-Event-ID.
 * Returns a function that closes the stream. `onError(err)` hears about failures;
 * a 404 (no such endpoint) stops for good so the caller can fall back to polling.
 */
export function stream(path, params, { onEvent, onOpen, onError } = {}) {
  const controller = new AbortController();
  let lastId = null;
  let closed = false;
  let delay = 500;

  async function connect() {
    while (!closed) {
      try {
        const extra = { Accept: "text/event-stream" };
        if (lastId !== null) extra["Last-Event-ID"] = lastId;
        const response = await fetch(url(path, params), { headers: headers(extra), signal: controller.signal });
        if (!response.ok) {
          const err = await errorFrom(response);
          if (onError) onError(err);
          if (response.status === 404 || response.status === 401 || response.status === 403) return;
        } else {
          delay = 500;
          if (onOpen) onOpen();
          await readEvents(response.body, (ev) => {
            if (ev.id !== undefined) lastId = ev.id;
            if (onEvent) onEvent(ev);
          });
        }
      } catch (exc) {
        if (closed || (exc && exc.name === "AbortError")) return;
        if (onError) onError(exc);
      }
      if (closed) return;
      await new Promise((resolve) => window.setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 10000);
    }
  }
  connect();
  return () => {
    closed = true;
    controller.abort();
  };
}

async function readEvents(body, emit) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let nl;
    while ((nl = buffer.search(/\r\n|\n|\r/)) >= 0) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + (buffer.startsWith("\r\n", nl) ? 2 : 1));
      if (line === "") {
        if (event.data.length) {
          const text = event.data.join("\n");
          let data = text;
          try {
            data = JSON.parse(text);
          } catch {
            /* plain text data */
          }
          emit({ event: event.event || "message", data, id: event.id });
        }
        event = { data: [] };
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? "" : line.slice(colon + 1);
      if (val.startsWith(" ")) val = val.slice(1);
      if (field === "data") event.data.push(val);
      else if (field === "event") event.event = val;
      else if (field === "id") event.id = val;
    }
  }
}

// -- what the server offers ------------------------------------------------------

let openapi = null;

/** The OpenAPI document (cached): lets pages use endpoints only where they exist. */
export async function spec() {
  if (!openapi) {
    openapi = get("/openapi.json").catch(() => ({ paths: {} }));
  }
  return openapi;
}

/** Whether the API has `path` (as written in the OpenAPI document) for `method`. */
export async function has(path, method = "get") {
  const doc = await spec();
  const item = (doc.paths || {})[`${BASE}${path}`];
  return Boolean(item && item[method]);
}

// -- showing errors ----------------------------------------------------------------

/** A readable box for an error from the API (or anything thrown). */
export function errorBox(err, what) {
  const status = err instanceof ApiError ? err.status : 0;
  const title = what ? `Could not load ${what}` : "Something went wrong";
  const box = h(
    "div",
    { class: "error-box", role: "alert" },
    h("strong", {}, title),
    h("p", {}, err && err.message ? err.message : String(err)),
  );
  const hint = err && err.details && typeof err.details === "object" && err.details.hint;
  if (hint) box.append(h("p", { class: "hint" }, hint));
  if (status === 401 || status === 403) box.append(tokenForm());
  return box;
}

/** Paste an API token (kept in this browser's local storage). */
export function tokenForm() {
  const input = h("input", { id: "api-token", type: "password", autocomplete: "off", value: token() });
  return h(
    "form",
    {
      class: "token-form",
      onsubmit: (e) => {
        e.preventDefault();
        setToken(input.value.trim());
        window.location.reload();
      },
    },
    h("label", { for: "api-token" }, "API token"),
    input,
    h("button", { type: "submit" }, "Use token"),
  );
}
