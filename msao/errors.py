"""The one error tree of msao; every error a caller can act on is a subclass of ``MsaoError``.

    MsaoError
    ├── BundleError            a bundle on disk is missing, altered, unsafe or malformed
    │   ├── HashMismatch       a file's sha256 differs from the manifest (or an engine's from its record)
    │   └── EngineMismatch     a TensorRT engine was built by another TensorRT, for another GPU, or from another export
    ├── ModelFolderError       a folder given to the exporter is not a usable LLaVA checkpoint
    ├── ExportCheckFailed      an exported segment disagrees with PyTorch beyond tolerance
    ├── EngineBuildFailed      TensorRT could not parse or build an engine from a segment's ONNX file
    ├── FeedError              a tensor fed to a segment has the wrong name, dtype or shape
    ├── ImageError             bytes given as an image cannot be decoded or are too large
    ├── MissingDependency      an optional package (torch, tensorrt, ...) is not installed
    ├── GpuUnavailable         a GPU path was asked for but no CUDA driver or device answers
    ├── MasInputError          tensors given to MAS disagree in shape, are not finite, or the question is empty
    ├── StreamError            a frame or token delta does not fit its stream (size changed, stale version)
    ├── ConfigError            a configuration value or key is invalid
    ├── RequestError           a request to the edge daemon is malformed or cannot be served (``code`` says which)
    ├── CodecError             bytes from the wire are not a valid msao payload (never trusted)
    │   └── PayloadTooLarge    a payload, decompressed size or chunked message exceeds a limit
    └── CloudError             the cloud path did not deliver; the edge should fall back
        ├── CloudUnavailable   no broker, no worker, no answer within the deadline, or a lost session
        ├── CloudBusy          every worker tried answered ``busy`` (its job queue was full)
        └── CloudJobFailed     a worker answered with an error result (``code`` says which)

Messages say what went wrong, where, what was expected, and what to do next.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "CloudBusy",
    "CloudError",
    "CloudJobFailed",
    "CloudUnavailable",
    "CodecError",
    "ConfigError",
    "EngineBuildFailed",
    "EngineMismatch",
    "ExportCheckFailed",
    "FeedError",
    "GpuUnavailable",
    "HashMismatch",
    "ImageError",
    "MasInputError",
    "MissingDependency",
    "ModelFolderError",
    "MsaoError",
    "PayloadTooLarge",
    "RequestError",
    "StreamError",
]


class MsaoError(Exception):
    """Root of every error msao raises on purpose."""


class BundleError(MsaoError):
    """A bundle cannot be trusted or used; nothing from it has been loaded."""


class HashMismatch(BundleError):
    """A bundle file's content does not match the sha256 recorded in its manifest."""


class EngineMismatch(BundleError):
    """A TensorRT engine cannot run here: built by another TensorRT version, for another GPU, or
    from another export of the bundle. Rebuild it on this device with ``msao build-engines``;
    until then the segment runs on ONNX Runtime."""


class ModelFolderError(MsaoError):
    """A model folder is not a LLaVA checkpoint the exporter can read."""


class ExportCheckFailed(MsaoError):
    """An exported ONNX segment does not reproduce the PyTorch reference."""


class EngineBuildFailed(MsaoError):
    """TensorRT's parser or builder refused a segment; the message carries TensorRT's own errors."""


class FeedError(MsaoError):
    """Inputs fed to a segment do not match its specification."""


class ImageError(MsaoError):
    """An image payload is not a decodable, reasonably sized image."""


class MissingDependency(MsaoError):
    """An optional dependency is needed for this action but not installed."""


class GpuUnavailable(MsaoError):
    """A GPU code path was requested but no CUDA driver, device or compiler answers; use the NumPy path."""


class MasInputError(MsaoError):
    """Inputs to the MAS analysis are inconsistent; no scores or keep-set were produced."""


class StreamError(MsaoError):
    """A frame or token delta cannot be applied to its stream; start the stream again (reset / full resend)."""


class ConfigError(MsaoError):
    """A configuration value is invalid or unknown."""


class RequestError(MsaoError):
    """A request to the edge daemon is refused; the client gets an error response with ``code``.

    Attributes:
        code: one of ``msao.edge_runtime.requests.ERROR_CODES`` (``bad_request``, ``bad_image``,
            ``too_large``, ``deadline``, ``busy``, ``unavailable``, ``internal``).
    """

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


class CodecError(MsaoError):
    """A payload is malformed: bad header, unknown dtype, sizes that do not add up."""


class PayloadTooLarge(CodecError):
    """A payload (or its decompressed form, or a chunked message) is larger than allowed."""


class CloudError(MsaoError):
    """The cloud path did not deliver a result; the edge runtime should fall back locally."""


class CloudUnavailable(CloudError):
    """No broker connection, no worker serving the model, no result by the deadline, or a lost session."""


class CloudBusy(CloudError):
    """The worker(s) tried had full job queues and answered ``busy``."""


class CloudJobFailed(CloudError):
    """A worker answered with an error result; retrying the same job will fail the same way.

    Attributes:
        code: the worker's error code (``bad_payload``, ``unknown_model``, ``unknown_segment``,
            ``bad_input``, ``session_unknown``, ``session_mismatch``, ``internal``, ...).
    """

    def __init__(self, message: str, code: str = "internal"):
        super().__init__(message)
        self.code = code
