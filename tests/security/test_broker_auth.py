"""Who may connect to a broker run from deploy/mosquitto/: TLS only, and only with a password or a trusted client certificate.

Every refusal is checked against the real Mosquitto; every client-side refusal must say why
and what to change.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from msao.cloud_bridge.client import BridgeClient
from msao.cloud_bridge.mqtt_options import ClientOptions, TlsOptions
from msao.edge_runtime.edge_client import EdgeClient
from msao.errors import CloudUnavailable
from tests.security.pki import renew_server_cert
from tests.security.probe import Probe
from tests.security.secure_broker import SecureBroker

ROOT = Path(__file__).resolve().parents[2]
REFUSED_LOGIN = ("Not authorized", "Bad user name or password")  # Mosquitto 2.0 answers the first for both


def _login(p: Probe) -> str:
    """CONNACK reason, or the TLS error, of one connection attempt."""
    try:
        return p.connect(timeout_s=3.0)
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        p.close()


def _bridge(url: str, user: str | None, password: str | None, ca: Path) -> BridgeClient:
    options = ClientOptions(url, f"sec-{uuid.uuid4().hex[:8]}", tls=TlsOptions(ca_file=str(ca)), username=user, password=password)
    return BridgeClient(options, lambda _m: None).start()


def _never_connects(client: BridgeClient, timeout_s: float = 5.0) -> str | None:
    """Wait until the client has a reason for not being connected; return it (it must not have connected)."""
    try:
        end = time.monotonic() + timeout_s
        while client.last_connect_error is None and not client.connected and time.monotonic() < end:
            time.sleep(0.02)
        assert not client.connected, "the client connected, it should have been refused"
        return client.last_connect_error
    finally:
        client.stop()


def test_edge_with_its_password_is_admitted(secure: SecureBroker):
    assert _login(Probe(secure.tls_url, "edge-a", secure.passwords["edge-a"], secure.pki.ca)) == "Success"


def test_wrong_password_is_refused(secure: SecureBroker):
    wrong = secure.passwords["edge-a"] + "x"
    assert _login(Probe(secure.tls_url, "edge-a", wrong, secure.pki.ca)) in REFUSED_LOGIN
    # msao's own client says so and names what to check
    reason = _never_connects(_bridge(secure.tls_url, "edge-a", wrong, secure.pki.ca))
    assert reason is not None and "refused" in reason and "MSAO_MQTT_PASSWORD" in reason, reason


def test_another_users_password_unknown_users_and_anonymous_clients_are_refused(secure: SecureBroker):
    assert _login(Probe(secure.tls_url, "edge-a", secure.passwords["edge-b"], secure.pki.ca)) in REFUSED_LOGIN
    assert _login(Probe(secure.tls_url, "edge-c", secure.passwords["edge-a"], secure.pki.ca)) in REFUSED_LOGIN
    assert _login(Probe(secure.tls_url, None, None, secure.pki.ca)) in REFUSED_LOGIN


def test_a_client_certificate_alone_does_not_log_in_on_the_password_listener(secure: SecureBroker):
    assert _login(Probe(secure.tls_url, None, None, secure.pki.ca, cert=secure.pki.client("edge-a"))) in REFUSED_LOGIN


def test_plain_mqtt_is_refused_on_the_tls_port(secure: SecureBroker):
    # a well-formed MQTT 5 CONNECT in clear text (client id "plain", user "edge-a" + its password)
    user, pw = b"edge-a", secure.passwords["edge-a"].encode()
    body = b"\x00\x04MQTT\x05\xc2\x00\x1e\x00" + b"\x00\x05plain" + len(user).to_bytes(2, "big") + user + len(pw).to_bytes(2, "big") + pw
    with socket.create_connection(("127.0.0.1", secure.tls_port), timeout=3) as s:
        s.sendall(bytes([0x10, len(body)]) + body)
        try:
            answer = s.recv(64)
        except (ConnectionResetError, TimeoutError) as exc:
            answer = f"{type(exc).__name__}".encode()
    assert not answer.startswith(b"\x20"), f"the TLS port answered a clear-text CONNECT with a CONNACK: {answer!r}"
    # and msao's client, pointed at the TLS port with mqtt://, never connects and says to use mqtts://
    plain = ClientOptions(f"mqtt://127.0.0.1:{secure.tls_port}", "sec-plain", username="edge-a", password=secure.passwords["edge-a"])
    reason = _never_connects(BridgeClient(plain, lambda _m: None).start())
    assert reason is not None and "mqtts://" in reason, reason
    assert "as plain" not in secure.log() and "as sec-plain" not in secure.log()


def test_client_refuses_a_broker_whose_certificate_it_does_not_trust(secure: SecureBroker):
    """The broker's certificate is signed by our CA; a client that trusts another CA must not connect, and must say why."""
    options = ClientOptions(
        secure.tls_url, "sec-untrusting", tls=TlsOptions(ca_file=str(secure.pki.rogue_ca)),
        username="edge-a", password=secure.passwords["edge-a"],
    )  # fmt: skip
    with pytest.raises(CloudUnavailable, match=r"does not trust \(.+\); give --ca-file the CA"):
        EdgeClient(options, "edge-a").start(timeout_s=1.0)
    assert "as sec-untrusting" not in secure.log(), "the client sent CONNECT (and its password) to a broker it does not trust"


