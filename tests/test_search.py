"""`keel.search_runs` over a sweep of 50 tracked runs (every operator, ordering,
quoting, bad filters, steps as rows), and the `keel experiments ls` / `keel runs
compare` commands. Each expectation is computed from the sweep's own data in
Python, so the assertions are exact ids in exact order."""

from __future__ import annotations

import getpass
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

import keel
from keel.cli.main import app
from keel.errors import TrackingError

N = 50
MODELS = ("svc", "rf", "knn")
RATES = (0.1, 0.01, 0.001, 0.5, 1.0)
TEAMS = ("vision", "NLP", "audio", "Vision")
FAILED = {3, 17}
CANCELLED = {5}


@dataclass
class Trial:
    i: int
    id: str
    name: str
    experiment: str
    status: str
    start: float
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


def _trial_data(i: int) -> tuple[dict[str, Any], dict[str, float], dict[str, str]]:
    params: dict[str, Any] = {"model": MODELS[i % 3], "lr": RATES[i % 5]}
    if i % 4:
        params["depth"] = i % 7
    metrics = {"accuracy": round(0.5 + i * 0.01, 4), "loss": (i * 37 % N) / 10}
    if i % 2 == 0:
        metrics["val loss"] = i / 100
    if i < 10:
        metrics["f1.macro"] = i / 10
    tags = {"team": TEAMS[i % 4]}
    if i == 7:
        tags["note"] = "it's 100% done"
    if i == 8:
        tags["note"] = "it's 1000 done"
    return params, metrics, tags


def _make_sweep() -> list[Trial]:
    trials = []
    for i in range(N):
        params, metrics, tags = _trial_data(i)
        try:
            with keel.start_run(experiment="sweep", run_name=f"trial-{i:02d}") as run:
                keel.log_params(params)
                keel.log_metrics(metrics)
                keel.set_tags(tags)
                if i in FAILED:
                    raise ValueError(f"trial {i} diverged")
                if i in CANCELLED:
                    raise KeyboardInterrupt
        except (ValueError, KeyboardInterrupt):
            pass
        status = "FAILED" if i in FAILED else "CANCELLED" if i in CANCELLED else "SUCCEEDED"
        trials.append(
            Trial(
                i,
                run.id,
                f"trial-{i:02d}",
                "sweep",
                status,
                0.0,
                {k: str(v) for k, v in params.items()},
                metrics,
                tags,
            )
        )
    # Two runs in another experiment, one of them with a higher accuracy than any above.
    for j in range(2):
        with keel.start_run(experiment="other", run_name=f"other-{j}") as run:
            keel.log_param("model", "svc")
            keel.log_metric("accuracy", 2.0 + j)
        trials.append(
            Trial(N + j, run.id, f"other-{j}", "other", "SUCCEEDED", 0.0, {"model": "svc"},
                  {"accuracy": 2.0 + j}, {})
        )  # fmt: skip
    store = keel.Client().store
    starts = {t.id: store.get_run(t.id).started_at for t in trials}  # exact, not via datetime
    for t in trials:
        t.start = starts[t.id]
    return trials


@pytest.fixture
def sweep(backend: str) -> list[Trial]:
    return _make_sweep()


def ids(filter: str = "", **kwargs: Any) -> list[str]:
    kwargs.setdefault("experiments", "sweep")
    records = keel.search_runs(filter=filter, output_format="list", **kwargs)
    return [r["run_id"] for r in records]


def newest_first(trials: list[Trial], keep: Callable[[Trial], bool]) -> list[str]:
    """The default order: by recorded start time, newest first, then by id (descending)."""
    return [t.id for t in sorted(trials, key=lambda t: (t.start, t.id), reverse=True) if keep(t)]


def oldest_first(trials: list[Trial]) -> list[str]:
    """`attributes.start_time ASC`: ties (the same start time) keep the id descending."""
    by_id = sorted(trials, key=lambda t: t.id, reverse=True)
    return [t.id for t in sorted(by_id, key=lambda t: t.start)]


