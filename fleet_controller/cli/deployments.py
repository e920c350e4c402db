"""``fleetctl deployment set|list|show|delete`` and ``fleetctl node label|forget``.

A deployment names what a group of nodes (a label selector) should run; the
controller keeps the group on it (see docs/operations.md, "Deployments").
``node label`` changes the labels operators give a node on top of those it
announces; ``node forget`` removes a node that is gone for good.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fleet_controller.cli import common
from fleet_controller.cli.catalog import help_of
from fleet_controller.cli.rollouts import add_policy_flags, policy_request
from shared.errors import DecodeError, UsageError
from shared.labels import format_labels
from shared.operations import (
    DEPLOYMENT_DELETE,
    DEPLOYMENT_LIST,
    DEPLOYMENT_SET,
    DEPLOYMENT_SHOW,
    NODE_FORGET,
    NODE_LABEL,
    Operation,
)
from shared.topics import check_id

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["add_node_actions", "parse_label_changes", "register"]

_LIST_COLUMNS = (
    "name",
    "selector",
    "model",
    "nodes",
    "on_target",
    "drifted",
    "offline",
    "held",
    "rollout_id",
)
_SHOWN_NODES = 20


def parse_label_changes(terms: list[str]) -> dict[str, Any]:
    """``k=v`` (set), ``!k`` (hide the node's own ``k``), ``k-`` (drop the operators'
    ``k``) as the ``set``, ``hide`` and ``reset`` of a ``node.label`` request.

    Raises: UsageError naming the term.
    """
    changes: dict[str, Any] = {"set": {}, "hide": [], "reset": []}
    for term in terms:
        key, sep, value = term.partition("=")
        try:
            if sep:
                changes["set"][check_id(key, "label key")] = check_id(value, "label value")
            elif term.startswith("!"):
                changes["hide"].append(check_id(term[1:], "label key"))
            elif term.endswith("-"):
                changes["reset"].append(check_id(term[:-1], "label key"))
            else:
                raise UsageError("expected k=v, !k or k-")
        except DecodeError as exc:
            raise UsageError(f"label change {term!r}: {exc}") from None
    return {k: v for k, v in changes.items() if v}


def _ask(
    args: argparse.Namespace,
    operation: Operation[Any],
    request: dict[str, Any],
    render: common.Render,
    *,
    now: float | None = None,
    shape: Callable[[Any, str], Any] = common.mapping,
) -> int:
    """Check ``request`` locally, run ``operation`` on the controller, print its
    answer (which must be of ``shape``: an object, or ``common.rows``)."""
    settings = common.settings_from(args)
    checked = common.checked(operation, request, now=now)
    answer = asyncio.run(common.call(settings, operation, checked))
    common.emit(args, shape(answer, operation.name), render)
    return 0


def _node_label(args: argparse.Namespace) -> int:
    node = check_id(args.id, "node id")
    request = {"node_id": node, **parse_label_changes(args.changes)}
    return _ask(args, NODE_LABEL, request, _labels_view)


def _labels_view(node: Mapping[str, Any]) -> RenderableType:
    from fleet_controller import console as view

    return view.kv_table(
        {
            "node": node.get("node_id"),
            "labels": format_labels(node.get("labels") or {}) or "(none)",
            "announced": format_labels(node.get("announced_labels") or {}) or "(none)",
            "operators'": ",".join(
                f"{k}={v}" if v is not None else f"!{k}"
                for k, v in sorted((node.get("central_labels") or {}).items())
            )
            or "(none)",
        },
        title="labels",
    )


def _node_forget(args: argparse.Namespace) -> int:
    request = {"node_id": check_id(args.id, "node id")}
    return _ask(args, NODE_FORGET, request, lambda a: f"node {a.get('node_id')} forgotten")


def _deployment_set(args: argparse.Namespace) -> int:
    request = {"deployment": check_id(args.name, "deployment name"), **policy_request(args)}
    if args.force:
        request["force"] = True
    return _ask(args, DEPLOYMENT_SET, request, _set_view, now=time.time())


def _set_view(answer: Mapping[str, Any]) -> RenderableType:
    started = answer.get("started")
    if isinstance(started, Mapping):
        note = f"rollout {started.get('rollout_id')} started"
    else:
        note = "no rollout started (same target, or no node matches yet)"
    from rich.console import Group

    return Group(_summary(answer), note)


def _summary(deployment: Mapping[str, Any]) -> RenderableType:
    from fleet_controller import console as view

    keys = ("name", "model", "selector", "rollout_id", "created_by", "updated_at")
    return view.kv_table({k: deployment.get(k) for k in keys}, title="deployment")


def _list_view(rows: Any) -> RenderableType:
    from fleet_controller import console as view

    return view.records_table(rows, title="deployments", columns=_LIST_COLUMNS)


def _deployment_list(args: argparse.Namespace) -> int:
    return _ask(
        args,
        DEPLOYMENT_LIST,
        {},
        _list_view,
        shape=common.rows,
    )


def _deployment_show(args: argparse.Namespace) -> int:
    request = {"deployment": check_id(args.name, "name")}
    return _ask(args, DEPLOYMENT_SHOW, request, _show_view)


def _nodes(ids: Any) -> str:
    shown = [str(i) for i in ids or []]
    more = f" (+{len(shown) - _SHOWN_NODES} more)" if len(shown) > _SHOWN_NODES else ""
    return (", ".join(shown[:_SHOWN_NODES]) or "-") + more


def _show_view(d: Mapping[str, Any]) -> RenderableType:
    from rich.console import Group

    from fleet_controller import console as view

    held = d.get("held") or {}
    group = view.kv_table(
        {
            "members": d.get("members"),
            "on target": d.get("on_target"),
            "drifted (online, next to get it)": _nodes(d.get("drifted")),
            "offline, not on target": _nodes(d.get("offline")),
            "rollout state": d.get("rollout_state"),
            "waiting": d.get("waiting") or "-",
        },
        title="group",
    )
    parts: list[RenderableType] = [_summary(d), group]
    if isinstance(held, Mapping) and held:
        rows = [{"node": node, "why": why} for node, why in sorted(held.items())]
        parts.append(view.records_table(rows, title="held (not sent this model again)"))
    conflicts = d.get("conflicts") or {}
    if isinstance(conflicts, Mapping) and conflicts:
        rows = [{"node": node, "also in": other} for node, other in sorted(conflicts.items())]
        parts.append(view.records_table(rows, title="in another deployment too (left alone)"))
    return Group(*parts)


def _deployment_delete(args: argparse.Namespace) -> int:
    request = {"deployment": check_id(args.name, "name")}
    return _ask(
        args,
        DEPLOYMENT_DELETE,
        request,
        lambda a: f"deployment {a.get('name')} deleted; its nodes keep their models",
    )


def add_node_actions(actions: common.Commands, parents: common.Parents) -> None:
    """``node label`` and ``node forget`` (``node enroll|revoke`` are the broker's)."""
    label = common.add_command(
        actions,
        "label",
        _node_label,
        "set (k=v), hide (!k) or reset (k-) labels on top of what the node announces",
        parents.with_json,
    )
    label.add_argument("id", metavar="NODE_ID")
    label.add_argument("changes", nargs="+", metavar="CHANGE", help="k=v, !k or k-")
    forget = common.add_command(
        actions,
        "forget",
        _node_forget,
        "remove an offline node that is gone for good (its results stay)",
        parents.with_json,
    )
    forget.add_argument("id", metavar="NODE_ID")


def register(commands: common.Commands, parents: common.Parents) -> None:
    """Add ``deployment`` and its actions to ``commands``."""
    deployment = commands.add_parser("deployment", help=help_of("deployment"))
    actions = deployment.add_subparsers(dest="deployment_command", required=True, metavar="ACTION")
    set_ = common.add_command(
        actions,
        "set",
        _deployment_set,
        "say what a group should run; a new target starts a staged rollout",
        parents.with_json,
        description="Flags left out take the controller's defaults, shown here. Nodes that "
        "join the group later get the model by rollouts of their own with the same policy.",
    )
    set_.add_argument("name", metavar="NAME", help="the deployment's name")
    set_.add_argument("model", metavar="NAME@VERSION")
    add_policy_flags(set_)
    set_.add_argument(
        "--force", action="store_true", help="set it even if another active rollout overlaps"
    )
    common.add_command(actions, "list", _deployment_list, "list deployments", parents.with_json)
    show = common.add_command(
        actions, "show", _deployment_show, "a deployment and its group", parents.with_json
    )
    show.add_argument("name", metavar="NAME")
    delete = common.add_command(
        actions,
        "delete",
        _deployment_delete,
        "stop keeping a group on its model (nodes keep what they run)",
        parents.with_json,
    )
    delete.add_argument("name", metavar="NAME")
