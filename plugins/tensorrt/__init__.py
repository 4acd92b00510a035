"""TensorRT plugin definitions wrapping the Triton kernels."""
