"""Property tests (hypothesis): serializer round trips, and deterministic step keys for
dynamic workflows, including after a resume that lost a random suffix of records."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import keel
from keel.store.metadata import open_store
from keel.store.schema import steps as steps_table
from keel.store.serializers import decode, encode
from keel.store.values import store_value

# -- serializers ------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
json_data = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (so 1 and 1.0, True and 1 differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@settings(max_examples=30, deadline=None)
@given(value=json_data, inline=st.booleans())
def test_json_like_data_round_trips(
    tmp_path_factory: pytest.TempPathFactory, value: Any, inline: bool
) -> None:
    enc = encode(value)
    assert enc.serializer == "json"
    assert _same(decode(enc.serializer, enc.data), value)
    # Through the value store too, inline or in the artifact store.
    url = str(tmp_path_factory.mktemp("artifacts"))
    stored = store_value(value, artifacts_url=url, inline_limit=10**9 if inline else 0)
    assert (stored.inline is not None) == inline
    assert _same(stored.load(url), value)
    # Same content, same digest.
    again = store_value(value, artifacts_url=url, inline_limit=0)
    assert again.digest == stored.digest


numeric_dtypes = st.sampled_from(
    [np.int8, np.int64, np.uint16, np.float32, np.float64, np.bool_, np.complex128]
)


@settings(max_examples=30, deadline=None)
@given(
    arr=hnp.arrays(dtype=numeric_dtypes, shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=5))
)
def test_numpy_arrays_round_trip(arr: np.ndarray) -> None:
    enc = encode(arr)
    assert enc.serializer == "numpy"
    back = decode(enc.serializer, enc.data)
    assert back.dtype == arr.dtype
    assert back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)  # NaNs compare equal here


@settings(max_examples=30, deadline=None)
@given(
    arr=hnp.arrays(
        dtype=hnp.unicode_string_dtypes(max_len=4), shape=hnp.array_shapes(max_dims=2, max_side=4)
    )
)
def test_numpy_string_arrays_round_trip(arr: np.ndarray) -> None:
    enc = encode(arr)
    assert enc.serializer == "numpy"
    back = decode(enc.serializer, enc.data)
    assert back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)


hashables = st.integers() | st.text(max_size=8) | st.booleans() | st.none()


@settings(max_examples=30, deadline=None)
@given(
    value=st.one_of(
        st.tuples(hashables, hashables),
        st.lists(hashables, max_size=4).map(tuple),
        st.sets(hashables, max_size=6),
        st.frozensets(hashables, max_size=6),
        st.lists(st.tuples(st.integers(), st.text(max_size=3)), min_size=1, max_size=4),
        st.dictionaries(st.integers(), st.text(max_size=3), min_size=1, max_size=4),
    )
)
def test_tuples_sets_and_non_json_containers_use_cloudpickle(value: Any) -> None:
    enc = encode(value)
    assert enc.serializer == "cloudpickle"
    back = decode(enc.serializer, enc.data)
    assert type(back) is type(value)
    assert back == value


# -- deterministic step keys -------------------------------------------------------------------

_lock = threading.Lock()
_executions: Counter[tuple[str, str]] = Counter()


def _executed() -> None:
    ctx = keel.context()
    assert ctx.step_key is not None
    with _lock:
        _executions[(ctx.run_id, ctx.step_key)] += 1


@keel.task(name="prop_add")
def p_add(x: int, y: int) -> int:
    _executed()
    return x + y


@keel.task(name="prop_mul")
def p_mul(x: int, y: int) -> int:
    _executed()
    return x * y


@keel.task(name="prop_sum")
def p_sum(xs: list[int]) -> int:
    _executed()
    return sum(xs)


@keel.workflow(name="prop_child")
def p_child(x: int, y: int) -> int:
    return p_mul(p_add(x, y), 3)


@keel.workflow(name="prop_dynamic")
def dynamic(plan: list[list[int]]) -> list[int]:
    """A graph decided by the plan and by step values (so replay must follow values)."""
    acc = 0
    pending: list[keel.StepFuture[int]] = []
    for op, arg in plan:
        if op == 0:
            acc = p_add(acc, arg)
        elif op == 1:
            pending.append(p_mul.submit(acc, arg))
        elif op == 2:
            pending.extend(p_add.map(range(arg % 3), y=acc))
        elif op == 3:
            acc = p_mul(acc + 1, 2) if acc % 2 == 0 else p_add(acc, 1)
        elif op == 4:
            if pending:
                pending = [p_sum.submit(pending)]
            else:
                acc = p_sum([acc, arg])
        elif op == 5:
            acc = p_child(acc, arg) % 1000
        if acc > 10_000:
            acc %= 97
    return [acc, *keel.gather(pending)]


plans = st.lists(
    st.tuples(st.integers(min_value=0, max_value=5), st.integers(min_value=0, max_value=7)).map(
        list
    ),
    max_size=10,
)


@contextlib.contextmanager
def _own_home(root: Path) -> Iterator[None]:
    """A fresh KEEL_HOME for one hypothesis example (a fresh SQLite store)."""
    home = root / uuid.uuid4().hex
    previous = os.environ.get("KEEL_HOME")
    os.environ["KEEL_HOME"] = str(home)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["KEEL_HOME"]
        else:
            os.environ["KEEL_HOME"] = previous


def _keys(run_id: str) -> list[str]:
    return [s.key for s in keel.Client().run(run_id).steps]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(plan=plans, data=st.data())
def test_step_keys_are_deterministic_and_survive_resume(
    backend: str,
    tmp_path_factory: pytest.TempPathFactory,
    plan: list[list[int]],
    data: st.DataObject,
) -> None:
    root = tmp_path_factory.mktemp("homes")
    with _own_home(root):
        first = keel.run(dynamic, plan=plan)
        second = keel.run(dynamic, plan=plan)
        result = first.result()
        assert second.result() == result
        keys = _keys(first.id)
        assert _keys(second.id) == keys
        assert [k.rsplit("-", 1)[1] for k in keys] == [str(i) for i in range(len(keys))]

        # Lose a random suffix of the first run's step records, as a crash could.
        cut = data.draw(st.integers(min_value=0, max_value=len(keys)), label="cut")
        store = open_store()
        with store.engine.begin() as conn:
            conn.execute(
                steps_table.delete().where(
                    steps_table.c.run_id == first.id, steps_table.c.seq >= cut
                )
            )
        store.update_run(first.id, status="RUNNING", ended_at=None)
        with _lock:
            before = Counter(_executions)

        resumed = keel.resume(first.id)
        assert resumed.result() == result
        assert _keys(first.id) == keys
        with _lock:
            ran = _executions - before
        # Exactly the task steps whose records were lost ran again, each once.
        again = {key for (run_id, key), n in ran.items() if run_id == first.id}
        assert all(n == 1 for n in ran.values())
        lost_tasks = {k for k in keys[cut:] if not k.startswith("prop_child-")}
        assert again == lost_tasks
        # Child runs keep their records: a replayed child runs none of its steps.
        assert all(run_id == first.id for run_id, _ in ran)
