"""A throw-away PKI for tests, made with the openssl CLI: a CA, the broker's certificate, client certificates.

Also a second, "rogue" CA that nobody trusts, with its own server and client certificates, so
tests can present a broker or a client that is not ours. EC P-256 keys: the whole PKI takes
~0.1 s. Certificates carry the extensions a strict verifier wants (CA:TRUE + keyCertSign on the
CA; serverAuth / clientAuth, key identifiers and subjectAltName on the leaves).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["make_pki", "Pki", "renew_server_cert"]

_EXTENSIONS = """\
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files. ``client(cn)`` / ``rogue_client(cn)`` give (cert, key) of a client."""

    root: Path
    ca: Path
    server_cert: Path
    server_key: Path
    rogue_ca: Path
    rogue_server_cert: Path
    rogue_server_key: Path

    def client(self, cn: str) -> tuple[Path, Path]:
        return self.root / f"{cn}.crt", self.root / f"{cn}.key"

    def rogue_client(self, cn: str) -> tuple[Path, Path]:
        return self.root / f"rogue-{cn}.crt", self.root / f"rogue-{cn}.key"


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.fail(f"openssl {' '.join(args[:2])} failed ({r.returncode}):\n{r.stderr[-2000:]}")


def _ca(root: Path, name: str, cn: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=root,
    )  # fmt: skip


def _leaf(root: Path, ca: str, name: str, cn: str, ext: str) -> None:
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        cwd=root,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial", "-days", "2",
        "-out", f"{name}.crt", "-extfile", "extensions.cnf", "-extensions", ext,
        cwd=root,
    )  # fmt: skip


def make_pki(root: Path, clients: tuple[str, ...]) -> Pki:
    """Write a CA, a server certificate for 127.0.0.1/localhost and one client certificate per CN in ``clients``,
    plus the same again under a rogue CA (files ``rogue-*``)."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is not installed (Debian package openssl); the TLS tests make their certificates with it")
    root.mkdir(parents=True, exist_ok=True)
    (root / "extensions.cnf").write_text(_EXTENSIONS)
    for prefix in ("", "rogue-"):
        _ca(root, f"{prefix}ca", f"msao {prefix or 'test '}CA")
        _leaf(root, f"{prefix}ca", f"{prefix}server", "localhost", "server_ext")
        for cn in clients:
            _leaf(root, f"{prefix}ca", f"{prefix}{cn}", cn, "client_ext")
    return Pki(
        root,
        root / "ca.crt",
        root / "server.crt",
        root / "server.key",
        root / "rogue-ca.crt",
        root / "rogue-server.crt",
        root / "rogue-server.key",
    )


def renew_server_cert(pki: Pki) -> None:
    """Replace the broker's key and certificate in place with new ones from the same CA (a rotation)."""
    _leaf(pki.root, "ca", "server", "localhost", "server_ext")
