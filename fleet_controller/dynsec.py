"""The broker's lanes: Mosquitto's dynamic security plugin, configured for EdgeFleet.

Mosquitto 2.0's plugin (``mosquitto_dynamic_security.so``) keeps clients,
roles and ACLs in a JSON file and changes them at run time through its control
topic, ``$CONTROL/dynamic-security/v1``. Unlike an ACL file it checks every
SUBSCRIBE (a node cannot join the controllers' ``$share`` group or subscribe
beyond its own topics) and can bind a client id to a username (a node cannot
take over another's session). Its ACLs have no ``%u``: every node and
operator gets a role of its own, written out here.

* :func:`base_config` is the plugin's starting file: the broker admin (who
  enrolls and revokes), the controllers, the shared node role, denied by default.
* :func:`enroll_node` / :func:`revoke_node` / :func:`add_operator` /
  :func:`add_controller` are the control commands that add and remove clients;
  :func:`control` sends them as the broker admin and checks every answer.

Usernames: a node's is its id, bound to client id = node id; a controller
replica's is its name; an operator's is its name in trust.json. Controllers'
and operators' client ids vary per run and are not bound (a controller opens a
second connection to revoke a node through the control topic); both are
trusted more than nodes, and docs/security.md says what that leaves open.
The controllers' role may use the control topic: revocation
(``fleetctl node revoke``) is an operator request the controller carries out,
signed and audited like every other.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
from collections.abc import Sequence
from typing import Any

from edgefleet_io.transport import Session, Transport
from shared import topics
from shared.errors import BrokerUnavailableError, EdgeFleetError, TransportError

__all__ = [
    "ADMIN_ROLE",
    "CONTROLLER_ROLE",
    "CONTROL_TIMEOUT_S",
    "CONTROL_TOPIC",
    "NODE_ROLE",
    "ControlError",
    "add_controller",
    "add_operator",
    "base_config",
    "control",
    "enroll_node",
    "hashed_client",
    "new_password",
    "revoke_node",
]

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
_RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
ADMIN_ROLE = "edgefleet-broker-admin"
CONTROLLER_ROLE = "edgefleet-controller"
NODE_ROLE = "edgefleet-node"
_ITERATIONS = 101  # what mosquitto_ctrl and the plugin itself use for sha512-pbkdf2
CONTROL_TIMEOUT_S = 10.0
_ALL_FLEETS = f"{topics.PREFIX}/+"

_Acl = dict[str, Any]


class ControlError(EdgeFleetError):
    """The broker refused a dynamic security command."""


def new_password() -> str:
    return secrets.token_urlsafe(24)


def _acl(kind: str, topic: str) -> _Acl:
    return {"acltype": kind, "topic": topic, "allow": True}


def _sends(*topic_list: str) -> list[_Acl]:
    return [_acl("publishClientSend", t) for t in topic_list]


def _reads(*topic_list: str) -> list[_Acl]:
    """Receive and subscribe: the filter a client subscribes with must match exactly."""
    return [
        acl
        for t in topic_list
        for acl in (_acl("publishClientReceive", t), _acl("subscribePattern", t))
    ]


def _node_acls(node: str) -> list[_Acl]:
    mine = f"{_ALL_FLEETS}/node/{node}"
    return [
        *_sends(
            f"{mine}/state",
            f"{mine}/status",
            f"{mine}/telemetry",
            f"{mine}/results",
            f"{mine}/infer/reply/+",
            f"{_ALL_FLEETS}/artifact/+/req/{node}",
        ),
        *_reads(
            f"{mine}/cmd",
            f"{mine}/ack",
            f"{mine}/infer/request",
            f"{_ALL_FLEETS}/artifact/+/data/{node}",
            # A blob's broadcast: the node subscribes while it downloads that blob.
            f"{_ALL_FLEETS}/artifact/+/data",
        ),
    ]


def _operator_acls(operator: str) -> list[_Acl]:
    return [
        *_sends(f"{_ALL_FLEETS}/ctl/request"),
        *_reads(
            f"{_ALL_FLEETS}/ctl/reply/{operator}",
            f"{_ALL_FLEETS}/node/+/state",
            f"{_ALL_FLEETS}/node/+/telemetry",
            f"{_ALL_FLEETS}/node/+/status",  # fleetctl top shows rollout progress
            f"{_ALL_FLEETS}/controller/state",
            f"{_ALL_FLEETS}/controller/state/+",  # each replica, and which one leads
        ),
    ]


def _roles() -> list[dict[str, Any]]:
    everything = f"{topics.PREFIX}/#"
    return [
        {
            "rolename": ADMIN_ROLE,
            "textname": "enrolls and revokes clients (fleetctl node enroll|revoke)",
            "acls": [*_sends(f"{CONTROL_TOPIC}/#"), *_reads(f"{CONTROL_TOPIC}/#")],
        },
        {
            "rolename": CONTROLLER_ROLE,
            "textname": "EdgeFleet controller replicas (they also revoke nodes)",
            "acls": [
                *_sends(everything, f"{CONTROL_TOPIC}/#"),
                *_reads(
                    everything,
                    f"$share/controllers/{everything}",
                    "$SYS/#",
                    f"{CONTROL_TOPIC}/#",
                ),
            ],
        },
        {
            "rolename": NODE_ROLE,
            "textname": "what every node reads: broadcast rollout commands, controller state",
            "acls": _reads(f"{_ALL_FLEETS}/rollout/+/cmd", f"{_ALL_FLEETS}/controller/state"),
        },
    ]


def hashed_client(
    username: str, password: str, roles: Sequence[str], *, clientid: str | None = None
) -> dict[str, Any]:
    """A client entry of the plugin's file, its password hashed as the plugin does."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS, 64)
    client: dict[str, Any] = {
        "username": username,
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": _ITERATIONS,
        "roles": [{"rolename": role} for role in roles],
    }
    if clientid is not None:
        client["clientid"] = clientid
    return client


