"""Shared fixtures and markers: kpr.testing.fixtures (the kit plugin authors use too).
Tests marked `kernel` are skipped, with the reason, where the machine cannot run them (not
root, no bcc, ...): never passed silently."""

from __future__ import annotations

import os

from hypothesis import settings

from kpr.testing.fixtures import *  # noqa: F403 - fixtures and hooks, by name

# Property tests run the same examples on every run unless asked otherwise, so a red CI means
# a change broke something, not that a new seed met an old flaw one run in four (as the
# allocator's written-ClusterIP test did). KPR_HYPOTHESIS=random explores new examples (and
# keeps hypothesis's example database); a test's own @settings still set its example count.
# Loaded here, before the test modules are imported: their @settings inherit the profile.
settings.register_profile("kpr-fixed", derandomize=True, database=None)
settings.register_profile("kpr-random")
settings.load_profile("kpr-random" if os.environ.get("KPR_HYPOTHESIS") == "random" else "kpr-fixed")
