"""Typed, frozen run configuration: YAML presets + dotted ``key=value`` overrides.

A preset may name another preset with ``base: <name or path>``; its keys are
merged on top. Every key is checked against the dataclasses below, so a typo
fails here (naming the key and the allowed ones) instead of deep inside a run.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config key, value or combination that cannot work."""


@dataclass(frozen=True)
class ModelConfig:
    family: Literal["bert", "roberta", "gpt2", "llama"] = "bert"
    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    kv_heads: int | None = None  # None = heads (no grouped-query attention)
    head_dim: int | None = None  # None = hidden // heads
    mlp: int = 1536
    max_len: int = 512
    type_vocab: int = 2  # token-type embeddings (encoders); 0 = none
    activation: Literal["gelu", "gelu_tanh", "silu", "relu"] = "gelu"
    norm_eps: float = 1e-12
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.1
    init_std: float = 0.02
    pad_id: int = 0
    position_offset: int = 0  # RoBERTa numbers positions from pad_id + 1
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    scan_layers: bool = False
    remat: Literal["none", "dots", "dots_no_batch", "full"] = "none"
    init_from: str | None = None  # HF folder / hub name / .gguf file

    @property
    def causal(self) -> bool:
        return self.family in ("gpt2", "llama")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads or self.heads


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class DataConfig:
    train: str | None = None  # file, glob, folder or HF dataset name
    validation: str | None = None
    test: str | None = None
    hf_config: str | None = None  # HF dataset config name (e.g. "sst2" for "glue")
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    labels: tuple[str, ...] | None = None  # None = inferred from train (sorted)
    tokenizer: str | None = None  # tokenizer.json, HF folder; None = model.init_from or train one
    tokenizer_vocab: int = 8000  # size when a tokenizer is trained from the data
    lowercase: bool = True
    seq_len: int = 128
    pack: bool = True  # LM: pack several documents per row (segment ids)
    buckets: tuple[int, ...] = ()  # fine-tuning padded lengths; () = 16, 32, ... up to seq_len
    max_examples: int | None = None  # cap on rows read per split
    # Few-shot training subsets (jtl/data/fewshot.py): a stratified sample of data.train,
    # reproducible per data.sample_seed; evaluation splits are never sampled.
    max_train_examples: int | None = None
    examples_per_label: int | None = None  # classification: k rows of every label
    sample_seed: int = 0
    mask_prob: float = 0.15
    doc_stride: int = 128  # QA: tokens of overlap between windows of a long context
    max_answer_tokens: int = 30  # QA: longest span considered when predicting
    shuffle: bool = True
    seed: int = 0
    # SFT (task.kind=sft, jtl/data/sft.py): prompt/response rows or chat messages; the
    # tokenizer's chat template renders them (null: when it has one) and marks the turns.
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    chat_template: bool | None = None


def bucket_lengths(d: "DataConfig") -> tuple[int, ...]:
    """Padded lengths for fine-tuning batches (the largest is always seq_len)."""
    if d.buckets:
        return tuple(d.buckets) if d.buckets[-1] == d.seq_len else tuple(d.buckets) + (d.seq_len,)
    out, n = [], 16
    while n < d.seq_len:
        out.append(n)
        n *= 2
    return tuple(out) + (d.seq_len,)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    clip_norm: float | None = 1.0
    freeze: tuple[str, ...] = ()  # parameter-path prefixes kept fixed, e.g. ("embed",)
    # Layer-wise lr decay (discriminative fine-tuning): layer i of L trains at lr * d**(L - i),
    # the embeddings at lr * d**(L + 1), the head and final norm at lr. 1.0 = off.
    layer_decay: float = 1.0