def in_sweep(trials: list[Trial]) -> list[Trial]:
    return [t for t in trials if t.experiment == "sweep"]


# -- filters ----------------------------------------------------------------------------------

FILTERS: list[tuple[str, Callable[[Trial], bool]]] = [
    ("", lambda t: True),
    ("   ", lambda t: True),
    # metrics: every comparison, on latest values
    ("metrics.accuracy > 0.9", lambda t: t.metrics["accuracy"] > 0.9),
    ("metrics.accuracy >= 0.9", lambda t: t.metrics["accuracy"] >= 0.9),
    ("metrics.accuracy < 0.55", lambda t: t.metrics["accuracy"] < 0.55),
    ("metrics.accuracy <= 0.55", lambda t: t.metrics["accuracy"] <= 0.55),
    ("metrics.accuracy = 0.6", lambda t: t.metrics["accuracy"] == 0.6),
    ("metrics.accuracy == 0.6", lambda t: t.metrics["accuracy"] == 0.6),
    ("metrics.loss != 0", lambda t: t.metrics["loss"] != 0),
    ("metrics.loss <> 0", lambda t: t.metrics["loss"] != 0),
    ("metrics.loss > -1e3", lambda t: True),
    ("metrics.loss<.5", lambda t: t.metrics["loss"] < 0.5),
    # a condition on a key only matches runs that have it
    ("metrics.`val loss` >= 0", lambda t: "val loss" in t.metrics),
    ('metrics."val loss" < 0.1', lambda t: t.metrics.get("val loss", 1) < 0.1),
    ("metrics.`f1.macro` > 0.5", lambda t: t.metrics.get("f1.macro", 0) > 0.5),
    ("metrics.f1.macro > 0.5", lambda t: t.metrics.get("f1.macro", 0) > 0.5),
    ("metric.accuracy > 0.95", lambda t: t.metrics["accuracy"] > 0.95),
    # params: text
    ("params.model = 'svc'", lambda t: t.params["model"] == "svc"),
    ('params.model = "svc"', lambda t: t.params["model"] == "svc"),
    ("params.model != 'svc'", lambda t: t.params["model"] != "svc"),
    ("params.model IN ('svc', 'knn')", lambda t: t.params["model"] in ("svc", "knn")),
    ("params.model not in ('svc', 'knn')", lambda t: t.params["model"] not in ("svc", "knn")),
    ("params.model LIKE '%v%'", lambda t: "v" in t.params["model"]),
    ("params.model NOT LIKE 's%'", lambda t: not t.params["model"].startswith("s")),
    ("params.model LIKE 'SV_'", lambda t: False),  # LIKE is case-sensitive
    ("params.model ILIKE 'SV_'", lambda t: t.params["model"] == "svc"),
    ("params.model > 'r'", lambda t: t.params["model"] > "r"),
    ("params.model <= 'knn'", lambda t: t.params["model"] <= "knn"),
    ("params.lr = 0.01", lambda t: t.params["lr"] == "0.01"),  # numbers compare as written
    ("params.lr = '1.0'", lambda t: t.params["lr"] == "1.0"),
    ("params.lr = 1", lambda t: False),  # '1.0' is not '1'
    ("params.lr IN (0.1, 0.5)", lambda t: t.params["lr"] in ("0.1", "0.5")),
    ("params.depth = '3'", lambda t: t.params.get("depth") == "3"),
    ("params.depth != '3'", lambda t: "depth" in t.params and t.params["depth"] != "3"),
    ("param.depth >= '5'", lambda t: t.params.get("depth", "") >= "5"),
    # tags
    ("tags.team = 'vision'", lambda t: t.tags["team"] == "vision"),
    ("tags.team ILIKE 'vision'", lambda t: t.tags["team"].lower() == "vision"),
    ("tags.team LIKE 'V%'", lambda t: t.tags["team"].startswith("V")),
    ("tags.team < 'a'", lambda t: t.tags["team"] < "a"),  # byte order: 'Vision' < 'audio'
    ("tags.note = 'it''s 100% done'", lambda t: t.tags.get("note") == "it's 100% done"),
    ("tags.note LIKE 'it\\'s 100\\%%'", lambda t: t.tags.get("note") == "it's 100% done"),
    ("tags.note LIKE '%100%'", lambda t: "100" in t.tags.get("note", "")),
    ("tags.note LIKE '%1000%'", lambda t: "1000" in t.tags.get("note", "")),
    ("tags.note LIKE 'it_s%'", lambda t: "note" in t.tags),
    # attributes
    ("attributes.status = 'FAILED'", lambda t: t.status == "FAILED"),
    ("attributes.status = 'failed'", lambda t: t.status == "FAILED"),
    ("attributes.status = 'FINISHED'", lambda t: t.status == "SUCCEEDED"),  # MLflow's name
    ("attributes.status = 'KILLED'", lambda t: t.status == "CANCELLED"),
    ("attributes.status != 'SUCCEEDED'", lambda t: t.status != "SUCCEEDED"),
    (
        "attributes.status IN ('FAILED', 'CANCELLED')",
        lambda t: t.status in ("FAILED", "CANCELLED"),
    ),
    ("attribute.run_name LIKE 'trial-1%'", lambda t: t.name.startswith("trial-1")),
    ("attributes.run_name = 'trial-07'", lambda t: t.i == 7),
    ("attributes.kind = 'tracking'", lambda t: True),
    ("attributes.kind = 'workflow'", lambda t: False),
    ("attributes.end_time > 0", lambda t: True),
    ("attributes.start_time < '2000-01-01'", lambda t: False),
    ("attributes.start_time >= '2000-01-01T00:00:00+00:00'", lambda t: True),
    # and / or / parentheses
    (
        "metrics.accuracy > 0.9 and params.model = 'svc'",
        lambda t: t.metrics["accuracy"] > 0.9 and t.params["model"] == "svc",
    ),
    (
        "metrics.accuracy > 0.9 AND params.model = 'svc' and tags.team = 'NLP'",
        lambda t: (
            t.metrics["accuracy"] > 0.9 and t.params["model"] == "svc" and t.tags["team"] == "NLP"
        ),
    ),
    (
        "params.model = 'svc' or params.model = 'rf' and metrics.accuracy < 0.6",
        lambda t: (
            t.params["model"] == "svc"
            or (t.params["model"] == "rf" and t.metrics["accuracy"] < 0.6)
        ),
    ),
    (
        "(params.model = 'svc' or params.model = 'rf') and metrics.accuracy < 0.6",
        lambda t: t.params["model"] in ("svc", "rf") and t.metrics["accuracy"] < 0.6,
    ),
    (
        "((tags.team = 'audio')) OR (metrics.loss = 0 or attributes.status = 'FAILED')",
        lambda t: t.tags["team"] == "audio" or t.metrics["loss"] == 0 or t.status == "FAILED",
    ),
]


