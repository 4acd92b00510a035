"""Graph passes; PIPELINE is the ordered list (STYLE.md item 1)."""