@dataclass(frozen=True)
class TaskConfig:
    kind: Literal["mlm", "clm", "sft", "classification", "regression", "multilabel",
                  "token_classification", "qa"] = "mlm"
    metric: str | None = None  # metric for early stopping / best checkpoint
    metric_mode: Literal["max", "min"] = "max"
    pooling: Literal["cls", "pooler", "mean"] = "pooler"
    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None
    head_dropout: float | None = None  # None = model.dropout
    # token_classification: "equal" = every labelled token weighs the same in the loss
    # (normalized by rows x the training set's mean labelled tokens per row), so length
    # buckets do not upweight the tokens of short rows; "batch" = the mean over the
    # batch's own labelled tokens (what a plain PyTorch loop over random batches does).
    token_weighting: Literal["equal", "batch"] = "equal"
    # SFT: at each validation, also generate (greedy, KV cache) a completion for each
    # validation prompt and score it against the reference response: exact_match,
    # label_accuracy (first word) or bleu (sacrebleu). null = off (no generation cost).
    generate_metric: Literal["exact_match", "label_accuracy", "bleu"] | None = None
    generate_tokens: int = 32  # max new tokens per completion
    generate_examples: int | None = None  # the first N validation rows; null = all


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32  # global examples (rows) per optimizer step
    microbatches: int = 1  # gradient accumulation inside the step
    steps: int | None = None  # None = derived from epochs
    epochs: float = 1.0
    eval_every: int = 0  # 0 = only at the end
    eval_batch_size: int | None = None
    log_every: int = 10
    patience: int = 0  # early stopping evaluations without improvement; 0 = off
    seed: int = 0
    nan_policy: Literal["stop", "skip"] = "stop"
    # Random bits for dropout and MLM masking (a jax.random key implementation). threefry2x32
    # gives the same bits on every backend and mesh; philox* (one device only: jax 0.10 cannot
    # shard it) and rbg / unsafe_rbg (XLA's RngBitGenerator: bits may differ between
    # backends) are there to compare (benchmarks/step_variants.py).
    rng_impl: Literal["threefry2x32", "threefry4x32", "philox2x32", "philox4x32", "rbg",
                      "unsafe_rbg"] = "threefry2x32"
    # nan_policy=skip: stop with an error after this many skipped updates in a row; 0 = never
    max_consecutive_skips: int = 10
    progress: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = False
    every: int = 0  # steps between saves; 0 = only at the end
    keep: int = 2  # latest N steps kept
    keep_every: int = 0  # also keep every K-th step for good; 0 = off
    keep_best: bool = True  # also keep the best step by task.metric (when the loop reports it)
    resume: bool = True  # resume from RUN_DIR/checkpoints; false = fresh start (old ones moved aside)
    resume_from: str | None = None  # run dir / checkpoints dir / step dir to start from
    fallback: bool = False  # a broken latest step: use the previous committed one instead of failing
    async_save: bool = True


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs (``jtl.run.distributed``): one process per host (TPU VM, GPU node)."""
    # null (auto): start jax.distributed when the environment says the run has several
    # processes (JTL_* / JAX_COORDINATOR_ADDRESS variables, Slurm, Open MPI, Cloud TPU pod
    # slices); true: always (e.g. Kubernetes with jax[k8s]); false: never (one process).
    enabled: bool | None = None
    coordinator: str | None = None  # host:port of process 0; default $JTL_COORDINATOR
    num_processes: int | None = None  # default $JTL_NUM_PROCESSES, or detected
    process_id: int | None = None  # default $JTL_PROCESS_ID, or detected
    initialization_timeout: int = 120  # s to wait for every process to join
    heartbeat_timeout: int = 30  # s without a heartbeat before a process counts as dead
    shutdown_timeout: int = 60  # s the exit barrier waits for the others


@dataclass(frozen=True)
class Config:
    name: str = "run"
    run_dir: str | None = None  # None = runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir or os.path.join("runs", self.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "Config":
        """Copy with dotted overrides applied, e.g. ``cfg.replace(**{"optim.lr": 1e-3})``."""
        raw = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return from_dict(raw)


# ---------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to annotation ``tp``; raise ConfigError naming ``key``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}: {value!r} is not a valid {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
    if origin is tuple:
        if isinstance(value, str):
            value = [parse_value(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, fields, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key '{prefix}{k}'{hint}; allowed keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need several keys at once (device counts are checked in sharding)."""
    m, t, d = cfg.model, cfg.train, cfg.data
    positive = {"model.vocab_size": m.vocab_size, "model.hidden": m.hidden, "model.layers": m.layers,
                "model.heads": m.heads, "model.mlp": m.mlp, "train.batch_size": t.batch_size,
                "train.microbatches": t.microbatches, "data.seq_len": d.seq_len}
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key} must be positive, got {v}")
    if m.head_dim is None and m.hidden % m.heads:
        raise ConfigError(f"model.hidden={m.hidden} is not divisible by model.heads={m.heads}")
    if m.heads % m.num_kv_heads:
        raise ConfigError(f"model.heads={m.heads} is not divisible by model.kv_heads={m.kv_heads}")
    if t.batch_size % t.microbatches:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                          f"train.microbatches={t.microbatches}")
    if d.seq_len + m.position_offset > m.max_len and m.family != "llama":
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_len={m.max_len}")
    if not 0.0 <= m.dropout < 1.0 or not 0.0 <= m.attention_dropout < 1.0:
        raise ConfigError("model.dropout and model.attention_dropout must be in [0, 1)")
    o = cfg.optim
    if not o.lr > 0:  # a negative lr trains by gradient ascent, silently
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    ranges = {"optim.warmup_ratio": (o.warmup_ratio, 0.0, 1.0), "optim.end_lr_ratio": (o.end_lr_ratio, 0.0, 1.0),
              "optim.b1": (o.b1, 0.0, 0.999999), "optim.b2": (o.b2, 0.0, 0.999999),
              "task.label_smoothing": (cfg.task.label_smoothing, 0.0, 0.999999)}
    for key, (v, lo, hi) in ranges.items():
        if not lo <= v <= hi:
            raise ConfigError(f"{key} must be in [{lo}, {hi:g}], got {v}")
    for key, v in {"optim.weight_decay": o.weight_decay, "optim.eps": o.eps, "optim.warmup_steps": o.warmup_steps,
                   "train.max_consecutive_skips": t.max_consecutive_skips}.items():
        if v < 0:
            raise ConfigError(f"{key} must be >= 0, got {v}")
    if t.steps is not None and t.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, or null to train for train.epochs; got {t.steps} "
                          f"(a run always trains: 0 would silently mean 'the preset's epochs')")
    if o.clip_norm is not None and o.clip_norm <= 0:
        raise ConfigError(f"optim.clip_norm must be > 0 or null (no clipping), got {o.clip_norm}")
    if t.steps and o.warmup_steps > t.steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} exceeds train.steps={t.steps}")
    if not 0.0 < cfg.optim.layer_decay <= 1.0:
        raise ConfigError(f"optim.layer_decay must be in (0, 1], got {cfg.optim.layer_decay}")
    if not 0.0 < d.mask_prob < 1.0:
        raise ConfigError(f"data.mask_prob must be in (0, 1), got {d.mask_prob}")
    for key, v in (("data.max_train_examples", d.max_train_examples),
                   ("data.examples_per_label", d.examples_per_label)):
        if v is not None and v < 1:
            raise ConfigError(f"{key} must be >= 1 or null (all rows), got {v}")
    if d.max_train_examples is not None and d.examples_per_label is not None:
        raise ConfigError("set data.max_train_examples or data.examples_per_label, not both")
    # Whether task.kind fits the model family is checked by jtl.run.birth.resolve, once the
    # architecture is final (model.init_from decides it).
    for key, size in (("mesh.data", cfg.mesh.data), ("mesh.fsdp", cfg.mesh.fsdp),
                      ("mesh.tensor", cfg.mesh.tensor)):
        if size == 0 or size < -1:
            raise ConfigError(f"{key} must be a positive size or -1 (the rest), got {size}")
    if sum(s == -1 for s in (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)) > 1:
        raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    dist = cfg.distributed
    for key in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
        if getattr(dist, key) < 1:
            raise ConfigError(f"distributed.{key} must be >= 1 second, got {getattr(dist, key)}")
    if dist.num_processes is not None and dist.num_processes < 1:
        raise ConfigError(f"distributed.num_processes must be >= 1, got {dist.num_processes}")
    if dist.process_id is not None and not 0 <= dist.process_id < (dist.num_processes or dist.process_id + 1):
        raise ConfigError(f"distributed.process_id={dist.process_id} must be in [0, "
                          f"distributed.num_processes={dist.num_processes})")
    tk = cfg.task
    if tk.generate_metric is not None:
        if tk.kind != "sft":
            raise ConfigError(f"task.generate_metric={tk.generate_metric!r} is for task.kind=sft "
                              f"(generation on the validation prompts), not {tk.kind!r}")
        if not d.validation:
            raise ConfigError(f"task.generate_metric={tk.generate_metric!r} needs data.validation "
                              f"(its prompts are completed and scored)")
    for key, v in (("task.generate_tokens", tk.generate_tokens), ("task.generate_examples", tk.generate_examples)):
        if v is not None and v < 1:
            raise ConfigError(f"{key} must be >= 1, got {v}")
    if list(d.buckets) != sorted(set(d.buckets)) or (d.buckets and d.buckets[-1] > d.seq_len):
        raise ConfigError(f"data.buckets={list(d.buckets)} must be increasing and <= "
                          f"data.seq_len={d.seq_len}")


