"""Triton kernels as torch.library.triton_op, each next to its launcher and torch reference."""
