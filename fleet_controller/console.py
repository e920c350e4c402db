"""What ``fleetctl`` shows: tables of controller answers, and the ``fleetctl top`` console.

Two halves:

* :class:`FleetView` is pure. Feed it node messages (``state``, ``telemetry``,
  ``status``) with an explicit receive time ``now`` and it returns one
  :class:`NodeRow` per node. It applies the protocol's birth/death rule and
  its sender-matches-topic rule from :mod:`shared.rules` (a birth always
  wins; a death older than the newest session seen is a stale Will), computes
  inferences per second from the *delta* of two telemetry counters on the
  node's own clock (a counter that goes backwards means the agent restarted:
  no rate until the next sample).
* :func:`run_top` is the thin MQTT shell: one read-only, clean-session
  connection through the transport seam (:mod:`edgefleet_io.transport`) that
  subscribes to the fleet's node leaves and redraws a :class:`rich.live.Live`
  table, or collects for a while and returns one snapshot
  (``fleetctl top --once --json``).

The table helpers (:func:`records_table`, :func:`kv_table`,
:func:`rollout_view`, :func:`report_view`) render the JSON the operator API
returns; every cell is a :class:`rich.text.Text`, so text from the wire is
never read as rich markup.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edgefleet_io.transport import Session, Transport
from shared import topics
from shared.errors import DecodeError
from shared.messages import ModelRef, NodeState, NodeStatus, Telemetry, decode
from shared.rules import accept_node_state, require_topic_node

__all__ = [
    "TOP_LEAVES",
    "FleetView",
    "NodeRow",
    "format_value",
    "kv_table",
    "plan_view",
    "records_table",
    "report_view",
    "rollout_view",
    "run_top",
    "stop_on_signals",
    "summarize",
    "top_table",
]

# Node leaves `fleetctl top` reads. The operator ACL (broker_config/acl.template)
# grants state and telemetry; status is shown where the broker lets it through.
TOP_LEAVES = ("state", "telemetry", "status")

NodeMessage = NodeState | Telemetry | NodeStatus
_MODELS: dict[topics.TopicKind, type[NodeMessage]] = {
    topics.TopicKind.STATE: NodeState,
    topics.TopicKind.TELEMETRY: Telemetry,
    topics.TopicKind.STATUS: NodeStatus,
}


# ----- fleetctl top: pure aggregation ---------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One line of ``fleetctl top``; ``None`` where nothing is known yet."""

    node: str
    online: bool | None
    model: str | None
    inferences_per_s: float | None
    p95_ms: float | None
    errors: int | None
    outbox_depth: int | None
    status: str | None
    age_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Node:
    node_id: str
    online: bool | None = None
    session: int | None = None
    model: ModelRef | None = None
    telemetry: Telemetry | None = None
    rate: float | None = None
    status: NodeStatus | None = None
    last_seen: float | None = None


@dataclass(slots=True)
class FleetView:
    """Per-node aggregation of one fleet's node messages (pure; no clock, no I/O)."""

    fleet: str
    malformed: int = 0
    _nodes: dict[str, _Node] = field(default_factory=dict)

    def feed(self, topic: str, payload: bytes, now: float) -> bool:
        """Decode one MQTT message of this fleet and apply it; False when ignored.

        An empty payload on ``state`` (a cleared retained birth) forgets the
        node. Malformed payloads, and payloads naming another node than their
        topic, are counted in :attr:`malformed` and dropped.
        """
        try:
            parsed = topics.parse_topic(topic)
        except DecodeError:
            return False
        model = _MODELS.get(parsed.kind)
        if parsed.fleet != self.fleet or model is None or parsed.node is None:
            return False
        if not payload:
            if parsed.kind is topics.TopicKind.STATE:
                self._nodes.pop(parsed.node, None)
                return True
            return False
        try:
            message = decode(model, payload)
            require_topic_node(parsed.node, message.node)
        except DecodeError:
            self.malformed += 1
            return False
        return self.apply(message, now)

    def apply(self, message: NodeMessage, now: float) -> bool:
        """Apply one decoded message received at ``now``; False when it was stale."""
        node = self._nodes.get(message.node)
        if node is None:
            node = self._nodes[message.node] = _Node(message.node)
        if isinstance(message, NodeState):
            if not accept_node_state(node.session, message):
                return False  # a late Last Will of an older session
            node.session = message.session
            node.online = message.online
            node.model = message.model
        elif isinstance(message, Telemetry):
            previous = node.telemetry
            if previous is not None and message.ts <= previous.ts:
                return False  # older or repeated sample
            node.rate = _rate(previous, message)
            node.telemetry = message
            node.model = message.model
        else:
            node.status = message
        node.last_seen = now
        return True

    def rows(self, now: float) -> list[NodeRow]:
        return [_row(self._nodes[n], now) for n in sorted(self._nodes)]

    def snapshot(self, now: float) -> dict[str, Any]:
        """The JSON document of ``fleetctl top --once --json``."""
        rows = self.rows(now)
        return {
            "fleet": self.fleet,
            "ts": now,
            "summary": summarize(rows),
            "nodes": [r.as_dict() for r in rows],
            "malformed": self.malformed,
        }


