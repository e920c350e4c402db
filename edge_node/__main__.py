"""``python -m edge_node`` runs ``edge-node``."""

from __future__ import annotations

import sys

from edge_node.cli import main

sys.exit(main())
