"""Intermediate graph: torch.export capture, pattern rewrites, passes (see DESIGN.md section 5)."""