def _rate(previous: Telemetry | None, current: Telemetry) -> float | None:
    if previous is None or current.inferences < previous.inferences:
        return None  # first sample, or the agent restarted and its counters with it
    return (current.inferences - previous.inferences) / (current.ts - previous.ts)


def _row(node: _Node, now: float) -> NodeRow:
    telemetry = node.telemetry
    status = node.status
    status_text = None
    if status is not None:
        parts = [status.state.value, status.rollout_id or "", status.code or ""]
        status_text = " ".join(p for p in parts if p)
    return NodeRow(
        node=node.node_id,
        online=node.online,
        model=f"{node.model.name}@{node.model.version}" if node.model else None,
        inferences_per_s=node.rate,
        p95_ms=telemetry.latency.p95_ms if telemetry else None,
        errors=telemetry.errors if telemetry else None,
        outbox_depth=telemetry.outbox_depth if telemetry else None,
        status=status_text,
        age_s=max(0.0, now - node.last_seen) if node.last_seen is not None else None,
    )


def summarize(rows: Sequence[NodeRow]) -> dict[str, Any]:
    rates = [r.inferences_per_s for r in rows if r.inferences_per_s is not None]
    return {
        "nodes": len(rows),
        "online": sum(1 for r in rows if r.online),
        "inferences_per_s": sum(rates) if rates else None,
        "errors": sum(r.errors or 0 for r in rows),
    }


def top_table(fleet: str, rows: Sequence[NodeRow], *, malformed: int = 0) -> Table:
    summary = summarize(rows)
    rate = summary["inferences_per_s"]
    caption = (
        f"{summary['online']}/{summary['nodes']} online, "
        f"{'-' if rate is None else f'{rate:.1f}'} inferences/s, {summary['errors']} errors"
    )
    if malformed:
        caption += f", {malformed} malformed messages dropped"
    table = Table(title=f"fleet {fleet}", caption=caption)
    for header, justify in (
        ("node", "left"),
        ("online", "left"),
        ("model", "left"),
        ("inf/s", "right"),
        ("p95 ms", "right"),
        ("errors", "right"),
        ("outbox", "right"),
        ("last status", "left"),
        ("seen", "right"),
    ):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        online = Text("?" if r.online is None else ("yes" if r.online else "no"))
        if r.online is False:
            online.stylize("red")
        elif r.online:
            online.stylize("green")
        table.add_row(
            Text(r.node),
            online,
            Text(r.model or "-"),
            Text(_num(r.inferences_per_s, "{:.1f}")),
            Text(_num(r.p95_ms, "{:.1f}")),
            Text(_num(r.errors, "{}")),
            Text(_num(r.outbox_depth, "{}")),
            Text(r.status or "-"),
            Text(_num(r.age_s, "{:.0f}s")),
        )
    return table


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


# ----- fleetctl top: the MQTT shell ---------------------------------------------------