def base_config(
    *, admin_password: str, controllers: dict[str, str], operators: dict[str, str]
) -> dict[str, Any]:
    """The plugin's starting file: the broker admin ``broker-admin``, one client per
    controller replica (name: password) and per operator (with a role of their
    own), and everything else denied."""
    roles = _roles()
    clients = [hashed_client("broker-admin", admin_password, [ADMIN_ROLE])]
    clients += [
        hashed_client(name, password, [CONTROLLER_ROLE]) for name, password in controllers.items()
    ]
    for name, password in operators.items():
        roles.append({"rolename": f"operator-{name}", "acls": _operator_acls(name)})
        clients.append(hashed_client(name, password, [f"operator-{name}"]))
    return {
        "clients": clients,
        "groups": [],
        "roles": roles,
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


def _client_with_role(
    username: str,
    password: str,
    acls: list[_Acl],
    *,
    role: str,
    also: Sequence[str] = (),
    clientid: str | None = None,
) -> list[dict[str, Any]]:
    """Commands that create ``role`` with ``acls`` and a client holding it (and ``also``)."""
    client: dict[str, Any] = {
        "command": "createClient",
        "username": username,
        "password": password,
        "roles": [{"rolename": name} for name in (*also, role)],
    }
    if clientid is not None:
        client["clientid"] = clientid
    return [{"command": "createRole", "rolename": role, "acls": acls}, client]


def enroll_node(node: str, password: str) -> list[dict[str, Any]]:
    """Commands that give ``node`` its username, password, bound client id and role."""
    return _client_with_role(
        node, password, _node_acls(node), role=f"node-{node}", also=(NODE_ROLE,), clientid=node
    )


def revoke_node(node: str) -> list[dict[str, Any]]:
    """Commands that remove ``node``'s client (the broker disconnects it) and role."""
    return [
        {"command": "deleteClient", "username": node},
        {"command": "deleteRole", "rolename": f"node-{node}"},
    ]


def add_operator(name: str, password: str) -> list[dict[str, Any]]:
    return _client_with_role(name, password, _operator_acls(name), role=f"operator-{name}")


def add_controller(name: str, password: str) -> list[dict[str, Any]]:
    return [
        {
            "command": "createClient",
            "username": name,
            "password": password,
            "roles": [{"rolename": CONTROLLER_ROLE}],
        }
    ]


async def control(
    transport: Transport,
    commands: Sequence[dict[str, Any]],
    *,
    timeout_s: float = CONTROL_TIMEOUT_S,
) -> None:
    """Send ``commands`` as the broker admin; return once every one succeeded.

    Raises:
        BrokerUnavailableError: the broker cannot be reached or does not answer.
        ControlError: a command was refused (the first refusal, in one line).
    """
    client_id = f"broker-admin-{secrets.token_hex(4)}"
    try:
        async with transport.connect(Session(client_id=client_id)) as link:
            await link.subscribe([(_RESPONSE_TOPIC, 1)])
            await link.publish(CONTROL_TOPIC, json.dumps({"commands": list(commands)}).encode())
            async with asyncio.timeout(timeout_s):
                async for message in link.messages():
                    with contextlib.suppress(ValueError):
                        answers = json.loads(message.payload).get("responses", [])
                        _check(commands, answers)
                        return
    except TimeoutError:
        raise BrokerUnavailableError(
            f"no answer from the dynamic security plugin at {transport} within "
            f"{timeout_s:g}s: is it loaded, and is this the broker admin?"
        ) from None
    except TransportError as exc:
        raise BrokerUnavailableError(f"cannot reach the broker at {transport}: {exc}") from None


def _check(commands: Sequence[dict[str, Any]], answers: list[Any]) -> None:
    if len(answers) != len(commands):
        raise ValueError("not the answer to these commands")
    for command, answer in zip(commands, answers, strict=True):
        if not isinstance(answer, dict) or answer.get("command") != command["command"]:
            raise ValueError("not the answer to these commands")
        if answer.get("error"):
            raise ControlError(f"the broker refused {command['command']}: {answer['error']}")
