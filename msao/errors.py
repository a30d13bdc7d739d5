"""The one error tree of msao; every error a caller can act on is a subclass of ``MsaoError``.

    MsaoError
    ├── BundleError            a bundle on disk is missing, altered, unsafe or malformed
    │   └── HashMismatch       a file's sha256 differs from the manifest
    ├── ModelFolderError       a folder given to the exporter is not a usable LLaVA checkpoint
    ├── ExportCheckFailed      an exported segment disagrees with PyTorch beyond tolerance
    ├── FeedError              a tensor fed to a segment has the wrong name, dtype or shape
    ├── ImageError             bytes given as an image cannot be decoded or are too large
    ├── MissingDependency      an optional package (torch, tensorrt, ...) is not installed
    └── ConfigError            a configuration value or key is invalid

Messages say what went wrong, where, what was expected, and what to do next.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "ConfigError",
    "ExportCheckFailed",
    "FeedError",
    "HashMismatch",
    "ImageError",
    "MissingDependency",
    "ModelFolderError",
    "MsaoError",
]


class MsaoError(Exception):
    """Root of every error msao raises on purpose."""


class BundleError(MsaoError):
    """A bundle cannot be trusted or used; nothing from it has been loaded."""


class HashMismatch(BundleError):
    """A bundle file's content does not match the sha256 recorded in its manifest."""


class ModelFolderError(MsaoError):
    """A model folder is not a LLaVA checkpoint the exporter can read."""


class ExportCheckFailed(MsaoError):
    """An exported ONNX segment does not reproduce the PyTorch reference."""


class FeedError(MsaoError):
    """Inputs fed to a segment do not match its specification."""


class ImageError(MsaoError):
    """An image payload is not a decodable, reasonably sized image."""


class MissingDependency(MsaoError):
    """An optional dependency is needed for this action but not installed."""


class ConfigError(MsaoError):
    """A configuration value is invalid or unknown."""
