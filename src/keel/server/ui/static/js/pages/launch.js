// Launch: start a registered workflow with a form generated from its parameters'
// JSON Schema. The server checks the values; its 422 reply names each bad
// parameter, and the message is shown next to that field.

import { ApiError, errorBox, get, post, seg } from "../api.js";
import { announce, clear, h } from "../dom.js";

/** The schema of a parameter without its `| None` (anyOf [X, null]); and whether None is allowed. */
function unwrap(schema, defs) {
  let s = schema || {};
  let nullable = false;
  if (Array.isArray(s.anyOf)) {
    const rest = s.anyOf.filter((x) => x.type !== "null");
    nullable = rest.length < s.anyOf.length;
    if (rest.length === 1) s = { ...rest[0], title: schema.title, default: schema.default, description: schema.description };
  }
  if (s.$ref) {
    const name = s.$ref.split("/").pop();
    s = { ...(defs[name] || {}), title: schema.title, default: schema.default, description: schema.description ?? (defs[name] || {}).description };
  }
  return { s, nullable };
}

function kindOf(s) {
  if (Array.isArray(s.enum)) return "enum";
  if (s.const !== undefined) return "enum";
  if (s.type === "boolean") return "boolean";
  if (s.type === "integer") return "integer";
  if (s.type === "number") return "number";
  if (s.type === "string") return "string";
  return "json"; // arrays, objects, unions: typed as JSON
}

function typeLabel(s, nullable) {
  let t;
  switch (kindOf(s)) {
    case "enum":
      t = `one of ${(s.enum || [s.const]).map((x) => JSON.stringify(x)).join(", ")}`;
      break;
    case "json":
      t = s.type === "array" ? "a JSON list" : s.type === "object" ? "a JSON object" : "JSON";
      break;
    default:
      t = s.type === "integer" ? "a whole number" : s.type === "number" ? "a number" : s.type === "boolean" ? "true or false" : "text";
  }
  if (s.format) t += ` (${s.format})`;
  return nullable ? `${t}; may be left empty` : t;
}

function field(name, schema, defs, required, prefill) {
  const { s, nullable } = unwrap(schema, defs);
  const kind = kindOf(s);
  const id = `p-${name}`;
  const initial = prefill !== undefined ? prefill : s.default;
  const errorId = `${id}-error`;
  const helpId = `${id}-help`;
  let input;
  if (kind === "enum") {
    const options = s.enum || [s.const];
    input = h(
      "select",
      { id, name },
      !required || nullable ? h("option", { value: "" }, nullable ? "(none)" : "(default)") : null,
      options.map((o) => h("option", { value: JSON.stringify(o), selected: initial !== undefined && JSON.stringify(initial) === JSON.stringify(o) }, String(o))),
    );
  } else if (kind === "boolean") {
    input = h("select", { id, name }, !required ? h("option", { value: "" }, "(default)") : null, h("option", { value: "true", selected: initial === true }, "true"), h("option", { value: "false", selected: initial === false }, "false"));
  } else if (kind === "json") {
    input = h("textarea", { id, name, rows: 3, spellcheck: "false" });
    if (initial !== undefined && initial !== null) input.value = JSON.stringify(initial, null, 1);
  } else {
    input = h("input", {
      id,
      name,
      type: "text",
      inputmode: kind === "integer" ? "numeric" : kind === "number" ? "decimal" : undefined,
      autocomplete: "off",
      spellcheck: kind === "string" ? undefined : "false",
    });
    if (initial !== undefined && initial !== null) input.value = typeof initial === "string" ? initial : JSON.stringify(initial);
  }
  input.setAttribute("aria-describedby", `${helpId} ${errorId}`);
  if (required) input.setAttribute("aria-required", "true");
  const error = h("span", { class: "error", id: errorId, "aria-live": "polite" });
  const help = [typeLabel(s, nullable)];
  if (s.description) help.unshift(s.description);
  if (s.default !== undefined && s.default !== null) help.push(`default ${JSON.stringify(s.default)}`);
  const wrap = h(
    "div",
    { class: "field", "data-param": name },
    h("label", { for: id }, s.title || name, required ? h("span", { "aria-hidden": "true", class: "req" }, " *") : null, h("span", { class: "visually-hidden" }, required ? " (required)" : "")),
    input,
    h("span", { class: "help", id: helpId }, help.join(" · ")),
    error,
  );

  /** The value to send: undefined (leave it to the default), or what was typed. */
  function value() {
    const raw = input.value.trim();
    if (raw === "") return undefined; // the workflow's default
    switch (kind) {
      case "enum":
      case "boolean":
        return JSON.parse(raw);
      case "integer":
      case "number": {
        const n = Number(raw);
        return raw !== "" && Number.isFinite(n) ? n : raw; // the server says what is wrong
      }
      case "json":
        try {
          return JSON.parse(raw);
        } catch {
          return raw;
        }
      default:
        return input.value;
    }
  }
  function setError(message) {
    error.textContent = message || "";
    if (message) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
  }
  return { name, wrap, input, value, setError, required };
}

