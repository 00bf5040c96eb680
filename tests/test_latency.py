"""Latency measurement: runners timed on their runtime, interleaved rounds, noise flags.

Timings on a shared machine are noisy, so these tests assert relations that hold under
load (orderings with wide margins, ratios, the noise flag), never absolute times.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from automl_prune.errors import InvalidValueError, UnknownNameError
from automl_prune.measure import LatencyStats, measure_interleaved, measure_latency, num_threads
from automl_prune.measure import latency as latency_module
from automl_prune.measure.latency import round_ratio, time_runner
from automl_prune.models.zoo import fashion_cnn
from automl_prune.runtimes import RUNTIMES, Runner, get_runtime


@pytest.fixture
def restore_threads():
    previous = torch.get_num_threads()
    yield previous
    torch.set_num_threads(previous)


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1))


def _sleeper(durations_ms: list[float], label: str = "sleep") -> tuple[Runner, list[int]]:
    """A runner that sleeps ``durations_ms[call // per_round]``-like times (see the tests); counts its calls."""
    calls = [0]

    def call() -> None:
        calls[0] += 1
        time.sleep(durations_ms[min(calls[0] - 1, len(durations_ms) - 1)] / 1000.0)

    return Runner(label, torch.device("cpu"), 1, (1, 1), call), calls


class _VirtualClock:
    """A stand-in for ``time.perf_counter`` that only moves when a runner "runs".

    Runners made by :meth:`runner` advance it by exact durations instead of sleeping, so
    what the statistics see does not depend on how loaded the machine is.
    """

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def runner(self, durations_ms: list[float], label: str = "virtual") -> Runner:
        """A runner whose ``n``-th call takes ``durations_ms[n]`` ms (the last one repeated) on this clock."""
        calls = [0]

        def call() -> None:
            calls[0] += 1
            self.now += durations_ms[min(calls[0] - 1, len(durations_ms) - 1)] / 1000.0

        return Runner(label, torch.device("cpu"), 1, (1, 1), call)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _VirtualClock:
    """The measurement code's clock replaced by a :class:`_VirtualClock`."""
    virtual = _VirtualClock()
    monkeypatch.setattr(latency_module.time, "perf_counter", virtual)
    return virtual


def test_measure_latency_stats_are_sane(restore_threads: int) -> None:
    torch.set_num_threads(2)
    model = fashion_cnn()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    stats = measure_latency(model, (2, 1, 28, 28), threads=1, warmup=2, runs=7)

    assert isinstance(stats, LatencyStats)
    assert stats.runs == 7 and stats.warmup == 2 and stats.runtime == "torch"
    assert stats.batch_size == 2 and stats.threads == 1 and stats.device == "cpu"
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.mean_ms > 0 and stats.std_ms >= 0
    assert torch.get_num_threads() == 2  # restored
    # The caller's model is untouched: still in training mode, BN statistics unchanged.
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert json.loads(json.dumps(stats.to_dict()))["runs"] == 7


@pytest.mark.parametrize("runtime", RUNTIMES.names())
def test_every_runtime_measures_and_a_bigger_model_is_slower(runtime: str) -> None:
    # fashion_cnn at batch 64 does roughly 10^4 times the work of one 1->4 conv at batch 1.
    small = measure_latency(_tiny(), (1, 1, 28, 28), threads=1, warmup=2, runs=5, runtime=runtime)
    big = measure_latency(fashion_cnn(), (64, 1, 28, 28), threads=1, warmup=1, runs=3, runtime=runtime)
    assert small.runtime == big.runtime == runtime and big.threads == 1
    assert big.median_ms > 10 * small.median_ms


def test_num_threads_context_restores(restore_threads: int) -> None:
    torch.set_num_threads(2)
    with num_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with num_threads(None) as n:
        assert n == 2


def test_torch_runner_pins_its_threads_while_timed(restore_threads: int) -> None:
    torch.set_num_threads(2)
    seen = []
    runner = get_runtime("torch").compile(_tiny(), (1, 1, 8, 8), threads=1)
    original = runner._call
    runner._call = lambda: (seen.append(torch.get_num_threads()), original())
    time_runner(runner, 1, 3)
    assert seen == [1] * 4 and torch.get_num_threads() == 2


@pytest.mark.parametrize(
    "kwargs",
    [{"device": "tpu"}, {"device": "not a device"}, {"threads": 0}, {"runs": 0}, {"warmup": -1}],
)
def test_measure_latency_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(InvalidValueError):
        measure_latency(_tiny(), (1, 1, 8, 8), **kwargs)


def test_bad_input_shapes_and_runtimes_rejected() -> None:
    with pytest.raises(InvalidValueError):
        measure_latency(_tiny(), (1, 0, 8, 8))
    with pytest.raises(UnknownNameError, match="onnxruntime"):
        measure_latency(_tiny(), (1, 1, 8, 8), runtime="tensorrt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_unavailable_rejected() -> None:
    with pytest.raises(InvalidValueError, match="CUDA"):
        measure_latency(_tiny(), (1, 1, 8, 8), device="cuda")
    with pytest.raises(InvalidValueError, match="CUDA"):
        get_runtime("torchscript").compile(_tiny(), (1, 1, 8, 8), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
@pytest.mark.parametrize("runtime", ["torch", "torchscript"])
def test_cuda_latency_is_measured_synchronised(runtime: str) -> None:
    stats = measure_latency(fashion_cnn(), (64, 1, 28, 28), device="cuda", runs=10, runtime=runtime)
    assert stats.device.startswith("cuda") and stats.median_ms > 0


def test_interleaved_rounds_and_ratio(clock: _VirtualClock) -> None:
    fast = clock.runner([1.0, 1.0, 1.5, 1.0])  # one slow run in round one: its median ignores it
    slow = clock.runner([4.0])
    stats = measure_interleaved({"fast": fast, "slow": slow}, rounds=4, runs=3, warmup=1)
    assert list(stats) == ["fast", "slow"]
    for s in stats.values():
        assert len(s.rounds) == 4 and s.runs == 12
        assert s.median_ms == pytest.approx(sorted(s.rounds)[1] / 2 + sorted(s.rounds)[2] / 2)
    assert stats["fast"].rounds[0] == pytest.approx(1.0) and stats["slow"].median_ms == pytest.approx(4.0)
    assert round_ratio(stats["slow"], stats["fast"]) == pytest.approx(4.0)


def test_a_measurement_that_stays_noisy_is_repeated_then_flagged() -> None:
    # calls alternate between 1 ms and 15 ms: the runs spread far beyond the limit in every attempt
    jumpy, calls = _sleeper([1.0, 15.0] * 1000)
    stats = measure_interleaved({"jumpy": jumpy}, rounds=3, runs=4, warmup=1, retries=2)
    s = stats["jumpy"]
    assert s.noisy and "spread" in s.note
    assert "NOISY" in s.describe()
    assert calls[0] == 1 + 3 * 3 * 4  # warm-up, then three attempts (two retries) of 3 rounds x 4 runs


def test_noise_against_a_reference_is_judged_on_the_ratio(clock: _VirtualClock) -> None:
    # both slow down together after round one: absolute rounds disagree, the ratio does not
    # (on a virtual clock: real sleeps of a few ms jitter by a third on a loaded machine)
    def measure(b_later_ms: float, reference: str | None) -> dict[str, LatencyStats]:
        runners = {"a": clock.runner([1.0] * 3 + [6.0]), "b": clock.runner([2.0] * 3 + [b_later_ms])}
        return measure_interleaved(runners, rounds=3, runs=2, warmup=1, retries=0, reference=reference)

    alone = measure(12.0, None)
    assert alone["b"].noisy and "rounds disagree" in alone["b"].note
    paired = measure(12.0, "a")
    assert not paired["b"].noisy and round_ratio(paired["b"], paired["a"]) == pytest.approx(2.0)
    # a ratio that itself moves between rounds is noisy even against the reference
    drifting = measure(18.0, "a")
    assert drifting["b"].noisy and "ratio to a varies" in drifting["b"].note


def test_rounds_are_shared_out_among_fresh_sessions(clock: _VirtualClock) -> None:
    """sessions=3 over 5 rounds: 2 rounds on the given runner, then 2 and 1 on fresh ones, each warmed up and closed."""
    opened: list[list[int]] = []
    closed: list[int] = []

    def session(index: int) -> Runner:
        calls = [0]
        opened.append(calls)

        def call() -> None:
            calls[0] += 1
            clock.now += 0.001 if index == 0 else 0.004  # the first session runs fast, the fresh ones slow

        return Runner(
            "fake", torch.device("cpu"), 1, (1, 1), call, lambda: closed.append(index), lambda: session(len(opened))
        )

    stats = measure_interleaved({"x": session(0)}, rounds=5, runs=2, warmup=1, retries=0, sessions=3)
    assert [c[0] for c in opened] == [1 + 2 * 2, 1 + 2 * 2, 1 + 1 * 2]  # warm-up, then its share of rounds x runs
    assert closed == [1, 2]  # the fresh sessions, not the caller's runner
    s = stats["x"]
    assert len(s.rounds) == 5 and s.runs == 10
    assert s.rounds == pytest.approx((1.0, 1.0, 4.0, 4.0, 4.0))  # rounds 3-5 ran on the fresh sessions
    # more sessions than rounds: one round each
    opened.clear()
    measure_interleaved({"x": session(0)}, rounds=2, runs=1, warmup=0, retries=0, sessions=5)
    assert [c[0] for c in opened] == [1, 1]


def test_an_onnxruntime_runner_reopens_as_a_new_session_of_the_same_model() -> None:
    runtime = get_runtime("onnxruntime")
    with runtime.compile(_tiny(), (1, 1, 8, 8), threads=1) as runner:
        fresh = runner.reopen()
        try:
            assert fresh._call is not runner._call and fresh.input_shape == runner.input_shape
            fresh()
        finally:
            fresh.close()
        runner()  # closing the fresh one left the first running
    with pytest.raises(RuntimeError, match="closed"):
        fresh()


def test_interleaved_rejects_bad_arguments() -> None:
    runner, _ = _sleeper([0.1])
    with pytest.raises(InvalidValueError):
        measure_interleaved({"x": runner}, rounds=0)
    with pytest.raises(InvalidValueError, match="reference"):
        measure_interleaved({"x": runner}, reference="y")
    with pytest.raises(InvalidValueError, match="sessions"):
        measure_interleaved({"x": runner}, sessions=0)


def test_an_idle_onnxruntime_session_does_not_slow_torch_down() -> None:
    """Sessions are created without spinning threads: an idle one left alive costs torch nothing."""
    from automl_prune.runtimes import onnx_session

    model = fashion_cnn()
    onnx = get_runtime("onnxruntime").convert(model, torch.zeros(1, 1, 28, 28))
    session = onnx_session(onnx, threads=2)
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 2
    x = {"input": torch.zeros(64, 1, 28, 28).numpy()}
    ratios = []
    for _ in range(3):  # alone, then right after the session ran (its threads now idle), three times
        alone = measure_latency(model, (1, 1, 28, 28), threads=2, warmup=3, runs=20).median_ms
        session.run(None, x)
        after = measure_latency(model, (1, 1, 28, 28), threads=2, warmup=0, runs=20).median_ms
        ratios.append(after / alone)
    # spinning onnxruntime threads slowed torch 5-10x here; idle ones leave it within noise
    assert sorted(ratios)[1] < 2.5, ratios
