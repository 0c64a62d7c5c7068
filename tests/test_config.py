"""biofed.config: TOML -> pydantic models, with readable errors naming file and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from biofed.config import (
    BrokerConfig,
    ConfigError,
    CoordinatorConfig,
    DeviceConfig,
    load_config,
)

DEVICE = """
device_id = "pi-01"
fleet = "ward7"
recordings = ["data/s00_1.edf", "/abs/s00_2.edf"]
store_path = "state/features.sqlite"
store_max_rows = 5000
predict = true

[broker]
host = "10.0.0.2"
port = 1884
protocol = "3.1.1"

[pipeline]
window_s = 4.0
hop_s = 2.0

[training]
lr = 0.01
optimizer = "adam"
"""

COORDINATOR = """
fleet = "ward7"
rounds = 50
min_devices = 3
sampling_rate = 0.5
round_deadline_s = 120
state_dir = "state"

[broker]
protocol = 5

[strategy]
name = "fedadam"
params = { server_lr = 0.01, beta1 = 0.9 }

[model]
classes = ["rest", "arithmetic"]
hidden = 16

[dp]
trust_mode = "central"
clip_norm = 0.5
noise_multiplier = 1.1
delta = 1e-6
epsilon_budget = 8.0
accountant = "pld"

[dp.adaptive_clipping]
target_quantile = 0.5
learning_rate = 0.2
bit_noise_std = 5.0
"""


def _write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_device_config_loads_and_resolves_paths(tmp_path):
    config = load_config(_write(tmp_path, DEVICE), DeviceConfig)
    assert config.device_id == "pi-01" and config.fleet == "ward7"
    assert config.broker == BrokerConfig(host="10.0.0.2", port=1884, protocol="3.1.1")
    assert config.recordings == (tmp_path / "data/s00_1.edf", Path("/abs/s00_2.edf"))
    assert config.store_path == tmp_path / "state/features.sqlite"
    assert (config.pipeline.window_s, config.pipeline.hop_s, config.pipeline.n_mels) == (4.0, 2.0, 32)
    assert (config.training.lr, config.training.optimizer, config.training.batch_size) == (0.01, "adam", 32)
    assert config.predict is True and config.store_max_rows == 5000


def test_coordinator_config_loads(tmp_path):
    config = load_config(_write(tmp_path, COORDINATOR), CoordinatorConfig)
    assert config.broker.protocol == "5"  # a bare 5 in TOML means MQTT 5
    assert config.sampling_rate == 0.5 and config.rounds == 50 and config.min_devices == 3
    assert config.strategy.name == "fedadam" and config.strategy.params == {"server_lr": 0.01, "beta1": 0.9}
    assert config.model.hidden == 16 and config.model.classes == ("rest", "arithmetic")
    assert config.dp.accountant == "pld" and config.dp.delta == 1e-6 and config.dp.epsilon_budget == 8.0
    assert config.dp.adaptive_clipping.target_quantile == 0.5
    assert config.dp.adaptive_clipping.bit_noise_std == 5.0
    assert config.state_dir == tmp_path / "state"


def test_minimal_coordinator_defaults(tmp_path):
    config = load_config(_write(tmp_path, 'fleet = "f"\nrounds = 1\nstate_dir = "/var/biofed"\n'), CoordinatorConfig)
    assert config.sampling_rate == "all"
    assert config.dp.trust_mode == "central" and config.dp.adaptive_clipping is None
    assert config.broker.protocol == "auto" and config.strategy.name == "fedavg"


def test_standardization_and_basis_dp_settings(tmp_path):
    config = load_config(_write(tmp_path, 'fleet = "f"\nrounds = 1\nstate_dir = "s"\n'), CoordinatorConfig)
    assert config.model.standardization == "device"  # the default: no moments phase
    assert config.dp.basis_noise_multiplier is None and config.dp.basis_clip_norm is None  # follow the training's
    text = (
        'fleet = "f"\nrounds = 1\nstate_dir = "s"\n[model]\nstandardization = "global"\n'
        "[dp]\nbasis_noise_multiplier = 8.0\nbasis_clip_norm = 2.5\n"
    )
    config = load_config(_write(tmp_path, text), CoordinatorConfig)
    assert config.model.standardization == "global"
    assert (config.dp.basis_noise_multiplier, config.dp.basis_clip_norm) == (8.0, 2.5)


@pytest.mark.parametrize(
    "text,match",
    [
        ('[model]\nstandardization = "subject"\n', r"model.standardization: Input should be 'global' or 'device'"),
        (
            "[dp]\nbasis_noise_multiplier = -1.0\n",
            r"dp.basis_noise_multiplier: Input should be greater than or equal to 0",
        ),
        ("[dp]\nbasis_clip_norm = 0.0\n", r"dp.basis_clip_norm: Input should be greater than 0"),
    ],
)
def test_invalid_standardization_and_basis_dp_settings(tmp_path, text, match):
    path = _write(tmp_path, 'fleet = "f"\nrounds = 1\nstate_dir = "s"\n' + text)
    with pytest.raises(ConfigError, match=match):
        load_config(path, CoordinatorConfig)


def test_configs_are_frozen(tmp_path):
    config = load_config(_write(tmp_path, DEVICE), DeviceConfig)
    with pytest.raises(ValueError, match="frozen"):
        config.device_id = "other"


@pytest.mark.parametrize(
    "text,model,match",
    [
        (DEVICE + "\nbatchsize = 3\n", DeviceConfig, r"training.batchsize: unknown key; did you mean 'batch_size'\?"),
        (
            DEVICE.replace("[training]", "[training]\nepochs = 2"),
            DeviceConfig,
            r"training.epochs: unknown key; did you mean 'local_epochs'\?",
        ),
        (
            DEVICE.replace("[training]", "[training]\nzzz = 2"),
            DeviceConfig,
            r"training.zzz: unknown key \(known: batch_size, l2",
        ),
        (
            DEVICE.replace("store_path =", 'stor_path = "x"\nstore_path ='),
            DeviceConfig,
            r"stor_path: unknown key; did you mean 'store_path'\?",
        ),
        (
            COORDINATOR.replace("[dp]", "[dp]\nnoise_multiplyer = 2"),
            CoordinatorConfig,
            r"dp.noise_multiplyer: unknown key; did you mean 'noise_multiplier'\?",
        ),
        (
            DEVICE.replace("port = 1884", 'port = "high"'),
            DeviceConfig,
            r"broker.port: Input should be a valid integer.*\(got 'high'\)",
        ),
        (
            DEVICE.replace("port = 1884", "port = 70000"),
            DeviceConfig,
            r"broker.port: Input should be less than or equal to 65535",
        ),
        (
            DEVICE.replace('protocol = "3.1.1"', 'protocol = "4"'),
            DeviceConfig,
            r"broker.protocol: Input should be 'auto', '5' or '3.1.1'",
        ),
        (
            DEVICE.replace('device_id = "pi-01"', 'device_id = "pi/01"'),
            DeviceConfig,
            r"device_id: Value error, invalid id .pi/01.: use 1 to 64 characters",
        ),
        (DEVICE.replace('device_id = "pi-01"', ""), DeviceConfig, r"device_id: Field required"),
        (
            DEVICE.replace("hop_s = 2.0", "hop_s = 8.0"),
            DeviceConfig,
            r"pipeline: Value error, hop_s \(8.0\) must not exceed window_s",
        ),
        (
            COORDINATOR.replace("rounds = 50", "rounds = 0"),
            CoordinatorConfig,
            r'rounds must be >= 1 with \[training\] algorithm = "fedavg"',
        ),
        (
            COORDINATOR.replace("sampling_rate = 0.5", "sampling_rate = 1.5"),
            CoordinatorConfig,
            r"sampling_rate must be in \(0, 1\] or \"all\"",
        ),
        (COORDINATOR.replace("sampling_rate = 0.5", 'sampling_rate = "some"'), CoordinatorConfig, r"sampling_rate"),
        (
            COORDINATOR.replace('name = "fedadam"', 'name = "fedsgd"'),
            CoordinatorConfig,
            r"strategy.name: Input should be 'fedavg'",
        ),
        (
            COORDINATOR.replace('trust_mode = "central"', 'trust_mode = "trusted"'),
            CoordinatorConfig,
            r"dp.trust_mode: Input should be",
        ),
        (
            COORDINATOR.replace("target_quantile = 0.5", "target_quantile = 1.5"),
            CoordinatorConfig,
            r"dp.adaptive_clipping.target_quantile: Input should be less than 1",
        ),
        (
            COORDINATOR.replace('accountant = "pld"', 'accountant = "moments"'),
            CoordinatorConfig,
            r"dp.accountant: Input should be 'rdp' or 'pld'",
        ),
        (
            COORDINATOR.replace('classes = ["rest", "arithmetic"]', 'classes = ["rest", "rest"]'),
            CoordinatorConfig,
            r"classes must be at least 2 distinct names",
        ),
    ],
)
def test_invalid_config_names_file_and_field(tmp_path, text, model, match):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path, model)
    assert str(info.value).startswith(f"{path}: invalid {model.__name__}:")


def test_all_problems_reported_at_once(tmp_path):
    text = DEVICE.replace("port = 1884", "port = 0").replace("store_max_rows = 5000", "store_max_rows = -1")
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), DeviceConfig)
    assert "broker.port" in str(info.value) and "store_max_rows" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere.toml: config file not found"):
        load_config(tmp_path / "nowhere.toml", DeviceConfig)


def test_not_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML: .*line 1"):
        load_config(_write(tmp_path, "device_id = pi-01\n", "bad.toml"), DeviceConfig)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path, DeviceConfig)


def _docstring_block(title: str) -> str:
    """The indented TOML block that follows ``title`` in the biofed.config module docstring."""
    import biofed.config

    doc = biofed.config.__doc__
    start = doc.index(title + "::\n\n") + len(title) + 4
    lines = []
    for line in doc[start:].splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines)


@pytest.mark.parametrize(
    "title,model",
    [
        ("Example device file", DeviceConfig),
        ("Example coordinator file", CoordinatorConfig),
        ("the broker's ACL lets it touch only its own topics)", DeviceConfig),
    ],
)
def test_module_docstring_examples_load(tmp_path, title, model):
    config = load_config(_write(tmp_path, _docstring_block(title)), model)
    if model is CoordinatorConfig:  # the strategy parameters are accepted by the strategy itself
        from biofed.coordinator.strategies import make_strategy

        make_strategy(config.strategy.name, **config.strategy.params)
        assert config.dp.epsilon_budget == 8.0


MINIMAL_COORDINATOR = 'fleet = "ward7"\nrounds = 5\nstate_dir = "state"\n[broker]\nport = 1884\n[dp]\nclip_norm = 0.5\n'


def test_precedence_cli_over_env_over_file_over_default(tmp_path):
    path = _write(tmp_path, MINIMAL_COORDINATOR)
    env = {
        "BIOFED_BROKER_PORT": "1999",
        "BIOFED_DP_CLIP_NORM": "0.75",
        "BIOFED_ROUNDS": "7",
        "BIOFED_NOT_A_SETTING": "x",
    }
    plain = load_config(path, CoordinatorConfig, environ={})
    assert (plain.broker.port, plain.dp.clip_norm, plain.rounds, plain.broker.host) == (1884, 0.5, 5, "127.0.0.1")
    from_env = load_config(path, CoordinatorConfig, environ=env)
    assert (from_env.broker.port, from_env.dp.clip_norm, from_env.rounds) == (1999, 0.75, 7)
    from_cli = load_config(
        path, CoordinatorConfig, environ=env, overrides={"broker.port": 2001, "rounds": None, "broker.host": "10.1.1.1"}
    )
    assert (from_cli.broker.port, from_cli.dp.clip_norm, from_cli.rounds, from_cli.broker.host) == (
        2001,
        0.75,
        7,
        "10.1.1.1",
    )


def test_env_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    path = _write(tmp_path, MINIMAL_COORDINATOR)
    monkeypatch.chdir(tmp_path.parent)
    config = load_config(path, CoordinatorConfig, environ={"BIOFED_STATE_DIR": "elsewhere"})
    assert config.state_dir == tmp_path.parent / "elsewhere"


def test_bad_env_value_names_the_variable(tmp_path):
    with pytest.raises(
        ConfigError, match=r"broker.port: Input should be a valid integer.*\[set by BIOFED_BROKER_PORT\]"
    ):
        load_config(_write(tmp_path, MINIMAL_COORDINATOR), CoordinatorConfig, environ={"BIOFED_BROKER_PORT": "high"})


# ----------------------------------------------------------------------------- the TOML writer
def test_toml_document_reads_back_as_written():
    import math
    import tomllib

    from biofed.config import toml_document

    top = {
        "fleet": "ward7",
        "rounds": 3,
        "rate": 0.25,
        "tiny": 1e-300,
        "on": True,
        "skipped": None,
        "path": Path("/data/s 01.edf"),
        "quote": 'say "hi"\\n',
        "names": ("rest", "arithmetic"),
        "params": {"eta": 0.01, "beta": -2},
        "unicode": "Zürich",
    }
    text = toml_document(
        top,
        {"broker": {"host": "127.0.0.1", "port": 1883, "password": None}, "empty": {}},
        header="line one\n\nline three",
    )
    assert text.startswith("# line one\n#\n# line three\n")
    data = tomllib.loads(text)
    expected = {k: v for k, v in top.items() if v is not None}
    expected.update(path="/data/s 01.edf", names=["rest", "arithmetic"])
    assert {k: v for k, v in data.items() if k not in ("broker", "empty")} == expected
    assert data["broker"] == {"host": "127.0.0.1", "port": 1883} and data["empty"] == {}
    special = tomllib.loads(toml_document({"a": math.inf, "b": -math.inf, "c": math.nan}))
    assert special["a"] == math.inf and special["b"] == -math.inf and math.isnan(special["c"])
    with pytest.raises(TypeError, match="cannot write object to TOML"):
        toml_document({"x": object()})


def test_written_configs_load(tmp_path):
    from biofed.config import RECOMMENDED_PRIVACY, toml_document

    path = tmp_path / "coordinator.toml"
    path.write_text(
        toml_document(
            {"fleet": "ward7", "rounds": 2, "state_dir": "state", "sampling_rate": None},
            {
                "broker": {"port": 1884},
                "dp": RECOMMENDED_PRIVACY,
                "strategy": {"name": "fedadam", "params": {"eta": 0.01}},
            },
        )
    )
    config = load_config(path, CoordinatorConfig, environ={})
    assert config.dp.noise_multiplier == RECOMMENDED_PRIVACY["noise_multiplier"] and config.sampling_rate == "all"
    assert config.strategy.params == {"eta": 0.01} and config.state_dir == tmp_path / "state"
