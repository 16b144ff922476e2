"""`keel worker`: take queued runs and steps from the metadata store and execute them.

A worker claims items of the queues it serves (store/queue.py), renews their
leases while it works, and marks them done. Runs are continued by replay (so a
run whose previous worker died picks up where its record ends); steps are run
with the thread executor and their outcomes written back for their coordinator.

SIGTERM (or Ctrl-C) stops claiming; running items get `grace` seconds to finish,
then the rest are handed back: a run is parked and re-queued, a step's claim is
released, so another worker continues without waiting for a lease to expire.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from keel.engine.api import LEASE_SECONDS, continue_run, new_session
from keel.engine.session import Session
from keel.errors import KeelError, qualified_name
from keel.executors.base import StepCall, StepOutcome
from keel.executors.threads import ThreadExecutor
from keel.status import RunStatus
from keel.store import queue
from keel.store.metadata import MetadataStore, open_store
from keel.store.retry import with_retry
from keel.store.schema import workers

log = logging.getLogger("keel.worker")

# Called on every turn of the worker loop (schedules and triggers hook in here).
loop_hooks: list[Callable[[Worker], None]] = []


class Worker:
    def __init__(
        self,
        *,
        queues: Sequence[str] = ("default",),
        concurrency: int = 4,
        store: MetadataStore | None = None,
        lease_seconds: float = LEASE_SECONDS,
        poll_seconds: float = 0.2,
        grace_seconds: float = 30.0,
        kinds: Sequence[str] = ("run", "step"),
    ) -> None:
        if not queues:
            raise KeelError("a worker needs at least one queue to serve", hint="--queue default")
        self.store = store or open_store()
        self.queues = list(queues)
        self.concurrency = max(1, concurrency)
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.grace_seconds = grace_seconds
        self.kinds = list(kinds)
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._keeper = queue.LeaseKeeper(self.store, self.id, lease_seconds)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._active: dict[int, queue.Claim] = {}
        self._sessions: dict[int, Session] = {}
        self._lock = threading.Lock()
        self._steps = ThreadExecutor(self.concurrency)
        self.completed = 0

    # -- lifecycle --------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the worker to stop (what SIGTERM does)."""
        self._stop.set()
        self._wake.set()

    def run(self, *, max_items: int | None = None, idle_exit: float | None = None) -> None:
        """Work until stopped (or after `max_items` items / `idle_exit` idle seconds)."""
        self._register()
        previous = self._install_signal_handlers()
        last_work = time.monotonic()
        last_beat = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now - last_beat > self.lease_seconds / 3:
                    self._heartbeat()
                    last_beat = now
                for hook in loop_hooks:
                    self._guard(hook)
                claimed = self._claim_one() if len(self._active) < self.concurrency else False
                if claimed:
                    last_work = time.monotonic()
                    continue
                if self._active:
                    last_work = time.monotonic()
                if max_items is not None and self.completed >= max_items and not self._active:
                    break
                if idle_exit is not None and time.monotonic() - last_work > idle_exit:
                    break
                # Sleep until the next poll, or until a slot frees up.
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
        finally:
            self._shutdown()
            self._restore_signal_handlers(previous)

    def _guard(self, fn: Callable[[Worker], None]) -> None:
        try:
            fn(self)
        except sa.exc.SQLAlchemyError as exc:  # a database blip: the next turn retries
            log.warning("worker loop hook failed: %s", exc)

    def _register(self) -> None:
        now = time.time()
        with self.store.engine.begin() as conn:
            conn.execute(
                workers.insert().values(
                    id=self.id,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    queues=json.dumps(self.queues),
                    status="running",
                    started_at=now,
                    heartbeat_at=now,
                )
            )

    def _heartbeat(self) -> None:
        try:
            with self.store.engine.begin() as conn:
                conn.execute(
                    workers.update()
                    .where(workers.c.id == self.id)
                    .values(heartbeat_at=time.time(), status="running")
                )
        except sa.exc.SQLAlchemyError as exc:
            log.warning("heartbeat failed (database unreachable?): %s", exc)

    def _install_signal_handlers(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        return previous

    def _restore_signal_handlers(self, previous: Any) -> None:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    def _shutdown(self) -> None:
        deadline = time.monotonic() + self.grace_seconds
        while self._active and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            leftover = dict(self._active)
        for item_id, claim in leftover.items():
            session = self._sessions.get(item_id)
            if claim.kind == "run" and session is not None:
                session.hand_back()  # the run parks itself; the engine re-queues it
            else:
                queue.release(self.store, item_id, self.id)
        hand_back_deadline = time.monotonic() + 10
        while self._active and time.monotonic() < hand_back_deadline:
            time.sleep(0.05)
        self._keeper.stop()
        self._steps.shutdown(wait=False)
        try:
            with self.store.engine.begin() as conn:
                conn.execute(
                    workers.update().where(workers.c.id == self.id).values(status="stopped")
                )
        except sa.exc.SQLAlchemyError:
            pass

    # -- claims -------------------------------------------------------------------------
    def _claim_one(self) -> bool:
        try:
            claim = queue.claim(
                self.store, self.id, self.queues, lease_seconds=self.lease_seconds, kinds=self.kinds
            )
        except sa.exc.SQLAlchemyError as exc:
            log.warning("claiming failed (database unreachable?): %s", exc)
            return False
        if claim is None:
            return False
        with self._lock:
            self._active[claim.id] = claim
        self._keeper.hold(claim.id)
        if claim.kind == "run":
            threading.Thread(
                target=self._run_claimed,
                args=(claim,),
                name=f"keel-run-{claim.run_id}",
                daemon=True,
            ).start()
        else:
            self._start_step(claim)
        return True

    def _finished(self, claim: queue.Claim) -> None:
        self._keeper.drop(claim.id)
        with self._lock:
            self._active.pop(claim.id, None)
            self._sessions.pop(claim.id, None)
            self.completed += 1
        self._wake.set()

    def _run_claimed(self, claim: queue.Claim) -> None:
        session = new_session(store=self.store)
        with self._lock:
            self._sessions[claim.id] = session
        try:
            outcome = continue_run(session, claim.run_id)
            if outcome.status is not RunStatus.PENDING:
                with_retry(
                    lambda: queue.complete(self.store, claim.id, self.id),
                    what=f"completing run {claim.run_id}",
                )
        except Exception as exc:
            # The run cannot even start here (its code cannot be found...): record why.
            log.error("run %s failed to start on worker %s: %s", claim.run_id, self.id, exc)
            self.store.update_run(
                claim.run_id,
                status=str(RunStatus.FAILED),
                ended_at=time.time(),
                error_type=qualified_name(type(exc)),
                error_message=exc.message if isinstance(exc, KeelError) else str(exc),
            )
            queue.complete(self.store, claim.id, self.id)
        finally:
            session.close()
            self._finished(claim)

    def _start_step(self, claim: queue.Claim) -> None:
        try:
            call: StepCall = pickle.loads(claim.payload or b"")
        except Exception as exc:
            from keel.executors.base import failure

            self._step_done(claim, failure(exc, time.time()))
            return
        call.keep_value = False
        self._steps.submit(call, lambda outcome: self._step_done(claim, outcome))

    def _step_done(self, claim: queue.Claim, outcome: StepOutcome) -> None:
        import cloudpickle

        try:
            data = cloudpickle.dumps(outcome)
        except Exception:
            outcome.error = None
            data = cloudpickle.dumps(outcome)
        try:
            with_retry(
                lambda: queue.complete(self.store, claim.id, self.id, bytes(data)),
                what=f"reporting step {claim.run_id}/{claim.seq}",
            )
        except Exception:
            # Given up: the claim's lease runs out and another worker runs the step again.
            log.exception("could not report step %s/%s", claim.run_id, claim.seq)
        finally:
            self._finished(claim)
