"""EdgeFleet's I/O helpers that the controller and the nodes share.

* :mod:`edgefleet_io.transport`: the MQTT seam, one small interface
  (:class:`~edgefleet_io.transport.Transport`, :class:`~edgefleet_io.transport.Link`)
  that both sides talk through, and reconnect back-off;
* :mod:`edgefleet_io.mqtt`: that interface over a real broker (aiomqtt, the only
  module that imports it), translating its errors to
  :class:`~shared.errors.TransportError` at that one boundary;
* :mod:`edgefleet_io.memory`: the same interface over an in-process broker that
  behaves like Mosquitto where EdgeFleet depends on it, for fast tests;
* :mod:`edgefleet_io.files`: durable atomic file writes;
* :mod:`edgefleet_io.logs`: the long-running programs' log handler (text or
  JSON lines on stderr).

Nothing here decides anything about the protocol: that is :mod:`shared`'s job.
"""
