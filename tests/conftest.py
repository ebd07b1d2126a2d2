"""Shared fixtures and markers: kpr.testing.fixtures (the kit plugin authors use too).
Tests marked `kernel` are skipped, with the reason, where the machine cannot run them (not
root, no bcc, ...): never passed silently."""

from __future__ import annotations

from kpr.testing.fixtures import *  # noqa: F403 - fixtures and hooks, by name
