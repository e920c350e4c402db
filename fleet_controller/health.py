"""The health gate: is a node's new model worse than the old one, or is it the weather?

The controller owns the verdict. Each node reports, per telemetry period, how
many runs its serving model made, how many failed and a latency histogram
(:class:`shared.messages.PeriodStats`, buckets of :mod:`shared.histogram`).
:func:`judge` compares a node's runs on the new model since its activation with
a **reference measured over the same window**, the way canary analysis does:

1. the **control group**: every other node of the rollout's selection still on
   the node's previous model, over the same window; or, when it has fewer than
   ``min_samples`` runs (the last wave, a one-node fleet),
2. the node's own runs on the previous model just before its activation,
   **adjusted by the fleet-wide change** over the same span, measured on nodes
   whose model did not change meanwhile (their latency ratio and error-rate
   difference, after versus before).

Two gates, each optional (``gates``):

* **errors**: the new error rate exceeds the reference's by more than
  ``max_error_increase``, with one-sided confidence ``confidence`` (a
  two-proportion z-test against that margin);
* **latency**: the new median exceeds the reference's allowance
  (``max(median * (1 + max_latency_regression), median + min_latency_regression_ms)``)
  and a one-sided Mann-Whitney U test finds the new latencies larger than the
  reference's *shifted by that allowance* with confidence ``confidence``.

Neither side with fewer than ``min_samples`` runs makes a verdict. A single
breach is not one either: the rollout engine counts consecutive breaching
evaluations (:mod:`fleet_controller.rollout_core`). Pure: samples in, a
judgement out; no clock, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from shared.histogram import BUCKETS_PER_DOUBLING, NUM_BUCKETS, bucket_value_ms

if TYPE_CHECKING:
    from fleet_controller.rollout_records import RolloutSpec

__all__ = [
    "BUCKET_VALUES_MS",
    "FleetSamples",
    "Gate",
    "HealthSample",
    "Judgement",
    "Window",
    "error_increase_p",
    "judge",
    "latency_regression_p",
]

Counts = npt.NDArray[np.int64]
BUCKET_VALUES_MS = np.array([bucket_value_ms(i) for i in range(NUM_BUCKETS)])
_MIN_BASELINE_SPAN_S = 5.0  # the shortest pre-activation span read for a baseline
_MAX_BASELINE_SPAN_S = 600.0


class Gate(StrEnum):
    ERRORS = "errors"
    LATENCY = "latency"


@dataclass(frozen=True, slots=True)
class HealthSample:
    """One telemetry period of one node, reduced to what the gate needs."""

    ts: float
    model_sha256: str | None
    inferences: int
    errors: int
    latency: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Window:
    """Runs of one model summed over some periods (of one node or many)."""

    hist: Counts
    inferences: int = 0
    errors: int = 0
    nodes: int = 0

    @classmethod
    def empty(cls) -> Window:
        return cls(np.zeros(NUM_BUCKETS, dtype=np.int64))

    @property
    def runs(self) -> int:
        return self.inferences + self.errors

    @property
    def error_rate(self) -> float:
        return self.errors / self.runs if self.runs else 0.0

    def median_ms(self) -> float:
        """The median successful run's bucket value; 0 when there is none."""
        total = int(self.hist.sum())
        if total == 0:
            return 0.0
        index = int(np.searchsorted(np.cumsum(self.hist), total / 2))
        return float(BUCKET_VALUES_MS[index])

    def plus(self, other: Window) -> Window:
        return Window(
            self.hist + other.hist,
            self.inferences + other.inferences,
            self.errors + other.errors,
            self.nodes + other.nodes,
        )

    def scaled(self, factor: float) -> Window:
        """The histogram with every latency multiplied by ``factor`` (whole buckets)."""
        shift = round(math.log2(factor) * BUCKETS_PER_DOUBLING) if factor > 0 else 0
        if shift == 0:
            return self
        hist = np.zeros_like(self.hist)
        for index in np.flatnonzero(self.hist):
            hist[min(NUM_BUCKETS - 1, max(0, int(index) + shift))] += self.hist[index]
        return Window(hist, self.inferences, self.errors, self.nodes)


