"""The benchmark harness end to end on a tiny model (no timing thresholds)."""
import json

import jax
import pytest

from jtl import bench
from jtl import sharding as S
from jtl.config import ModelConfig
from jtl.metrics import train_flops_per_step

TINY = """
name: tiny-bench
model: {family: bert, vocab_size: 128, hidden: 32, layers: 2, heads: 4, mlp: 64, max_len: 32,
        dropout: 0.1, attention_dropout: 0.1}
data: {seq_len: 16}
task: {kind: mlm}
train: {batch_size: 8}
"""


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny-bench.yaml"
    p.write_text(TINY)
    return str(p)


def test_flops_formula_matches_hand_count():
    cfg = ModelConfig(family="bert", vocab_size=100, hidden=32, layers=2, heads=4, mlp=64)
    # per token and layer: q,k,v 3*2*32*32 + out 2*32*32 + MLP 2*2*32*64 + attention 2*2*16*32
    per_layer = 3 * 2048 + 2048 + 8192 + 2048
    body = 2 * 16 * 2 * per_layer  # batch 2 x seq 16 tokens, 2 layers
    head = 2 * 3 * (2 * 32 * 32 + 2 * 32 * 100)  # 3 predictions per row
    assert train_flops_per_step(cfg, 2, 16, "mlm", 3) == 3 * (body + head)
    gpt = ModelConfig(family="gpt2", vocab_size=100, hidden=32, layers=2, heads=4, mlp=64)
    causal_layer = 3 * 2048 + 2048 + 8192 + 2048 // 2
    assert train_flops_per_step(gpt, 2, 16, "clm") == 3 * 32 * (2 * causal_layer + 2 * 32 * 100)


def test_synthetic_batches_have_task_keys(tiny):
    cfg = bench.bench_config(tiny, 4, 16)
    b = bench.synthetic_batch(cfg)
    assert set(b) == {"input_ids", "segment_ids", "positions", "mlm_eligible"}
    assert b["input_ids"].shape == (4, 16) and (b["segment_ids"] == 1).all()
    clm = bench.bench_config(tiny, 4, 16, overrides=["model.family=gpt2", "task.kind=clm"])
    b = bench.synthetic_batch(clm)
    assert set(b) >= {"targets", "loss_weights"} and (b["targets"][:, :-1] == b["input_ids"][:, 1:]).all()


def test_throughput_cli_writes_json_md_png(tiny, tmp_path):
    out = tmp_path / "out"
    assert bench.main(["throughput", "--presets", tiny, "--batch", "8", "--seq", "16",
                       "--warmup", "1", "--steps", "2", "--out", str(out)]) == 0
    doc = json.loads((out / "throughput.json").read_text())
    assert {"machine", "results", "host_peak_flops", "command", "quiet"} <= set(doc)
    assert {"load_1min_at_start", "load_1min_after", "others_cpu_share", "quiet"} <= set(doc["quiet"])
    assert "lscpu SIMD" in doc["machine"] and "lscpu CPU family" in doc["machine"]
    r = doc["results"][0]
    for key in ("tokens_per_s", "examples_per_s", "step_s_median", "step_s_min", "step_s_max",
                "compile_s", "mfu", "model_flops_per_step", "hlo_flops_per_device", "memory",
                "peak_flops", "params"):
        assert key in r, key
    assert len(r["step_s_all"]) == 3
    assert r["mfu"] == pytest.approx(r["model_flops_per_step"] / r["step_s_median"] / r["peak_flops"])
    assert r["tokens_per_s"] == pytest.approx(8 * 16 / r["step_s_median"])
    assert r["memory"]["temp"] > 0 and r["memory"]["argument"] > 0
    assert (out / "throughput.png").stat().st_size > 1000
    assert "tokens/s" in (out / "throughput.md").read_text()
    assert "of the cores while timing" in (out / "throughput.md").read_text()