def test_filters_select_exactly_the_matching_runs(sweep: list[Trial]) -> None:
    trials = in_sweep(sweep)
    for text, keep in FILTERS:
        assert ids(text) == newest_first(trials, keep), text


def test_filter_on_run_id_and_start_time(sweep: list[Trial]) -> None:
    trials = in_sweep(sweep)
    pivot = trials[25]
    assert ids(f"attributes.run_id = '{pivot.id}'") == [pivot.id]
    assert ids(f"attributes.id IN ('{pivot.id}', '{trials[0].id}')") == [pivot.id, trials[0].id]
    later = newest_first(trials, lambda t: t.start > pivot.start)
    assert ids(f"attributes.start_time > {pivot.start!r}") == later
    assert ids(f"attributes.start_time >= {pivot.start!r}") == [*later, pivot.id]
    everyone = newest_first(trials, lambda t: True)
    assert ids(f"attributes.user = '{getpass.getuser()}'") == everyone
    assert ids("attributes.user_id != 'somebody else'") == everyone


# -- ordering, limits, output -----------------------------------------------------------------


def _ordered(trials: list[Trial], key: Callable[[Trial], Any], reverse: bool) -> list[str]:
    ties = sorted(trials, key=lambda t: (t.start, t.id), reverse=True)  # ties: newest first
    return [t.id for t in sorted(ties, key=key, reverse=reverse)]