def _hist(pairs: Iterable[tuple[int, int]]) -> Counts:
    hist = np.zeros(NUM_BUCKETS, dtype=np.int64)
    for index, count in pairs:
        hist[index] += count
    return hist


class _Series:
    """One node's samples, in time order, as arrays."""

    def __init__(self, samples: Sequence[HealthSample]) -> None:
        ordered = sorted(samples, key=lambda s: s.ts)
        self.ts = np.array([s.ts for s in ordered], dtype=np.float64)
        self.sha = [s.model_sha256 for s in ordered]
        self.hist = np.array([_hist(s.latency) for s in ordered], dtype=np.int64).reshape(
            len(ordered), NUM_BUCKETS
        )
        self.inferences = np.array([s.inferences for s in ordered], dtype=np.int64)
        self.errors = np.array([s.errors for s in ordered], dtype=np.int64)

    def _range(self, after: float, until: float) -> tuple[int, int]:
        lo = int(np.searchsorted(self.ts, after, side="right"))
        hi = int(np.searchsorted(self.ts, until, side="right"))
        return lo, hi

    def window(self, sha: str, after: float, until: float) -> Window:
        """Periods of model ``sha`` that ended in ``(after, until]``."""
        lo, hi = self._range(after, until)
        rows = [i for i in range(lo, hi) if self.sha[i] == sha]
        if not rows:
            return Window.empty()
        return Window(
            self.hist[rows].sum(axis=0),
            int(self.inferences[rows].sum()),
            int(self.errors[rows].sum()),
            1,
        )

    def steady(self, after: float, until: float) -> bool:
        """Whether every period ending in ``(after, until]`` ran one model."""
        lo, hi = self._range(after, until)
        return hi > lo and len(set(self.sha[lo:hi])) == 1


class FleetSamples:
    """Every selected node's recent samples, indexed for windows of time."""

    def __init__(self, samples: Mapping[str, Sequence[HealthSample]]) -> None:
        self._samples = {node_id: s for node_id, s in samples.items() if s}
        self._built: dict[str, _Series] = {}

    def _get(self, node_id: str) -> _Series | None:
        """The node's series, built on first use (most ticks judge nobody)."""
        series = self._built.get(node_id)
        if series is None and node_id in self._samples:
            series = self._built[node_id] = _Series(self._samples[node_id])
        return series

    def _all(self, exclude: frozenset[str]) -> Iterable[_Series]:
        for node_id in self._samples:
            series = self._get(node_id)
            if series is not None and node_id not in exclude:
                yield series

    def node(self, node_id: str, sha: str, after: float, until: float) -> Window:
        series = self._get(node_id)
        return Window.empty() if series is None else series.window(sha, after, until)

    def others(self, sha: str, after: float, until: float, exclude: frozenset[str]) -> Window:
        """Runs of model ``sha`` on every node but ``exclude``, periods ending in the window."""
        total = Window.empty()
        for series in self._all(exclude):
            part = series.window(sha, after, until)
            if part.runs:
                total = total.plus(part)
        return total

    def weather(
        self, start: float, split: float, end: float, exclude: frozenset[str], min_runs: int
    ) -> tuple[float, float, int]:
        """How the fleet changed from ``(start, split]`` to ``(split, end]``, on nodes
        (not in ``exclude``) that ran one model throughout: the latency ratio of the
        medians, the error-rate difference, and how many nodes that is; ``(1, 0, 0)``
        when either side has fewer than ``min_runs`` runs."""
        before, after, nodes = Window.empty(), Window.empty(), 0
        for series in self._all(exclude):
            if not series.steady(start, end):
                continue
            sha = series.sha[int(np.searchsorted(series.ts, end, side="right")) - 1]
            if sha is None:
                continue
            one, two = series.window(sha, start, split), series.window(sha, split, end)
            before, after = before.plus(one), after.plus(two)
            nodes += 1
        if before.runs < min_runs or after.runs < min_runs:
            return 1.0, 0.0, 0
        old, new = before.median_ms(), after.median_ms()
        ratio = new / old if old > 0 and new > 0 else 1.0
        return ratio, after.error_rate - before.error_rate, nodes


