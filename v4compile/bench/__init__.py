"""Benchmarks (not tests): `v4compile bench` times kernels against measured ceilings and writes JSON."""
