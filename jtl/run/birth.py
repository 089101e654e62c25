"""One way a model is born: architecture, tokenizer and state, decided in one place.

Where a run's state comes from, first match wins:

1. **this run's own checkpoint** (``RUN_DIR/checkpoints``, newest usable step) -
   a resumed or preempted run continues exactly (params, optimizer, data iterator,
   loop history);
2. **``checkpoint.resume_from``** (another run dir, checkpoints dir or step dir) -
   the full state, when the run has no checkpoint of its own;
3. **``model.init_from``** (HF folder, Hub name, ``.gguf`` file or jtl run dir) -
   pretrained parameters; the head and the optimizer start fresh;
4. **random init** (``train.seed``).

In cases 1-2 nothing is initialized: the checkpoint is restored straight into
the abstract sharded state (``train.concrete_target``); ``init_from`` is then not
read at all. The architecture (``model.*`` fields the source decides) is taken
from ``model.init_from`` once, by ``resolve``, before any model-dependent check;
the tokenizer likewise has one order of sources (``tokenizer``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import jax

from jtl import checkpoint as ckpt
from jtl import config as C
from jtl.config import Config, ConfigError
from jtl.data.tokenizer import load_tokenizer, train_tokenizer
from jtl.tasks import get as get_task
from jtl.train import Setup, build

log = logging.getLogger("jtl")


def resolve(cfg: Config) -> Config:
    """``cfg`` with the architecture of ``model.init_from`` (idempotent), then the checks
    that need the final model: does the task fit the family."""
    if cfg.model.init_from:
        from jtl.weights import resolve_config
        cfg = resolve_config(cfg)
    task = get_task(cfg.task.kind)
    if task.causal is not None and task.causal != cfg.model.causal:
        need = "a decoder family (gpt2, llama)" if task.causal else "an encoder family (bert, roberta)"
        raise ConfigError(f"task.kind={task.name!r} needs {need}; model.family={cfg.model.family!r}"
                          + (f" (from model.init_from={cfg.model.init_from})" if cfg.model.init_from else ""))
    return cfg


def _run_tokenizer(path) -> str | None:
    """The tokenizer/ folder of the jtl run that ``path`` (run, checkpoints or step dir) is in."""
    p = Path(path)
    for d in (p, p.parent, p.parent.parent):
        if (d / "tokenizer" / "tokenizer.json").is_file() and (d / "checkpoints").is_dir():
            return str(d / "tokenizer")
    return None


def tokenizer_source(cfg: Config, out_dir: Path) -> str | None:
    """Where the tokenizer comes from: ``data.tokenizer`` > ``model.init_from``'s > this
    run's own > ``checkpoint.resume_from``'s run > None (train one on the training text)."""
    if cfg.data.tokenizer:
        source = str(cfg.data.tokenizer)
        if (Path(source) / "checkpoints").is_dir():
            return str(Path(source) / "tokenizer")
        return source
    if cfg.model.init_from:
        from jtl.weights import load_hf_tokenizer_dir
        found = load_hf_tokenizer_dir(str(cfg.model.init_from))
        return found or str(cfg.model.init_from)
    if (out_dir / "tokenizer" / "tokenizer.json").exists():
        return str(out_dir / "tokenizer")
    if cfg.checkpoint.resume_from:
        found = _run_tokenizer(cfg.checkpoint.resume_from)
        if found is None and Path(cfg.checkpoint.resume_from).exists():
            raise ConfigError(
                f"checkpoint.resume_from={cfg.checkpoint.resume_from}: no tokenizer/ beside its checkpoints/ "
                f"(a jtl run dir holds both), so the tokenizer its weights were trained with is unknown; a new "
                f"one would give the tokens other ids: set data.tokenizer to that tokenizer")
        return found
    return None


def tokenizer(cfg: Config, texts: list[str] | None, out_dir: Path):
    """The run's tokenizer (``tokenizer_source``, else trained on ``texts``); refused when
    it has more tokens than ``model.vocab_size``. ``begin`` saves it to RUN_DIR/tokenizer
    once the model's birth (validation, resume) has succeeded."""
    source = tokenizer_source(cfg, out_dir)
    if source:
        tok = load_tokenizer(source)
    else:
        if texts is None:
            raise ConfigError("data.tokenizer is not set and there is no training text to train one")
        kind = "bpe" if cfg.model.causal else "wordpiece"
        log.info("training a %s tokenizer (%d tokens) on %d texts", kind, cfg.data.tokenizer_vocab, len(texts))
        tok = train_tokenizer(texts, cfg.data.tokenizer_vocab, kind=kind, lowercase=cfg.data.lowercase)
    if len(tok) > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tok)} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}: ids >= vocab_size would be silently clamped; "
                          f"set model.vocab_size >= {len(tok)}")
    return tok


@dataclass
class Resumed:
    """What a restored checkpoint brings besides the state."""
    step: int = 0
    data_state: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    source: Path | None = None


