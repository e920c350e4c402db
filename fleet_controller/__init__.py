"""EdgeFleet's fleet controller: registry, rollouts, ingest, operator API and ``fleetctl``."""

from __future__ import annotations

__all__: list[str] = []
