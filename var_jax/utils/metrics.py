"""Metric writers (JSON lines + TensorBoard), the reduction of logged steps, the progress line, and
throughput arithmetic.

Only process 0 writes; other processes get a writer that drops everything. `metrics.jsonl` holds
one JSON object per logged step ({"step": s, "name": value, ...}) and is appended to on resume,
so a resumed run reads as one curve.
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import jax
import numpy as np
from etils import epath


def _scalar(v) -> float | int | None:
    try:
        v = np.asarray(v)
    except Exception:  # noqa: BLE001
        return None
    if v.size != 1:
        return None
    v = v.item()
    return v if isinstance(v, (int, bool)) else float(v)


class Writer:
    """JSONL + TensorBoard scalars/images under `workdir`."""

    def __init__(self, workdir, *, tensorboard: bool = True, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.dir = epath.Path(workdir)
        self._tb = None
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        # Local files are appended to, so a resumed run reads as one curve. Object stores (gs://)
        # cannot append: there each session rewrites its own `metrics.<t>.jsonl` (read_jsonl merges).
        self._local = '://' not in str(self.dir)
        if self._local:
            self._jsonl = (self.dir / 'metrics.jsonl').open('a')
        else:
            self._session = self.dir / f'metrics.{int(time.time())}.jsonl'
            self._lines: list[str] = []
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415

                self._tb = SummaryWriter(str(self.dir / 'tensorboard'))
            except ImportError:
                self._tb = None

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: s for k, v in values.items() if (s := _scalar(v)) is not None}
        rec = {'step': int(step), **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                     for k, v in clean.items()}}
        if self._local:
            self._jsonl.write(json.dumps(rec) + '\n')
            self._jsonl.flush()
        else:
            self._lines.append(json.dumps(rec))
            self._session.write_text('\n'.join(self._lines) + '\n')
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """uint8 HWC image to TensorBoard."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(name, np.asarray(image), step, dataformats='HWC')

    def text(self, step: int, name: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(name, text, step)

    def flush(self):
        if self.enabled and self._tb is not None:
            self._tb.flush()

    def close(self):
        if self.enabled:
            if self._local:
                self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def reduce_steps(fetched: list[dict]) -> tuple[dict[str, float | int], int, int]:
    """The per-step metrics of the steps since the last log (host values, as `jax.device_get`
    returns them) -> (logged values, non-finite steps, skipped images).

    Scalars become their mean over the steps; a vector (one value per scale, e.g. `acc_scale`)
    becomes one mean per entry, `name/i`, after the scalars. `nonfinite` (0/1 per step) is logged
    as the number of non-finite steps, not their mean; `skipped` (unreadable images replaced in
    each step's batch) is summed for the running total."""
    nonfinite = sum(int(f['nonfinite']) for f in fetched)
    skipped = sum(int(f['skipped']) for f in fetched)
    out = {k: float(np.mean([f[k] for f in fetched])) for k in fetched[-1] if np.ndim(fetched[-1][k]) == 0}
    for k in fetched[-1]:
        if np.ndim(fetched[-1][k]) == 1:  # per-scale vectors
            for i, v in enumerate(np.mean([f[k] for f in fetched], 0)):
                out[f'{k}/{i}'] = float(v)
    out['nonfinite'] = nonfinite
    return out, nonfinite, skipped


def read_jsonl(workdir) -> list[dict]:
    """Every logged record of a workdir, in file then line order."""
    d = epath.Path(workdir)
    files = sorted(d.glob('metrics*.jsonl'), key=lambda f: (f.name != 'metrics.jsonl', f.name))
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f'{h}:{m:02d}:{s:02d}' if h else f'{m:02d}:{s:02d}'


class Progress:
    """`[name] step 120/3000 (4%) | loss 3.21 | 5.1 it/s | eta 09:24`, from process 0."""

    def __init__(self, name: str, total: int, start: int = 0, stream=None):
        self.name, self.total, self.start = name, total, start
        self.t0 = time.time()
        self.stream = stream or sys.stdout
        self.enabled = jax.process_index() == 0

    def update(self, step: int, fields: dict[str, Any]) -> None:
        if not self.enabled:
            return
        done = step - self.start
        el = time.time() - self.t0
        rate = done / el if el > 0 and done > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float('nan')
        parts = [f'[{self.name}] step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)']
        for k, v in fields.items():
            parts.append(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}')
        parts.append(f'{rate:.2f} it/s')
        parts.append(f'eta {fmt_time(eta) if math.isfinite(eta) else "--:--"}')
        print(' | '.join(parts), file=self.stream, flush=True)


def var_flops_per_image(cfg) -> float:
    """Training FLOPs of one image through the VAR transformer (forward + backward = 3x forward).

    Matmul FLOPs 2 * params_in_matmuls per token, plus attention q.k and p.v over the keys each
    query may see under the block-causal mask (4 * C per query-key pair and layer).
    """
    c, d, L = cfg.C, cfg.depth, cfg.L  # noqa: N806  (the paper's L: tokens per image)
    hidden = round(c * cfg.mlp_ratio)
    # AdaLN linears run once per image (on the class embedding), not per token: left out
    per_token = d * (3 * c * c + c * c + 2 * c * hidden) + c * cfg.vocab_size + cfg.cvae * c
    ends = np.cumsum([p * p for p in cfg.patch_nums])
    pairs = float(sum(p * p * e for p, e in zip(cfg.patch_nums, ends)))  # visible keys, summed over queries
    fwd = 2 * per_token * L + 4 * c * d * pairs
    return 3.0 * fwd


class CountProgress:
    """Items done out of a total, on stderr: tqdm when installed (tensorflow-datasets brings it),
    otherwise a line every ~10 %. For sampling and feature extraction loops."""

    def __init__(self, total: int, desc: str, done: int = 0, unit: str = 'img'):
        try:
            from tqdm import tqdm  # noqa: PLC0415
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, initial=done, desc=desc, unit=unit, file=sys.stderr) if tqdm else None
        self.total, self.desc, self.done, self.shown = total, desc, done, -1

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        tenth = 10 * self.done // max(self.total, 1)
        if tenth != self.shown:
            self.shown = tenth
            print(f'{self.desc}: {self.done}/{self.total}', file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