def test_order_by(sweep: list[Trial]) -> None:
    trials = in_sweep(sweep)
    assert ids(order_by=["metrics.accuracy DESC"]) == _ordered(
        trials, lambda t: t.metrics["accuracy"], True
    )
    assert ids(order_by=["metrics.loss"]) == _ordered(trials, lambda t: t.metrics["loss"], False)
    assert ids(order_by=["metrics.loss asc"]) == ids(order_by=["metrics.loss"])
    assert ids(order_by=["attributes.start_time ASC"]) == oldest_first(trials)
    assert ids(order_by=["attributes.start_time DESC"]) == newest_first(trials, lambda t: True)
    # several keys: model (text), then accuracy descending within a model
    assert ids(order_by=["params.model", "metrics.accuracy DESC"]) == _ordered(
        trials, lambda t: (t.params["model"], -t.metrics["accuracy"]), False
    )
    # text sorts by code point on every database: 'NLP' < 'Vision' < 'audio' < 'vision'
    by_team = ids(order_by=["tags.team", "attributes.run_name"])
    assert by_team == _ordered(trials, lambda t: (t.tags["team"], t.name), False)
    # runs missing the key come last, whichever the direction
    for direction in ("ASC", "DESC"):
        got = ids(order_by=[f"metrics.`val loss` {direction}"])
        having = [t for t in trials if "val loss" in t.metrics]
        missing = newest_first(trials, lambda t: "val loss" not in t.metrics)
        assert got == _ordered(having, lambda t: t.metrics["val loss"], direction == "DESC") + (
            missing
        )
    # filter + order + limit, all in one query
    got = ids(
        "params.model = 'svc' and attributes.status = 'SUCCEEDED'",
        order_by=["metrics.accuracy DESC"],
        max_results=3,
    )
    best = [t for t in trials if t.params["model"] == "svc" and t.status == "SUCCEEDED"]
    assert got == _ordered(best, lambda t: t.metrics["accuracy"], True)[:3]


def test_max_results_and_list_records(sweep: list[Trial]) -> None:
    trials = in_sweep(sweep)
    assert ids(max_results=1) == newest_first(trials, lambda t: True)[:1]
    assert ids(max_results=10) == newest_first(trials, lambda t: True)[:10]
    assert len(ids(max_results=10_000)) == N
    seventh = keel.search_runs(
        "sweep", filter="attributes.run_name = 'trial-07'", output_format="list"
    )
    assert seventh == [
        {
            "run_id": trials[7].id,
            "experiment": "sweep",
            "run_name": "trial-07",
            "status": "SUCCEEDED",
            "kind": "tracking",
            "start_time": seventh[0]["start_time"],
            "end_time": seventh[0]["end_time"],
            "params": {"model": "rf", "lr": "0.001", "depth": "0"},
            "metrics": {"accuracy": 0.57, "loss": 0.9, "f1.macro": 0.7},
            "tags": {"team": "Vision", "note": "it's 100% done"},
        }
    ]
    start, end = seventh[0]["start_time"], seventh[0]["end_time"]
    assert start.tzinfo is not None and abs(start.timestamp() - trials[7].start) < 1e-5
    assert end is not None and end >= start


