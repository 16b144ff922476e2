// Follow a run while it executes: the server's event stream (GET /api/v1/events)
// when it offers one, polling every second otherwise.
//
// `refresh()` reloads what the page shows (never twice at once, at most every
// 250 ms) and returns true once there is nothing more to follow. With the stream,
// `onEvent(ev)` (if given) gets each run/step event of this run and returns true
// when it applied the change itself; otherwise the event asks for a refresh. A slow
// refresh runs as well, to catch up on anything missed during a reconnect.

import { has, stream } from "./api.js";

export async function follow(ctx, runId, refresh, indicator, { onEvent } = {}) {
  let done = false;
  let busy = false;
  let again = false;
  let last = 0;
  let timer = null;

  const set = (on, text) => {
    if (!indicator) return;
    indicator.classList.toggle("on", on);
    indicator.textContent = text;
  };

  async function tick() {
    if (done || !ctx.alive()) return;
    if (busy) {
      again = true;
      return;
    }
    const wait = 250 - (Date.now() - last);
    if (wait > 0) {
      if (!timer) {
        timer = window.setTimeout(() => {
          timer = null;
          tick();
        }, wait);
      }
      return;
    }
    busy = true;
    last = Date.now();
    try {
      if (await refresh()) finish();
    } catch {
      /* a failed refresh keeps the last view; the next event or tick retries */
    } finally {
      busy = false;
      if (again && !done) {
        again = false;
        tick();
      }
    }
  }

  let close = null;
  function finish() {
    done = true;
    if (close) close();
    close = null;
    set(false, "");
  }
  ctx.onLeave(() => {
    done = true;
    if (close) close();
    if (timer) window.clearTimeout(timer);
  });

  const mine = (data) => {
    const about = String(data.run_id || "");
    return about === runId || about.startsWith(`${runId}.`) || data.parent_id === runId;
  };

  if (await has("/events")) {
    set(true, "live");
    close = stream("/events", { run_id: runId }, {
      onEvent: (ev) => {
        if (done || (ev.event !== "run" && ev.event !== "step")) return;
        const data = ev.data && typeof ev.data === "object" ? ev.data : {};
        if (!mine(data)) return;
        if (onEvent && onEvent(ev.event, data)) return;
        tick();
      },
      onOpen: () => {
        set(true, "live");
        tick();
      },
      onError: () => set(false, "reconnecting…"),
    });
    ctx.every(10000, tick);
  } else {
    set(true, "live (polling)");
    ctx.every(1000, tick);
  }
  return { stop: finish, refresh: tick };
}
