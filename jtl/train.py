"""Sharded state, the one pure train step, the eval step.

``train_step(state, batch) -> (state, metrics)`` is jitted once per (mesh, rules,
shapes) with explicit in/out shardings and the state donated. Everything that
varies per step (dropout/masking RNG, learning rate) is derived on device from
the optimizer's step counter, so the host only feeds batches.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jtl import sharding as S
from jtl.config import Config, ConfigError
from jtl.models import Model
from jtl.optim import make_tx, schedule, trainable_filter, tree_finite
from jtl.tasks import TaskSpec, loss_and_outputs, prepare_batch


def create_model(cfg: Config, spec: TaskSpec, seed=None) -> Model:
    """``seed``: an int, or a traced integer array (init_state jits one program for all seeds)."""
    seed = cfg.train.seed if seed is None else seed
    return Model(cfg.model, cfg.task.kind, spec.num_labels, pooling=cfg.task.pooling,
                 rngs=nnx.Rngs(seed if isinstance(seed, int) else jax.random.key(seed)))


@dataclass
class Setup:
    """Everything a loop needs: mesh, sharded state, compiled-on-first-call steps."""
    cfg: Config
    spec: TaskSpec
    mesh: Mesh
    graphdef: Any
    state: Any  # nnx.State of (model, optimizer), sharded
    state_sharding: Any
    train_step: Callable
    eval_step: Callable
    total_steps: int

    @property
    def params(self):
        return self.state[0]

    def model(self) -> Model:
        return nnx.merge(self.graphdef, self.state)[0]

    def step_count(self) -> int:
        return int(jax.device_get(nnx.merge(self.graphdef, self.state)[1].step[...]))


def abstract_state(cfg: Config, spec: TaskSpec, mesh: Mesh, total_steps: int):
    """(graphdef, abstract state, shardings, create-fn) without allocating anything."""
    tx = make_tx(cfg.optim, total_steps)

    def create(seed=None):  # seed: a traced value in init_state (one program for every seed)
        model = create_model(cfg, spec, seed)
        return model, nnx.Optimizer(model, tx, wrt=trainable_filter(cfg.optim))

    with S.activate(mesh):
        graphdef, abstract = nnx.split(nnx.eval_shape(create))
        shardings = nnx.get_named_sharding(abstract, mesh)
    return graphdef, abstract, shardings, create


def concrete_target(abstract, shardings):
    """The abstract state (whose shardings name an AbstractMesh) with the real mesh's
    shardings: what loaders and Orbax restore straight into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def init_state(cfg: Config, spec: TaskSpec, mesh: Mesh, total_steps: int,
               load_params: Callable | None = None, restore: Callable | None = None,
               programs: "Programs | None" = None):
    """Create the state directly in its shardings (never whole on one device).

    ``restore(target) -> state | None`` fills the whole (params, opt) state from a
    checkpoint (nothing is initialized then); if it gives None (nothing to restore) the state is initialized on device and
    ``load_params(target_params) -> {path: jax.Array}`` may supply pretrained weights
    (already sharded); parameters it does not return keep their init.
    """
    S.check_model_fits(cfg.model, mesh)
    progs = programs or compiled_programs(cfg, spec, mesh, total_steps)
    target = concrete_target(progs.abstract, progs.shardings)  # fresh Variables: restore fills them
    if restore is not None:
        state = restore(target)
        if state is not None:
            return progs.graphdef, state, progs.shardings
    with S.activate(mesh):
        state = progs.init(np.uint32(cfg.train.seed))
    if load_params is not None:
        loaded = load_params(target[0])
        flat = dict(state[0].flat_state())
        for path, arr in loaded.items():
            var = flat[path]
            if tuple(arr.shape) != tuple(var.shape):
                raise ValueError(f"loaded parameter {'.'.join(map(str, path))} has shape "
                                 f"{tuple(arr.shape)}, model expects {tuple(var.shape)}")
            var.set_value(jax.device_put(arr.astype(var.dtype), var.sharding))
    return progs.graphdef, state, progs.shardings


def _split_micro(x, m: int):
    # Microbatch i takes rows i, i+m, ...: each device keeps its own rows.
    return x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)


