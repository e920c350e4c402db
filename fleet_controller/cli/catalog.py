"""Every top-level ``fleetctl`` command: the group module that registers it, and its help.

``fleetctl`` imports a command group's module only when one of that group's
commands runs (or its ``--help`` is asked for); ``fleetctl --help`` lists every
command from this table without importing any group. Each group's ``register``
takes its commands' one-line help from here, so the two cannot differ.

Importing this module costs nothing beyond the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COMMANDS", "Command", "help_of"]


@dataclass(frozen=True, slots=True)
class Command:
    """A top-level command: the module ``fleet_controller.cli.<group>`` adds it."""

    group: str
    help: str


#: In the order ``fleetctl --help`` lists them; a group's commands are adjacent.
COMMANDS: dict[str, Command] = {
    "keys": Command("keys", "create and rotate signing keys and trust.json"),
    "operator": Command("operators", "operators' keys and roles in trust.json"),
    "serve": Command("serve", "run the controller service"),
    "model": Command("models", "register and list models"),
    "rollout": Command("rollouts", "start, watch and steer rollouts"),
    "deployment": Command(
        "deployments", "what groups of nodes should run, kept up by the controller"
    ),
    "nodes": Command("fleet", "list nodes the controller knows"),
    "audit": Command("fleet", "show the audit log of operator actions"),
    "report": Command("fleet", "results per node and model, corner cases, latency"),
    "top": Command("top", "live console of the fleet's nodes (reads MQTT directly)"),
    "demo": Command(
        "demo", "run a whole fleet on this machine: rollouts, waves, an automatic rollback"
    ),
    "broker": Command("broker", "the secure Mosquitto setup"),
    "node": Command("broker", "nodes: enrollment, revocation, operators' labels, forgetting"),
}


def help_of(command: str) -> str:
    """The one-line help of top-level ``command``."""
    return COMMANDS[command].help
