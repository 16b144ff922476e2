"""B11 serving workflows: what an ephemeral workflow endpoint (`keel serve REF
--ephemeral`) adds per request over calling the same Python functions from a minimal
Starlette app, both on uvicorn in their own process, measured in the same run.

The pipeline is three tasks: preprocess (64 pixel values scaled) -> predict (a
LogisticRegression on the digits, registered in a fresh store and loaded with
`keel.load_model`) -> postprocess (label and probability). The floor app parses the
JSON body and calls the three functions in a row; its process installs the same
model cache, so both load the model once and the difference is the endpoint itself:
parameter validation, the in-memory runtime, each step's hop to the step pool, and
the reply. The client (httpx, one kept-alive connection per thread) runs in this
process; every reply is checked.

Both servers run at once and the client alternates between them (the order flips
each time), so a shared, noisy machine loads both alike.

- Sequential: p50 and p99 of single requests; the overhead is keel's p50 minus the
  floor's.
- Concurrent: requests/s with 16 client threads, the median of 4 alternating rounds.
  The floor's endpoint is `async` and calls the functions on the event loop (one
  request at a time); keel runs each call on a worker thread.

Target: ephemeral overhead per request <= 1 ms at p50 (sequential).

    python bench/b11_serving_workflows.py [--requests 2000] [--clients 16]
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import keel

TARGET_OVERHEAD_MS = 1.0
MODEL_URI = "models:/b11-digits@champion"
HERE = Path(__file__).resolve()


# -- the pipeline (the same functions in both apps) -------------------------------------


def preprocess_fn(image: list[float]) -> np.ndarray:
    return np.asarray(image, dtype=float).reshape(1, -1)


def predict_fn(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(keel.load_model(MODEL_URI).unwrap().predict_proba(pixels))[0]


def postprocess_fn(probabilities: np.ndarray) -> dict[str, Any]:
    label = int(np.argmax(probabilities))
    return {"label": label, "p": round(float(probabilities[label]), 4)}


preprocess = keel.task(preprocess_fn)
predict = keel.task(predict_fn)
postprocess = keel.task(postprocess_fn)


@keel.workflow
def classify(image: list[float]) -> dict[str, Any]:
    return postprocess(predict(preprocess(image)))


# -- the servers ------------------------------------------------------------------------


def floor_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def run(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        result = postprocess_fn(predict_fn(preprocess_fn(body["image"])))
        return JSONResponse({"result": result})

    return Starlette(routes=[Route("/run", run, methods=["POST"])])


def serve(kind: str, port: int) -> None:
    import uvicorn

    from keel.serving import model_cache
    from keel.serving.workflow_app import create_workflow_app

    if kind == "keel":
        app = create_workflow_app(f"{HERE}:classify", ephemeral=True)
    else:
        model_cache.install()  # the same cache the keel app installs while it runs
        app = floor_app()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, kind: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "--serve", kind, "--port", str(self.port)],
            env=dict(os.environ),
        )

    def wait_ready(self, body: dict[str, Any]) -> None:
        import httpx

        end = time.monotonic() + 60
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.post(f"{self.url}/run", json=body, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise SystemExit("the server did not answer within 60 s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


# -- measuring --------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def sequential(
    urls: dict[str, str], images: list[list[float]], wanted: list[int]
) -> dict[str, list[float]]:
    """Single requests, alternating between the servers (the order flips each time),
    so both see the same machine load."""
    import httpx

    times: dict[str, list[float]] = {kind: [] for kind in urls}
    clients = {kind: httpx.Client(base_url=url, timeout=60) for kind, url in urls.items()}
    kinds = list(urls)
    try:
        for i, (image, label) in enumerate(zip(images, wanted, strict=True)):
            for kind in kinds if i % 2 == 0 else kinds[::-1]:
                start = time.perf_counter()
                reply = clients[kind].post("/run", json={"image": image})
                times[kind].append(time.perf_counter() - start)
                got = reply.json()["result"]["label"]
                if got != label:
                    raise SystemExit(f"wrong label from {kind}: {got} != {label}")
    finally:
        for client in clients.values():
            client.close()
    return times


def concurrent(url: str, images: list[list[float]], wanted: list[int], clients: int) -> float:
    """Requests/s of `clients` threads sending `images` (each checked)."""
    import httpx

    share = len(images) // clients

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for j in range(i * share, (i + 1) * share):
                got = client.post("/run", json={"image": images[j]}).json()["result"]["label"]
                if got != wanted[j]:
                    raise SystemExit(f"wrong label from {url}")

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))
    return share * clients / (time.perf_counter() - start)


def main() -> None:
    sys.path.insert(0, str(HERE.parent))
    from _common import Result, fresh_home, parser, report

    p = parser("Ephemeral workflow endpoint vs a minimal Starlette app", n=0, repeat=1)
    p.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    p.add_argument("--clients", type=int, default=16, help="client threads (concurrent)")
    args = p.parse_args()
    fresh_home(args.db_url, args.keep)

    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    model = LogisticRegression(max_iter=3000).fit(digits.data, digits.target)
    version = keel.register_model("b11-digits", model)
    keel.models.set_alias("b11-digits", "champion", version.version)
    picks = np.arange(args.requests) % len(digits.data)
    images = [digits.data[i].tolist() for i in picks]
    wanted = [int(x) for x in model.predict(digits.data[picks])]

    servers = {kind: Server(kind) for kind in ("floor", "keel")}
    try:
        for server in servers.values():
            server.wait_ready({"image": images[0]})
        urls = {kind: server.url for kind, server in servers.items()}
        sequential(urls, images[:200], wanted[:200])  # warm up
        times = sequential(urls, images, wanted)
        # Concurrent load in alternating rounds, for the same reason.
        rounds: dict[str, list[float]] = {kind: [] for kind in urls}
        chunk = max(args.clients, len(images) // 4)
        for r in range(4):
            part = slice(r * chunk, (r + 1) * chunk)
            for kind in urls if r % 2 == 0 else list(urls)[::-1]:
                rps = concurrent(urls[kind], images[part], wanted[part], args.clients)
                rounds[kind].append(rps)
    finally:
        for server in servers.values():
            server.stop()
    figures = {
        kind: {
            "p50": statistics.median(times[kind]) * 1000,
            "p99": percentile(times[kind], 0.99) * 1000,
            "rps": statistics.median(rounds[kind]),
        }
        for kind in urls
    }
    keel_f, floor_f = figures["keel"], figures["floor"]
    overhead = keel_f["p50"] - floor_f["p50"]
    lines = [
        (f"{kind} sequential p50 / p99", f"{f['p50']:.3f} / {f['p99']:.3f} ms")
        for kind, f in figures.items()
    ] + [
        (f"{kind} requests/s ({args.clients} clients)", f"{f['rps']:,.0f}")
        for kind, f in figures.items()
    ]
    lines.append(("ephemeral overhead per request (p50)", f"{overhead:.3f} ms"))
    results = [
        Result(
            "b11",
            "sequential p50 latency",
            keel_f["p50"],
            floor_f["p50"],
            f"overhead <= {TARGET_OVERHEAD_MS} ms",
            overhead <= TARGET_OVERHEAD_MS,
            unit="ms",
            baseline_name="starlette floor",
            extra={"overhead_ms": overhead},
        ),
        Result(
            "b11",
            f"requests/s, {args.clients} clients",
            keel_f["rps"],
            floor_f["rps"],
            "(reported)",
            None,
            unit="req/s",
            baseline_name="starlette floor",
        ),
    ]
    report(f"B11 serving workflows ({args.requests} requests)", lines, results, args.json)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2], int(sys.argv[4]))
    else:
        main()
