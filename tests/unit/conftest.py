"""Shared settings for the unit tests: the addon package on sys.path, bounded hypothesis runs."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

# tests/pytest.ini's `pythonpath = addon` resolves relative to tests/ (the ini file's directory),
# so make sure the real addon directory is importable however pytest is started.
ADDON_DIR = Path(__file__).resolve().parents[2] / "addon"
if str(ADDON_DIR) not in sys.path:
    sys.path.insert(0, str(ADDON_DIR))

settings.register_profile(
    "unit",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("unit")
