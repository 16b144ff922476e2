"""B11 serving: `keel serve` against `mlflow models serve --env-manager local`, Ray
Serve with `@serve.batch` (a minimal hand-written deployment) and a minimal Starlette
app that calls `predict` once per request (the thin-HTTP floor), on the same models,
on the same machine, in the same run.

The models are trained here on the digits: a LogisticRegression (cheap per call) and
a 100-tree RandomForest (costly per call, where batching pays). keel serves them from
a fresh store (`models:/b11-lr@champion`); mlflow from `mlflow.sklearn.save_model`
directories; Ray Serve and the floor from the same pickled objects. Each server runs
alone, in its own process, one after the other; every request is one row in the
MLflow scoring body `{"inputs": [[64 pixels]]}`.

Per server and model:
- cold start: from launching the process to the first 200 of `/invocations`;
- sequential single-row p50/p99 (one client, one kept-alive connection);
- requests/s with 1, 16 and 64 concurrent clients, from a separate load process: an
  asyncio client over raw keep-alive HTTP/1.1 (one connection per client), warmed up,
  then counting the 200s answered in a fixed window (any other status fails the run).

Targets (issue #10), at 64 clients: LogisticRegression >= 10x mlflow's requests/s and
>= 0.5x the floor's; RandomForest >= 2x the floor's and >= 1.5x Ray Serve's; keel's
cold start <= 2 s.

    python bench/b11_serving.py [--systems keel thin mlflow ray] [--models lr rf] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import Result, fresh_home, report

HERE = Path(__file__).resolve()
SYSTEMS = ("keel", "thin", "mlflow", "ray")
MODELS = ("lr", "rf")
CONCURRENCY = (1, 16, 64)
COLD_START_TARGET_S = 2.0
START_BOUND_S = 180.0  # a server that is not answering by then fails the run


# -- the models ------------------------------------------------------------------------


def train(kind: str) -> Any:
    from sklearn.datasets import load_digits
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    if kind == "lr":
        return LogisticRegression(max_iter=2000).fit(x, y)
    return RandomForestClassifier(n_estimators=100, random_state=0).fit(x, y)


def prepare(models: list[str], work: Path, systems: list[str]) -> dict[str, dict[str, Any]]:
    """Train each model and put it where each system loads it from."""
    import keel

    out: dict[str, dict[str, Any]] = {}
    for kind in models:
        model = train(kind)
        pickled = work / f"{kind}.pkl"
        pickled.write_bytes(pickle.dumps(model))
        entry: dict[str, Any] = {"pickle": str(pickled)}
        if "keel" in systems:
            version = keel.register_model(f"b11-{kind}", model)
            keel.models.set_alias(f"b11-{kind}", "champion", version.version)
            entry["keel"] = f"models:/b11-{kind}@champion"
        if "mlflow" in systems:
            import mlflow.sklearn

            path = work / f"mlflow-{kind}"
            # mlflow saves with skops, which asks to trust a forest's tree storage by
            # name (the model was trained here, a moment ago).
            trusted = ["sklearn.tree._tree.Tree"] if kind == "rf" else None
            mlflow.sklearn.save_model(model, str(path), skops_trusted_types=trusted)
            entry["mlflow"] = str(path)
        out[kind] = entry
    return out


def payload() -> bytes:
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    return json.dumps({"inputs": [x[7].tolist()]}).encode()


# -- the servers -----------------------------------------------------------------------


def thin_app(pickled: str) -> Any:
    """The floor: parse the body, one predict per request on the event loop, reply."""
    import numpy as np
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    model = pickle.loads(Path(pickled).read_bytes())

    async def invocations(request: Request) -> JSONResponse:
        rows = np.asarray(json.loads(await request.body())["inputs"], dtype=float)
        return JSONResponse({"predictions": model.predict(rows).tolist()})

    return Starlette(routes=[Route("/invocations", invocations, methods=["POST"])])


def serve_thin(pickled: str, port: int) -> None:
    import uvicorn

    uvicorn.run(thin_app(pickled), host="127.0.0.1", port=port, log_level="warning")


def serve_ray(pickled: str, port: int) -> None:
    """A minimal Ray Serve deployment: one replica, `@serve.batch` over single rows."""
    import numpy as np
    import ray
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(max_ongoing_requests=256)
    class Model:
        def __init__(self, path: str) -> None:
            self.model = pickle.loads(Path(path).read_bytes())

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
        async def predict(self, rows: list[list[float]]) -> list[Any]:
            return list(self.model.predict(np.asarray(rows, dtype=float)).tolist())

        async def __call__(self, request: Request) -> dict[str, Any]:
            row = (await request.json())["inputs"][0]
            return {"predictions": [await self.predict(row)]}

    # SIGTERM becomes an exit, so atexit shuts the local Ray cluster down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Model.bind(pickled), route_prefix="/invocations")
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(system: str, model: dict[str, Any], port: int) -> list[str]:
    py = sys.executable
    if system == "keel":
        return [py, "-m", "keel", "serve", model["keel"], "--port", str(port)]
    if system == "mlflow":
        return [py, "-m", "mlflow", "models", "serve", "-m", model["mlflow"],
                "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    return [py, str(HERE), "--serve", system, "--pickle", model["pickle"], "--port", str(port)]


class Server:
    def __init__(self, system: str, model: dict[str, Any], body: bytes, logs: Path) -> None:
        self.system = system
        self.log = logs / f"{system}-{Path(model['pickle']).stem}.log"
        self.port = free_port()
        # mlflow starts `uvicorn` by name: the interpreter's scripts come first on PATH.
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        start = time.perf_counter()
        # Its own session: at the end the whole group goes (Ray's and gunicorn's children).
        self.proc = subprocess.Popen(
            server_command(system, model, self.port),
            env=env,
            start_new_session=True,
            stdout=self.log.open("wb"),  # mlflow logs every request; shown on failure
            stderr=subprocess.STDOUT,
        )
        self.cold_start = start_first_200(self, body, start)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # what the group left behind
        except ProcessLookupError:
            pass
        self.proc.wait()


def start_first_200(server: Server, body: bytes, start: float) -> float:
    """Seconds from launch to the first 200 of /invocations (a bounded poll)."""
    while time.perf_counter() - start < START_BOUND_S:
        if server.proc.poll() is not None:
            print(server.log.read_text(errors="replace")[-3000:], file=sys.stderr)
            raise SystemExit(f"{server.system} exited with {server.proc.returncode} at start")
        try:
            status = asyncio.run(one_request(server.port, body))
        except OSError:
            status = 0
        if status == 200:
            return time.perf_counter() - start
        time.sleep(0.02)
    server.stop()
    print(server.log.read_text(errors="replace")[-3000:], file=sys.stderr)
    raise SystemExit(f"{server.system} did not answer 200 within {START_BOUND_S:.0f} s")


# -- the load (a separate process) -----------------------------------------------------


def request_bytes(port: int, body: bytes) -> bytes:
    head = (
        f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """The status of one response, read to its end; and whether the server closes."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).strip().split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status, headers.get("connection", "").lower() == "close"


