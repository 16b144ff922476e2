import keel


@keel.task
def square(x: int) -> int:
    return x * x


@keel.task
def total(xs: list[int]) -> int:
    return sum(xs)


@keel.workflow
def sum_of_squares(n: int = 5) -> int:
    return total(square.map(range(n)))


def test_run_records_every_step(backend: str) -> None:
    handle = keel.run(sum_of_squares, n=4)
    assert handle.result() == 0 + 1 + 4 + 9
    run = keel.Client().run(handle.id)
    assert run.status == "SUCCEEDED"
    assert [s.key for s in run.steps] == ["square-0", "square-1", "square-2", "square-3", "total-4"]
    assert all(s.status == "SUCCEEDED" for s in run.steps)
    assert run.step("total").deps == [0, 1, 2, 3]
