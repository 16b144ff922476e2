"""B11 serving on Ray: `keel serve --on ray` against a hand-written minimal Ray Serve
deployment of the same scikit-learn model with `@serve.batch`, on one local Ray, in
the same run.

The model is a LogisticRegression on the digits (64 pixel columns), registered in a
fresh store. keel's side is `keel.serve(uri, on="ray", ...)` (MLflow's protocol, the
signature check, hot reload following the alias, the deployment record); the
baseline is the smallest useful Ray Serve app: the fitted estimator handed to the
replica, `{"inputs": [[...]]}` parsed with `json`, rows joined with numpy in an
`@serve.batch` method, `predict`, `{"predictions": [...]}`. Both use the same
replica count, batch size, batch wait and `max_ongoing_requests`, and both run at
once behind the same Serve proxy (keel on `/`, the baseline on `/hand`).

The client (httpx, one kept-alive connection per thread) runs in this process and
checks every reply; rounds alternate between the two apps (the order flips each
time) so a shared, noisy machine loads both alike. Figure: requests/s of single-row
requests at 16 and 64 clients, the median of `--rounds` rounds.

Target: keel's requests/s within 1.3x of the hand-written deployment's
(keel >= baseline / 1.3).

    python bench/b11_serving_ray.py [--requests 1500] [--rounds 3] [--replicas 1]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _common import Result, fresh_home, report

os.environ.pop("KEEL_RAY_ADDRESS", None)
os.environ.pop("RAY_ADDRESS", None)

import httpx
import numpy as np

import keel

TARGET_RATIO = 1.3
MODEL_URI = "models:/b11ray-digits@champion"
MAX_BATCH = 32
WAIT_MS = 2.0


def hand_written(replicas: int, ongoing: int) -> Any:
    """The baseline: a minimal Ray Serve deployment with @serve.batch."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment(num_replicas=replicas, max_ongoing_requests=ongoing)
    class Hand:
        def __init__(self, model: Any) -> None:
            self.model = model

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=WAIT_MS / 1000)
        async def predict(self, parts: list[np.ndarray]) -> list[list[Any]]:
            out = self.model.predict(np.concatenate(parts))
            pieces, start = [], 0
            for part in parts:
                pieces.append(out[start : start + len(part)].tolist())
                start += len(part)
            return pieces

        async def __call__(self, request: Request) -> Response:
            rows = np.asarray(json.loads(await request.body())["inputs"], dtype=float)
            body = json.dumps({"predictions": await self.predict(rows)})
            return Response(body, media_type="application/json")

    return Hand


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load(url: str, bodies: list[bytes], wants: list[list[int]], clients: int) -> float:
    """Requests/s of sending every body once from `clients` threads; each reply checked."""
    per = [list(range(k, len(bodies), clients)) for k in range(clients)]
    headers = {"content-type": "application/json"}

    def worker(indexes: list[int]) -> int:
        with httpx.Client(timeout=120) as client:
            for i in indexes:
                reply = client.post(f"{url}/invocations", content=bodies[i], headers=headers)
                if reply.status_code != 200 or reply.json()["predictions"] != wants[i]:
                    raise SystemExit(f"{url}: wrong reply {reply.status_code}: {reply.text}")
        return len(indexes)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = sum(pool.map(worker, per))
    return done / (time.perf_counter() - start)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1500, help="requests per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per app and concurrency")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    p.add_argument("--json", default=None)
    args = p.parse_args()

    fresh_home()
    import ray
    from ray import serve
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(max_iter=300).fit(x[:1000], y[:1000])
    keel.register_model("b11ray-digits", model, input_example=x[:3])
    keel.models.set_alias("b11ray-digits", "champion", 1)
    rows = x[1000:]
    bodies = [json.dumps({"inputs": [r.tolist()]}).encode() for r in rows]
    wants = [[int(v)] for v in model.predict(rows)]
    reps = max(1, -(-args.requests // len(bodies)))
    bodies, wants = (bodies * reps)[: args.requests], (wants * reps)[: args.requests]

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    handle = keel.serve(
        MODEL_URI,
        on="ray",
        replicas=args.replicas,
        port=free_port(),
        max_batch_size=MAX_BATCH,
        batch_wait_ms=WAIT_MS,
        background=True,
    )
    assert handle is not None
    keel_start = time.perf_counter() - started
    ongoing = max(8, 2 * MAX_BATCH)  # as keel sets it
    started = time.perf_counter()
    serve.run(hand_written(args.replicas, ongoing).bind(model), name="hand", route_prefix="/hand")
    hand_start = time.perf_counter() - started
    urls = {"keel": handle.url, "hand": f"{handle.url}/hand"}
    try:
        for url in urls.values():  # warm-up: connections, first batches
            load(url, bodies[:200], wants[:200], 8)
        results, lines = [], []
        lines.append(("deploy to first 200", f"keel {keel_start:.1f} s, hand {hand_start:.1f} s"))
        for clients in args.clients:
            rates: dict[str, list[float]] = {"keel": [], "hand": []}
            for r in range(args.rounds):
                order = ("keel", "hand") if r % 2 == 0 else ("hand", "keel")
                for side in order:
                    rates[side].append(load(urls[side], bodies, wants, clients))
            k, h = statistics.median(rates["keel"]), statistics.median(rates["hand"])
            lines.append(
                (
                    f"{clients} clients rounds",
                    f"keel {[round(v) for v in rates['keel']]}, "
                    f"hand {[round(v) for v in rates['hand']]}",
                )
            )
            results.append(
                Result(
                    bench="B11-ray",
                    metric=f"requests/s, {clients} clients",
                    keel=k,
                    baseline=h,
                    target=f">= hand-written / {TARGET_RATIO}",
                    passed=k * TARGET_RATIO >= h,
                    unit="req/s",
                    baseline_name="hand-written Ray Serve + @serve.batch",
                )
            )
        report(
            f"B11 keel serve --on ray vs a hand-written Ray Serve deployment "
            f"({args.replicas} replica(s), batch {MAX_BATCH}, wait {WAIT_MS} ms, "
            f"{args.requests} single-row requests per round)",
            lines,
            results,
            args.json,
        )
    finally:
        serve.delete("hand")
        handle.stop()
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