async def one_request(port: int, body: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes(port, body))
        await writer.drain()
        return (await asyncio.wait_for(read_reply(reader), 60))[0]
    finally:
        writer.close()


async def load(
    port: int, body: bytes, clients: int, warmup: float, seconds: float
) -> dict[str, Any]:
    """`clients` connections each sending requests back to back; counts the 200s
    answered inside the measured window, with their latencies."""
    raw = request_bytes(port, body)
    clock = time.perf_counter  # uvloop's loop.time() has only millisecond resolution
    begin = clock() + warmup
    end = begin + seconds
    latencies: list[float] = []
    bad: list[int] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while clock() < end:
            sent = clock()
            writer.write(raw)
            status, closes = await read_reply(reader)
            done = clock()
            if status != 200:
                bad.append(status)
            elif begin <= sent and done <= end:
                latencies.append(done - sent)
            if closes:
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return {"count": len(latencies), "seconds": seconds, "latencies": latencies, "bad": bad}


def run_load(port: int, body: bytes, clients: int, warmup: float, seconds: float) -> dict[str, Any]:
    """The load in a separate process, so the client does not share the server's loop."""
    reply = subprocess.run(
        [
            sys.executable,
            str(HERE),
            "--load",
            str(port),
            "--clients",
            str(clients),
            "--warmup",
            str(warmup),
            "--seconds",
            str(seconds),
        ],
        input=body,
        capture_output=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(reply.stdout)
    if result["bad"]:
        raise SystemExit(f"non-200 answers: {sorted(set(result['bad']))}")
    return result


# -- measuring and reporting -----------------------------------------------------------


@dataclass
class Figures:
    cold_start: float
    p50_ms: float
    p99_ms: float
    rps: dict[int, float] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(
    system: str, model: dict[str, Any], body: bytes, warmup: float, seconds: float, logs: Path
) -> Figures:
    server = Server(system, model, body, logs)
    try:
        sequential = run_load(server.port, body, 1, warmup, seconds)
        lat = sequential["latencies"]
        figures = Figures(
            cold_start=server.cold_start,
            p50_ms=statistics.median(lat) * 1000,
            p99_ms=percentile(lat, 0.99) * 1000,
            rps={1: sequential["count"] / seconds},
        )
        for clients in CONCURRENCY[1:]:
            figures.rps[clients] = (
                run_load(server.port, body, clients, warmup, seconds)["count"] / seconds
            )
        print(
            f"  {system:<6} cold {figures.cold_start:6.2f} s | p50 {figures.p50_ms:7.2f} ms"
            f" p99 {figures.p99_ms:7.2f} ms | req/s "
            + "  ".join(f"c{c}: {r:7.1f}" for c, r in figures.rps.items()),
            flush=True,
        )
        return figures
    finally:
        server.stop()


def ratio_result(
    kind: str, keel: Figures, other: Figures | None, name: str, factor: float
) -> Result | None:
    if other is None:
        return None
    mine, theirs = keel.rps[64], other.rps[64]
    return Result(
        bench=f"B11 serve {kind}",
        metric="req/s at 64 clients",
        keel=mine,
        baseline=theirs,
        target=f">= {factor:g}x {name}",
        passed=mine >= factor * theirs,
        baseline_name=name,
    )


def results_for(kind: str, figs: dict[str, Figures]) -> list[Result]:
    keel = figs.get("keel")
    if keel is None:
        return []
    wanted = [("mlflow", 10.0), ("thin", 0.5)] if kind == "lr" else [("thin", 2.0), ("ray", 1.5)]
    out = [ratio_result(kind, keel, figs.get(name), name, factor) for name, factor in wanted]
    out.append(
        Result(
            bench=f"B11 serve {kind}",
            metric="cold start to first 200",
            keel=keel.cold_start,
            baseline=figs["thin"].cold_start if "thin" in figs else None,
            target=f"<= {COLD_START_TARGET_S:g} s",
            passed=keel.cold_start <= COLD_START_TARGET_S,
            unit="s",
            baseline_name="thin",
        )
    )
    return [r for r in out if r is not None]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--seconds", type=float, default=5.0, help="measured window per figure")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before it")
    p.add_argument("--quick", action="store_true", help="short windows (a smoke run)")
    p.add_argument("--keep", action="store_true", help="keep the temporary KEEL_HOME")
    p.add_argument("--json", default=None, help="append the results to this file as JSON lines")
    # internal: the server and load processes
    p.add_argument("--serve", choices=("thin", "ray"), help=argparse.SUPPRESS)
    p.add_argument("--pickle", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--load", type=int, help=argparse.SUPPRESS)
    p.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.systems = list(dict.fromkeys(args.systems))
    args.models = list(dict.fromkeys(args.models))

    if args.serve:
        (serve_thin if args.serve == "thin" else serve_ray)(args.pickle, args.port)
        return 0
    if args.load is not None:
        try:
            import uvloop

            uvloop.install()  # the client's own CPU cost is not what is measured
        except ImportError:
            pass
        body = sys.stdin.buffer.read()
        result = asyncio.run(load(args.load, body, args.clients, args.warmup, args.seconds))
        print(json.dumps(result))
        return 0

    if args.quick:
        args.seconds, args.warmup = 1.5, 0.5
    home = fresh_home(keep=args.keep)
    work = home / "b11"
    work.mkdir()
    # Every system logs as little as keel does by default.
    os.environ.setdefault("KEEL_SERVER_LOG_LEVEL", "warning")
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    models = prepare(args.models, work, args.systems)
    body = payload()
    load_avg = os.getloadavg()
    print(f"B11 serving: load average {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}")
    all_figs: dict[str, dict[str, Figures]] = {}
    results: list[Result] = []
    for kind in args.models:
        print(f"{kind}:", flush=True)
        figs = {
            s: measure(s, models[kind], body, args.warmup, args.seconds, work) for s in args.systems
        }
        all_figs[kind] = figs
        results += results_for(kind, figs)
    lines = [
        (
            f"{kind} {system}",
            f"cold {f.cold_start:.2f} s, p50 {f.p50_ms:.2f} ms, p99 {f.p99_ms:.2f} ms, req/s "
            + ", ".join(f"{c}: {r:.1f}" for c, r in f.rps.items()),
        )
        for kind, figs in all_figs.items()
        for system, f in figs.items()
    ]
    lines.append(("load average", " ".join(f"{v:.2f}" for v in load_avg)))
    report("B11 serving (single-row requests)", lines, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