async def run_top(
    transport: Transport,
    *,
    fleet: str,
    interval_s: float,
    once: bool,
    console: Console,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any] | None:
    """Watch the fleet's nodes; with ``once`` return a snapshot after ``interval_s``.

    Without ``once`` it redraws every ``interval_s`` until SIGINT or SIGTERM.
    The client only subscribes (read-only) and uses a clean session, so
    nothing is queued for it on the broker after it leaves.

    Raises:
        TransportError: the broker cannot be reached or drops the connection.
    """
    view = FleetView(fleet)
    session = Session(client_id=f"fleetctl-top-{secrets.token_hex(4)}")
    async with transport.connect(session) as link:
        await link.subscribe([(topics.node_filter(fleet, leaf), 1) for leaf in TOP_LEAVES])

        async def read() -> None:
            async for message in link.messages():
                view.feed(message.topic, message.payload, clock())

        reader = asyncio.get_running_loop().create_task(read(), name="top-reader")
        try:
            if once:
                await _wait(reader, interval_s)
                return view.snapshot(clock())
            await _live(view, reader, interval_s, console, clock)
            return None
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def _wait(reader: asyncio.Task[None], seconds: float) -> None:
    """Sleep ``seconds``, or return early (re-raising its error) when ``reader`` ends."""
    done, _ = await asyncio.wait({reader}, timeout=seconds)
    if done:
        reader.result()


