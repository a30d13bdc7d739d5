"""The MQTT topic layout of msao v1, in one place; builders check every id they put in a topic.

    msao/v1/cloud/jobs/<model_hash>                        jobs for any worker serving the model
    $share/msao-cloud/msao/v1/cloud/jobs/<model_hash>      ... as workers subscribe (shared = load balancing)
    msao/v1/cloud/workers/<worker_id>/jobs/<model_hash>    jobs for one worker (chunked jobs, decode steps
                                                           bound to that worker's KV session, re-dispatch)
    msao/v1/cloud/status/<worker_id>                       retained worker status (Last Will: offline)
    msao/v1/edge/<edge_id>/cloud/results                   results (each job's ResponseTopic)
    msao/v1/edge/<edge_id>/status                          retained edge status (Last Will: offline)
    msao/v1/edge/<edge_id>/request                         questions to the edge daemon (docs/mqtt-api.md)
    msao/v1/edge/<edge_id>/response                        its answers, unless a request names its own ResponseTopic

Ids are ``[A-Za-z0-9_-]{1,64}`` so they never contain MQTT wildcards or separators.
"""

from __future__ import annotations

import re

from msao.errors import ConfigError

__all__ = [
    "PREFIX",
    "SHARE_GROUP",
    "check_id",
    "edge_request_topic",
    "edge_response_topic",
    "edge_results_topic",
    "edge_status_topic",
    "job_topic",
    "shared_job_filter",
    "worker_job_filter",
    "worker_job_topic",
    "worker_status_filter",
    "worker_status_topic",
]

PREFIX = "msao/v1"
SHARE_GROUP = "msao-cloud"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
_HASH = re.compile(r"^[0-9a-f]{64}\Z")


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid msao id; raise ConfigError otherwise."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ConfigError(f"{what} {value!r} is not a valid id: use 1-64 characters from A-Z, a-z, 0-9, '_' and '-'")
    return value


def _hash(model_hash: str) -> str:
    if not isinstance(model_hash, str) or not _HASH.match(model_hash):
        raise ConfigError(f"model hash {model_hash!r} is not 64 lower-case hex digits (see the bundle's manifest.json)")
    return model_hash


def job_topic(model_hash: str) -> str:
    return f"{PREFIX}/cloud/jobs/{_hash(model_hash)}"


def shared_job_filter(model_hash: str) -> str:
    return f"$share/{SHARE_GROUP}/{job_topic(model_hash)}"


def worker_job_topic(worker_id: str, model_hash: str) -> str:
    return f"{PREFIX}/cloud/workers/{check_id(worker_id, 'worker id')}/jobs/{_hash(model_hash)}"


def worker_job_filter(worker_id: str) -> str:
    """Every model's direct jobs for one worker (a job for a model it lacks gets an error result)."""
    return f"{PREFIX}/cloud/workers/{check_id(worker_id, 'worker id')}/jobs/+"


def worker_status_topic(worker_id: str) -> str:
    return f"{PREFIX}/cloud/status/{check_id(worker_id, 'worker id')}"


def worker_status_filter() -> str:
    return f"{PREFIX}/cloud/status/+"


def edge_results_topic(edge_id: str) -> str:
    return f"{PREFIX}/edge/{check_id(edge_id, 'edge id')}/cloud/results"


def edge_status_topic(edge_id: str) -> str:
    return f"{PREFIX}/edge/{check_id(edge_id, 'edge id')}/status"


def edge_request_topic(edge_id: str) -> str:
    """Where users send questions to one edge daemon (JSON or a raw image; docs/mqtt-api.md)."""
    return f"{PREFIX}/edge/{check_id(edge_id, 'edge id')}/request"


def edge_response_topic(edge_id: str) -> str:
    """Where the edge daemon answers requests that carry no ResponseTopic of their own."""
    return f"{PREFIX}/edge/{check_id(edge_id, 'edge id')}/response"
