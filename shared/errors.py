"""The two error families of EdgeFleet, plus malformed input.

* ``DecodeError``: a payload that is not a well-formed message (too big, bad JSON,
  duplicate keys, NaN, out-of-range numbers, too deep, schema mismatch).
* ``TrustError``: a document that is well formed but must not be believed (bad
  signature, unknown key, wrong role, below threshold, expired, replayed, version
  went backwards, digest mismatch, ...). Each subclass carries a stable ``code``
  that nodes put in ``rejected``/``failed`` statuses.
* ``TransportError``: the network or the broker failed us; retrying may help.

Command-line tools print ``str(error)`` as one line for any of these.
"""

from __future__ import annotations

__all__ = [
    "BadSignatureError",
    "BrokerUnavailableError",
    "DecodeError",
    "DigestMismatchError",
    "DowngradeError",
    "EdgeFleetError",
    "ExpiredError",
    "NotAddressedError",
    "OutOfBoundsError",
    "ReplayError",
    "RequestTimeoutError",
    "RollbackTargetError",
    "ThresholdError",
    "TransferError",
    "TransportError",
    "TrustError",
    "TrustFileError",
    "UnknownKeyError",
    "UsageError",
    "VersionRollbackError",
    "WrongRoleError",
]


class EdgeFleetError(Exception):
    """Base of every error EdgeFleet raises on purpose."""


class DecodeError(EdgeFleetError):
    """A payload is not a well-formed message of the expected kind."""


class UsageError(DecodeError):
    """A flag, argument, request or input file is invalid (command-line exit code 2)."""


class TrustError(EdgeFleetError):
    """A document must not be trusted. ``code`` is the machine-readable reason."""

    code = "untrusted"


class BadSignatureError(TrustError):
    code = "bad_signature"


class UnknownKeyError(TrustError):
    code = "unknown_key"


class WrongRoleError(TrustError):
    code = "wrong_role"


class ThresholdError(TrustError):
    code = "below_threshold"


class ExpiredError(TrustError):
    code = "expired"


class ReplayError(TrustError):
    code = "replayed"


class VersionRollbackError(TrustError):
    """A trust list's version is not newer than the one already trusted."""

    code = "version_rollback"


class TrustFileError(TrustError):
    """The trust file is missing or unreadable: refuse everything (fail closed)."""

    code = "no_trust"


class NotAddressedError(TrustError):
    code = "not_addressed"


class DowngradeError(TrustError):
    code = "downgrade"


class RollbackTargetError(TrustError):
    """A rollback names a model other than the node's own previous one."""

    code = "rollback_target"


class OutOfBoundsError(TrustError):
    """A command claims a time or sequence number ahead of the node's clock, or a
    lifetime longer than any command may have."""

    code = "out_of_bounds"


class DigestMismatchError(TrustError):
    code = "digest_mismatch"


class TransportError(EdgeFleetError):
    """The broker or the network failed; the operation may succeed later."""


class BrokerUnavailableError(TransportError):
    """The MQTT broker could not be reached or dropped the connection."""


class RequestTimeoutError(TransportError):
    """No reply arrived within the deadline."""


class TransferError(TransportError):
    """An artifact transfer stalled or was cut off."""