def make_train_step(cfg: Config, spec: TaskSpec, graphdef, total_steps: int):
    lr_fn = schedule(cfg.optim, total_steps)
    micro, skip_nan = cfg.train.microbatches, cfg.train.nan_policy == "skip"
    trainable = trainable_filter(cfg.optim)
    rng_impl = cfg.train.rng_impl

    def train_step(state, batch, seed):  # seed: traced (train.seed), so seeds share one program
        model, opt = nnx.merge(graphdef, state)
        mdef, params, frozen = nnx.split(model, trainable, ...)  # frozen: optim.freeze (often empty)
        step = opt.step[...]
        rng = jax.random.fold_in(jax.random.key(seed, impl=rng_impl), step)
        mask_rng, rng = jax.random.split(rng)
        real_tokens = jnp.sum(batch["segment_ids"] > 0, dtype=jnp.int32)  # of the global batch
        with jax.named_scope("prepare_batch"):  # MLM masking, label shifting
            batch = prepare_batch(cfg, spec, batch, mask_rng)

        def loss_fn(p, mb, r):
            loss_sum, count, extra = loss_and_outputs(cfg, spec, nnx.merge(mdef, p, frozen), mb, r)
            return loss_sum, (count, extra.get("correct", jnp.zeros(())), extra.get("scored", count))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if micro == 1:
            (loss_sum, (count, correct, scored)), grads = grad_fn(params, batch, rng)
        else:
            mbs = jax.tree.map(lambda x: _split_micro(x, micro), batch)
            mbs = jax.tree.map(lambda x: S.constrain(x, (None, "batch") + (None,) * (x.ndim - 2)), mbs)

            def accumulate(carry, inp):
                mb, i = inp
                (ls, (c, k, n)), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (ls, c, k, n, g)), None

            zero = (jnp.zeros(()),) * 4 + (jax.tree.map(jnp.zeros_like, params),)
            (loss_sum, count, correct, scored, grads), _ = jax.lax.scan(
                accumulate, zero, (mbs, jnp.arange(micro)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        with jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            old = jax.tree.map(lambda x: x, nnx.state((model, opt))) if skip_nan else None  # values, not refs
            opt.update(model, grads)
        new = nnx.state((model, opt))
        if skip_nan:
            # A finite gradient can still overflow the update (huge lr): skip that too, so
            # a skipped step never leaves a non-finite state behind.
            finite = finite & tree_finite(new)
            new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            # The step counter still advances: the schedule and RNG stay in step with the host.
            m2, o2 = nnx.merge(graphdef, new)
            o2.step.set_value(step + 1)
            new = nnx.state((m2, o2))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(step), "tokens": count,
                   "accuracy": correct / jnp.maximum(scored, 1.0), "finite": finite, "step": step + 1,
                   "real_tokens": real_tokens}
        return new, metrics

    return train_step


def make_eval_step(cfg: Config, spec: TaskSpec, graphdef):
    spec = dataclasses.replace(spec, label_tokens_per_row=0.0)  # eval: the mean over real tokens

    def eval_step(state, batch):
        model = nnx.merge(graphdef, state)[0]
        loss_sum, count, extra = loss_and_outputs(cfg, spec, model, batch, None)
        out = {"loss_sum": loss_sum, "count": count}
        if "logits" in extra:
            out["logits"] = extra["logits"]
        if "correct" in extra:
            out["correct"] = extra["correct"]
        return out

    return eval_step


class InMesh:
    """A jitted function called (and traced) with the mesh and axis rules active.

    The rules are not part of jit's cache key, so each mesh gets its own jit.
    ``bound``: trailing (value, sharding) arguments every call gets (the train step's
    seed: an argument, not a constant, so every seed shares one compiled program); they
    are put on the devices once, and traced as shapes only."""

    def __init__(self, mesh: Mesh, jitted, bound: tuple = ()):
        self.mesh, self.jitted, self.bound, self._on_device = mesh, jitted, bound, None

    def bound_args(self) -> tuple:
        if self._on_device is None:
            self._on_device = tuple(jax.device_put(v, s) for v, s in self.bound)
        return self._on_device

    def _bound_shapes(self) -> tuple:
        return tuple(jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=s) for v, s in self.bound)

    def __call__(self, *args):
        with S.activate(self.mesh):
            return self.jitted(*args, *self.bound_args())

    def lower(self, *args):
        with S.activate(self.mesh):
            return self.jitted.lower(*args, *self._bound_shapes())

    def trace(self, *args):
        with S.activate(self.mesh):
            return self.jitted.trace(*args, *self._bound_shapes())


def _seed_arg(cfg: Config, mesh) -> tuple:
    """The train step's trailing (seed, sharding) argument, bound by ``InMesh``."""
    return ((np.uint32(cfg.train.seed), NamedSharding(mesh, P())),)


