"""Caching across runs: hits, and misses when an input, the `cache_version` or the
task's source code changes; futures as inputs hash by content; clearing the cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import keel
from keel.store.metadata import open_store


def _append(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text + "\n")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def out(tmp_path: Path) -> Iterator[Path]:
    """The side-effect file: one line per real execution of a task body."""
    yield tmp_path / "executions.txt"


# -- tasks --------------------------------------------------------------------------------


@keel.task(name="cache_square", cache=True)
def square(x: int, path: str) -> int:
    _append(path, f"square {x}")
    return x * x


square_v2 = square.with_options(cache_version="2")


@keel.task(name="cache_code", cache=True)
def code_v1(x: int, path: str) -> int:
    _append(path, f"v1 {x}")
    return x + 1


@keel.task(name="cache_code", cache=True)
def code_v2(x: int, path: str) -> int:
    _append(path, f"v2 {x}")
    return x + 100


@keel.task(name="cache_parity")
def parity(x: int, path: str) -> int:
    _append(path, f"parity {x}")
    return x % 2


@keel.task(name="cache_describe", cache=True)
def describe(value: int, path: str) -> str:
    _append(path, f"describe {value}")
    return f"value={value}"


@keel.task(name="cache_uncached")
def uncached(x: int, path: str) -> int:
    _append(path, f"uncached {x}")
    return x


@keel.task(name="cache_fails", cache=True)
def fails_when(x: int, path: str, broken: bool) -> int:
    _append(path, f"fails_when {x}")
    if broken:
        raise RuntimeError("broken")
    return x


@keel.task(name="cache_big", cache=True)
def big(n: int, path: str) -> list[int]:
    _append(path, f"big {n}")
    return list(range(n))


@keel.task(name="cache_plus_one")
def plus_one(x: int) -> int:
    return x + 1


@keel.workflow(name="cache_flow")
def flow(x: int, path: str, variant: str = "plain") -> int:
    if variant == "plain":
        return plus_one(square(x, path))
    if variant == "v2":
        return plus_one(square_v2(x, path))
    if variant == "code1":
        return code_v1(x, path)
    if variant == "code2":
        return code_v2(x, path)
    if variant == "future":
        return len(describe(parity.submit(x, path), path))
    if variant == "value":
        return len(describe(parity(x, path), path))
    if variant == "uncached":
        return uncached(x, path)
    if variant == "big":
        return sum(big(x, path))
    raise AssertionError(variant)


def _run(**params: object) -> keel.Run:
    return keel.Client().run(keel.run(flow, **params).id)


@pytest.fixture(params=["threads", "processes"])
def executor(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KEEL_EXECUTOR", request.param)
    return str(request.param)


# -- hits ---------------------------------------------------------------------------------


def test_cache_hit_across_runs(backend: str, executor: str, out: Path) -> None:
    first = _run(x=3, path=str(out))
    assert first.result() == 10
    second = _run(x=3, path=str(out))
    assert second.result() == 10
    assert _lines(out) == ["square 3"]  # the body ran once

    hit = second.step("cache_square-0")
    assert hit.status == "CACHED"
    assert hit.cached_from == f"{first.id}/cache_square-0"
    assert hit.attempts == []
    assert hit.output() == 9
    # The downstream, uncached step still ran in the second run with the cached value.
    assert second.step("cache_plus_one-1").status == "SUCCEEDED"
    assert second.step("cache_plus_one-1").output() == 10

    source = first.step("cache_square-0")
    assert source.status == "SUCCEEDED"
    assert source.cached_from is None
    assert source.cache is not None and hit.cache is not None
    assert hit.cache["key"] == source.cache["key"]
    assert set(source.cache) >= {"task", "code_hash", "cache_version", "inputs", "key"}
    assert source.cache["task"] == "cache_square"


def test_a_cached_value_can_be_cached_from_again(backend: str, out: Path) -> None:
    first = _run(x=4, path=str(out))
    _run(x=4, path=str(out))
    third = _run(x=4, path=str(out))
    assert third.result() == 17
    assert _lines(out) == ["square 4"]
    assert third.step("cache_square-0").status == "CACHED"
    # The entry points at the run that computed the value, not at a cache hit.
    assert third.step("cache_square-0").cached_from == f"{first.id}/cache_square-0"


def test_tasks_without_cache_always_run(backend: str, out: Path) -> None:
    _run(x=1, path=str(out), variant="uncached")
    second = _run(x=1, path=str(out), variant="uncached")
    assert _lines(out) == ["uncached 1", "uncached 1"]
    assert second.steps[0].status == "SUCCEEDED"
    assert second.steps[0].cache is None


def test_large_cached_output_is_reused(
    backend: str, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_INLINE_LIMIT", "64")
    first = _run(x=500, path=str(out), variant="big")
    second = _run(x=500, path=str(out), variant="big")
    assert first.result() == second.result() == sum(range(500))
    assert _lines(out) == ["big 500"]
    hit = second.step("cache_big-0")
    assert hit.status == "CACHED"
    assert hit.output_ref is not None
    assert hit.output() == list(range(500))


# -- misses -------------------------------------------------------------------------------


def test_miss_when_an_input_changes(backend: str, executor: str, out: Path) -> None:
    _run(x=2, path=str(out))
    changed = _run(x=5, path=str(out))
    assert changed.result() == 26
    assert changed.step("cache_square-0").status == "SUCCEEDED"
    assert _lines(out) == ["square 2", "square 5"]
    # Both earlier inputs now hit.
    assert _run(x=2, path=str(out)).step("cache_square-0").status == "CACHED"
    assert _run(x=5, path=str(out)).step("cache_square-0").status == "CACHED"
    assert _lines(out) == ["square 2", "square 5"]


def test_miss_when_cache_version_changes(backend: str, out: Path) -> None:
    first = _run(x=3, path=str(out))
    bumped = _run(x=3, path=str(out), variant="v2")
    assert bumped.result() == 10
    assert _lines(out) == ["square 3", "square 3"]
    step = bumped.step("cache_square-0")
    assert step.status == "SUCCEEDED"
    assert step.cache is not None and step.cache["cache_version"] == "2"
    original = first.step("cache_square-0").cache
    assert original is not None and original["cache_version"] is None
    assert step.cache["key"] != original["key"]
    # The new version is cached under its own key.
    assert _run(x=3, path=str(out), variant="v2").step("cache_square-0").status == "CACHED"
    assert len(_lines(out)) == 2


def test_miss_when_the_source_code_changes(backend: str, out: Path) -> None:
    assert code_v1.name == code_v2.name
    assert code_v1.code_hash != code_v2.code_hash
    first = _run(x=1, path=str(out), variant="code1")
    changed = _run(x=1, path=str(out), variant="code2")
    assert first.result() == 2
    assert changed.result() == 101  # not the cached output of the old code
    assert _lines(out) == ["v1 1", "v2 1"]
    assert changed.steps[0].status == "SUCCEEDED"
    assert _run(x=1, path=str(out), variant="code2").steps[0].status == "CACHED"
    assert _run(x=1, path=str(out), variant="code1").steps[0].status == "CACHED"
    assert len(_lines(out)) == 2


def test_failed_steps_are_not_cached(backend: str, out: Path) -> None:
    @keel.workflow(name="cache_failing_flow")
    def failing(path: str, broken: bool) -> int:
        return fails_when(1, path, broken)

    assert keel.run(failing, path=str(out), broken=True).status == "FAILED"
    # The same inputs again: a failure is never served from the cache.
    assert keel.run(failing, path=str(out), broken=True).status == "FAILED"
    assert _lines(out) == ["fails_when 1", "fails_when 1"]


# -- futures as inputs ---------------------------------------------------------------------


def test_future_inputs_hash_by_content(backend: str, executor: str, out: Path) -> None:
    # parity(1) and parity(3) are both 1: `describe` sees the same input content.
    first = _run(x=1, path=str(out), variant="future")
    second = _run(x=3, path=str(out), variant="future")
    assert first.result() == second.result() == len("value=1")
    assert _lines(out) == ["parity 1", "describe 1", "parity 3"]
    hit = second.step("cache_describe-1")
    assert hit.status == "CACHED"
    assert hit.cached_from == f"{first.id}/cache_describe-1"
    assert hit.deps == [0]

    # A plain value with the same content hits the entry made from a future.
    third = _run(x=5, path=str(out), variant="value")
    assert third.step("cache_describe-1").status == "CACHED"
    assert third.step("cache_describe-1").deps == []
    # A different upstream value misses.
    fourth = _run(x=2, path=str(out), variant="future")
    assert fourth.step("cache_describe-1").status == "SUCCEEDED"
    assert _lines(out) == [
        "parity 1",
        "describe 1",
        "parity 3",
        "parity 5",
        "parity 2",
        "describe 0",
    ]


# -- clearing -----------------------------------------------------------------------------


def test_clear_cache_makes_it_miss(backend: str, out: Path) -> None:
    _run(x=3, path=str(out))
    _run(x=1, path=str(out), variant="code1")
    store = open_store()

    assert store.clear_cache(task="cache_other_task") == 0
    assert _run(x=3, path=str(out)).step("cache_square-0").status == "CACHED"

    assert store.clear_cache(task="cache_square") == 1
    again = _run(x=3, path=str(out))
    assert again.step("cache_square-0").status == "SUCCEEDED"
    assert _lines(out).count("square 3") == 2
    # Other tasks' entries survive a per-task clear.
    assert _run(x=1, path=str(out), variant="code1").steps[0].status == "CACHED"

    assert store.clear_cache() >= 2
    assert _run(x=1, path=str(out), variant="code1").steps[0].status == "SUCCEEDED"
    assert _run(x=3, path=str(out)).step("cache_square-0").status == "SUCCEEDED"
    # Clearing the cache never touches recorded runs.
    assert all(r.status == "SUCCEEDED" for r in keel.Client().runs())


@keel.task(name="cache_sum_all", cache=True)
def sum_all(xs: list[int], path: str) -> int:
    _append(path, f"sum_all {xs}")
    return sum(xs)


@keel.workflow(name="cache_list_of_futures")
def list_of_futures(values: list[int], path: str) -> int:
    return sum_all([parity.submit(v, path) for v in values], path)


def test_lists_of_futures_hash_by_content(backend: str, out: Path) -> None:
    first = keel.run(list_of_futures, values=[1, 2, 3], path=str(out))
    second = keel.run(list_of_futures, values=[5, 4, 7], path=str(out))  # same parities
    third = keel.run(list_of_futures, values=[2, 2, 3], path=str(out))  # different
    assert first.result() == second.result() == 2
    assert third.result() == 1
    assert [line for line in _lines(out) if line.startswith("sum_all")] == [
        "sum_all [1, 0, 1]",
        "sum_all [0, 0, 1]",
    ]
    hit = keel.Client().run(second.id).step("cache_sum_all-3")
    assert hit.status == "CACHED"
    assert hit.cached_from == f"{first.id}/cache_sum_all-3"


@keel.task(name="cache_nested_total", cache=True)
def nested_total(groups: dict[str, list[list[int]]], path: str) -> int:
    _append(path, f"nested_total {groups}")
    return sum(sum(g) for gs in groups.values() for g in gs)


@keel.workflow(name="cache_nested_futures")
def nested_futures(values: list[int], path: str) -> int:
    parities = [parity.submit(v, path) for v in values]
    return nested_total({"groups": [parities[:1], parities[1:]]}, path)


def test_futures_nested_deep_in_inputs_hash_by_content(
    backend: str, executor: str, out: Path
) -> None:
    first = keel.run(nested_futures, values=[1, 2, 3], path=str(out))
    second = keel.run(nested_futures, values=[3, 4, 5], path=str(out))  # same parities
    assert first.result() == second.result() == 2
    assert [line for line in _lines(out) if line.startswith("nested_total")] == [
        "nested_total {'groups': [[1], [0, 1]]}"
    ]
    hit = keel.Client().run(second.id).step("cache_nested_total-3")
    assert hit.status == "CACHED"
    assert sorted(hit.deps) == [0, 1, 2]


@keel.workflow(name="cache_plain_list")
def plain_list(values: list[int], path: str) -> int:
    return sum_all([v % 2 for v in values], path)


def test_a_list_of_futures_and_the_equal_plain_list_share_an_entry(
    backend: str, executor: str, out: Path
) -> None:
    futures = keel.run(list_of_futures, values=[1, 2, 3], path=str(out))
    plain = keel.run(plain_list, values=[1, 2, 3], path=str(out))
    assert futures.result() == plain.result() == 2
    assert [line for line in _lines(out) if line.startswith("sum_all")] == ["sum_all [1, 0, 1]"]
    hit = keel.Client().run(plain.id).step("cache_sum_all-0")
    assert hit.status == "CACHED"
    assert hit.cached_from == f"{futures.id}/cache_sum_all-3"


@keel.task(name="cache_settings", cache=True)
def settings_of(config: dict[str, object], path: str) -> str:
    _append(path, f"settings_of {sorted(config)}")
    return ",".join(f"{k}={config[k]}" for k in sorted(config))


@keel.task(name="cache_make_config")
def make_config(order: list[str]) -> dict[str, object]:
    base: dict[str, object] = {"lr": 0.1, "depth": 3, "nested": {"b": 1, "a": [1, 2]}}
    return {k: base[k] for k in order}


@keel.workflow(name="cache_dict_order")
def dict_order(order: list[str], path: str, through_step: bool = False) -> str:
    if through_step:
        return settings_of(make_config(order), path)
    base: dict[str, object] = {"lr": 0.1, "depth": 3, "nested": {"a": [1, 2], "b": 1}}
    return settings_of({k: base[k] for k in order}, path)


def test_equal_dicts_in_any_order_share_an_entry(backend: str, out: Path) -> None:
    first = keel.run(dict_order, order=["lr", "depth", "nested"], path=str(out))
    second = keel.run(dict_order, order=["nested", "depth", "lr"], path=str(out))
    third = keel.run(dict_order, order=["depth", "lr", "nested"], path=str(out), through_step=True)
    assert first.result() == second.result() == third.result()
    assert [line for line in _lines(out) if line.startswith("settings_of")] == [
        "settings_of ['depth', 'lr', 'nested']"
    ]
    assert keel.Client().run(second.id).step("cache_settings-0").status == "CACHED"
    assert keel.Client().run(third.id).step("cache_settings-1").status == "CACHED"
    # A different value still misses.
    other = keel.run(dict_order, order=["lr", "depth"], path=str(out))
    assert keel.Client().run(other.id).step("cache_settings-0").status == "SUCCEEDED"


@keel.task(name="cache_count_items", cache=True)
def count_items(parts: list[list[int]], path: str) -> int:
    _append(path, f"count_items {len(parts)}")
    return sum(len(p) for p in parts)


@keel.workflow(name="cache_big_parts")
def big_parts(n: int, path: str) -> int:
    return count_items([big.submit(n, path), big.submit(n + 1, path)], path)


def test_futures_whose_values_live_in_the_artifact_store_key_by_digest(
    backend: str, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_INLINE_LIMIT", "64")
    first = keel.run(big_parts, n=100, path=str(out))
    second = keel.run(big_parts, n=100, path=str(out))
    third = keel.run(big_parts, n=101, path=str(out))
    assert first.result() == second.result() == 201
    assert third.result() == 203
    assert keel.Client().run(second.id).step("cache_count_items-2").status == "CACHED"
    assert keel.Client().run(third.id).step("cache_count_items-2").status == "SUCCEEDED"
    assert [line for line in _lines(out) if line.startswith("count_items")] == [
        "count_items 2",
        "count_items 2",
    ]
