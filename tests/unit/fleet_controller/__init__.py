"""Unit tests of the fleet controller, one file per module."""
