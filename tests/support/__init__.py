"""Helpers that start real services for the tests (mosquitto, RTSP server)."""
