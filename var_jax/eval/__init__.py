"""Evaluation: the ADM protocol (openai/guided-diffusion `evaluations/evaluator.py`), the built-in
score and the tokenizer metrics.

    modes.py              the three evaluations of `python -m var_jax.evaluate` (adm, builtin,
                          tokenizer): cheap input checks, then the module below that uses JAX
    inputs.py             numpy-only: streaming npz readers and input validation (fails before JAX starts)
    inception.py          InceptionV3, FID variant, as an NNX module loading the pytorch-fid port weights
    adm.py                feature extraction over all local devices; IS, FID, sFID, precision/recall
    builtin_score.py      class accuracy and Frechet distances of a VAR trained on shapes10
    classifier.py         the shapes10 judge of the built-in score
    tokenizer_metrics.py  reconstruction PSNR, LPIPS, rFID and codebook usage of a VQVAE

Nothing here imports JAX at package import time, so the CLI can reject bad inputs quickly.
See docs/evaluation.md for the protocol and how these numbers relate to the TensorFlow suite.
"""