def test_a_timing_run_next_to_a_busy_process_is_marked_not_quiet(capsys):
    import subprocess
    import sys
    import time
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        with bench.Quiet("probe") as q:
            time.sleep(1.0)  # this process idles; the spinner takes a core
    finally:
        spinner.kill()
        spinner.wait()
    r = q.report()
    import os
    assert r["others_cpu_share"] * os.cpu_count() >= 0.5 and r["quiet"] is False, r  # about one core
    assert "NOT QUIET" in capsys.readouterr().err


def test_collective_parser_on_hlo_text():
    hlo = """
  %p.1 = f32[4,8]{1,0} parameter(0)
  %ag = f32[8,8]{1,0} all-gather(%p.1), channel_id=1, replica_groups={{0,1}}, dimensions={0}
  %ars = (f32[4,8]{1,0}, bf16[2]{0}) all-reduce-start(%p.1, %q), channel_id=2, to_apply=%add
  %ard = (f32[4,8]{1,0}, bf16[2]{0}) all-reduce-done(%ars)
  %q = bf16[2]{0} parameter(1)
  ROOT %rs = f32[2,8]{1,0} reduce-scatter(f32[4,8]{1,0} %p.1), dimensions={0}
"""
    c = bench.collectives(hlo)
    assert c["all-gather"] == {"count": 1, "operand_bytes": 128, "result_bytes": 256}
    assert c["all-reduce"] == {"count": 1, "operand_bytes": 132, "result_bytes": 132}
    assert c["reduce-scatter"] == {"count": 1, "operand_bytes": 128, "result_bytes": 64}
    assert c["all-to-all"]["count"] == 0


