"""EdgeFleet's wire contract: topics, messages, envelopes and trust. Pure: no I/O."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