def test_msao_ask_names_the_untrusted_certificate(secure: SecureBroker, tmp_path: Path):
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")  # never read by anyone: the connection fails first
    r = subprocess.run(
        [sys.executable, "-m", "msao", "ask", "--broker", secure.tls_url, "--ca-file", str(secure.pki.rogue_ca), "--username", "edge-a",
         "--edge-id", "edge-a", "--image", str(image), "--question", "what shape is this?"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, env={**os.environ, "MSAO_MQTT_PASSWORD": secure.passwords["edge-a"]},
    )  # fmt: skip
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "does not trust" in r.stderr and "--ca-file" in r.stderr, r.stderr


def test_client_certificate_logs_in_as_its_common_name(secure: SecureBroker):
    with Probe(secure.mtls_url, None, None, secure.pki.ca, cert=secure.pki.client("edge-a")) as p:
        assert p.publish("msao/v1/edge/edge-a/request", b"cert-login") in ("Success", "No matching subscribers")
        assert p.publish("msao/v1/edge/edge-b/request", b"cert-login") == "Not authorized"  # the ACL sees user edge-a


@pytest.mark.parametrize("who", ["no certificate", "a certificate from another CA"])
def test_client_certificate_listener_refuses_clients_without_a_trusted_certificate(secure: SecureBroker, who: str):
    cert = None if who == "no certificate" else secure.pki.rogue_client("edge-a")
    assert _login(Probe(secure.mtls_url, None, None, secure.pki.ca, cert=cert)) != "Success"


def _served_certificate_serial(secure: SecureBroker) -> str:
    ctx = ssl.create_default_context(cafile=str(secure.pki.ca))
    with socket.create_connection(("127.0.0.1", secure.tls_port), timeout=3) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        return s.getpeercert()["serialNumber"]


def test_server_certificate_rotates_on_sighup_without_dropping_connected_clients(secure: SecureBroker):
    before = _served_certificate_serial(secure)
    with Probe(secure.tls_url, "edge-a", secure.passwords["edge-a"], secure.pki.ca) as connected:
        renew_server_cert(secure.pki)
        secure.broker.process.send_signal(signal.SIGHUP)
        end = time.monotonic() + 5
        while (after := _served_certificate_serial(secure)) == before and time.monotonic() < end:
            time.sleep(0.05)
        assert after != before, "Mosquitto still presents the old certificate after SIGHUP"
        connected.sync("msao/v1/edge/edge-a/response/rotation")  # the connection made before the rotation still works
        assert connected.disconnect_reason is None


@pytest.mark.parametrize("command", ["edge", "cloud", "ask"])
def test_every_connecting_command_takes_tls_files_and_a_user_but_no_password_flag(command: str, tmp_path: Path):
    from msao.cli import _parser

    f = tmp_path / "x.pem"
    f.write_text("-")
    flags = ["--broker", "mqtts://b:8883", "--ca-file", str(f), "--cert-file", str(f), "--key-file", str(f), "--username", "edge-a"]
    extra = ["--image", "x.png", "--question", "q"] if command == "ask" else []
    args = _parser().parse_args([command, *flags, *extra])
    assert (args.broker, args.ca_file, args.cert_file, args.key_file, args.username) == ("mqtts://b:8883", str(f), str(f), str(f), "edge-a")
    with pytest.raises(SystemExit):  # the password comes from $MSAO_MQTT_PASSWORD only, never argv (ps would show it)
        _parser().parse_args([command, *flags, *extra, "--password", "secret"])