async def _live(
    view: FleetView,
    reader: asyncio.Task[None],
    interval_s: float,
    console: Console,
    clock: Callable[[], float],
) -> None:
    stop = asyncio.Event()
    with stop_on_signals(stop):

        def table() -> Table:
            return top_table(view.fleet, view.rows(clock()), malformed=view.malformed)

        with Live(table(), console=console, auto_refresh=False) as live:
            while not stop.is_set():
                waiter = asyncio.get_running_loop().create_task(stop.wait())
                done, _ = await asyncio.wait(
                    {reader, waiter}, timeout=interval_s, return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                if reader in done:
                    reader.result()
                    return
                live.update(table(), refresh=True)


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Set ``stop`` on SIGINT/SIGTERM while inside (a clean exit instead of a traceback)."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


# ----- tables of operator API answers ------------------------------------------------

_CELL_CHARS_MAX = 120  # characters in a table cell; --json has the full values


def format_value(key: str, value: Any) -> str:
    """One cell: ``-`` for nothing, short digests, readable times, sizes and model refs."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int | float) and _is_time_key(key) and value > 1e8:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if isinstance(value, int) and (key == "size" or key.endswith("_bytes")):
        return _bytes(value)
    if isinstance(value, float):
        return f"{value:.1f}" if key.endswith("_ms") else f"{value:.4g}"
    if isinstance(value, str) and key.endswith("sha256") and len(value) == 64:
        return value[:12]
    if isinstance(value, Mapping):
        if "name" in value and "version" in value:
            return f"{value['name']}@{value['version']}"
        return ", ".join(f"{k}={format_value(str(k), v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(format_value(key, v) for v in value)
    return str(value)


def _is_time_key(key: str) -> bool:
    return key in ("ts", "time", "last_seen", "since") or key.endswith(("_at", "_ts"))


def _bytes(size: int) -> str:
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{size} B"  # pragma: no cover - the loop always returns


_IDENTITY_KEYS = ("node_id", "node", "rollout_id", "name", "version", "sha256")


def _columns(rows: Sequence[Mapping[str, Any]], preferred: Sequence[str]) -> list[str]:
    """``preferred`` keys present in ``rows``; else every scalar key, identities first."""
    present = {k for r in rows for k in r}
    columns = [k for k in preferred if k in present]
    if columns:
        return columns
    seen: dict[str, None] = dict.fromkeys(k for k in _IDENTITY_KEYS if k in present)
    for r in rows:
        seen.update(dict.fromkeys(k for k, v in r.items() if not isinstance(v, list | dict)))
    return list(seen)


def records_table(
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str | None = None,
    columns: Sequence[str] = (),
) -> Table:
    """A table of JSON rows: the ``columns`` present (else every scalar field)."""
    table = Table(title=title)
    keys = _columns(rows, columns)
    for key in keys:
        table.add_column(key.replace("_", " "))
    for row in rows:
        table.add_row(*(Text(_clip(format_value(k, row.get(k)))) for k in keys))
    if not rows:
        table.caption = "(none)"
    return table


def _clip(text: str, limit: int = _CELL_CHARS_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def kv_table(values: Mapping[str, Any], *, title: str | None = None) -> Table:
    """A two-column table of one JSON object's fields."""
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in values.items():
        table.add_row(Text(key.replace("_", " ")), Text(_clip(format_value(key, value), 400)))
    return table


_ROLLOUT_FIELDS = ("rollout_id", "model", "state", "wave", "waves", "selector", "reason")
_NODE_COLUMNS = ("node", "wave", "state", "attempts", "from", "code", "reason")


def rollout_view(status: Mapping[str, Any], *, note: str | None = None) -> RenderableType:
    """A rollout (``rollout.status``/``rollout.start`` answer) and, if given, its nodes."""
    summary: dict[str, Any] = {k: status.get(k) for k in _ROLLOUT_FIELDS if k in status}
    if summary.get("selector") == "":
        summary["selector"] = "(all nodes)"
    waves = status.get("waves")
    if isinstance(waves, list) and "wave" in summary:
        summary["wave"] = f"{status['wave']} of {len(waves)}"
        summary["waves"] = ", ".join(f"{format_value('', w)}%" for w in waves)
    counts = status.get("counts")
    if isinstance(counts, Mapping):
        summary["nodes"] = f"{status.get('nodes_total', sum(counts.values()))}" + (
            f" ({format_value('counts', dict(counts))})" if counts else ""
        )
    parts: list[RenderableType] = [kv_table(summary, title=f"rollout {status.get('rollout_id')}")]
    nodes = status.get("nodes")
    if isinstance(nodes, list):
        parts.append(records_table(nodes, title="nodes", columns=_NODE_COLUMNS))
    if note:
        parts.append(Text(note, style="yellow"))
    return Group(*parts)


def plan_view(plan: Mapping[str, Any]) -> RenderableType:
    """``rollout start --dry-run``: the nodes of each wave, then who is offline, who
    would refuse and which active rollouts overlap (each table only when not empty)."""
    title = f"plan of rollout {plan.get('rollout_id')}: {plan.get('model')} (nothing started)"
    waves = [
        {
            "wave": w.get("wave"),
            "percent": w.get("percent"),
            "new nodes": len(w.get("nodes", [])),
            "nodes": ", ".join(w.get("nodes", [])),
        }
        for w in plan.get("waves", [])
    ]
    parts: list[RenderableType] = [records_table(waves, title=title)]
    if plan.get("offline"):
        parts.append(kv_table({"offline": ", ".join(plan["offline"])}, title="offline now"))
    if plan.get("refusing"):
        parts.append(records_table(plan["refusing"], title="would refuse"))
    if plan.get("overlapping"):
        rows = [{**o, "nodes": ", ".join(o.get("nodes", []))} for o in plan["overlapping"]]
        parts.append(records_table(rows, title="active rollouts on the same nodes"))
    return Group(*parts)


_REPORT_SECTIONS = ("totals", "nodes", "models")


def report_view(report: Mapping[str, Any]) -> RenderableType:
    """``fleetctl report``: one table per section of the controller's report."""
    scalars = {k: v for k, v in report.items() if not isinstance(v, list | Mapping)}
    parts: list[RenderableType] = [kv_table(scalars, title="report")] if scalars else []
    first = [k for k in _REPORT_SECTIONS if k in report]
    for key in [*first, *(k for k in report if k not in first)]:
        value = report[key]
        title = key.replace("_", " ")
        if isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
            parts.append(records_table(value, title=title))
        elif isinstance(value, list):
            parts.append(kv_table({key: value}, title=title))
        elif isinstance(value, Mapping):
            nested = list(value.values())
            if nested and all(isinstance(v, Mapping) for v in nested):
                rows = [{"key": k, **v} for k, v in value.items()]
                parts.append(records_table(rows, title=title))
            else:
                parts.append(kv_table(value, title=title))
    return Group(*parts)
