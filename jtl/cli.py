"""``jtl`` command line: train | eval | eval-prompted | lm-eval | predict | export | generate | bench | show-config."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading

from jtl import use_xla_defaults_for_decoding


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jtl").setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args) -> int:
    from jtl import config
    cfg = config.load(args.config, args.overrides)
    from jtl.run import distributed
    distributed.start(cfg.distributed)  # before any other JAX call; a no-op for one process
    from jtl import preemption
    with preemption.Guard():  # from here on, SIGTERM means "checkpoint and exit 75"
        return _train(cfg, args)


def _train(cfg, args) -> int:
    from jtl.run import distributed
    from jtl.tasks import get as get_task
    if args.seeds:
        from jtl.run.seeds import parse_seeds, run_seeds
        print(json.dumps(run_seeds(cfg, parse_seeds(args.seeds)), indent=2, default=float))
        return 0
    if get_task(cfg.task.kind).pretraining:  # the model's birth (init_from, resume) is jtl.run.birth's
        from jtl.pretrain import pretrain
        summary = pretrain(cfg)
    else:
        from jtl.finetune import finetune
        summary = finetune(cfg)
    if distributed.is_primary():
        print(json.dumps(summary, indent=2, default=float))
    return 0


def cmd_show_config(args) -> int:
    import yaml
    from jtl import config
    cfg = config.load(args.config, args.overrides)
    print(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))
    return 0


def cmd_eval(args) -> int:
    from jtl.finetune import evaluate_run
    print(json.dumps(evaluate_run(args.run, args.config, args.overrides, split=args.split), indent=2))
    return 0


def cmd_predict(args) -> int:
    from jtl.finetune import predict_file
    n = predict_file(args.run, args.input, args.output, args.overrides)
    print(f"wrote {n} predictions to {args.output}")
    return 0


def cmd_export(args) -> int:
    from jtl.weights import export_run
    export_run(args.run, args.out)
    print(f"exported {args.run} to {args.out}")
    return 0


def cmd_launch(args) -> int:
    """``jtl launch`` (routed here before argparse: the launcher parses its own flags)."""
    from jtl.run.launch import main as launch_main
    return launch_main(args.rest)


def cmd_generate(args) -> int:
    use_xla_defaults_for_decoding()
    from jtl.config import ConfigError
    from jtl.generate import generate_file, load
    if (args.prompt is None) == (args.input is None):
        raise ConfigError("jtl generate: give either --prompt TEXT or --input rows.jsonl --output out.jsonl")
    if args.input is not None and not args.output:
        raise ConfigError("jtl generate --input needs --output")
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, stop=args.stop or (), batch_size=args.batch_size)
    if args.no_eos:
        kw["eos"] = []
    dtype = [f"model.dtype={args.dtype}", f"model.param_dtype={args.dtype}"] if args.dtype else []
    gen = load(args.source, overrides=dtype + list(args.overrides))
    if args.prompt is not None:  # streamed to the console as the tokens come
        gen.generate([args.prompt], chat=args.chat, on_text=lambda _, piece: print(piece, end="", flush=True), **kw)
        print()
        return 0
    n = generate_file(gen, args.input, args.output, chat=args.chat, **kw)
    print(f"wrote {n} completions to {args.output}")
    return 0


def cmd_eval_prompted(args) -> int:
    use_xla_defaults_for_decoding()
    from jtl.prompted import main as prompted_main
    return prompted_main(args.rest)


def cmd_lm_eval(args) -> int:
    use_xla_defaults_for_decoding()
    from jtl.config import ConfigError
    try:
        from jtl.lm_eval_adapter import main as lm_eval_main
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        raise ConfigError("jtl lm-eval needs lm-evaluation-harness: pip install 'jtl[eval]'") from None
    return lm_eval_main(args.rest)


def cmd_bench(args) -> int:
    from jtl.bench import main as bench_main
    return bench_main(args.rest)


def _leave(code: int, as_program: bool, multi_process: bool = False) -> int:
    """``code``; when ``main`` is the program and it failed, exit at once if background
    threads would keep the process alive (after a failed checkpoint save, Orbax's
    writer threads wait ~300 s for a step directory that will never appear) or if the
    run is multi-process (JAX's shutdown barrier would wait for peers still training)."""
    if as_program and code and multi_process:
        from jtl.run.distributed import fail_fast
        fail_fast(code)
    lingering = [t for t in threading.enumerate()
                 if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if as_program and code and lingering:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jtl", description="JAX transfer learning")
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="pretrain or fine-tune: jtl train CONFIG [key=value ...]")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--seeds", help="run once per seed (e.g. 0,1,2 or 0-4) in RUN_DIR/seed-N; "
                                   "writes RUN_DIR/seeds.json with mean and std")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("show-config", help="print the resolved config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_show_config)
    p = sub.add_parser("eval", help="evaluate a fine-tuned run: jtl eval RUN_DIR [CONFIG] [key=value ...]")
    p.add_argument("run")
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--split", default="validation")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("predict", help="jtl predict RUN_DIR --input in.jsonl --output out.jsonl")
    p.add_argument("run")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(fn=cmd_predict)
    p = sub.add_parser("export", help="jtl export RUN_DIR OUT_DIR (Hugging Face folder)")
    p.add_argument("run")
    p.add_argument("out")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("launch", help="N local processes of one multi-process run: jtl launch "
                                      "--processes N [--devices-per-process D] -- train CONFIG ...")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_launch)
    p = sub.add_parser("generate", help="jtl generate RUN_DIR|WEIGHTS (--prompt TEXT | --input rows.jsonl "
                                        "--output out.jsonl) [--max-new-tokens N] [--temperature T ...]")
    p.add_argument("source", help="a jtl run dir, a Hugging Face folder, a .gguf file or a hub name")
    p.add_argument("overrides", nargs="*", help="key=value config items (mesh.tensor=2, model.dtype=bfloat16)")
    p.add_argument("--prompt", help="one prompt; the completion is streamed to the console")
    p.add_argument("--input", help="JSONL rows with a \"prompt\" string or chat \"messages\"")
    p.add_argument("--output", help="JSONL: each input row with a \"completion\" added")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (repeatable); not part of the completion")
    p.add_argument("--no-eos", action="store_true", help="do not stop at the model's EOS token")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the chat template")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="weights and compute (model.param_dtype and model.dtype; default: the model's): "
                        "bfloat16 reads half the bytes per token, its tokens may differ from float32's")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("eval-prompted", help="zero/k-shot label-word evaluation of a decoder on a "
                       "classification task: jtl eval-prompted MODEL TASK [--shots 0,4] (--help)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_eval_prompted)
    p = sub.add_parser("lm-eval", help="lm-evaluation-harness with the jtl model: jtl lm-eval "
                       "--model_args run=RUN|WEIGHTS --tasks ... [--include_path DIR] (lm_eval's flags)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_lm_eval)
    p = sub.add_parser("bench", help="throughput/MFU/memory benchmarks (jtl bench --help)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)
    as_program = argv is None  # `jtl ...` / `python -m jtl.cli`, not a call from Python
    argv = sys.argv[1:] if argv is None else argv
    lead = [a for a in argv[:2] if a in ("-q", "--quiet")]
    if argv[len(lead):len(lead) + 1] == ["launch"]:  # own flags; everything after -- is the command
        rest = argv[len(lead) + 1:]
        if lead and "--" in rest:  # jtl -q launch ... -- train ...: the processes are quiet too
            rest.insert(rest.index("--") + 1, "-q")
        return cmd_launch(argparse.Namespace(rest=rest))
    if argv[:1] == ["bench"]:  # the bench tool parses its own flags (incl. --help)
        _setup_logging(True)
        from jtl.bench import main as bench_main
        return bench_main(argv[1:])
    if argv[len(lead):len(lead) + 1] == ["lm-eval"]:  # lm_eval parses its own flags (incl. --help)
        args = argparse.Namespace(quiet=bool(lead), fn=cmd_lm_eval, rest=argv[len(lead) + 1:])
    else:
        args = parser.parse_args(argv)
    _setup_logging(not args.quiet)
    from jtl.config import ConfigError
    from jtl.checkpoint import CheckpointError
    from jtl.data.sources import DataError
    from jtl.run import distributed
    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"jtl: error: {e}", file=sys.stderr)
        return _leave(2, as_program, distributed.multi_process())
    except FloatingPointError as e:  # train.nan_policy=stop
        print(f"jtl: stopped: {e}", file=sys.stderr)
        return _leave(3, as_program, distributed.multi_process())
    except Exception as e:
        if not distributed.multi_process():
            raise
        distributed.report(e)  # a peer process must not wait in JAX's shutdown barrier for us
        return _leave(1, as_program, True)


if __name__ == "__main__":
    sys.exit(main())
