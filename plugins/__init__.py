"""Kernels: Triton kernels (plugins/triton) and TensorRT plugin definitions (plugins/tensorrt)."""
