"""Sample-quality evaluation on the ADM protocol (openai/guided-diffusion `evaluations/evaluator.py`).

    inputs.py     numpy-only: streaming npz readers and input validation (fails before JAX starts)
    inception.py  InceptionV3, FID variant, as an NNX module loading the pytorch-fid port weights
    adm.py        feature extraction over all local devices; IS, FID, sFID, precision/recall

Nothing here imports JAX at package import time, so the CLI can reject bad inputs quickly.
See docs/evaluation.md for the protocol and how these numbers relate to the TensorFlow suite.
"""
