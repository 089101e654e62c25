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


def train_iterator(arrays: dict, global_batch: int, *, seed: int, shuffle: bool = True,
                   epochs: int | None = None, process_index: int | None = None,
                   process_count: int | None = None):
    """Endless (or ``epochs``) shuffled batches: this process's rows of each global batch,
    as numpy dicts.

    The order is planned globally (one shuffle of all rows, the same in every process,
    reshuffled each epoch) and process p takes rows ``[p*B/P, (p+1)*B/P)`` of every
    global batch of B rows (``process_rows``' convention). So the global batches do not
    depend on how many processes there are: a run on 2 processes sees the batches a run
    on 1 process sees, and the iterator state (the number of global batches taken) can
    be restored with any process count. Each process reads only its own rows.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if global_batch % pc:
        raise ValueError(f"train.batch_size={global_batch} not divisible by {pc} processes")
    n = len(RowSource(arrays))
    if n < global_batch:
        raise ValueError(f"only {n} rows, fewer than a batch of {global_batch}; "
                         f"lower train.batch_size or add data")
    ds = grain.MapDataset.source(RowSource(arrays))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    # Sub-batches of B/P rows; global batch b is sub-batches b*P .. b*P+P-1, in process order.
    ds = ds.repeat(epochs).batch(global_batch // pc, drop_remainder=True)[pi::pc]
    # In-memory rows: no reader threads (they only contend for the GIL and the cores with XLA).
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def steps_per_epoch(n_rows: int, global_batch: int) -> int:
    return max(n_rows // global_batch, 1)


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
