"""When a node calls the controller silent, and when it comes back."""

from __future__ import annotations

import pytest

from edge_node.presence_core import ControllerWatch


def watch() -> ControllerWatch:
    return ControllerWatch(silent_after_s=10.0)


def test_before_any_state_or_send_the_controller_is_not_silent() -> None:
    w = watch()
    assert w.online is None
    assert not w.silent(1_000.0)
    assert not w.offline


def test_an_offline_state_silences_until_an_online_state_brings_it_back() -> None:
    w = watch()
    assert not w.state(online=True, now=0.0)  # the retained online on subscribe: nothing to resume
    assert not w.state(online=False, now=1.0)
    assert w.silent(1.0)
    assert w.offline
    assert not w.state(online=False, now=2.0)  # still offline: no comeback
    assert w.state(online=True, now=3.0)
    assert not w.silent(3.0)
    assert not w.offline


def test_an_ack_proves_a_controller_listens_whatever_the_retained_state_says() -> None:
    """A replica's Will may overwrite the state of another that still serves."""
    w = watch()
    w.state(online=False, now=0.0)
    assert w.acked(1.0, outstanding=False)
    assert not w.silent(1.0)
    assert not w.offline
    assert w.online is False  # the state itself is what it said


def test_unanswered_sends_silence_after_the_limit_and_an_ack_ends_it() -> None:
    w = watch()
    w.sent(0.0)
    w.sent(5.0)  # the clock runs from the first unanswered send
    assert not w.silent(10.0)
    assert w.silent(10.5)
    assert not w.offline  # silence by acks does not hold chunk requests
    assert w.acked(11.0, outstanding=True)
    assert not w.silent(20.0)
    assert w.silent(21.5)  # what is still outstanding waits from the ack on
    assert w.acked(22.0, outstanding=False)
    assert not w.silent(1_000.0)


@pytest.mark.parametrize(
    ("events", "back"),
    [
        ([("state", True)], False),  # first state seen: the connect sent everything anyway
        ([("state", True), ("state", True)], False),  # a re-delivered retained online
        ([("state", False), ("state", True)], True),  # a controller restart
        ([("sent", None), ("state", True)], True),  # hung, then online again (at t=20)
        ([("state", False), ("ack", None)], True),
        ([("sent", None), ("ack", None)], True),  # silent by t=20
        ([("ack", None)], False),
    ],
)
def test_what_counts_as_coming_back(events: list[tuple[str, bool | None]], back: bool) -> None:
    w = watch()
    results = []
    for kind, online in events[:-1]:
        if kind == "state":
            w.state(online=bool(online), now=0.0)
        elif kind == "sent":
            w.sent(0.0)
    kind, online = events[-1]
    if kind == "state":
        results.append(w.state(online=bool(online), now=20.0))
    else:
        results.append(w.acked(20.0, outstanding=False))
    assert results == [back]


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="silent_after_s"):
        ControllerWatch(silent_after_s=0)
