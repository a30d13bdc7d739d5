"""Fixtures of the cloud bridge tests (helpers live in ``tests/mqtt_parts.py``; ``broker`` in ``tests/conftest.py``).

``small_broker`` sets a small ``max_packet_size`` to force chunking.
"""

from __future__ import annotations

import pytest

from testbed import start_broker
from tests.cloud_bridge import SMALL_MAX_PACKET


@pytest.fixture(scope="module")
def small_broker(tmp_path_factory):
    b = start_broker(tmp_path_factory.mktemp("small-broker"), max_packet_bytes=SMALL_MAX_PACKET)
    yield b
    b.stop()