def test_dataframe_output(sweep: list[Trial]) -> None:
    frame = keel.search_runs("sweep", order_by=["metrics.accuracy"])  # in sweep order
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == [
        "run_id",
        "experiment",
        "run_name",
        "status",
        "kind",
        "start_time",
        "end_time",
        "params.depth",
        "params.lr",
        "params.model",
        "metrics.accuracy",
        "metrics.f1.macro",
        "metrics.loss",
        "metrics.val loss",
        "tags.note",
        "tags.team",
    ]
    assert list(frame["run_id"]) == [t.id for t in in_sweep(sweep)]
    assert isinstance(frame["start_time"].dtype, pd.DatetimeTZDtype)
    assert str(frame["start_time"].dt.tz) == "UTC"
    assert frame["metrics.accuracy"].tolist() == [t.metrics["accuracy"] for t in in_sweep(sweep)]
    # a run without the key: NaN for metrics, None for params and tags
    assert math.isnan(frame.loc[1, "metrics.val loss"])
    assert pd.isna(frame.loc[0, "params.depth"])
    assert frame.loc[1, "params.depth"] == "1"
    assert frame.loc[3, "status"] == "FAILED"
    assert frame.loc[5, "status"] == "CANCELLED"
    empty = keel.search_runs("sweep", filter="metrics.accuracy > 100")
    assert empty.empty
    assert list(empty.columns)[:7] == [
        "run_id",
        "experiment",
        "run_name",
        "status",
        "kind",
        "start_time",
        "end_time",
    ]


def test_experiment_selection(sweep: list[Trial]) -> None:
    every = newest_first(sweep, lambda t: True)
    assert ids(experiments=None) == every
    assert ids(experiments=["sweep", "other"]) == every
    assert ids(experiments="other") == newest_first(sweep, lambda t: t.experiment == "other")
    assert ids("metrics.accuracy > 1", experiments=None, order_by=["metrics.accuracy"]) == [
        sweep[N].id,
        sweep[N + 1].id,
    ]
    with pytest.raises(TrackingError, match="no experiment named 'nope'") as info:
        keel.search_runs("nope")
    assert "other" in str(info.value) and "sweep" in str(info.value)
    with pytest.raises(TrackingError, match="no experiment named 'nope'"):
        keel.search_runs(["sweep", "nope"])


def test_search_sees_what_an_open_run_logged(backend: str) -> None:
    with keel.start_run(experiment="live") as run:
        keel.log_metric("loss", 0.25)
        found = keel.search_runs("live", filter="metrics.loss < 1", output_format="list")
        assert [r["run_id"] for r in found] == [run.id]
        assert found[0]["status"] == "RUNNING" and found[0]["end_time"] is None
        assert keel.search_runs("live", filter="attributes.end_time > 0").empty


def test_nan_and_infinite_metrics_in_filters(backend: str) -> None:
    made = {}
    for name, value in (("nan", math.nan), ("inf", math.inf), ("minf", -math.inf), ("one", 1.0)):
        with keel.start_run(experiment="odd", run_name=name) as run:
            keel.log_metric("m", value)
        made[name] = run.id

    def names(filter: str, order_by: list[str] | None = None) -> list[str]:
        found = keel.search_runs("odd", filter=filter, order_by=order_by, output_format="list")
        return [r["run_name"] for r in found]

    assert names("metrics.m > 1e300") == ["inf"]
    assert names("metrics.m < 0") == ["minf"]
    assert names("metrics.m >= -1e300 and metrics.m <= 1e300") == ["one"]
    by_name = ["attributes.run_name"]
    assert names("metrics.m != 1", by_name) == ["inf", "minf", "nan"]  # NaN differs from all
    assert names("metrics.m = 1") == ["one"]
    assert names("", order_by=["metrics.m DESC"]) == ["inf", "one", "minf", "nan"]
    value = keel.search_runs("odd", filter="attributes.run_name = 'nan'")["metrics.m"][0]
    assert math.isnan(value)


# -- bad input -----------------------------------------------------------------------------------