export async function render(view, _params, ctx) {
  ctx.setTitle("Launch a run");
  const q = ctx.query;
  view.append(
    h(
      "div",
      { class: "page-head" },
      h("div", { class: "title" }, h("h1", {}, "Launch a run"), h("p", { class: "subtitle" }, "Start a workflow registered with this server.")),
    ),
  );
  let workflows;
  try {
    workflows = await get("/workflows");
  } catch (err) {
    view.append(errorBox(err, "the workflows"));
    return;
  }
  if (!workflows.length) {
    view.append(
      h(
        "div",
        { class: "card" },
        h("p", {}, "This server has no registered workflow to launch."),
        h("p", {}, "Start it with the workflows it may run: ", h("code", {}, "keel server --workflows flows/train.py"), ", or list them in ", h("code", {}, "keel.toml"), ": ", h("code", {}, '[server] workflows = ["flows/train.py:train"]'), "."),
      ),
    );
    return;
  }

  let prefill = {};
  const from = q.get("from");
  if (from) {
    try {
      prefill = (await get(`/runs/${seg(from)}`)).params || {};
    } catch {
      prefill = {};
    }
  }

  const names = workflows.map((w) => w.name);
  const wanted = q.get("workflow");
  const select = h(
    "select",
    { id: "launch-workflow", name: "workflow" },
    workflows.map((w) => h("option", { value: w.name, selected: w.name === wanted }, w.name)),
  );
  const body = h("div");
  view.append(
    h(
      "div",
      { class: "card" },
      h("div", { class: "field" }, h("label", { for: "launch-workflow" }, "Workflow"), select),
      body,
    ),
  );
  if (wanted && !names.includes(wanted)) {
    body.append(h("p", { class: "error-box" }, `No workflow named ${wanted} is registered with this server; pick one above.`));
  }

  function show(name) {
    const wf = workflows.find((w) => w.name === name) || workflows[0];
    const schema = wf.params_schema || { properties: {} };
    const defs = schema.$defs || {};
    const required = new Set(schema.required || []);
    const fields = Object.entries(schema.properties || {}).map(([pname, ps]) =>
      field(pname, ps, defs, required.has(pname), from && wf.name === wanted ? prefill[pname] : undefined),
    );
    const summary = h("div", { id: "launch-errors", tabindex: "-1" });
    const submit = h("button", { type: "submit", class: "primary" }, `Launch ${wf.name}`);
    const form = h(
      "form",
      { id: "launch-form", novalidate: true, "aria-describedby": "launch-desc" },
      h("p", { id: "launch-desc", class: "muted" }, wf.description || "", wf.description ? h("br") : null, "Source: ", h("code", {}, wf.source), ` · queue ${wf.queue} · experiment ${wf.experiment}`),
      summary,
      fields.length ? h("div", { class: "form-grid" }, fields.map((f) => f.wrap)) : h("p", { class: "empty" }, "This workflow takes no parameters."),
      h("p", { class: "muted" }, "Fields marked * are required."),
      h("div", { class: "actions" }, submit),
    );
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      fields.forEach((f) => f.setError(""));
      clear(summary);
      const params = {};
      const missing = [];
      for (const f of fields) {
        const v = f.value();
        if (v === undefined) {
          if (f.required) missing.push(f);
        } else params[f.name] = v;
      }
      if (missing.length) {
        missing.forEach((f) => f.setError("Required: give a value."));
        showProblems(summary, missing.map((f) => ({ parameter: f.name, message: "required" })), fields);
        missing[0].input.focus();
        return;
      }
      submit.disabled = true;
      submit.textContent = "Launching…";
      try {
        const reply = await post(`/workflows/${seg(wf.name)}/runs`, { params });
        announce(`Run ${reply.run.id} started`);
        window.keelNavigate(`/runs/${seg(reply.run.id)}`);
      } catch (err) {
        const problems = problemsOf(err);
        if (problems.length) {
          for (const p of problems) {
            const f = fields.find((x) => x.name === p.parameter);
            if (f) f.setError(p.message);
          }
          showProblems(summary, problems, fields, err);
        } else {
          summary.append(errorBox(err, null));
        }
        summary.focus();
      } finally {
        submit.disabled = false;
        submit.textContent = `Launch ${wf.name}`;
      }
    });
    clear(body).append(form);
  }

  select.addEventListener("change", () => {
    window.history.replaceState(null, "", `/launch?workflow=${encodeURIComponent(select.value)}`);
    show(select.value);
  });
  show(select.value);
}

/** The per-parameter problems in a 422 reply (from keel's check, or from request validation). */
function problemsOf(err) {
  if (!(err instanceof ApiError) || err.status !== 422 || !err.details) return [];
  if (Array.isArray(err.details.problems)) return err.details.problems;
  if (Array.isArray(err.details)) {
    return err.details.map((d) => {
      const loc = (d.loc || []).filter((x) => x !== "body" && x !== "params");
      return { parameter: String(loc[0] ?? ""), message: d.msg || "invalid" };
    });
  }
  return [];
}

function showProblems(summary, problems, fields, err) {
  clear(summary).append(
    h(
      "div",
      { class: "error-box", role: "alert" },
      h("strong", {}, problems.length === 1 ? "One parameter needs fixing" : `${problems.length} parameters need fixing`),
      h(
        "ul",
        {},
        problems.map((p) => {
          const f = fields.find((x) => x.name === p.parameter);
          return h("li", {}, f ? h("a", { href: `#${f.input.id}`, onclick: (e) => { e.preventDefault(); f.input.focus(); } }, p.parameter) : p.parameter, `: ${p.message}`);
        }),
      ),
      err && err.details && err.details.hint ? h("p", { class: "hint" }, err.details.hint) : null,
    ),
  );
}
