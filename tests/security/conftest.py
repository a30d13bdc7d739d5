"""Fixtures of the security tests: a Mosquitto of each module's own, started from deploy/mosquitto/.

``secure`` is that broker (TLS + passwords on one port, client certificates on another, the
shipped ACL); ``connect(user, ...)`` opens a connected ``Probe`` as that user and closes it
after the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.probe import Probe
from tests.security.secure_broker import SecureBroker, start_secure_broker

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def secure(tmp_path_factory) -> Iterator[SecureBroker]:
    b = start_secure_broker(tmp_path_factory.mktemp("secure-broker"))
    yield b
    b.stop()


@pytest.fixture()
def connect(secure: SecureBroker):
    """``connect(user, **probe_options)``: a connected Probe on the password listener, as ``user``."""
    opened: list[Probe] = []

    def _connect(user: str, **kw) -> Probe:
        p = Probe(secure.tls_url, user, secure.passwords[user], secure.pki.ca, **kw)
        reason = p.connect()
        opened.append(p)
        assert reason == "Success", f"{user} could not connect: {reason}\n{secure.log()[-2000:]}"
        return p

    yield _connect
    for p in opened:
        p.close()


@pytest.fixture(scope="module")
def built_bundles(request) -> tuple[Path, Path]:
    """(edge bundle, cloud bundle): the ones `make export` built under bundles/, else fresh exports (slow)."""
    edge, cloud = ROOT / "bundles" / "msao-tiny-edge", ROOT / "bundles" / "msao-tiny-cloud"
    if (edge / "manifest.json").is_file() and (cloud / "manifest.json").is_file():
        return edge, cloud
    return request.getfixturevalue("edge_bundle_dir"), request.getfixturevalue("cloud_bundle_dir")