# ---------------------------------------------------------------- YAML + overrides


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve_preset(name: str, relative_to: Path | None = None) -> Path:
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.append(relative_to / name)
    candidates += [CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config file {name!r} not found; presets: {', '.join(presets)}")


def load_yaml(name: str, _seen: tuple = ()) -> dict:
    path = _resolve_preset(name, _seen[-1].parent if _seen else None).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys")
    base = raw.pop("base", None)
    if path.parent == CONFIG_DIR.resolve():
        _anchor_preset_paths(raw, path)
    return _merge(load_yaml(base, _seen + (path,)), raw) if base else raw


# Path keys whose relative values, in a preset shipped in configs/, name files of this
# repository (examples/data/...). They are made absolute against the repo root, so a
# preset works from any directory and never picks up a same-named file elsewhere.
# Relative paths in the user's own YAML files and in key=value overrides stay relative
# to the current directory.
_PATH_KEYS = (("data", "train"), ("data", "validation"), ("data", "test"), ("data", "tokenizer"),
              ("model", "init_from"))


def _anchor_preset_paths(raw: dict, preset: Path) -> None:
    root = CONFIG_DIR.resolve().parent
    for section, key in _PATH_KEYS:
        values = raw.get(section)
        value = values.get(key) if isinstance(values, dict) else None
        if not isinstance(value, str) or os.path.isabs(value) or not (root / value).exists():
            continue
        raw[section][key] = str(root / value)
        logging.getLogger("jtl").info("preset %s: %s.%s=%s is the repository's %s (not looked up in the "
                                      "current directory)", preset.stem, section, key, value, root / value)


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def load(name: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset (name or path) and apply ``key=value`` overrides."""
    raw = load_yaml(name) if name else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=3e-5)")
        key, text = item.split("=", 1)
        _set_dotted(raw, key.strip(), parse_value(text))
    return from_dict(raw)