# ----- the statistics ---------------------------------------------------------------


def _upper_tail(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def latency_regression_p(
    treated: Counts, reference: Counts, allowance: npt.NDArray[np.float64]
) -> float:
    """One-sided Mann-Whitney U p-value that ``treated`` latencies are larger than
    ``reference`` latencies moved up to ``allowance`` (one value per bucket).

    Both histograms are bucket counts; equal values count as ties (normal
    approximation with tie and continuity corrections). 1.0 when either is empty.
    """
    n1, n2 = int(treated.sum()), int(reference.sum())
    if n1 == 0 or n2 == 0:
        return 1.0
    values = np.concatenate([BUCKET_VALUES_MS[treated > 0], allowance[reference > 0]])
    t_counts = np.concatenate([treated[treated > 0], np.zeros(int((reference > 0).sum()))])
    r_counts = np.concatenate([np.zeros(int((treated > 0).sum())), reference[reference > 0]])
    distinct, inverse = np.unique(values, return_inverse=True)
    t_at = np.bincount(inverse, weights=t_counts, minlength=len(distinct))
    r_at = np.bincount(inverse, weights=r_counts, minlength=len(distinct))
    r_below = np.cumsum(r_at) - r_at
    u = float(np.sum(t_at * (r_below + 0.5 * r_at)))
    n = n1 + n2
    ties = float(np.sum((t_at + r_at) ** 3 - (t_at + r_at)))
    variance = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0:
        return 1.0
    z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(variance)
    return _upper_tail(z)


def error_increase_p(
    errors: int, runs: int, ref_errors: float, ref_runs: int, margin: float
) -> float:
    """One-sided p-value that the error rate ``errors/runs`` exceeds the reference's
    by more than ``margin`` (a z-test; rates smoothed by half a run so that zero
    errors on both sides still has a spread). 1.0 when either side has no runs."""
    if runs == 0 or ref_runs == 0:
        return 1.0
    p1 = (errors + 0.5) / (runs + 1)
    p2 = (ref_errors + 0.5) / (ref_runs + 1)
    spread = math.sqrt(p1 * (1 - p1) / runs + p2 * (1 - p2) / ref_runs)
    return _upper_tail((errors / runs - ref_errors / ref_runs - margin) / spread)


# ----- the verdict --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Judgement:
    """One evaluation of one node. ``enough`` is False when either side had fewer
    than ``min_samples`` runs; then ``breach`` is False and nothing is decided."""

    breach: bool
    enough: bool
    runs: int
    reason: str


@dataclass(frozen=True, slots=True)
class _Reference:
    window: Window
    error_shift: float
    what: str


def _reference(
    spec: RolloutSpec,
    fleet: FleetSamples,
    node_id: str,
    *,
    old_sha: str,
    activated_at: float,
    now: float,
) -> _Reference:
    control = fleet.others(old_sha, activated_at, now, frozenset({node_id}))
    if control.runs >= spec.min_samples:
        return _Reference(control, 0.0, f"control group of {control.nodes} nodes")
    span = max(now - activated_at, spec.health_window_s, _MIN_BASELINE_SPAN_S)
    baseline = fleet.node(node_id, old_sha, activated_at - span, activated_at)
    while baseline.runs < spec.min_samples and span < _MAX_BASELINE_SPAN_S:
        span = min(2 * span, _MAX_BASELINE_SPAN_S)
        baseline = fleet.node(node_id, old_sha, activated_at - span, activated_at)
    ratio, error_shift, nodes = fleet.weather(
        activated_at - span, activated_at, now, frozenset({node_id}), spec.min_samples
    )
    what = "its own runs before the update"
    if nodes:
        what += f", adjusted by the fleet's change (x{ratio:.2f} latency on {nodes} nodes)"
    return _Reference(baseline.scaled(ratio), error_shift, what)


def judge(
    spec: RolloutSpec,
    fleet: FleetSamples,
    node_id: str,
    *,
    old_sha: str | None,
    activated_at: float,
    now: float,
) -> Judgement:
    """Evaluate ``node_id``'s runs of the rollout's model since ``activated_at``.

    ``old_sha`` is the model the node ran before (None: a first install, judged
    on its own error rate). Nodes whose model changed during the window never
    count in the fleet's weather; the node itself is never its own control.
    """
    treated = fleet.node(node_id, spec.model.sha256, activated_at, now)
    if old_sha is None or old_sha == spec.model.sha256:
        ref = _Reference(Window.empty(), 0.0, "no previous model")
    else:
        ref = _reference(spec, fleet, node_id, old_sha=old_sha, activated_at=activated_at, now=now)
    if treated.runs < spec.min_samples or (ref.window.runs < spec.min_samples and old_sha):
        return Judgement(
            breach=False,
            enough=False,
            runs=treated.runs,
            reason=f"{treated.runs} runs vs {ref.window.runs} in the reference "
            f"({ref.what}): fewer than {spec.min_samples}",
        )
    alpha = 1.0 - spec.confidence
    breaches: list[str] = []
    if Gate.ERRORS in spec.gates:
        breaches.extend(_error_breach(spec, treated, ref, alpha))
    if Gate.LATENCY in spec.gates and ref.window.runs:
        breaches.extend(_latency_breach(spec, treated, ref.window, alpha))
    verdict = "; ".join(breaches) if breaches else _healthy_reason(treated, ref.window)
    return Judgement(
        breach=bool(breaches),
        enough=True,
        runs=treated.runs,
        reason=f"{verdict} (vs {ref.what})",
    )


def _error_breach(spec: RolloutSpec, treated: Window, ref: _Reference, alpha: float) -> list[str]:
    ref_rate = min(1.0, max(0.0, ref.window.error_rate + ref.error_shift))
    ref_runs = ref.window.runs or treated.runs  # no previous model: against a clean slate
    increase = treated.error_rate - ref_rate
    if increase <= spec.max_error_increase:
        return []
    p = error_increase_p(
        treated.errors, treated.runs, ref_rate * ref_runs, ref_runs, spec.max_error_increase
    )
    if p >= alpha:
        return []
    return [f"error rate {treated.error_rate:.1%} vs {ref_rate:.1%} (p={p:.2g})"]


def _allowance(spec: RolloutSpec) -> npt.NDArray[np.float64]:
    return np.maximum(
        BUCKET_VALUES_MS * (1 + spec.max_latency_regression),
        BUCKET_VALUES_MS + spec.min_latency_regression_ms,
    )


def _latency_breach(spec: RolloutSpec, treated: Window, ref: Window, alpha: float) -> list[str]:
    new, old = treated.median_ms(), ref.median_ms()
    limit = max(old * (1 + spec.max_latency_regression), old + spec.min_latency_regression_ms)
    if old <= 0 or new <= limit:
        return []
    p = latency_regression_p(treated.hist, ref.hist, _allowance(spec))
    if p >= alpha:
        return []
    return [f"median latency {new:.3g} ms vs {old:.3g} ms, over {limit:.3g} ms (p={p:.2g})"]


def _healthy_reason(treated: Window, ref: Window) -> str:
    return (
        f"healthy: {treated.runs} runs, {treated.error_rate:.1%} errors, "
        f"median {treated.median_ms():.3g} ms vs {ref.median_ms():.3g} ms"
    )
