"""Grain iterators over row arrays: deterministic per seed, one slice per host,
checkpointable (``get_state``/``set_state``)."""
from __future__ import annotations

import grain
import jax
import numpy as np


class RowSource:
    """Random access to row i of a dict of equal-length arrays."""

    def __init__(self, arrays: dict):
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.arrays.items()}


def host_slice(n: int, process_index: int | None = None, process_count: int | None = None):
    """Indices this host reads: same count on every host (remainder dropped)."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    usable = n - n % pc
    return pi, pc, usable


def train_iterator(arrays: dict, global_batch: int, *, seed: int, shuffle: bool = True,
                   epochs: int | None = None, process_index: int | None = None,
                   process_count: int | None = None):
    """Endless (or ``epochs``) shuffled batches of this host's rows, as numpy dicts.

    Each epoch is reshuffled; a batch never mixes two epochs' orders beyond the
    boundary batch. ``global_batch`` must be divisible by the process count.
    """
    pi, pc, usable = host_slice(len(RowSource(arrays)), process_index, process_count)
    if global_batch % pc:
        raise ValueError(f"train.batch_size={global_batch} not divisible by {pc} processes")
    per_host = global_batch // pc
    ds = grain.MapDataset.source(RowSource(arrays))[:usable][pi::pc]
    if len(ds) < per_host:
        raise ValueError(f"only {len(ds)} rows per host, fewer than a batch of {per_host}; "
                         f"lower train.batch_size or add data")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(epochs).batch(per_host, drop_remainder=True)
    # In-memory rows: no reader threads (they only contend for the GIL and the cores with XLA).
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
    _, pc, usable = host_slice(n_rows)
    return max(usable // global_batch, 1)


def pad_batch(chunk: dict, batch: int, fill: dict | None = None) -> dict:
    """The one padding rule for partial batches (evaluation, the last bucketed batch):
    ``chunk``'s rows, then ``batch - n`` rows of ``fill[k]`` (default 0) with
    ``example_weights`` 0, so every real example is counted exactly once."""
    real = len(next(iter(chunk.values())))
    out = {}
    for k, v in chunk.items():
        if real < batch:
            pad = np.full((batch - real,) + v.shape[1:], (fill or {}).get(k, 0), v.dtype)
            v = np.concatenate([v, pad])
        out[k] = v
    w = np.zeros(batch, np.float32)
    w[:real] = 1.0
    out["example_weights"] = w
    return out


def process_rows(global_rows: dict, process_index: int | None = None,
                 process_count: int | None = None) -> dict:
    """This process's contiguous share of a global batch that every process planned
    identically (the convention ``sharding.global_batch`` assembles from)."""
    pc = jax.process_count() if process_count is None else process_count
    if pc == 1:
        return global_rows
    pi = jax.process_index() if process_index is None else process_index
    n = len(next(iter(global_rows.values())))
    if n % pc:
        raise ValueError(f"a global batch of {n} rows does not split over {pc} processes")
    per = n // pc
    return {k: v[pi * per:(pi + 1) * per] for k, v in global_rows.items()}


def eval_batches(arrays: dict, global_batch: int):
    """Every row exactly once, in order, as this process's share of padded global batches.

    Yields (batch, n_real) with ``example_weights`` 1 for real rows, 0 for padding.
    """
    n = len(RowSource(arrays))
    for start in range(0, n, global_batch):
        chunk = {k: v[start:start + global_batch] for k, v in arrays.items()}
        real = len(next(iter(chunk.values())))
        yield process_rows(pad_batch(chunk, global_batch)), real