def jit_train_step(cfg: Config, spec: TaskSpec, mesh, graphdef, shardings, total_steps: int) -> InMesh:
    """The jitted train step for these state shardings (also used for AOT analysis
    from ``abstract_state``, where nothing is allocated)."""
    repl = NamedSharding(mesh, P())
    step_fn = make_train_step(cfg, spec, graphdef, total_steps)
    return InMesh(mesh, jax.jit(step_fn, donate_argnums=0, in_shardings=(shardings, None, repl),
                                out_shardings=(shardings, repl)), bound=_seed_arg(cfg, mesh))


@dataclass(frozen=True)
class Programs:
    """The jitted programs of one (model, task, optimizer, mesh, step count) and the
    state layout they were traced for."""
    graphdef: Any
    abstract: Any
    shardings: Any
    init: Callable  # seed -> sharded (params, opt) state
    train: Callable  # jitted train_step(state, batch, seed)
    eval: Callable  # jitted eval_step(state, batch)


# Keys that never reach a traced program: where data and runs live, how much data is
# read, logging, checkpointing, process start-up. The seeds are traced arguments and
# the step count is its own key. Every other key (all of model, task and optim; the
# batch size, microbatches and nan policy; masking and span limits) is part of the key,
# so two configs share programs only if nothing a program sees differs.
_NOT_TRACED = {"name": None, "run_dir": None, "checkpoint": None, "distributed": None,
               "mesh": None,  # the Mesh itself is part of the key
               "model": ("init_from",),
               "data": ("train", "validation", "test", "hf_config", "tokenizer", "tokenizer_vocab",
                        "max_examples", "max_train_examples", "examples_per_label", "sample_seed",
                        "shuffle", "seed", "lowercase"),
               "task": ("generate_metric", "generate_tokens", "generate_examples"),
               "train": ("steps", "epochs", "eval_every", "eval_batch_size", "log_every", "patience",
                         "seed", "max_consecutive_skips", "progress")}
_PROGRAMS: "collections.OrderedDict[tuple, Programs]" = collections.OrderedDict()
_MAX_PROGRAMS = 4


def program_key(cfg: Config, spec: TaskSpec, mesh: Mesh, total_steps: int) -> tuple:
    raw = cfg.to_dict()
    for section, keys in _NOT_TRACED.items():
        if keys is None:
            raw.pop(section, None)
        else:
            raw[section] = {k: v for k, v in raw[section].items() if k not in keys}
    return json.dumps(raw, sort_keys=True, default=str), spec, mesh, total_steps


def compiled_programs(cfg: Config, spec: TaskSpec, mesh: Mesh, total_steps: int) -> Programs:
    """The programs for this run, shared with earlier runs of this process that trace
    the same programs (``--seeds``, the quick start's budgets and arms, a resume after
    preemption, ``jtl eval`` after training): they are traced and compiled once, not
    once per run. The last few are kept."""
    key = program_key(cfg, spec, mesh, total_steps)
    if key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key]
    graphdef, abstract, shardings, create = abstract_state(cfg, spec, mesh, total_steps)
    init = jax.jit(lambda seed: nnx.state(create(seed)), out_shardings=shardings)
    train = jit_train_step(cfg, spec, mesh, graphdef, shardings, total_steps).jitted
    evaluate = jax.jit(make_eval_step(cfg, spec, graphdef), in_shardings=(shardings, None))
    _PROGRAMS[key] = progs = Programs(graphdef, abstract, shardings, init, train, evaluate)
    while len(_PROGRAMS) > _MAX_PROGRAMS:
        _PROGRAMS.popitem(last=False)
    return progs


def build(cfg: Config, spec: TaskSpec, mesh: Mesh, total_steps: int,
          load_params: Callable | None = None, restore: Callable | None = None) -> Setup:
    """Sharded state + jitted train/eval steps for this mesh (one jit per mesh/rules).
    Where the state comes from is ``jtl.run.birth``'s decision (see ``init_state``)."""
    S.check_batch_fits(cfg.train.batch_size, cfg.train.microbatches, mesh)
    if cfg.train.rng_impl.startswith("philox") and mesh.size > 1:
        raise ConfigError(f"train.rng_impl={cfg.train.rng_impl} works on one device only (jax cannot shard "
                          f"its bits); this mesh has {mesh.size}: use threefry2x32 (the default)")
    progs = compiled_programs(cfg, spec, mesh, total_steps)
    graphdef, state, shardings = init_state(cfg, spec, mesh, total_steps, load_params, restore, progs)
    train_step = InMesh(mesh, progs.train, bound=_seed_arg(cfg, mesh))  # this run's seed, shared program
    eval_step = InMesh(mesh, progs.eval)
    return Setup(cfg, spec, mesh, graphdef, state, shardings, train_step, eval_step, total_steps)
