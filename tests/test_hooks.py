"""The overlap scheduler: hooks run right before their micro-batch resumes, after the others ran."""
import pytest

from epkern.hooks import run_overlapped


def _microbatch(name, log, steps):
    for step in range(steps):
        log.append(f"{name}:send{step}")
        yield (lambda s=step: log.append(f"{name}:recv{s}"))
        log.append(f"{name}:compute{step}")
    return f"{name}-done"


def test_two_microbatches_interleave_send_compute_recv():
    log = []
    out = run_overlapped([_microbatch("a", log, 2), _microbatch("b", log, 2)])
    assert out == ["a-done", "b-done"]
    # a's first receive happens only after b issued its own send (a's data was in flight meanwhile)
    assert log.index("b:send0") < log.index("a:recv0") < log.index("a:compute0")
    assert log.index("a:send1") < log.index("b:recv1")
    # every hook ran exactly once, each before its own compute
    for name in "ab":
        for s in range(2):
            assert log.count(f"{name}:recv{s}") == 1
            assert log.index(f"{name}:recv{s}") < log.index(f"{name}:compute{s}")


def test_uneven_lengths_and_none_yields():
    def short():
        yield None
        return 1

    log = []
    trace = []
    assert run_overlapped([_microbatch("a", log, 3), short()], trace=trace) == ["a-done", 1]
    assert [e for e in trace if e[0] == "hook"] == [("hook", 0)] * 3


def test_bad_yield_and_bad_input():
    def bad():
        yield 42

    with pytest.raises(TypeError, match="yielded 42"):
        run_overlapped([bad()])
    with pytest.raises(TypeError, match="expected a generator"):
        run_overlapped([lambda: None])
