"""Mosquitto started from the shipped deploy/mosquitto/ configuration, for the security tests.

The shipped ``mosquitto.conf`` is used as written except for what must differ on a test
machine: its two listener ports (free loopback ports instead of 8883/8884), the folder of
certificates and password file (``/etc/mosquitto/msao/`` -> a temporary folder), the
persistence folder, and ``acl_file``, which points at the shipped ``deploy/mosquitto/acl``
itself. A rewrite that finds the file in another shape fails the test, so the configuration
that is shipped stays the one that is tested. Passwords are random per broker and hashed with
``mosquitto_passwd -U``; certificates come from ``pki.py``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed import Broker, free_port, start_broker_from_conf
from tests.security.pki import Pki, make_pki

__all__ = ["CLOUD_USER", "EDGES", "SHIPPED_ACL", "SHIPPED_CONF", "SecureBroker", "start_secure_broker", "conf_for_test"]

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONF = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
SHIPPED_ACL = ROOT / "deploy" / "mosquitto" / "acl"
EDGES = ("edge-a", "edge-b")  # user name = edge id
CLOUD_USER = "msao-cloud"  # the workers' account in the shipped acl


@dataclass
class SecureBroker:
    """A running broker: ``tls_url`` (password listener), ``mtls_url`` (client-certificate listener)."""

    broker: Broker
    tls_url: str
    mtls_url: str
    tls_port: int
    mtls_port: int
    pki: Pki
    passwords: dict[str, str]

    def log(self) -> str:
        return self.broker.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.broker.stop()


def conf_for_test(text: str, folder: Path, tls_port: int, mtls_port: int) -> str:
    """The shipped configuration with ports and paths moved to this test (see the module docstring); comments dropped."""
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")) + "\n"
    subs = [
        ("acl_file /etc/mosquitto/msao/acl", f"acl_file {SHIPPED_ACL}", 1),
        ("/etc/mosquitto/msao/", f"{folder}/", 7),  # password file, and certfile/keyfile/cafile of both listeners
        ("persistence_location /var/lib/mosquitto/", f"persistence_location {folder}/", 1),
        ("\nlistener 8883\n", f"\nlistener {tls_port} 127.0.0.1\n", 1),
        ("\nlistener 8884\n", f"\nlistener {mtls_port} 127.0.0.1\n", 1),
    ]
    for old, new, count in subs:
        found = text.count(old)
        if found != count:
            pytest.fail(f"{SHIPPED_CONF} changed shape: {old.strip()!r} occurs {found} times, this test rewrites {count}; update it")
        text = text.replace(old, new)
    if os.geteuid() == 0:
        text += "\nuser root\n"  # otherwise mosquitto drops to a 'mosquitto' user that cannot read the temporary folder
    return text


def start_secure_broker(root: Path) -> SecureBroker:
    if shutil.which("mosquitto_passwd") is None:
        pytest.fail("mosquitto_passwd is not installed: run `make broker` (Debian package mosquitto)")
    root.mkdir(parents=True, exist_ok=True)
    pki = make_pki(root, clients=(*EDGES, CLOUD_USER))
    passwords = {user: secrets.token_urlsafe(12) for user in (*EDGES, CLOUD_USER)}
    passwd = root / "passwd"
    passwd.write_text("".join(f"{u}:{p}\n" for u, p in passwords.items()))
    r = subprocess.run(["mosquitto_passwd", "-U", str(passwd)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 or not ("$7$" in passwd.read_text() or "$6$" in passwd.read_text()):  # hashed, not clear text
        pytest.fail(f"mosquitto_passwd -U failed ({r.returncode}): {r.stderr}")
    tls_port, mtls_port = free_port(), free_port()
    while mtls_port == tls_port:
        mtls_port = free_port()
    conf = root / "mosquitto.conf"
    conf.write_text(conf_for_test(SHIPPED_CONF.read_text(), root, tls_port, mtls_port))
    url = f"mqtts://127.0.0.1:{tls_port}"
    broker = start_broker_from_conf(conf, tls_port, url, 2_000_000)
    return SecureBroker(broker, url, f"mqtts://127.0.0.1:{mtls_port}", tls_port, mtls_port, pki, passwords)