BAD_FILTERS = [
    # (filter, column, token named in the message, words in the message)
    ("metrics.accurac y > 0.9", 17, "'y'", "expected an operator"),
    ("accuracy > 0.9", 1, "'accuracy'", "expected metrics.<key>"),
    ("metrics.accuracy > 'high'", 20, "\"'high'\"", "expected a number"),
    ("metrics.accuracy LIKE '0.9%'", 18, "'LIKE'", "is a number"),
    ("metrics.accuracy IN (1, 2)", 18, "'IN'", "is a number"),
    ("metrics.accuracy >", 19, "end of the filter", "expected a number"),
    ("metrics.accuracy > 0.9 and", 27, "end of the filter", "expected a condition"),
    ("metrics.accuracy > 0.9 params.model = 'a'", 24, "'params.model'", "expected 'and', 'or'"),
    ("params.model = 'svc", 16, '"\'svc"', "no closing '"),
    ("params.model = svc", 16, "'svc'", "expected a quoted value"),
    ("params.model LIKE 5", 19, "'5'", "quoted pattern"),
    ("params.model IN 'a'", 17, "\"'a'\"", "expected a list in parentheses"),
    ("params.model IN ('a' 'b')", 22, "\"'b'\"", "expected ',' or ')'"),
    ("params.model NOT = 'a'", 18, "'='", "expected LIKE, ILIKE or IN after NOT"),
    ("paramz.model = 'a'", 1, "'paramz.model'", "unknown kind of key 'paramz'"),
    ("attributes.colour = 'red'", 1, "'attributes.colour'", "unknown attribute 'colour'"),
    ("attributes.start_time > 'yesterday'", 25, "\"'yesterday'\"", "expected a date"),
    ("attributes.start_time LIKE '2026%'", 23, "'LIKE'", "is a time"),
    ("(metrics.a > 1", 15, "end of the filter", "expected ')'"),
    ("metrics.a > 1)", 14, "')'", "has no matching '('"),
    ("metrics.a > 1 ; drop table keel_runs", 15, "';'", "unexpected character"),
    ("metrics. > 1", 1, "'metrics.'", "must be followed by a key"),
    ("metrics.`val loss > 1", 9, "'`val loss > 1'", "no closing `"),
    ("metrics.a = = 1", 13, "'='", "expected a number"),
    ("and", 1, "'and'", "expected a condition"),
    ("()", 2, "')'", "expected a condition"),
]


@pytest.mark.parametrize(("text", "column", "near", "words"), BAD_FILTERS)
def test_bad_filters_name_the_token(text: str, column: int, near: str, words: str) -> None:
    with pytest.raises(TrackingError) as info:
        keel.search_runs(filter=text)
    message = str(info.value)
    assert message.startswith(f"filter error at column {column} "), message
    assert near in message.splitlines()[0], message
    assert words in message, message


def test_bad_arguments() -> None:
    with pytest.raises(TrackingError, match="order_by error at column 18 near 'upwards'"):
        keel.search_runs(order_by=["metrics.accuracy upwards"])
    with pytest.raises(TrackingError, match="unknown kind of key 'metricz'"):
        keel.search_runs(order_by=["metricz.accuracy"])
    with pytest.raises(TrackingError, match="order_by must be a list"):
        keel.search_runs(order_by="metrics.accuracy")  # type: ignore[arg-type]
    with pytest.raises(TrackingError, match="expected a key"):
        keel.search_runs(order_by=[""])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(TrackingError, match="max_results"):
            keel.search_runs(max_results=bad)  # type: ignore[arg-type]
    with pytest.raises(TrackingError, match="output_format"):
        keel.search_runs(output_format="json")  # type: ignore[arg-type]
    with pytest.raises(TrackingError, match="filter must be a string"):
        keel.search_runs(filter=None)  # type: ignore[arg-type]
    with pytest.raises(TrackingError, match="experiments must be names"):
        keel.search_runs(experiments=[3.5])  # type: ignore[list-item]


# -- steps as rows -------------------------------------------------------------------------------


