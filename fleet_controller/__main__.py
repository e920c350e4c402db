"""``python -m fleet_controller`` runs ``fleetctl``."""

from __future__ import annotations

import sys

from fleet_controller.cli import main

sys.exit(main())
