"""`msao cloud` as a user runs it: documented options, clear failures, clean shutdown."""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from msao.cli import cloud_cmd
from testbed import open_link, start_workers, wait_online

ROOT = Path(__file__).resolve().parents[2]


def msao(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msao", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_cloud_help_documents_every_option():
    p = argparse.ArgumentParser()
    cloud_cmd.add_arguments(p)
    r = msao("cloud", "--help")
    assert r.returncode == 0
    for action in p._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 20, action.dest
        assert action.option_strings[0] in r.stdout, action.option_strings
    assert "mqtts://" in r.stdout and "busy" in r.stdout


def test_cloud_with_a_missing_bundle_fails_clearly(tmp_path):
    r = msao("cloud", "--bundle", str(tmp_path / "nope"), "--broker", "mqtt://127.0.0.1:1")
    assert r.returncode == 1 and "not a bundle" in r.stderr and "Traceback" not in r.stderr


def test_cloud_with_a_bad_broker_url_fails_clearly(cloud_bundle_dir):
    r = msao("cloud", "--bundle", str(cloud_bundle_dir), "--broker", "http://example.com")
    assert r.returncode == 1 and "mqtt://HOST:PORT" in r.stderr and "Traceback" not in r.stderr


def test_sigterm_stops_the_worker_cleanly_and_publishes_offline(broker, cloud_bundle_dir, tmp_path):
    (w,) = start_workers(broker.url, cloud_bundle_dir, tmp_path)
    link = open_link(broker.url)
    try:
        wait_online(link, [w])
        w.send_signal(signal.SIGTERM)
        assert w.process.wait(20) == 0
        status = link.worker_status(w.worker_id)
        end = time.monotonic() + 5
        while status.state != "offline" and time.monotonic() < end:
            time.sleep(0.02)
            status = link.worker_status(w.worker_id)
        assert status.state == "offline"
        assert "Traceback" not in w.log()
    finally:
        link.close()


def test_cloud_metrics_port_in_use_fails_before_the_bundles_load(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        # the bundle does not exist: a worker that loaded bundles before binding would say "not a bundle" instead
        r = msao("cloud", "--metrics", f"127.0.0.1:{port}", "--bundle", str(tmp_path / "none"), "--broker", "mqtt://127.0.0.1:1")
    assert r.returncode == 1 and f"127.0.0.1:{port}" in r.stderr and "pick another --metrics HOST:PORT" in r.stderr, r.stderr
    assert "not a bundle" not in r.stderr and "Traceback" not in r.stderr


def test_cloud_metrics_address_must_be_host_and_port():
    r = msao("cloud", "--metrics", "9465", "--broker", "mqtt://127.0.0.1:1")
    assert r.returncode == 1 and "--metrics must be HOST:PORT" in r.stderr and "Traceback" not in r.stderr


def test_cloud_extras_install_mqtt_and_zstd_and_never_torch():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("edge", "cloud", "cloud-gpu"):
        reqs = extras[name]
        assert any(r.startswith("paho-mqtt>=2.1,<3") for r in reqs) and any(r.startswith("zstandard") for r in reqs), name
        assert any(r.startswith("prometheus-client") for r in reqs), name  # the --metrics listener
        assert not any(r.startswith(("torch", "transformers")) for r in reqs), name
    assert any(r.startswith("onnxruntime-gpu") for r in extras["cloud-gpu"])
    assert not any(r.startswith("onnxruntime>") for r in extras["cloud-gpu"])  # the CPU and GPU wheels clash


def test_every_cloud_bridge_module_imports_without_torch():
    mods = ["msao.cloud_bridge." + p.stem for p in (ROOT / "msao" / "cloud_bridge").glob("*.py") if p.stem != "__init__"]
    code = "import sys; sys.modules['torch'] = None\n" + "\n".join(f"import {m}" for m in [*mods, "msao.cli.cloud_cmd"])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