@keel.task(name="search_fit")
def fit(c: float) -> float:
    keel.log_param("c", c)
    keel.log_metric("val_acc", c / 10)
    return c / 10


@keel.task(name="search_report")
def report_best(scores: list[float]) -> float:
    keel.log_metric("best", max(scores))
    return max(scores)


@keel.workflow(name="search_grid", experiment="grid-search")
def grid(cs: list[float]) -> float:
    keel.log_metric("n_candidates", len(cs))
    return report_best(fit.map(cs))


def test_include_steps(backend: str) -> None:
    first = keel.run(grid, cs=[1.0, 2.0, 3.0]).id
    second = keel.run(grid, cs=[4.0]).id
    runs_only = keel.search_runs("grid-search", output_format="list")
    assert [r["run_id"] for r in runs_only] == [second, first]
    assert runs_only[0]["kind"] == "workflow" and runs_only[0]["run_name"] == "search_grid"
    assert runs_only[0]["params"] == {"cs": "[4.0]"}
    assert runs_only[0]["metrics"] == {"n_candidates": 1.0}
    assert "step_key" not in runs_only[0]

    rows = keel.search_runs(
        "grid-search", include_steps=True, order_by=["attributes.start_time"], output_format="list"
    )
    keys = [(r["run_id"], r["step_key"]) for r in rows]
    # A run starts before its steps; steps mapped together may start in any order.
    assert keys[0] == (first, None) and keys[5] == (second, None)
    assert set(keys[1:5]) == {
        (first, "search_fit-0"),
        (first, "search_fit-1"),
        (first, "search_fit-2"),
        (first, "search_report-3"),
    }
    assert keys[5:] in ([(second, None), (second, "search_fit-0"), (second, "search_report-1")],)
    by_key = {(r["run_id"], r["step_key"]): r for r in rows}
    step = by_key[(first, "search_fit-1")]
    assert step["kind"] == "step" and step["run_name"] == "search_fit"
    assert step["status"] == "SUCCEEDED"
    assert step["params"] == {"c": "2.0"} and step["metrics"] == {"val_acc": 0.2}
    assert len(rows) == 8

    def found(filter: str, **kwargs: Any) -> list[tuple[str, str | None]]:
        got = keel.search_runs(
            "grid-search", filter=filter, include_steps=True, output_format="list", **kwargs
        )
        return [(r["run_id"], r["step_key"]) for r in got]

    assert found("metrics.val_acc >= 0.2", order_by=["metrics.val_acc DESC"]) == [
        (second, "search_fit-0"),
        (first, "search_fit-2"),
        (first, "search_fit-1"),
    ]
    assert found("attributes.kind = 'workflow'") == [(second, None), (first, None)]
    assert found("attributes.run_name = 'search_report'", order_by=["attributes.start_time"]) == [
        (first, "search_report-3"),
        (second, "search_report-1"),
    ]
    assert found("attributes.step_key LIKE 'search_fit-%' and params.c = '3.0'") == [
        (first, "search_fit-2")
    ]
    assert found("metrics.n_candidates > 0", order_by=["attributes.start_time"]) == [
        (first, None),
        (second, None),
    ]
    frame = keel.search_runs("grid-search", include_steps=True, max_results=2)
    assert list(frame.columns[:3]) == ["run_id", "step_key", "experiment"]
    assert len(frame) == 2


# -- the CLI ------------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return subprocess.CompletedProcess(
        ["keel", *args], result.exit_code, result.stdout, result.stderr
    )


def test_experiments_ls(backend: str) -> None:
    assert "no experiments" in cli("experiments", "ls").stdout
    keel.run(grid, cs=[1.0])
    keel.run(grid, cs=[2.0])
    with keel.start_run(experiment="notebook"):
        keel.log_metric("x", 1)
    out = cli("experiments", "ls")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split() == ["ID", "NAME", "RUNS", "LAST", "RUN"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[1], r[2]) for r in rows] == [("grid-search", "2"), ("notebook", "1")]
    assert all(len(r) == 5 for r in rows)  # id, name, runs, date, time


