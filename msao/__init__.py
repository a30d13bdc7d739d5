"""msao: Modality Sparsity-Aware Offloading of multimodal LLMs between a Jetson edge and a cloud GPU.

The package is split so that each machine imports only what it runs:
``msao.export`` (torch, workstation only), ``msao.engines`` (bundles and backends, no torch),
``msao.edge_runtime`` and ``msao.cloud_bridge`` (no torch).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
