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
    return iter(ds.to_iter_dataset())


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
    _, pc, usable = host_slice(n_rows)
    return max(usable // global_batch, 1)


def eval_batches(arrays: dict, global_batch: int, pad_row: dict | None = None):
    """Every row exactly once, in order; the last batch padded with weight-0 rows.

    Yields (batch, n_real) with ``example_weights`` set to 1 for real rows.
    """
    n = len(RowSource(arrays))
    for start in range(0, n, global_batch):
        chunk = {k: v[start:start + global_batch] for k, v in arrays.items()}
        real = len(next(iter(chunk.values())))
        if real < global_batch:
            chunk = {k: np.concatenate([v, np.repeat(v[:1] * 0 if pad_row is None else
                                                      pad_row[k][None], global_batch - real, 0)])
                     for k, v in chunk.items()}
        w = np.zeros(global_batch, np.float32)
        w[:real] = 1.0
        chunk["example_weights"] = w
        yield chunk, real
