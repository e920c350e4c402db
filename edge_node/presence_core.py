"""Is the controller listening? What a node decides from ``controller/state`` and acks.

Pure and synchronous: events and times in, decisions out. The sender
(:mod:`edge_node.sender`) and the downloader (:mod:`edge_node.downloads`) act on
them.

Everything a node sends the controller goes to the controllers' shared
subscription group; the broker drops what reaches a group with no member. So
a node watches two signals:

* the retained ``controller/state`` (online on connect, offline as the
  controller's Last Will or on a clean stop): ``online`` is the last one seen,
  ``None`` before any (a broker that lost its retained messages, a controller
  that does not publish one);
* the controller's acks: an ack proves a controller stores what the node
  sends, whatever the retained state says (a replica's Will may overwrite the
  state of one that still serves).

:class:`ControllerWatch` calls the controller **silent** when the last state
seen says offline and no ack came since, or when something sent has waited
``silent_after_s`` for an ack and none came (a controller that hangs keeps
its retained online until the broker gives up on its keep-alive). While
silent, the node holds its backlog (only the oldest entry goes out, on a
back-off, as a probe) and its chunk requests. A controller **comes back**
when it is silent and a state says online or an ack arrives, or when a state
says online after one said offline: then everything held goes out at once.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ControllerWatch"]


@dataclass(slots=True)
class ControllerWatch:
    """Whether the controller is heard from (see the module docstring). Times in seconds."""

    silent_after_s: float
    online: bool | None = None  # the last controller/state seen; None: none yet
    _offline_unanswered: bool = False  # an offline state seen, and no ack since
    _waiting_since: float | None = None  # the first send not answered by an ack

    def __post_init__(self) -> None:
        if self.silent_after_s <= 0:
            raise ValueError("silent_after_s must be positive")

    @property
    def offline(self) -> bool:
        """The last ``controller/state`` said offline and no ack came since.

        What is sent to the controllers' group now would be dropped.
        """
        return self._offline_unanswered

    def silent(self, now: float) -> bool:
        return self._offline_unanswered or (
            self._waiting_since is not None and now - self._waiting_since > self.silent_after_s
        )

    def sent(self, now: float) -> None:
        """Something that calls for an ack went out at ``now``."""
        if self._waiting_since is None:
            self._waiting_since = now

    def state(self, *, online: bool, now: float) -> bool:
        """A ``controller/state`` arrived; True when the controller came back."""
        back = online and (self.online is False or self.silent(now))
        self.online = online
        if online:
            self._offline_unanswered = False
            if back:
                self._waiting_since = None  # its ack clock starts with what goes out now
        else:
            self._offline_unanswered = True
        return back

    def acked(self, now: float, *, outstanding: bool) -> bool:
        """An ack arrived at ``now``; ``outstanding``: sent entries still wait for one.

        Returns True when it ended a silence.
        """
        back = self.silent(now)
        self._offline_unanswered = False
        self._waiting_since = now if outstanding else None
        return back
