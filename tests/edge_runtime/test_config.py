"""Configuration: TOML, then MSAO_* variables, then flags; unknown keys and bad values refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from msao.edge_runtime.config import EdgeConfig, config_to_toml, env_bool, env_name, load_edge_config
from msao.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text", ["1", "true", "TRUE", " yes ", "On"])
def test_env_bool_reads_true(text):
    assert env_bool(text) is True


@pytest.mark.parametrize("text", ["0", "false", "No", "off", ""])
def test_env_bool_reads_false(text):
    assert env_bool(text) is False


@pytest.mark.parametrize("text", ["2", "maybe", "truee", "-1"])
def test_env_bool_refuses_anything_else(text):
    with pytest.raises(ConfigError, match="not a boolean"):
        env_bool(text, "MSAO_X")


def test_defaults_need_no_file_no_environment_no_flags():
    assert load_edge_config(None, env={}) == EdgeConfig()


def test_flags_beat_environment_which_beats_the_file(tmp_path):
    f = tmp_path / "edge.toml"
    f.write_text('[edge]\nedge_id = "from-file"\nthreads = 3\n[runtime]\nworkers = 4\n[runtime.scheduler]\npolicy = "edge_only"\n')
    env = {"MSAO_EDGE_EDGE_ID": "from-env", "MSAO_RUNTIME_WORKERS": "5"}
    c = load_edge_config(f, env=env, flags={"edge.edge_id": "from-flag", "runtime.queue_size": None})
    assert c.edge.edge_id == "from-flag"  # flag over env over file
    assert c.runtime.workers == 5  # env over file
    assert c.edge.threads == 3 and c.runtime.scheduler.policy == "edge_only"  # file over defaults
    assert c.runtime.queue_size == EdgeConfig().runtime.queue_size  # an unset flag overrides nothing


def test_every_key_has_one_environment_name():
    assert env_name(("runtime", "scheduler", "keep_ratios")) == "MSAO_RUNTIME_SCHEDULER_KEEP_RATIOS"
    c = load_edge_config(None, env={"MSAO_RUNTIME_SCHEDULER_KEEP_RATIOS": "1, 0.5", "MSAO_RUNTIME_MAS_ALWAYS": "yes"})
    assert c.runtime.scheduler.keep_ratios == (1.0, 0.5) and c.runtime.mas_always is True


def test_the_papers_regime_is_one_edge_key_with_its_environment_variable_and_flag():
    assert EdgeConfig().edge.large_on_edge is True  # the resident regime stays the default
    assert load_edge_config(None, env={"MSAO_EDGE_LARGE_ON_EDGE": "false"}).edge.large_on_edge is False
    assert load_edge_config(None, env={}, flags={"edge.large_on_edge": "false"}).edge.large_on_edge is False
    with pytest.raises(ConfigError, match="not a boolean"):
        load_edge_config(None, env={"MSAO_EDGE_LARGE_ON_EDGE": "sometimes"})


def test_print_config_output_loads_back_to_the_same_config(tmp_path):
    c = load_edge_config(None, env={"MSAO_BROKER_URL": "mqtt://10.0.0.2:1883", "MSAO_RUNTIME_SCHEDULER_ACCURACY_SLACK": "0.02"})
    f = tmp_path / "printed.toml"
    f.write_text(config_to_toml(c))
    assert load_edge_config(f, env={}) == c


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[runtime]\nworkerz = 2\n", "unknown key 'runtime.workerz'"),
        ("[nonsense]\nx = 1\n", "unknown key 'nonsense'"),
        ("[runtime]\nworkers = 0\n", "must be >= 1"),
        ('[runtime]\nworkers = "two"\n', "not a valid int"),
        ('[runtime.scheduler]\npolicy = "fastest"\n', "not one of"),
        ('[edge]\nedge_id = "a/b"\n', "not a valid id"),
        ('[broker]\nurl = "http://x"\n', "mqtt://HOST:PORT"),
        ('[edge]\nmetrics = "9464"\n', r"edge\.metrics \(--metrics\) must be HOST:PORT"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_files_are_refused_with_what_and_where(tmp_path, toml, message):
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_edge_config(f, env={})


def test_metrics_listener_is_off_unless_an_address_is_given():
    assert EdgeConfig().edge.metrics == ""
    c = load_edge_config(None, env={"MSAO_EDGE_METRICS": "127.0.0.1:9464"}, flags={"edge.metrics": "[::1]:9464"})
    assert c.edge.metrics == "[::1]:9464"  # the flag over the environment


def test_bad_environment_values_name_the_variable():
    with pytest.raises(ConfigError, match="MSAO_RUNTIME_QUEUE_SIZE"):
        load_edge_config(None, env={"MSAO_RUNTIME_QUEUE_SIZE": "lots"})


def test_the_password_is_never_a_config_key(tmp_path):
    f = tmp_path / "pw.toml"
    f.write_text('[broker]\npassword = "hunter2"\n')
    with pytest.raises(ConfigError, match="unknown key 'broker.password'"):
        load_edge_config(f, env={})


def test_msao_edge_print_config_merges_flags_and_environment(tmp_path):
    env = {"MSAO_RUNTIME_WORKERS": "3", "MSAO_MQTT_PASSWORD": "hunter2", "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-m", "msao", "edge", "--print-config", "--broker", "mqtt://127.0.0.1:1999", "--policy", "edge_only"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert 'url = "mqtt://127.0.0.1:1999"' in r.stdout and "workers = 3" in r.stdout and 'policy = "edge_only"' in r.stdout
    assert "hunter2" not in r.stdout


def test_msao_edge_with_a_bad_config_exits_1_with_the_problem(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[runtime]\nqueue_size = -1\n")
    r = subprocess.run([sys.executable, "-m", "msao", "edge", "--config", str(f)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1 and "queue_size" in r.stderr and "Traceback" not in r.stderr
