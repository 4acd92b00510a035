"""The model side: configuration, checkpoint format, and the eager reference (the semantics)."""
