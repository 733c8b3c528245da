"""Multi-process start-up: one `jax.distributed.initialize()` before anything touches devices.

When it runs:
  * `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` set (launch/local_multiprocess.sh,
    any hand-made cluster): initialise with exactly those values;
  * `VAR_JAX_MULTIHOST=1` (launch/tpu/*, multi-node GPU) or SLURM with more than one task:
    initialise with JAX's cluster auto-detection (TPU metadata, SLURM, ...);
  * otherwise: single process, nothing to do (auto-detection is never tried on a plain machine,
    where it could wait on a metadata server).
CPU processes get gloo collectives so the local rehearsal computes across processes.
"""
from __future__ import annotations

import os

import jax

_DONE = False


def maybe_initialize() -> bool:
    """Initialise jax.distributed if the environment asks for it; returns True if it did."""
    global _DONE
    if _DONE:
        return True
    env = os.environ
    explicit = env.get('JAX_COORDINATOR_ADDRESS') and env.get('JAX_NUM_PROCESSES')
    auto = env.get('VAR_JAX_MULTIHOST') == '1' or int(env.get('SLURM_NTASKS', '1')) > 1
    if not (explicit or auto):
        return False
    if env.get('JAX_PLATFORMS', '').startswith('cpu') or env.get('VAR_JAX_CPU_COLLECTIVES') == '1':
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    if explicit:
        jax.distributed.initialize(env['JAX_COORDINATOR_ADDRESS'], int(env['JAX_NUM_PROCESSES']),
                                   int(env.get('JAX_PROCESS_ID', '0')))
    else:
        jax.distributed.initialize()
    _DONE = True
    return True
