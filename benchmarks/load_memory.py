"""Peak host memory while loading a BERT-base-sized HF checkpoint onto an 8-device FSDP mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/load_memory.py

Writes a random BERT-base checkpoint (safetensors, ~440 MB) to a temp dir in a
child process, then, for each method in a fresh child process, builds the
abstract sharded model and loads the checkpoint into it while a thread samples
RSS (psutil or /proc) every 5 ms; ``ru_maxrss`` gives the kernel's own peak. On CPU the
"devices" live in host memory, so the loaded arrays themselves are ~1x the
checkpoint: a loader that streams adds little on top of that, one that reads
the whole file first needs ~2x.

Methods: ``jtl`` (jtl.weights.params_loader: per-device slices via pread),
``safe_open`` (the same loader reading slices through ``safe_open(...).get_slice``,
i.e. a memory-mapped file whose touched pages count in RSS) and ``naive``
(safetensors.numpy.load_file of the whole file, then device_put).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
                 hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0, model_type="bert",
                 architectures=["BertModel"])


def write_checkpoint(folder: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file
    c = BERT_BASE
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    rng = np.random.default_rng(0)
    w = lambda *s: (0.02 * rng.standard_normal(s)).astype(np.float32)
    t = {"embeddings.word_embeddings.weight": w(v, d),
         "embeddings.position_embeddings.weight": w(c["max_position_embeddings"], d),
         "embeddings.token_type_embeddings.weight": w(2, d),
         "embeddings.LayerNorm.weight": w(d), "embeddings.LayerNorm.bias": w(d),
         "pooler.dense.weight": w(d, d), "pooler.dense.bias": w(d)}
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            t[p + f"attention.self.{n}.weight"], t[p + f"attention.self.{n}.bias"] = w(d, d), w(d)
        t[p + "attention.output.dense.weight"], t[p + "attention.output.dense.bias"] = w(d, d), w(d)
        t[p + "attention.output.LayerNorm.weight"], t[p + "attention.output.LayerNorm.bias"] = w(d), w(d)
        t[p + "intermediate.dense.weight"], t[p + "intermediate.dense.bias"] = w(f, d), w(f)
        t[p + "output.dense.weight"], t[p + "output.dense.bias"] = w(d, f), w(d)
        t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"] = w(d), w(d)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(BERT_BASE))


def rss() -> int:
    """Resident set size now (psutil when installed, else Linux /proc)."""
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class SafeOpenSource:
    """The same slicing loader over ``safe_open(...).get_slice`` (memory-mapped file)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open
        self.name = str(folder)
        self.f = safe_open(str(folder / "model.safetensors"), "np")

    def keys(self):
        return list(self.f.keys())

    def shape(self, key):
        return tuple(self.f.get_slice(key).get_shape())

    def file(self, key):
        return self.name

    def read(self, key, region):
        return self.f.get_slice(key)[tuple(slice(a, b) for a, b in region)]


def measure(folder: Path, method: str, mesh_shape: tuple) -> dict:
    import resource
    import threading

    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    import jax
    import numpy as np
    from jtl import config as C, sharding as S, train
    from jtl.convert.hf import concrete_sharding
    from jtl.tasks import TaskSpec
    from jtl.weights import params_loader, resolve_config

    cfg = resolve_config(C.load(None, [f"model.init_from={folder}", "task.kind=classification",
                                       "train.batch_size=8"]))
    mesh = S.make_mesh(mesh_shape)
    _, abstract, _, _ = train.abstract_state(cfg, TaskSpec(num_labels=2), mesh, 10)
    params = abstract[0]
    base = rss()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    if method == "jtl":
        loaded = params_loader(cfg)(params)
    elif method == "safe_open":
        from jtl.convert.hf import load_params
        loaded = load_params(cfg.model, cfg.task.kind, SafeOpenSource(folder), params)
    else:
        from safetensors.numpy import load_file
        from jtl.convert import tables as T
        whole = load_file(str(folder / "model.safetensors"))
        dims = {"H": cfg.model.heads, "KV": cfg.model.num_kv_heads}
        loaded = {}
        for path, var in params.flat_state():
            rule = T.rules("bert", "classification").get(tuple(map(str, path)))
            if rule is None or rule[0][0].startswith("^"):
                continue
            (key,), ops = rule
            if "{i}" in key:
                x = np.stack([T.read_region(lambda k, r: whole[k], key.format(i=i),
                                            whole[key.format(i=i)].shape, ops, dims,
                                            [(0, n) for n in var.shape[1:]])
                              for i in range(cfg.model.layers)])
            else:
                x = whole[key]
            loaded[path] = jax.device_put(x, concrete_sharding(var.sharding))
        del whole
    jax.block_until_ready(list(loaded.values()))
    seconds = time.perf_counter() - t0
    stop.set()
    t.join()
    after = rss()
    ckpt = (folder / "model.safetensors").stat().st_size
    held = sum(sum(s.data.nbytes for s in a.addressable_shards) for a in loaded.values())
    return dict(method=method, mesh=list(mesh_shape), checkpoint_mb=ckpt / 2**20,
                device_arrays_mb=held / 2**20, rss_before_mb=base / 2**20,
                peak_rss_mb=max(peak[0], after) / 2**20, rss_after_mb=after / 2**20,
                ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
                peak_increase_over_checkpoint=(max(peak[0], after) - base) / ckpt,
                host_overhead_mb=(max(peak[0], after) - base - held) / 2**20,
                load_seconds=seconds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="jtl,safe_open,naive")
    ap.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--_write", help=argparse.SUPPRESS)
    ap.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    mesh = tuple(int(x) for x in args.mesh.split(","))
    if args._write:
        write_checkpoint(Path(args._write))
        return 0
    if args._measure:
        print(json.dumps(measure(Path(args._measure[0]), args._measure[1], mesh)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, __file__, "--_write", tmp], check=True)
        for method in args.methods.split(","):
            r = subprocess.run([sys.executable, __file__, "--mesh", args.mesh, "--_measure", tmp, method],
                               check=True, capture_output=True, text=True)
            line = r.stdout.strip().splitlines()[-1]
            res = json.loads(line)
            print(f"{method:6s} mesh {args.mesh}: checkpoint {res['checkpoint_mb']:.0f} MB, "
                  f"RSS before {res['rss_before_mb']:.0f} MB, peak {res['peak_rss_mb']:.0f} MB "
                  f"(+{res['peak_increase_over_checkpoint']:.2f}x checkpoint), after "
                  f"{res['rss_after_mb']:.0f} MB, device arrays {res['device_arrays_mb']:.0f} MB "
                  f"(peak - before - arrays = {res['host_overhead_mb']:.0f} MB), "
                  f"ru_maxrss {res['ru_maxrss_mb']:.0f} MB, {res['load_seconds']:.1f} s")
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
