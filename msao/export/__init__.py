"""Workstation side: training, cutting a LLaVA checkpoint into segments, ONNX export and its checks. Imports torch; never imported by the edge."""
