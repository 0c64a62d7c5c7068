"""biofed.metrics: the series a coordinator and an agent expose, and the dashboard that reads them."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from biofed.config import CoordinatorConfig, DeviceConfig, MetricsSettings
from biofed.coordinator.server import Coordinator
from biofed.coordinator.state import RoundRecord
from biofed.edge.agent import EdgeAgent
from biofed.metrics import serve

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json"


def _coordinator(tmp_path) -> Coordinator:
    config = CoordinatorConfig(
        fleet="ward7", rounds=3, state_dir=tmp_path / "state", dp={"epsilon_budget": 6.0, "noise_multiplier": 1.0}
    )
    return Coordinator(config)


def _agent(tmp_path) -> EdgeAgent:
    return EdgeAgent(DeviceConfig(device_id="pi-01", fleet="ward7", store_path=tmp_path / "features.sqlite"))


def _samples(registry) -> dict[str, float]:
    text = generate_latest(registry).decode()
    return {
        sample.name
        + (
            "{" + ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items())) + "}" if sample.labels else ""
        ): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_coordinator_hooks_and_scrape_time_state(tmp_path):
    coordinator = _coordinator(tmp_path)
    metrics = coordinator.metrics
    coordinator.ingest.online.update({"pi-01", "pi-02"})
    coordinator.ingest.known.update({"pi-01", "pi-02", "pi-03"})
    coordinator.ingest.dropped.update({"late": 2, "BadSignature": 1})
    metrics.received("biofed/ward7/update/pi-01", 1000, "accepted")
    metrics.received("biofed/ward7/status/pi-01", 50, "status")
    metrics.sent(300)
    metrics.round_opened(4)
    record = RoundRecord(
        round=4,
        phase="train",
        train_round=2,
        n_selected=2,
        n_devices=2,
        mean_loss=0.5,
        balanced_accuracy=0.7,
        eval_windows=10,
        epsilon_rdp=1.5,
        epsilon_pld=1.25,
        sampling_rate=1.0,
        noise_multiplier=1.0,
        clip_norm=1.0,
        attempts=1,
        finished=time.time() + 3,
    )  # committed 3 s after the task went out
    metrics.round_closed(record)
    series = _samples(metrics.registry)
    assert series["biofed_coordinator_devices_online"] == 2 and series["biofed_coordinator_devices_known"] == 3
    assert series['biofed_coordinator_messages_rejected_total{reason="late"}'] == 2
    assert series['biofed_coordinator_messages_rejected_total{reason="BadSignature"}'] == 1
    assert series['biofed_coordinator_updates_accepted_total{kind="update"}'] == 1
    assert (
        series["biofed_coordinator_received_bytes_total"] == 1050
        and series["biofed_coordinator_sent_bytes_total"] == 300
    )
    assert series['biofed_coordinator_rounds_total{phase="train"}'] == 1
    assert series['biofed_coordinator_round{phase="train"}'] == 4
    assert 2.5 < series['biofed_coordinator_round_duration_seconds_sum{phase="train"}'] < 10
    assert series['biofed_coordinator_epsilon_spent{accountant="rdp"}'] == 1.5
    assert series['biofed_coordinator_epsilon_spent{accountant="pld"}'] == 1.25
    assert series["biofed_coordinator_epsilon_budget"] == 6.0 and series["biofed_coordinator_delta"] == 1e-5
    assert series['biofed_coordinator_state{state="starting"}'] == 1
    assert sum(v for k, v in series.items() if k.startswith("biofed_coordinator_state{")) == 1


def test_agent_series_and_the_endpoint(tmp_path):
    agent = _agent(tmp_path)
    try:
        agent.metrics.stored(12)
        agent.metrics.task_answered(5, "train")
        server = serve(agent.metrics.registry, MetricsSettings(port=0))
        try:
            with urllib.request.urlopen(server.url, timeout=5) as response:
                text = response.read().decode()
        finally:
            server.close()
    finally:
        agent.close()
    assert "biofed_agent_windows_ingested_total 12.0" in text
    assert "biofed_agent_last_task_round 5.0" in text
    assert 'biofed_agent_state{state="starting"} 1.0' in text
    assert re.search(r"^process_resident_memory_bytes \d", text, re.M)
    assert serve(agent.metrics.registry, MetricsSettings()) is None  # no port: no endpoint


def test_dashboard_queries_only_series_that_exist(tmp_path):
    coordinator, agent = _coordinator(tmp_path), _agent(tmp_path)
    try:
        coordinator.metrics.round_closed(
            RoundRecord(
                round=1,
                phase="train",
                train_round=1,
                n_selected=1,
                n_devices=1,
                mean_loss=None,
                balanced_accuracy=None,
                eval_windows=0,
                epsilon_rdp=1.0,
                epsilon_pld=None,
                sampling_rate=1.0,
                noise_multiplier=1.0,
                clip_norm=1.0,
                attempts=1,
                finished=0.0,
            )
        )
        coordinator.metrics.received("biofed/ward7/update/pi-01", 1, "accepted")
        agent.metrics.task_answered(1, "train")
        exposed = {
            family.name
            for registry in (coordinator.metrics.registry, agent.metrics.registry)
            for family in text_string_to_metric_families(generate_latest(registry).decode())
        }
        exposed |= {f"{name}_total" for name in exposed} | {f"{name}_bucket" for name in exposed}
    finally:
        agent.close()
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b((?:biofed|process)_[a-z_]+)", target["expr"])
    }
    assert queried and queried <= exposed, queried - exposed
