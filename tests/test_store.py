"""The store: serializers chosen by type, the content-addressed artifact store, the
inline limit, lineage, pluggable serializers and the metadata store itself."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

import keel
from keel.errors import RunNotFoundError, SerializationError
from keel.store.config import StoreConfig
from keel.store.metadata import Batch, MetadataStore, open_store
from keel.store.serializers import decode, encode, register_serializer, serializer_for
from keel.store.values import content_digest, store_value

# -- serializers, unit level ------------------------------------------------------------------


class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    __hash__ = None  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("value", "serializer"),
    [
        ({"a": [1, 2.5, None, True, "x"], "b": {"c": []}}, "json"),
        ([1, "two", 3.0], "json"),
        ("text", "json"),
        (12345678901234567890, "json"),
        (None, "json"),
        ((1, 2), "cloudpickle"),  # JSON would turn the tuple into a list
        ({1: "int key"}, "cloudpickle"),  # JSON would turn the key into a string
        ({"nested": (1, 2)}, "cloudpickle"),
        ({1, 2, 3}, "cloudpickle"),
        (b"bytes", "cloudpickle"),
        (dt.date(2024, 1, 2), "cloudpickle"),
        (Decimal("1.10"), "cloudpickle"),
        (Point(1, 2), "cloudpickle"),
        (np.arange(6, dtype=np.int32).reshape(2, 3), "numpy"),
        (np.array(["a", "bc"]), "numpy"),
        (np.array([{"a": 1}, None], dtype=object), "cloudpickle"),
        (np.float64(1.5), "cloudpickle"),
        (pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}), "parquet"),
        (pd.DataFrame({0: [1, 2]}), "cloudpickle"),  # parquet needs string column names
        (pd.Series([1, 2]), "cloudpickle"),
    ],
)
def test_serializer_chosen_by_type_and_round_trip(value: Any, serializer: str) -> None:
    enc = encode(value)
    assert enc.serializer == serializer
    back = decode(enc.serializer, enc.data)
    assert type(back) is type(value)
    if isinstance(value, np.ndarray):
        assert back.dtype == value.dtype
        if value.dtype != object:
            np.testing.assert_array_equal(back, value)
        else:
            assert back.tolist() == value.tolist()
    elif isinstance(value, pd.DataFrame):
        pd.testing.assert_frame_equal(back, value)
    elif isinstance(value, pd.Series):
        pd.testing.assert_series_equal(back, value)
    else:
        assert back == value


def test_unserializable_value_names_what_and_type() -> None:
    with pytest.raises(SerializationError) as info:
        encode(threading.Lock(), describe=lambda: "output of step s-1")
    text = str(info.value)
    assert "output of step s-1" in text
    assert "lock" in text.lower()


def test_decode_with_unknown_serializer() -> None:
    with pytest.raises(SerializationError, match="no serializer named 'nope'"):
        decode("nope", b"")


def test_content_digest_covers_serializer_and_bytes() -> None:
    data = b"[1,2]"
    assert content_digest("json", data) == hashlib.sha256(b"json\0" + data).hexdigest()
    assert content_digest("json", data) != content_digest("cloudpickle", data)


# -- pluggable serializers ------------------------------------------------------------------


class Celsius:
    def __init__(self, degrees: float) -> None:
        self.degrees = degrees


class CelsiusSerializer:
    name = "test-celsius"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, Celsius)

    def dumps(self, value: Any) -> bytes:
        return f"{value.degrees}C".encode()

    def loads(self, data: bytes) -> Any:
        return Celsius(float(data.decode().removesuffix("C")))


register_serializer(CelsiusSerializer())  # once per process, at import


def test_register_serializer(backend: str) -> None:
    assert serializer_for(Celsius(1.0)).name == "test-celsius"
    assert serializer_for({"plain": 1}).name == "json"  # others are unaffected

    @keel.task(name="store_temperature")
    def temperature(d: float) -> Celsius:
        return Celsius(d)

    @keel.task(name="store_warmer")
    def warmer(c: Celsius) -> Celsius:
        return Celsius(c.degrees + 1)

    @keel.workflow(name="store_temperature_wf")
    def wf(d: float) -> float:
        return warmer(temperature(d)).degrees

    handle = keel.run(wf, d=20.5)
    assert handle.result() == 21.5
    step = keel.Client().run(handle.id).steps[0]
    assert step.serializer == "test-celsius"
    assert step.output_bytes() == b"20.5C"
    assert step.output().degrees == 20.5

    with pytest.raises(SerializationError, match="already registered"):
        register_serializer(CelsiusSerializer())


# -- values of steps, inline and in the artifact store ------------------------------------------


@keel.task(name="store_make")
def make(kind: str, n: int) -> Any:
    if kind == "list":
        return list(range(n))
    if kind == "tuple":
        return tuple(range(n))
    if kind == "array":
        return np.arange(n, dtype=np.float32)
    if kind == "frame":
        return pd.DataFrame({"i": range(n), "s": [str(i) for i in range(n)]})
    if kind == "object":
        return Point(n, -n)
    raise AssertionError(kind)


@keel.task(name="store_describe")
def describe_value(value: Any) -> str:
    return type(value).__name__


@keel.workflow(name="store_values")
def values(n: int) -> list[str]:
    made = [make.submit(kind, n) for kind in ("list", "tuple", "array", "frame", "object")]
    return [describe_value(m) for m in made]


def test_step_outputs_are_recorded_with_their_serializer(backend: str) -> None:
    handle = keel.run(values, n=3)
    assert handle.result() == ["list", "tuple", "ndarray", "DataFrame", "Point"]
    run = keel.Client().run(handle.id)
    made = run.steps[:5]
    assert [s.serializer for s in made] == [
        "json",
        "cloudpickle",
        "numpy",
        "parquet",
        "cloudpickle",
    ]
    assert made[0].output() == [0, 1, 2]
    assert made[1].output() == (0, 1, 2)
    np.testing.assert_array_equal(made[2].output(), np.arange(3, dtype=np.float32))
    pd.testing.assert_frame_equal(
        made[3].output(), pd.DataFrame({"i": range(3), "s": ["0", "1", "2"]})
    )
    assert made[4].output() == Point(3, -3)
    assert made[2].output_type == "numpy.ndarray"
    assert made[0].output_type == "list"
    # Small values live inline in the metadata row.
    assert all(s.output_ref is None for s in made[:2])


def _artifact_files(home: Path) -> list[Path]:
    root = home / "artifacts"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_large_values_go_to_the_artifact_store(
    backend: str, keel_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_INLINE_LIMIT", "256")

    @keel.workflow(name="store_big")
    def big(n: int) -> list[Any]:
        # Two steps with the same large output, one with a different one, one small.
        return keel.gather(
            make.submit("list", n),
            make.submit("list", n),
            make.submit("array", n),
            make.submit("list", 3),
        )

    handle = keel.run(big, n=400)
    result = handle.result()
    assert result[0] == list(range(400)) and result[3] == [0, 1, 2]
    run = keel.Client().run(handle.id)
    same_a, same_b, array, small = run.steps
    assert small.output_ref is None
    assert same_a.output_ref is not None
    assert same_a.output_ref == same_b.output_ref  # identical outputs share one blob
    assert array.output_ref not in (None, same_a.output_ref)

    files = _artifact_files(keel_home)
    names = {p.name for p in files}
    # One blob per distinct large value (plus, maybe, the workflow's own result).
    assert {same_a.output_ref, array.output_ref} <= names
    for path in files:
        data = path.read_bytes()
        serializer = next(
            s
            for s in ("json", "numpy", "cloudpickle", "parquet")
            if content_digest(s, data) == path.name
        )
        assert path.parent.name == path.name[:2]
        assert serializer
    assert (
        same_a.output_bytes()
        == (keel_home / "artifacts" / same_a.output_ref[:2] / same_a.output_ref).read_bytes()
    )
    assert json.loads(same_a.output_bytes()) == list(range(400))

    store = open_store()
    artifact = store.get_artifact(same_a.output_ref)
    assert artifact is not None
    assert artifact.serializer == "json"
    assert artifact.size == len(same_a.output_bytes())
    assert artifact.run_id == run.id
    producers = {r.key for r in store.steps_with_output(same_a.output_ref)}
    assert producers == {same_a.key, same_b.key}

    # A second run with the same output adds no new blob.
    before = len(_artifact_files(keel_home))
    keel.run(big, n=400)
    assert len(_artifact_files(keel_home)) == before


def test_artifacts_on_an_fsspec_url(
    backend: str, monkeypatch: pytest.MonkeyPatch, keel_home: Path
) -> None:
    import uuid

    url = f"memory://keel-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("KEEL_ARTIFACTS", url)
    monkeypatch.setenv("KEEL_INLINE_LIMIT", "16")
    handle = keel.run(values, n=50)
    assert handle.result()[0] == "list"
    step = keel.Client().run(handle.id).steps[0]
    assert step.output_ref is not None
    assert step.output() == list(range(50))
    assert _artifact_files(keel_home) == []
    artifact = open_store().get_artifact(step.output_ref)
    assert artifact is not None and artifact.uri.startswith(url)


def test_missing_artifact_gives_a_clear_error(
    backend: str, keel_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_INLINE_LIMIT", "16")
    handle = keel.run(values, n=50)
    step = keel.Client().run(handle.id).steps[0]
    ref = step.output_ref
    assert ref is not None
    (keel_home / "artifacts" / ref[:2] / ref).unlink()
    with pytest.raises(SerializationError) as info:
        step.output()
    assert ref in str(info.value)
    assert "missing" in str(info.value)


def test_store_value_inline_limit_boundary(tmp_path: Path) -> None:
    url = str(tmp_path / "art")
    data = encode([1, 2, 3]).data
    at = store_value([1, 2, 3], artifacts_url=url, inline_limit=len(data))
    assert at.inline == data and at.ref is None
    above = store_value([1, 2, 3], artifacts_url=url, inline_limit=len(data) - 1)
    assert above.inline is None and above.ref == above.digest
    assert (tmp_path / "art" / above.ref[:2] / above.ref).read_bytes() == data
    assert above.load(url) == [1, 2, 3]


# -- lineage -----------------------------------------------------------------------------------


@keel.task(name="store_add")
def add(a: int, b: int) -> int:
    return a + b


def test_lineage_deps_and_consumers(backend: str) -> None:
    @keel.workflow(name="store_lineage")
    def lineage() -> int:
        a = add.submit(1, 1)
        b = add.submit(a, 1)
        c = add.submit(a, b)
        d = add.submit(10, 10)
        return add(c, 0) + d.result()

    handle = keel.run(lineage)
    assert handle.result() == 2 + 3 + 20
    run = keel.Client().run(handle.id)
    by_key = {s.key: s for s in run.steps}
    assert by_key["store_add-0"].deps == []
    assert by_key["store_add-1"].deps == [0]
    assert sorted(by_key["store_add-2"].deps) == [0, 1]
    assert by_key["store_add-4"].deps == [2]
    assert [s.key for s in by_key["store_add-0"].consumers()] == ["store_add-1", "store_add-2"]
    assert [s.key for s in by_key["store_add-2"].consumers()] == ["store_add-4"]
    assert by_key["store_add-3"].consumers() == []
    assert by_key["store_add-4"].consumers() == []


# -- the metadata store -------------------------------------------------------------------------


def test_sqlite_store_uses_wal(keel_home: Path) -> None:
    store = open_store()
    assert store.dialect == "sqlite"
    assert Path(store.engine.url.database or "").parent == keel_home
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"


def test_reopening_a_store_keeps_its_data(backend: str) -> None:
    handle = keel.run(values, n=2)
    config = StoreConfig.from_env()
    fresh = MetadataStore(config)  # a second opening (another process would do the same)
    try:
        row = fresh.get_run(handle.id)
        assert row is not None and row.status == "SUCCEEDED"
        assert len(fresh.load_steps(handle.id)) == 10
    finally:
        fresh.dispose()
    assert open_store() is open_store()


def test_write_batch_upserts_steps(backend: str) -> None:
    handle = keel.run(values, n=1)
    store = open_store()
    row = dict(store.load_steps(handle.id)[0]._mapping)
    row["error_message"] = "changed by the test"
    store.write_batch(Batch(steps=[row]))
    store.write_batch(Batch(steps=[row]))
    steps = store.load_steps(handle.id)
    assert len(steps) == 10
    assert steps[0].error_message == "changed by the test"


def test_run_ids_resolve_by_prefix(backend: str) -> None:
    first = keel.run(values, n=1)
    second = keel.run(values, n=1)
    store = open_store()
    assert store.resolve_run_id(first.id) == first.id
    # Ids share their time prefix; the random tail makes them unique.
    common = 0
    while first.id[common] == second.id[common]:
        common += 1
    assert store.resolve_run_id(first.id[: common + 1]) == first.id
    assert keel.Client().run(second.id[: common + 1]).id == second.id
    if common > 0:
        with pytest.raises(RunNotFoundError, match="ambiguous"):
            store.resolve_run_id(first.id[:common])
    with pytest.raises(RunNotFoundError, match="no run with id"):
        store.resolve_run_id("zzzzzzzz-not-a-run")
    with pytest.raises(RunNotFoundError, match="empty"):
        store.resolve_run_id("  ")


def test_run_ids_sort_by_creation(backend: str) -> None:
    ids = [keel.run(values, n=1).id for _ in range(3)]
    assert ids == sorted(ids)
    assert [r.id for r in keel.Client().runs(workflow="store_values")] == ids[::-1]


def test_workflow_result_in_the_artifact_store(
    backend: str, keel_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_INLINE_LIMIT", "0")

    @keel.workflow(name="store_big_result")
    def wf(n: int) -> dict[str, Any]:
        return {"values": make("list", n), "array": make("array", n)}

    handle = keel.run(wf, n=20)
    result = handle.result()
    assert result["values"] == list(range(20))
    np.testing.assert_array_equal(result["array"], np.arange(20, dtype=np.float32))
    row = open_store().get_run(handle.id)
    assert row is not None
    assert row.result_inline is None and row.result_ref is not None
    assert (keel_home / "artifacts" / row.result_ref[:2] / row.result_ref).is_file()
    assert all(s.output_ref is not None for s in keel.Client().run(handle.id).steps)
