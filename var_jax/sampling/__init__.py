"""Sampling: the KV-cached generate loop, editing, batched sampling."""
