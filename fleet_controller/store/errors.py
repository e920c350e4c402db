"""The store's errors: one family under :class:`~shared.errors.EdgeFleetError`.

Every message is one line, with any password in the database URL hidden, so a
command line prints it as it is.
"""

from __future__ import annotations

from shared.errors import EdgeFleetError

__all__ = [
    "DuplicateModelError",
    "DuplicateRolloutError",
    "LeaseLostError",
    "RecordError",
    "StoreError",
    "UnknownNodeError",
    "UnknownRolloutError",
]


class StoreError(EdgeFleetError):
    """The database cannot be opened or failed an operation. The message is one line."""


class DuplicateModelError(StoreError):
    """A model of that name and version is registered already."""


class DuplicateRolloutError(StoreError):
    """A rollout with that id exists already."""


class UnknownNodeError(StoreError):
    """No node with that id is stored."""


class UnknownRolloutError(StoreError):
    """No rollout with that id is stored."""


class RecordError(StoreError):
    """A rollout's stored record cannot be decoded (or a new one encoded).

    Unlike other store errors this is no passing trouble: retrying gives the
    same answer, so the service fails the rollout instead of ticking it again.
    """


class LeaseLostError(StoreError):
    """A rollout write was refused: its replica no longer holds the rollout lease
    (another replica took it, or it ran out); nothing was written."""
