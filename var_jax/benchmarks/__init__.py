"""Speed benchmarks: one module per `python -m var_jax.bench` subcommand, each with `main(args)`.

- `sample` (`sample.py`): class-conditional sampling throughput, transformer and decode timed
  apart, for an official architecture with random weights or a checkpoint.
- `train` (`train.py`): the train step of a VAR or tokenizer training config; `train_step_program`
  builds that step for `compare` and `device` too.
- `compare`: the same workloads timed in var_jax and in the official PyTorch code, interleaved
  run by run in one process (`compare.py`: the machinery, the var_jax side and the table;
  `official.py`: the adapter to a user's checkout of FoundationVision/VAR, imported at run time).
- `device`: the one-shot accelerator check (`device.py`): matmul peak, train-step throughput and
  MFU, sampling throughput, compiled memory of a large model, and `compare` on the same device,
  each part in its own process under a time budget.

`timing.py` holds the timing loop and table formatting they share; the tiny models of `--model
tiny` and `--smoke` are `var_jax.testing`'s.
"""
