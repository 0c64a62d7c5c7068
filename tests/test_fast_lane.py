"""The fast lane (``pytest -m "not slow"``) leaves out every test that starts a broker."""

from __future__ import annotations

import os
from pathlib import Path

import brokers
from conftest import starts_a_broker

pytest_plugins = ["pytester"]


def test_the_shared_broker_fixtures_are_recognised():
    for name in ("amqtt_broker", "mosquitto_broker", "rabbitmq_cluster"):
        assert callable(getattr(brokers, name)), f"tests/brokers.py has no fixture {name}"
        assert starts_a_broker(name)
    assert not starts_a_broker("broker_config") and not starts_a_broker("tmp_path")


def test_a_test_using_a_broker_fixture_is_deselected_from_the_fast_lane(pytester, monkeypatch):
    # The copied conftest points LSLAPICFG at the inner session's folder, which has no
    # lsl_api.cfg; restore it afterwards, or liblsl, first loaded by a later test of this
    # process, would run without the loopback-only config.
    monkeypatch.setenv("LSLAPICFG", os.environ["LSLAPICFG"])
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text(encoding="utf-8"))
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def amqtt_broker():
            return "a broker"

        def test_with_a_broker(amqtt_broker):
            assert amqtt_broker

        def test_without_one():
            pass
        """
    )
    # the inner sessions need neither hypothesis nor pytest-benchmark, whose set-up dominates their time
    fast = pytester.runpytest("-p", "no:hypothesispytest", "-p", "no:benchmark", "-m", "not slow", "--strict-markers")
    fast.assert_outcomes(passed=1, deselected=1)
    everything = pytester.runpytest("-p", "no:hypothesispytest", "-p", "no:benchmark", "--strict-markers")
    everything.assert_outcomes(passed=2)
