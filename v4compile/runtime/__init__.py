"""Python runtime: engines, caches, generation."""
