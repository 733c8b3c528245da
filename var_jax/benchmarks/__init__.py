"""Benchmarks beyond one workload of var_jax alone (the `python -m var_jax.bench` subcommands).

- `compare`: the same workloads timed in var_jax and in the official PyTorch code, interleaved
  run by run in one process (`compare.py`: the machinery, the var_jax side and the table;
  `official.py`: the adapter to a user's checkout of FoundationVision/VAR, imported at run time).
- `device`: the one-shot accelerator check (`device.py`): matmul peak, train-step throughput and
  MFU, sampling throughput, compiled memory of a large model, and `compare` on the same device,
  each part in its own process under a time budget.
"""
