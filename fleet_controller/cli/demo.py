"""``fleetctl demo``: a whole fleet on this machine, with embedded defaults.

It takes none of the global options: it starts its own Mosquitto (unless
``--broker``), controller and simulated nodes in this process.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from edgefleet_io.logs import setup_logging
from fleet_controller.cli import common
from fleet_controller.cli.catalog import help_of
from fleet_controller.cli.flags import whole_number

__all__ = ["register"]

_MAX_NODES = 200


def _demo(args: argparse.Namespace) -> int:
    from fleet_controller.demo import run_demo  # builds models with onnx

    setup_logging(args.log_level, args.log_format)
    common.quiet_onnxruntime()
    keep = Path(args.dir) if args.dir else None
    asyncio.run(run_demo(nodes=args.nodes, broker_url=args.demo_broker, keep=keep))
    return 0


def register(commands: common.Commands, parents: common.Parents) -> None:
    """Add ``demo`` to ``commands``; it takes none of ``parents`` (it runs its own fleet)."""
    demo = commands.add_parser(
        "demo",
        help=help_of("demo"),
        description="Starts Mosquitto (unless --broker), a controller and simulated nodes "
        "in this process, then rolls out three model versions.",
    )
    demo.add_argument(
        "--nodes",
        type=whole_number(1, _MAX_NODES),
        default=12,
        help=f"simulated nodes (12; at most {_MAX_NODES})",
    )
    demo.add_argument(
        "--broker", dest="demo_broker", help="use this broker instead of starting one"
    )
    demo.add_argument("--dir", help="keep the demo's files here instead of a temporary folder")
    demo.add_argument("--log-level", default="warning", choices=common.LOG_LEVELS)
    demo.add_argument(
        "--log-format", default="text", choices=common.LOG_FORMATS, help="text or json lines"
    )
    demo.set_defaults(handler=_demo)
