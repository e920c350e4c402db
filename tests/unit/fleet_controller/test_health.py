"""The health gate's statistics and windows: noise that must not trip it, regressions
that must, and the control group and fleet weather it compares against."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_controller.health import (
    BUCKET_VALUES_MS,
    FleetSamples,
    HealthSample,
    Window,
    error_increase_p,
    judge,
    latency_regression_p,
)
from shared.histogram import NUM_BUCKETS, bucket_of, bucket_value_ms, quantile_ms
from tests.support.shared_kit import NOW, PROPERTY
from tests.unit.fleet_controller.rollout_kit import NEW, OLD, make_spec, sample

ALLOW_50 = np.maximum(BUCKET_VALUES_MS * 1.5, BUCKET_VALUES_MS + 1.0)


def lognormal_hist(median_ms: float, sigma: float, runs: int) -> np.ndarray:
    """``runs`` latencies of a log-normal spread, binned exactly (no sampling noise)."""
    edges_ms = np.array([2 ** (i / 4) / 1000 for i in range(NUM_BUCKETS + 1)])
    z = (np.log(edges_ms) - np.log(median_ms)) / sigma
    cdf = 0.5 * (1 + np.vectorize(math.erf)(z / np.sqrt(2)))
    return np.round(np.diff(cdf) * runs).astype(np.int64)


# ----- the bucket scheme -------------------------------------------------------------


@pytest.mark.parametrize(
    ("ms", "bucket"),
    [(0.0, 0), (-1.0, 0), (float("nan"), 0), (0.001, 0), (0.002, 4), (1.0, 39), (1e12, 127)],
)
def test_bucket_of(ms: float, bucket: int) -> None:
    assert bucket_of(ms) == bucket


@given(st.floats(min_value=0.0011, max_value=3.6e6))
def test_a_bucket_holds_its_latencies(ms: float) -> None:
    index = bucket_of(ms)
    assert bucket_value_ms(index) / 1.1 <= ms <= bucket_value_ms(index) * 1.1


def test_quantile_of_a_histogram() -> None:
    assert quantile_ms([], 0.5) == 0.0
    assert quantile_ms([(40, 1), (10, 3)], 0.5) == bucket_value_ms(10)
    assert quantile_ms([(40, 1), (10, 3)], 1.0) == bucket_value_ms(40)


# ----- the statistics ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("treated_ms", "sigma", "runs", "breach"),
    [
        pytest.param(10.0, 0.3, 1000, False, id="same"),
        pytest.param(14.0, 0.3, 1000, False, id="1.4x-within-the-allowance"),
        pytest.param(20.0, 0.3, 200, True, id="2x-slower"),
        pytest.param(30.0, 0.6, 100, True, id="3x-slower-wide"),
        pytest.param(20.0, 1.5, 100, False, id="2x-but-lost-in-a-very-wide-spread"),
    ],
)
def test_latency_regression_p(treated_ms: float, sigma: float, runs: int, breach: bool) -> None:
    reference = lognormal_hist(10.0, sigma, runs)
    treated = lognormal_hist(treated_ms, sigma, runs)
    assert (latency_regression_p(treated, reference, ALLOW_50) < 0.05) is breach


def test_latency_regression_p_of_nothing_is_one() -> None:
    empty = np.zeros(NUM_BUCKETS, dtype=np.int64)
    assert latency_regression_p(empty, lognormal_hist(1.0, 0.3, 100), ALLOW_50) == 1.0
    single = np.zeros(NUM_BUCKETS, dtype=np.int64)
    single[40] = 50
    assert latency_regression_p(single, single, BUCKET_VALUES_MS) == 1.0  # all ties


@PROPERTY
@given(
    median=st.floats(0.05, 500.0),
    sigma=st.floats(0.05, 1.0),
    runs=st.integers(100, 100_000),
    load=st.floats(1.0, 10.0),
    slower=st.floats(1.0, 1.45),
)
def test_noise_within_the_allowance_never_trips_latency(
    median: float, sigma: float, runs: int, load: float, slower: float
) -> None:
    """Control and new model slowed alike by load, the new one up to 1.45x slower."""
    reference = lognormal_hist(median * load, sigma, runs)
    treated = lognormal_hist(median * load * slower, sigma, runs)
    assert latency_regression_p(treated, reference, ALLOW_50) >= 0.05


@PROPERTY
@given(median=st.floats(2.0, 500.0), sigma=st.floats(0.05, 0.5), runs=st.integers(100, 10_000))
def test_twice_as_slow_always_trips_latency(median: float, sigma: float, runs: int) -> None:
    reference = lognormal_hist(median, sigma, runs)
    treated = lognormal_hist(median * 2, sigma, runs)
    assert latency_regression_p(treated, reference, ALLOW_50) < 0.05


@pytest.mark.parametrize(
    ("errors", "runs", "ref_errors", "ref_runs", "breach"),
    [
        pytest.param(0, 1000, 0, 1000, False, id="none"),
        pytest.param(10, 1000, 0, 1000, False, id="1%-at-the-margin"),
        pytest.param(50, 1000, 0, 1000, True, id="5%"),
        pytest.param(10, 100, 0, 100, True, id="10%-of-100"),
        pytest.param(150, 1000, 100, 1000, True, id="15%-vs-10%"),
        pytest.param(105, 1000, 100, 1000, False, id="10.5%-vs-10%"),
        pytest.param(3, 20, 0, 20, False, id="15%-of-20-runs-proves-nothing"),
        pytest.param(5, 0, 0, 100, False, id="no-runs"),
    ],
)
def test_error_increase_p(
    errors: int, runs: int, ref_errors: int, ref_runs: int, breach: bool
) -> None:
    assert (error_increase_p(errors, runs, ref_errors, ref_runs, 0.01) < 0.05) is breach


@PROPERTY
@given(rate=st.floats(0.0, 0.5), runs=st.integers(100, 100_000), ref_runs=st.integers(100, 100_000))
def test_the_same_error_rate_never_trips(rate: float, runs: int, ref_runs: int) -> None:
    errors, ref_errors = round(rate * runs), round(rate * ref_runs)
    assert error_increase_p(errors, runs, ref_errors, ref_runs, 0.01) >= 0.05


@PROPERTY
@given(rate=st.floats(0.0, 0.05), runs=st.integers(1000, 100_000))
def test_five_points_more_errors_always_trips(rate: float, runs: int) -> None:
    """From a healthy rate (up to 5%), five points more with a thousand runs a side."""
    errors, ref_errors = round((rate + 0.05) * runs), round(rate * runs)
    assert error_increase_p(errors, runs, ref_errors, runs, 0.01) < 0.05


# ----- windows ------------------------------------------------------------------------


def test_window_median_and_scaling() -> None:
    hist = np.zeros(NUM_BUCKETS, dtype=np.int64)
    hist[[40, 41, 50]] = [3, 1, 1]
    window = Window(hist, inferences=5, errors=5)
    assert window.median_ms() == bucket_value_ms(40)
    assert window.error_rate == 0.5
    assert window.scaled(2.0).median_ms() == bucket_value_ms(44)
    assert window.scaled(1.05) is window  # less than half a bucket: unchanged
    assert Window.empty().median_ms() == 0.0


def test_fleet_windows_keep_to_their_model_and_time() -> None:
    fleet = FleetSamples(
        {
            "a": [sample(NOW + 1, OLD, 100), sample(NOW + 2, NEW, 50), sample(NOW + 3, NEW, 70)],
            "b": [sample(NOW + 2, OLD, 30, errors=3)],
            "c": [],
        }
    )
    assert fleet.node("a", NEW.sha256, NOW + 1, NOW + 3).inferences == 120
    assert fleet.node("a", NEW.sha256, NOW + 2, NOW + 3).inferences == 70
    assert fleet.node("a", OLD.sha256, NOW + 1, NOW + 3).runs == 0
    assert fleet.node("c", OLD.sha256, NOW, NOW + 9).runs == 0
    control = fleet.others(OLD.sha256, NOW, NOW + 3, frozenset({"a"}))
    assert (control.inferences, control.errors, control.nodes) == (30, 3, 1)


def test_fleet_weather_reads_only_nodes_on_one_model_throughout() -> None:
    steady = [sample(NOW + k, OLD, 100, 0, 10.0) for k in range(5)]
    steady += [sample(NOW + 5 + k, OLD, 100, 0, 40.0) for k in range(5)]
    changed = [sample(NOW + k, OLD, 100, 0, 10.0) for k in range(5)]
    changed += [sample(NOW + 5 + k, NEW, 100, 0, 400.0) for k in range(5)]
    fleet = FleetSamples({"s": steady, "x": changed})
    ratio, error_shift, nodes = fleet.weather(NOW - 1, NOW + 4.5, NOW + 10, frozenset(), 100)
    assert nodes == 1
    assert 3.5 < ratio < 4.5
    assert error_shift == 0.0
    assert fleet.weather(NOW - 1, NOW + 4.5, NOW + 10, frozenset({"s"}), 100) == (1.0, 0.0, 0)


def test_judge_without_a_previous_model_checks_errors_alone() -> None:
    spec = make_spec(min_samples=10)
    fleet = FleetSamples({"a": [sample(NOW + 5, NEW, 100, errors=30, ms=500.0)]})
    verdict = judge(spec, fleet, "a", old_sha=None, activated_at=NOW, now=NOW + 10)
    assert verdict.enough
    assert verdict.breach
    assert "error rate" in verdict.reason
    fleet = FleetSamples({"a": [sample(NOW + 5, NEW, 100, errors=0, ms=500.0)]})
    verdict = judge(spec, fleet, "a", old_sha=None, activated_at=NOW, now=NOW + 10)
    assert verdict.enough
    assert not verdict.breach


def test_judge_needs_min_samples_on_both_sides() -> None:
    spec = make_spec(min_samples=100)
    fleet = FleetSamples(
        {"a": [sample(NOW - 5, OLD, 50), sample(NOW + 5, NEW, 500, errors=400, ms=900.0)]}
    )
    verdict = judge(spec, fleet, "a", old_sha=OLD.sha256, activated_at=NOW, now=NOW + 10)
    assert (verdict.enough, verdict.breach) == (False, False)
    assert "fewer than 100" in verdict.reason


@pytest.mark.parametrize("old", [sample(NOW - 5, OLD, 500), sample(NOW + 5, OLD, 500)])
def test_judge_uses_the_control_group_when_it_has_enough(old: HealthSample) -> None:
    spec = make_spec(min_samples=100)
    fleet = FleetSamples(
        {
            "a": [sample(NOW - 5, OLD, 500), sample(NOW + 5, NEW, 500, ms=10.0)],
            "b": [old],
        }
    )
    verdict = judge(spec, fleet, "a", old_sha=OLD.sha256, activated_at=NOW, now=NOW + 10)
    in_window = old.ts > NOW
    assert ("control group of 1 nodes" in verdict.reason) is in_window
    assert ("its own runs before the update" in verdict.reason) is not in_window
