"""Tiny model configs shared by the tests and the benchmarks (like gemma's `gm.testing`).

8 px images, 4 scales (1, 2, 3, 4), a 64-entry codebook: cheap to compile on a CPU, for
behaviour rather than numbers. `tests/conftest.py` builds its session models from these,
`python -m var_jax.bench sample --model tiny` times them, and `bench device --smoke` runs its
code path on them.
"""
from __future__ import annotations

from var_jax.models import VARConfig, VQVAEConfig

TINY_PNS = (1, 2, 3, 4)
TINY_VQ = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=TINY_PNS)
TINY_VAR = VARConfig(depth=2, width=64, num_heads=2, vocab_size=64, cvae=8, patch_nums=TINY_PNS, num_classes=10)
# a small tokenizer in the official VQVAE layout (ch_mult and blocks fixed there: 64 px, 4 scales),
# which the official classes can build too (`bench compare --tiny`)
TINY_OFFICIAL_VQ = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, patch_nums=TINY_PNS)
