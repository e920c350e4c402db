"""Unit tests of ``fleetctl``, one file per module of :mod:`fleet_controller.cli`."""
