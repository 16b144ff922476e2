// The client-side router: each path maps to a page module that renders into
// <main>. Links are ordinary <a href> elements; clicks on same-origin links
// are handled here (history.pushState) so the shell is loaded once.

import { ApiError, errorBox } from "./api.js";
import { announce, clear, h } from "./dom.js";

const ROUTES = [
  { re: /^\/$/, page: "runs", nav: "runs" },
  { re: /^\/runs\/([^/]+)$/, page: "run", nav: "runs", keys: ["runId"] },
  { re: /^\/runs\/([^/]+)\/steps\/(.+)$/, page: "step", nav: "runs", keys: ["runId", "stepKey"] },
  { re: /^\/experiments$/, page: "experiments", nav: "experiments" },
  { re: /^\/experiments\/([^/]+)$/, page: "experiment", nav: "experiments", keys: ["experimentId"] },
  { re: /^\/compare$/, page: "compare", nav: "experiments" },
  { re: /^\/models$/, page: "models", nav: "models" },
  { re: /^\/models\/(.+)$/, page: "model", nav: "models", keys: ["name"] },
  { re: /^\/launch$/, page: "launch", nav: "launch" },
];

const main = document.getElementById("main");
let cleanup = null;
let generation = 0;

function match(pathname) {
  for (const route of ROUTES) {
    const m = route.re.exec(pathname);
    if (m) {
      const params = {};
      (route.keys || []).forEach((key, i) => {
        params[key] = decodeURIComponent(m[i + 1]);
      });
      return { route, params };
    }
  }
  return null;
}

function setNav(name) {
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

/** Context handed to each page: its query, and helpers tied to this render. */
function context(gen, search) {
  const timers = [];
  const closers = [];
  const mounted = [];
  return {
    query: new URLSearchParams(search),
    /** False once the user has left the page: async work should stop. */
    alive: () => gen === generation,
    every(ms, fn) {
      const id = window.setInterval(() => {
        if (gen !== generation) return;
        if (document.visibilityState === "hidden") return;
        fn();
      }, ms);
      timers.push(id);
      return id;
    },
    onLeave(fn) {
      closers.push(fn);
    },
    /** Run `fn` once the page is in the document (for code that measures sizes). */
    afterMount(fn) {
      mounted.push(fn);
    },
    runMounted() {
      mounted.splice(0).forEach((fn) => fn());
    },
    setTitle(text) {
      document.title = text ? `${text} · keel` : "keel";
    },
    dispose() {
      timers.forEach((id) => window.clearInterval(id));
      closers.forEach((fn) => {
        try {
          fn();
        } catch {
          /* a page's cleanup must not stop navigation */
        }
      });
    },
  };
}

async function render({ focus = true } = {}) {
  generation += 1;
  const gen = generation;
  if (cleanup) cleanup.dispose();
  cleanup = null;
  const { pathname, search } = window.location;
  const found = match(pathname);
  clear(main);
  if (!found) {
    setNav(null);
    main.append(
      h("h1", { tabindex: "-1" }, "Page not found"),
      h("p", {}, "No page at ", h("code", {}, pathname), ". ", h("a", { href: "/" }, "Back to the runs.")),
    );
    document.title = "Not found · keel";
    return;
  }
  setNav(found.route.nav);
  main.append(h("p", { class: "loading", role: "status" }, "Loading…"));
  const ctx = context(gen, search);
  cleanup = ctx;
  try {
    const module = await import(`./pages/${found.route.page}.js`);
    if (gen !== generation) return;
    const view = h("div", { class: "page" });
    await module.render(view, found.params, ctx);
    if (gen !== generation) return;
    clear(main).append(view);
    ctx.runMounted();
  } catch (err) {
    if (gen !== generation) return;
    if (!(err instanceof ApiError)) console.error(err); // a bug: worth a look in the console
    const status = err instanceof ApiError && err.status === 404 ? "Not found" : "Error";
    document.title = `${status} · keel`;
    clear(main).append(h("h1", { tabindex: "-1" }, status), errorBox(err));
  }
  if (focus) {
    const heading = main.querySelector("h1");
    if (heading) {
      heading.setAttribute("tabindex", "-1");
      heading.focus({ preventScroll: true });
    }
    announce(document.title.replace(" · keel", ""));
  }
}

export function navigate(href, { replace = false } = {}) {
  if (replace) window.history.replaceState(null, "", href);
  else window.history.pushState(null, "", href);
  render({ focus: !replace });
  if (!replace) window.scrollTo(0, 0);
}

// Pages navigate with this without importing app.js (which would run it twice).
window.keelNavigate = navigate;

document.addEventListener("click", (e) => {
  if (e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  const a = e.target.closest("a[href]");
  if (!a || a.target || a.hasAttribute("download")) return;
  const target = new URL(a.href, window.location.href);
  if (target.origin !== window.location.origin) return;
  if (target.pathname.startsWith("/api/") || target.pathname.startsWith("/static/")) return;
  if (!match(target.pathname)) return;
  e.preventDefault();
  if (target.pathname === window.location.pathname && target.search === window.location.search) {
    if (target.hash) window.location.hash = target.hash;
    return;
  }
  navigate(target.pathname + target.search + target.hash);
});

window.addEventListener("popstate", () => render({ focus: true }));

render({ focus: false });