def born(cfg: Config, spec, mesh, total_steps: int, ckdir: Path, load_params=None) -> tuple[Setup, Resumed]:
    """The Setup (sharded state + steps) by the precedence in this module's docstring.

    ``load_params`` overrides the ``model.init_from`` loader (tests, benchmarks)."""
    source = ckpt.resume_source(cfg.checkpoint, ckdir)
    got = Resumed()

    def restore(target):
        out = ckpt.resume(source, target, cfg.to_dict(), fallback=cfg.checkpoint.fallback,
                          set_aside_damaged=Path(source) == Path(ckdir))  # this run saves there
        if out is None:
            return None
        state, data_state, step, meta = out
        got.step, got.data_state, got.meta, got.source = step, data_state or {}, meta, ckpt.locate(source)[0]
        return state

    def init_loader():
        if load_params is not None:
            return load_params
        if cfg.model.init_from:
            from jtl.weights import params_loader
            return params_loader(cfg)
        return None

    setup = build(cfg, spec, mesh, total_steps, init_loader(),
                  restore=restore if source is not None else None)
    if source is not None and got.source is None:  # resume_from held no step
        log.info("%s: no checkpoint to resume; starting fresh", source)
    elif got.source is not None:
        log.info("resumed from %s at step %d", got.source / str(got.step), got.step)
        saved = ckpt.read_item(got.source, got.step, "config")
        if saved.get("data") != json.loads(json.dumps(cfg.to_dict())).get("data"):
            log.warning("the data config differs from the checkpoint's: the data stream will not "
                        "continue exactly where it stopped")
    return setup, got


def from_run(run_dir, config_path: str | None = None, overrides=()):
    """(cfg, tokenizer, Setup with the best parameters) of a finished run, for
    ``jtl eval`` / ``jtl predict``: the run's config, tokenizer and best (else latest) step."""
    from jtl import sharding as S
    from jtl.tasks import TaskSpec
    run = Path(run_dir)
    if config_path is not None and "=" in str(config_path) and not Path(config_path).is_file():
        overrides, config_path = [config_path, *overrides], None  # `jtl eval RUN key=value`
    if not (run / "config.yaml").exists() and config_path is None:
        raise ConfigError(f"{run}: no config.yaml (is this a jtl run directory?)")
    cfg = C.load(str(config_path or run / "config.yaml"), list(overrides))
    cfg = cfg.replace(**{"run_dir": str(run), "model.init_from": None})
    tok = load_tokenizer(str(run / "tokenizer"))
    step = None
    if (run / "summary.json").exists():
        step = json.loads((run / "summary.json").read_text()).get("best_step")
    mesh = S.make_mesh(cfg.mesh)
    task = get_task(cfg.task.kind)
    setup = build(cfg, TaskSpec(num_labels=task.num_labels(cfg)), mesh, 1,
                  lambda target: ckpt.restore_params(run, target, step=step))
    return cfg, tok, setup


def finished(cfg: Config, got: Resumed, total_steps: int, out_dir: Path) -> dict | None:
    """The kept summary.json when the restored run already reached ``total_steps``
    (rerunning a finished run trains nothing and rewrites nothing), else None.
    Changed optimizer keys are reported: they would have no effect."""
    summary = out_dir / "summary.json"
    if got.source is None or got.step < total_steps or not summary.exists():
        return None
    saved = ckpt.read_item(got.source, got.step, "config")
    now = json.loads(json.dumps(cfg.to_dict()))
    changed = sorted(f"optim.{k}" for k, v in now["optim"].items() if saved.get("optim", {}).get(k) != v)
    if changed:
        log.warning("%s differ from the finished run's config; they have no effect on a complete run "
                    "(use a new run_dir, or checkpoint.resume=false to retrain)", ", ".join(changed))
    log.info("%s: the run is complete (step %d of %d); nothing to train, summary.json kept",
             out_dir, got.step, total_steps)
    return json.loads(summary.read_text())


def begin(cfg: Config, spec, mesh, total_steps: int, out_dir: Path, load_params=None, tok=None):
    """A recipe's start: the model's birth, then (setup, resumed, None) with the run files
    written, or (setup, resumed, kept summary) when the run is already complete."""
    setup, resumed = born(cfg, spec, mesh, total_steps, out_dir / "checkpoints", load_params)
    done = finished(cfg, resumed, total_steps, out_dir)
    if done is None:
        write_run_files(cfg, out_dir, tok)
    return setup, resumed, done


def write_run_files(cfg: Config, out_dir: Path, tok=None) -> None:
    """RUN_DIR/config.yaml (the resolved config, labels included) and RUN_DIR/tokenizer,
    written by process 0 once the run's validation and resume have succeeded: a refused
    resume changes neither."""
    import yaml
    if jax.process_index() != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    if tok is not None:
        tok.save_pretrained(str(out_dir / "tokenizer"))
    (out_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())),
                                                        sort_keys=False))
