"""Broker URLs (:mod:`shared.broker`): the address, TLS, credentials and MQTT version."""

from __future__ import annotations

import pytest

from shared.broker import BrokerAddress, check_mqtt_version, parse_broker_url
from shared.errors import DecodeError


def test_defaults_are_mqtt_5_on_the_scheme_port() -> None:
    assert parse_broker_url("mqtt://broker") == BrokerAddress("broker", 1883, tls=False)
    secure = parse_broker_url("mqtts://u%40x:p%3Aw@broker.example")
    assert (secure.port, secure.tls, secure.username, secure.password) == (8883, True, "u@x", "p:w")
    assert secure.mqtt_version == "5"
    assert secure.shared_subscriptions


def test_protocol_3_1_1_has_no_shared_subscriptions_and_round_trips() -> None:
    address = parse_broker_url("mqtt://nats-a:1883?protocol=3.1.1")
    assert address.mqtt_version == "3.1.1"
    assert not address.shared_subscriptions
    assert str(address) == "mqtt://nats-a:1883?protocol=3.1.1"
    assert parse_broker_url(str(address)) == address
    assert str(parse_broker_url("mqtt://broker:1883?protocol=5")) == "mqtt://broker:1883"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://broker", "expected mqtt://host:port"),
        ("mqtt://", "expected mqtt://host:port"),
        ("mqtt://broker/fleet", "no path"),
        ("mqtt://broker#x", "no path"),
        ("mqtt://broker?protocol=4", "protocol '4'"),
        ("mqtt://broker?protocol=", "protocol ''"),
        ("mqtt://broker?qos=1", "only query allowed"),
        ("mqtt://broker?protocol=5&protocol=3.1.1", "only query allowed"),
        ("mqtt://broker?protocol", "bad query field"),
        ("mqtt://broker:99999", "invalid broker URL"),
    ],
)
def test_bad_urls_are_refused_in_one_line(url: str, words: str) -> None:
    with pytest.raises(DecodeError) as caught:
        parse_broker_url(url)
    message = str(caught.value)
    assert words in message
    assert "\n" not in message


def test_mqtt_versions_are_checked() -> None:
    assert check_mqtt_version("3.1.1") == "3.1.1"
    with pytest.raises(DecodeError, match=r"use 5 or 3\.1\.1"):
        check_mqtt_version("3")


def test_a_given_version_wins_over_the_urls() -> None:
    assert parse_broker_url("mqtt://h?protocol=3.1.1", "5").mqtt_version == "5"
    assert parse_broker_url("mqtt://h", "3.1.1").mqtt_version == "3.1.1"
    with pytest.raises(DecodeError, match="MQTT version '4'"):
        parse_broker_url("mqtt://h", "4")
