"""Sampling: the KV-cached generate loop (generate), zero-shot editing (editing), the padded batch
sampler over devices (batch), PNG grids (grid), resumable ADM .npz runs (npz), what
`python -m var_jax.sample` writes (files), and the one check of settings and class labels
(settings)."""
