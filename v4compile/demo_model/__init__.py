"""The embedded demo model: a tiny V4 trained with Muon on a long-context key-value retrieval task."""
