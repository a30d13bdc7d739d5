"""Datasets msao trains, evaluates and benchmarks on; they know nothing of models."""
