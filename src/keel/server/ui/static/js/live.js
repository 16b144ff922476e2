// Follow a run while it executes: the server's event stream (GET /api/v1/events)
// when it offers one, polling every second otherwise. `refresh()` is called
// (never twice at once, at most every 250 ms) whenever something may have changed;
// it returns true once there is nothing more to follow.

import { has, stream } from "./api.js";

export async function follow(ctx, runId, refresh, indicator) {
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
      if (!timer) timer = window.setTimeout(() => {
        timer = null;
        tick();
      }, wait);
      return;
    }
    busy = true;
    last = Date.now();
    try {
      if (await refresh()) {
        done = true;
        stop();
        set(false, "finished");
      }
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
  function stop() {
    if (close) close();
    close = null;
  }
  ctx.onLeave(() => {
    done = true;
    stop();
    if (timer) window.clearTimeout(timer);
  });

  if (await has("/events")) {
    set(true, "live");
    close = stream("/events", { run_id: runId }, {
      onEvent: (ev) => {
        const data = ev.data && typeof ev.data === "object" ? ev.data : {};
        const about = data.run_id || data.root_run_id;
        if (!about || about === runId || String(about).startsWith(`${runId}.`) || data.parent_id === runId) tick();
      },
      onOpen: () => {
        set(true, "live");
        tick();
      },
      onError: () => set(false, "reconnecting…"),
    });
    // A slow poll as well: an event that was missed during a reconnect is caught up.
    ctx.every(5000, tick);
  } else {
    set(true, "live (polling)");
    ctx.every(1000, tick);
  }
  return { stop: () => { done = true; stop(); } };
}
