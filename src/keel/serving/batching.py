"""Adaptive micro-batching: concurrent requests become one `predict` call.

Requests queue up; one consumer takes the first, adds whatever else is waiting (and,
for up to `wait_ms`, whatever arrives) until `max_rows` rows, runs one predict on a
worker thread, and hands each request its slice of the predictions. While a predict
runs, the next batch gathers: the busier the server, the bigger the batches, with no
wait at all when `wait_ms` is 0. A model that cannot batch (`Served.batchable`) is
called once per request, also on a thread, so the event loop keeps accepting.

A model whose calls have recently taken less than `INLINE_BELOW_S` (a linear model
on a few rows: tens of microseconds) is called on the event loop instead: handing
such a call to a thread and back costs more than the call, and blocks the loop for
less than that hand-off would. The first call of a version always goes to a thread,
and each call's time updates the estimate, so a model that turns slow moves back.

A batch whose predict raises, or whose output does not have one row per input row, is
run again request by request, so an error belongs to the request that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keel.serving.model_slot import Served

INLINE_BELOW_S = 0.0005  # recent seconds per predict call under which it runs on the loop


@dataclass
class _Item:
    data: Any
    rows: int
    future: asyncio.Future[Any] = field(repr=False)


class Batcher:
    def __init__(
        self,
        current: Callable[[], Served],
        *,
        max_rows: int = 32,
        wait_ms: float = 0.0,
        on_batch: Callable[[Served, int], None] | None = None,
        inline_below_s: float = INLINE_BELOW_S,
    ) -> None:
        self.current = current
        self.max_rows = max(1, max_rows)
        self.wait = max(0.0, wait_ms) / 1000.0
        self.on_batch = on_batch
        self.inline_below = inline_below_s
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._cost: tuple[Served, float] | None = None  # a version's recent s per call

    async def _call(self, served: Served, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the loop if this version's calls are cheap, else on a thread."""
        known = self._cost[1] if self._cost is not None and self._cost[0] is served else None

        def timed() -> Any:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                took = time.perf_counter() - start
                # an average over the last few calls, so one outlier does not flip the path
                self._cost = (served, took if known is None else 0.7 * known + 0.3 * took)

        if known is not None and known < self.inline_below:
            return timed()
        return await asyncio.to_thread(timed)

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._consume())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def predict(self, served: Served, data: Any, rows: int) -> tuple[Served, Any]:
        """The predictions for one request's data, and the version that made them."""
        if not served.batchable or self._queue is None or rows >= self.max_rows:
            self._count(served, rows)
            return served, await self._call(served, served.predict, data)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(data, rows, future))
        result: tuple[Served, Any] = await future
        return result

    def _count(self, served: Served, rows: int) -> None:
        if self.on_batch is not None:
            self.on_batch(served, rows)

    async def _consume(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            total = batch[0].rows
            deadline = loop.time() + self.wait
            while total < self.max_rows:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), left)
                    except TimeoutError:
                        break
                if total + item.rows > self.max_rows:
                    # keep it for the next batch (at the front of the line)
                    await self._run(batch)
                    batch, total = [item], item.rows
                    deadline = loop.time() + self.wait
                    continue
                batch.append(item)
                total += item.rows
            await self._run(batch)

    async def _run(self, batch: list[_Item]) -> None:
        try:
            await self._predict(batch)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # never leave a request waiting, nor stop consuming
            for item in batch:
                _settle(item, exc=exc)

    async def _predict(self, batch: list[_Item]) -> None:
        live = [item for item in batch if not item.future.done()]  # timed-out ones are gone
        if not live:
            return
        served = self.current()
        self._count(served, sum(item.rows for item in live))
        try:
            outputs = await self._call(served, _predict_batch, served, [i.data for i in live])
        except Exception:
            outputs = None
        if outputs is None:  # one at a time: each error goes to its own request
            for item in live:
                try:
                    value = await self._call(served, served.predict, item.data)
                except Exception as exc:
                    _settle(item, exc=exc)
                else:
                    _settle(item, (served, value))
            return
        for item, value in zip(live, outputs, strict=True):
            _settle(item, (served, value))


def _settle(item: _Item, value: Any = None, exc: BaseException | None = None) -> None:
    if item.future.done():
        return
    if exc is not None:
        item.future.set_exception(exc)
    else:
        item.future.set_result(value)


def _predict_batch(served: Served, parts: list[Any]) -> list[Any] | None:
    """One predict over the parts joined; each part's predictions, or None when the
    parts cannot be joined or the output cannot be split back."""
    if len(parts) == 1:
        return [served.predict(parts[0])]
    joined = _join(parts)
    if joined is None:
        return None
    out = served.predict(joined)
    total = sum(len(p) for p in parts)
    if not hasattr(out, "__len__") or len(out) != total:
        return None
    pieces, start = [], 0
    for part in parts:
        end = start + len(part)
        pieces.append(out.iloc[start:end] if hasattr(out, "iloc") else out[start:end])
        start = end
    return pieces


def _join(parts: list[Any]) -> Any:
    import numpy as np
    import pandas as pd

    if all(isinstance(p, pd.DataFrame) for p in parts):
        columns = list(parts[0].columns)
        if any(list(p.columns) != columns for p in parts):
            return None
        return pd.concat(parts, ignore_index=True)
    if all(isinstance(p, np.ndarray) for p in parts):
        if len({(p.shape[1:], p.dtype) for p in parts}) != 1:
            return None
        return np.concatenate(parts)
    return None
