"""Train the multi-scale VQVAE tokenizer:
`python -m var_jax.train_tokenizer --config=configs/tokenizer.py --workdir=DIR`.

Loss (VQGAN recipe on VAR's quantizer):
    l1 |x - x'| + l2 (x - x')^2 + lpips LPIPS(x, x')           reconstruction
  + vq * mean_k [ beta ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2 ]   (official training forward)
  + [step >= gan_start] * w_adapt * gan * -D(x')               hinge generator loss
with w_adapt = ||dL_rec/dW|| / (||dL_G/dW|| + 1e-4) at the decoder's last conv (VQGAN), and the
PatchGAN trained with the hinge loss on (x, sg(x')).

Codebook health: the official EMA of per-scale code hits is kept and logged as usage %; every
`reseed_every` steps, codes whose hit rate fell below `dead_threshold` x the uniform rate are
re-seeded from this batch's encoder residuals (random pooled vectors of random scales), so no
scale collapses onto a few codes.
"""
# the command line only (its docstring is its --help); the task is var_jax/training/tokenizer_task.py, the loop
# var_jax/training/loop.py, the flags var_jax/training/command.py
from __future__ import annotations

from var_jax.training import command, tokenizer_task

if __name__ == '__main__':
    command.main(tokenizer_task.run, default_config='configs/tokenizer_tiny.py', config_help='tokenizer config',
                 dry_run_help='compile the step from abstract shapes, print memory, exit',
                 memory_help='with --dry_run: the memory of one target device in GiB, to say whether the step '
                             'fits and which mesh does')
