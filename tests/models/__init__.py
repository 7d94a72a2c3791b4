"""Tests of worker.models."""
