"""Every test runs under a timeout (pytest-timeout), so that a hang fails its test instead of stalling CI."""

from __future__ import annotations

import pytest


def test_the_timeout_plugin_is_on_with_a_bound_for_every_test(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.hasplugin("timeout"), "pytest-timeout is not installed (the dev extra has it)"
    assert 0 < float(pytestconfig.getini("timeout")) <= 600
    assert pytestconfig.getini("timeout_method") == "signal"  # (signal: the test fails, the run goes on)