def test_collective_device_groups_in_every_printed_form_and_the_bytes_that_cross_processes():
    g = bench.device_groups
    # jax 0.10's mesh-axes form; data=2 x fsdp=4: device (d, f) is 4d+f, so fsdp groups stay in a process
    fsdp = ("%ag = f32[512,128]{0,1} all-gather(%c), channel_id=7, replica_groups=mesh['axis_0'=1,'axis_1'=4,"
            "'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_1'}, dimensions={1}, use_global_device_ids=true")
    assert sorted(map(sorted, g(fsdp, 8))) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    data = "%ar = f32[] all-reduce(%x), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, to_apply=%add"
    assert sorted(map(sorted, g(data, 8))) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    sub = "%ar = f32[] all-reduce(%x), replica_groups=mesh['a'=8] {'a':(2)2}, to_apply=%add"  # bit 1 of a
    assert sorted(map(sorted, g(sub, 8))) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert g("%ar = f32[] all-reduce(%x), replica_groups=[2,4]<=[4,2]T(1,0)", 8) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g("%ar = f32[] all-reduce(%x), replica_groups={{0,1},{2,3}}", 4) == [[0, 1], [2, 3]]
    assert g("%ar = f32[] all-reduce(%x), replica_groups={}", 4) == [[0, 1, 2, 3]]
    assert g("%cp = f32[2] collective-permute(%x), source_target_pairs={{0,1},{1,0}}", 2) == [[0, 1], [1, 0]]
    assert g("%ar = f32[] all-reduce(%x), replica_groups=something_new", 4) is None

    hlo = f"""
  %c = f32[128,128]{{1,0}} parameter(0)
  %x = f32[16]{{0}} parameter(1)
  {fsdp}
  {data}
  %odd = f32[16]{{0}} all-reduce(%x), replica_groups=something_new, to_apply=%add
"""
    c = bench.collectives(hlo, [i // 4 for i in range(8)])  # 2 processes x 4 devices
    assert c["all-gather"]["operand_bytes"] == 65536 and c["all-gather"]["cross_process_operand_bytes"] == 0
    assert c["all-reduce"]["operand_bytes"] == 16 * 4 + 16 * 4
    assert c["all-reduce"]["cross_process_operand_bytes"] == 64  # the data-axis reduction
    assert c["all-reduce"]["unclassified_operand_bytes"] == 64


def test_collectives_on_2x2x2_mesh_find_fsdp_all_gathers(tiny):
    cfg = bench.bench_config(tiny, 8, 16)
    mixed = bench.analyze(cfg, S.make_mesh((2, 2, 2)))
    ag = mixed["collectives"]["all-gather"]
    assert ag["count"] > 0 and ag["result_bytes"] > ag["operand_bytes"] > 0
    assert mixed["collectives"]["all-reduce"]["count"] > 0  # gradients over the data axis


def test_fsdp_state_per_device_is_total_over_n(tiny):
    # Biases and norm scales stay replicated, so the bound needs a model whose
    # matrices dominate (as in every real preset); hidden 32 would not pass.
    cfg = bench.bench_config(tiny, 8, 16, overrides=["model.hidden=256", "model.mlp=1024",
                                                     "model.vocab_size=2048"])
    fsdp = bench.analyze(cfg, S.make_mesh((1, 8, 1)))
    fsdp["strategy"] = "fsdp"
    (check,) = bench.fsdp_checks([fsdp])
    assert check["ok"], check
    assert fsdp["param_bytes_per_device"] < fsdp["state_bytes_total"] / 3 / 7


def test_aot_mesh_bigger_than_machine(tiny, tmp_path):
    assert jax.device_count() == 8
    out = tmp_path / "aot"
    assert bench.main(["aot", "--preset", tiny, "--mesh", "2,4,2", "--batch", "16", "--seq", "16",
                       "--out", str(out)]) == 0
    r = json.loads((out / "scaling.json").read_text())["results"][0]
    assert r["devices"] == 16 and r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 2}
    assert r["memory"]["temp"] > 0 and r["collectives"]["all-gather"]["count"] > 0
    assert (out / "scaling.png").exists()


def test_pytorch_reference_loop_learns_ner_and_is_scored_like_jtl(tmp_path):
    """benchmarks/finetune_vs_pytorch.py's PyTorch side: a tiny random BERT folder
    (safetensors + tokenizer) fine-tuned on a synthetic NER task by the plain loop,
    scored by jtl's own metric code, with the jtl preset's schedule."""
    import importlib.util
    import json as _json
    from pathlib import Path

    import torch
    import transformers

    from jtl import config as C
    from jtl import finetune as F
    from jtl.data.tokenizer import train_tokenizer
    from test_finetune import WORDS, ner_rows, write_jsonl

    spec = importlib.util.spec_from_file_location(
        "finetune_vs_pytorch", Path(__file__).resolve().parent.parent / "benchmarks" / "finetune_vs_pytorch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    tok = train_tokenizer([" ".join(WORDS + ["Mr", "Smith", "Paris"])] * 4, 128, kind="wordpiece")
    folder = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    hf = transformers.BertForTokenClassification(transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=len(names)))
    hf.save_pretrained(folder)
    tok.save_pretrained(str(folder))
    cfg = C.load(None, [f"model.init_from={folder}", "task.kind=token_classification",
                        "data.text_field=tokens", "data.label_field=ner_tags", f"data.labels={','.join(names)}",
                        f"data.train={write_jsonl(tmp_path / 'tr.jsonl', ner_rows(300, 0))}",
                        f"data.validation={write_jsonl(tmp_path / 'va.jsonl', ner_rows(40, 1))}",
                        f"run_dir={tmp_path / 'run'}", "data.seq_len=32", "train.batch_size=16",
                        "train.epochs=3", "optim.lr=3e-3", "optim.warmup_ratio=0.05"])
    cfg, tk, rows = F.prepare(cfg)
    enc = {s: F.encode_split(cfg, r, tk) for s, r in rows.items() if r is not None}
    out = mod.torch_finetune(cfg, enc, log_every=1000)
    assert out["steps"] == 3 * 19 and len(out["history"]) == 3
    assert out["final"]["validation"]["entity_f1"] >= 0.9, _json.dumps(out["history"])
    assert 0 <= out["padding_fraction"] < 1
