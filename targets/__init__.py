"""Compilation targets: capability tables, kernel selection, emit."""