def _compare_runs() -> tuple[str, str, str]:
    ids = []
    for i, (model, acc) in enumerate((("svc", 0.9), ("svc", 0.95), ("rf", 0.9))):
        with keel.start_run(experiment="cmp", run_name=f"cmp-{i}") as run:
            keel.log_params({"model": model, "seed": 7})
            keel.log_metrics({"accuracy": acc, "loss": 0.1})
            if i == 2:
                keel.log_metric("extra", 1.5)
        ids.append(run.id)
    return ids[0], ids[1], ids[2]


def _row(stdout: str, key: str) -> list[str]:
    for line in stdout.splitlines():
        words = line.split()
        if key in words:
            return words
    raise AssertionError(f"no row {key!r} in\n{stdout}")


def test_runs_compare(backend: str) -> None:
    a, b, c = _compare_runs()
    out = cli("runs", "compare", a, b, c[:12])
    assert out.returncode == 0, out.stderr
    for run_id in (a, b, c):
        assert run_id in out.stdout
    assert _row(out.stdout, "model") == ["*", "model", "svc", "svc", "rf"]
    assert _row(out.stdout, "seed") == ["seed", "7", "7", "7"]  # equal: shown, not marked
    assert _row(out.stdout, "accuracy") == ["*", "accuracy", "0.9", "0.95", "0.9"]
    assert _row(out.stdout, "loss") == ["loss", "0.1", "0.1", "0.1"]
    assert _row(out.stdout, "extra") == ["*", "extra", "-", "-", "1.5"]
    assert "3 of the compared values differ" in out.stdout

    diff = cli("runs", "compare", a, b, c, "--diff-only")
    assert "seed" not in diff.stdout and "loss" not in diff.stdout
    assert _row(diff.stdout, "accuracy") == ["*", "accuracy", "0.9", "0.95", "0.9"]

    only = cli("runs", "compare", a, b, "--metric", "loss")
    assert "accuracy" not in only.stdout and "extra" not in only.stdout
    assert _row(only.stdout, "loss") == ["loss", "0.1", "0.1"]
    assert _row(only.stdout, "model") == ["model", "svc", "svc"]

    same = cli("runs", "compare", a, b, "--diff-only", "-m", "loss")
    assert same.returncode == 0
    assert same.stdout.startswith("no params or metrics differ in runs")


def test_runs_compare_shows_step_values(backend: str) -> None:
    first = keel.run(grid, cs=[1.0, 2.0]).id
    second = keel.run(grid, cs=[1.0, 3.0]).id
    out = cli("runs", "compare", first, second)
    assert out.returncode == 0, out.stderr
    assert _row(out.stdout, "n_candidates") == ["n_candidates", "2", "2"]
    fit0 = [w for w in out.stdout.splitlines() if "search_fit-0" in w and "val_acc" in w]
    fit1 = [w for w in out.stdout.splitlines() if "search_fit-1" in w and "val_acc" in w]
    assert fit0 and fit0[0].split()[-2:] == ["0.1", "0.1"] and not fit0[0].startswith("*")
    assert fit1 and fit1[0].split()[-2:] == ["0.2", "0.3"] and fit1[0].startswith("*")


def test_runs_compare_errors(backend: str) -> None:
    a, b, _ = _compare_runs()
    unknown = cli("runs", "compare", a, "zzzzzz")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: no run with id 'zzzzzz'")
    assert len(unknown.stderr.strip().splitlines()) == 1
    one = cli("runs", "compare", a)
    assert one.returncode == 2 and "at least two runs" in one.stderr
    # as users run it: a real process, one error line, no traceback
    proc = subprocess.run(
        [sys.executable, "-m", "keel", "runs", "compare", b, "nope"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "no run with id 'nope'" in proc.stderr and "Traceback" not in proc.stderr
