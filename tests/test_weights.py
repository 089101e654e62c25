"""Pretrained weights: HF checkpoints -> sharded jtl models (parity with transformers),
jtl -> HF export, GGUF, and the errors a bad checkpoint must give."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from jtl import config as C, sharding as S, train  # noqa: E402
from jtl.config import ConfigError  # noqa: E402
from jtl.tasks import TaskSpec  # noqa: E402
from jtl.weights import WeightsError, export_hf, params_loader, resolve_config  # noqa: E402

TOL = 1e-4
B, SEQ, V = 4, 12, 128
MESHES = [(1, 1, 1), (2, 2, 2)]


def hf_model(family: str, *, tied: bool = True, head: str = "base"):
    """A tiny random transformers model, fp32, eager attention."""
    torch.manual_seed(0)
    T = transformers
    common = dict(vocab_size=V, attn_implementation="eager")
    if family in ("bert", "roberta"):
        cls = T.BertConfig if family == "bert" else T.RobertaConfig
        cfg = cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=40, type_vocab_size=2 if family == "bert" else 1,
                  hidden_act="gelu", **common)
        model = {("bert", "base"): T.BertModel, ("roberta", "mlm"): T.RobertaForMaskedLM,
                 ("roberta", "base"): T.RobertaModel, ("bert", "mlm"): T.BertForMaskedLM}[family, head](cfg)
    elif family == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=40, tie_word_embeddings=tied,
                           bos_token_id=1, eos_token_id=2, **common)
        model = T.GPT2LMHeadModel(cfg)
    else:
        cfg = T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                            rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0, **common)
        model = T.LlamaForCausalLM(cfg)
    with torch.no_grad():  # HF inits norms to ones/zeros: perturb so a swapped mapping shows up
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def batch_arrays(seed=0, types=False):
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, V, (B, SEQ))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[3, 3:] = 0
    ids = np.where(mask == 1, ids, 1)  # pad id of the tiny models (RoBERTa: 1)
    tt = (np.arange(SEQ)[None] >= SEQ // 2).astype(np.int64) * np.ones_like(ids) if types else None
    return ids, mask, tt


def torch_outputs(model, ids, mask, tt=None):
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if tt is not None:
        kw["token_type_ids"] = torch.tensor(tt)
    with torch.no_grad():
        out = model(**kw, output_hidden_states=True)
    logits = out.logits.numpy() if hasattr(out, "logits") else None
    return out.hidden_states[-1].numpy(), logits


def jtl_config(task: str, init_from=None, **model):
    over = [f"task.kind={task}", f"data.seq_len={SEQ}", "train.batch_size=8"]
    if task == "clm" and "family" not in model:
        model["family"] = "llama"  # validation needs a decoder family before init_from decides
    over += [f"model.{k}={v}" for k, v in model.items()]
    if init_from:
        over.append(f"model.init_from={init_from}")
    return C.load(None, over)


def jtl_outputs(cfg, mesh_shape, ids, mask, tt=None, load=True, num_labels=3, via_init_state=False):
    """(hidden [B,S,D], head output, params state) of a jtl model on a mesh.

    ``via_init_state`` builds through ``train.init_state`` (random init + optimizer, then the
    loader); otherwise the loaded arrays are put straight into the abstract model (much
    faster to compile; parameters the checkpoint lacks are zeros)."""
    from jtl.convert.hf import concrete_sharding
    mesh = S.make_mesh(mesh_shape)
    spec = TaskSpec(num_labels=num_labels if cfg.task.kind not in ("mlm", "clm") else 0,
                    max_predictions=SEQ)
    loader = params_loader(cfg) if load else None
    if via_init_state:
        graphdef, params, _ = train.init_state(cfg, spec, mesh, 10, loader)
        model_params = params[0]
        merge = lambda st: nnx.merge(graphdef, st)[0]
    elif not load:  # a random model, created eagerly (tiny; no init program to compile)
        with S.activate(mesh):
            graphdef, params = nnx.split(train.create_model(cfg, spec))
        model_params = params
        merge = lambda st: nnx.merge(graphdef, st)
    else:
        with S.activate(mesh):
            graphdef, params = nnx.split(nnx.eval_shape(lambda: train.create_model(cfg, spec)))
        loaded = loader(params)
        for path, var in params.flat_state():
            var.set_value(loaded[path] if path in loaded else
                          jax.device_put(jnp.zeros(var.shape, var.dtype), concrete_sharding(var.sharding)))
        model_params = params
        merge = lambda st: nnx.merge(graphdef, st)

    def fwd(state, ids, seg, tt):
        model = merge(state)
        h = model.backbone(cfg.model, ids, seg, None, tt)
        batch = {"input_ids": ids, "segment_ids": seg, "token_type_ids": tt}
        if cfg.task.kind == "mlm":
            batch["mlm_positions"] = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        return h, model(cfg.model, batch)

    with S.activate(mesh):
        h, out = jax.jit(fwd)(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                              None if tt is None else jnp.asarray(tt, jnp.int32))
    return np.asarray(h), np.asarray(out), model_params


def maxdiff(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


# ------------------------------------------------------------------ HF -> jtl parity

CASES = {  # name: (family, hf kwargs, jtl task)
    "bert": ("bert", dict(head="base"), "classification"),
    "roberta_mlm": ("roberta", dict(head="mlm"), "mlm"),
    "gpt2": ("gpt2", dict(tied=True), "clm"),
    "llama_gqa_untied": ("llama", dict(tied=False), "clm"),
    "llama_tied": ("llama", dict(tied=True), "clm"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny HF checkpoints written once per module: {case: (folder, model)}."""
    out = {}
    for name, (family, kw, _) in CASES.items():
        model = hf_model(family, **kw)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_hf_parity_on_meshes(case, saved, caplog):
    family, _, task = CASES[case]
    folder, model = saved[case]
    cfg = resolve_config(jtl_config(task, folder))
    assert cfg.model.family == family and cfg.model.dropout == 0.1  # user's dropout kept
    if family == "llama":
        assert cfg.model.num_kv_heads == 2 and cfg.model.rope_theta == 500.0
    if family == "roberta":
        assert cfg.model.position_offset == 2
    ids, mask, tt = batch_arrays(types=family == "bert")
    ref_h, ref_logits = torch_outputs(model, ids, mask, tt)
    for mesh_shape in MESHES:
        caplog.clear()
        with caplog.at_level("INFO", logger="jtl.weights"):
            h, out, _ = jtl_outputs(cfg, mesh_shape, ids, mask, tt,
                                   via_init_state=case == "bert" and mesh_shape == (2, 2, 2))
        assert maxdiff(h, ref_h, mask) < TOL, (case, mesh_shape, maxdiff(h, ref_h, mask))
        if ref_logits is not None and task in ("mlm", "clm"):
            d = maxdiff(out, ref_logits, mask)
            assert d < TOL, (case, mesh_shape, d)
    if task == "classification":  # fresh classifier is reported, the pooler is loaded
        assert "newly initialized" in caplog.text and "cls_w" in caplog.text
        assert "pooler_w" not in caplog.text.split("newly initialized")[1]


def test_loaded_arrays_carry_target_sharding(saved):
    folder, _ = saved["llama_gqa_untied"]
    cfg = resolve_config(jtl_config("clm", folder, scan_layers=True))
    mesh = S.make_mesh((2, 2, 2))
    _, abstract, shardings, _ = train.abstract_state(cfg, TaskSpec(), mesh, 10)
    loaded = params_loader(cfg)(abstract[0])
    want = dict(shardings[0].flat_state())
    assert set(loaded) == {p for p, _ in abstract[0].flat_state()}  # untied: lm_w loaded too
    for path, arr in loaded.items():
        assert arr.sharding.is_equivalent_to(want[path].get_value() if hasattr(want[path], "get_value")
                                             else want[path], arr.ndim), path


def test_sharded_safetensors_index(saved, tmp_path):
    folder, model = saved["llama_gqa_untied"]
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    cfg = resolve_config(jtl_config("clm", tmp_path))
    abstract = _abstract(cfg)
    one, many = params_loader(resolve_config(jtl_config("clm", folder)))(abstract), params_loader(cfg)(abstract)
    assert set(one) == set(many) and len(one) == len(list(abstract.flat_state()))
    for path in one:
        np.testing.assert_array_equal(np.asarray(one[path]), np.asarray(many[path]))


def test_bf16_checkpoint_into_fp32_and_bf16_params(saved, tmp_path):
    folder, model = saved["llama_tied"]
    bf = hf_model("llama", tied=True).to(torch.bfloat16)
    bf.save_pretrained(tmp_path)
    for dtype in ("float32", "bfloat16"):
        cfg = resolve_config(jtl_config("clm", tmp_path / "model.safetensors", param_dtype=dtype))
        loaded = params_loader(cfg)(_abstract(cfg))
        q = np.asarray(loaded[("backbone", "layers", "q_w")])
        assert q.dtype == np.dtype(jnp.dtype(dtype))
        want = bf.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().reshape(4, 8, 32)
        np.testing.assert_array_equal(q[1].astype(np.float32), want)


# ------------------------------------------------------------------ jtl -> HF export


EXPORT_CASES = {  # name: (model fields, task, transformers auto class)
    "bert_cls": (dict(family="bert"), "classification", "AutoModelForSequenceClassification"),
    "bert_no_types_mlm": (dict(family="bert", type_vocab=0, tie_embeddings=False), "mlm",
                          "AutoModelForMaskedLM"),
    "roberta_mlm": (dict(family="roberta", type_vocab=1, pad_id=1, position_offset=2), "mlm",
                    "AutoModelForMaskedLM"),
    "roberta_cls": (dict(family="roberta", type_vocab=1, pad_id=1, position_offset=2), "classification",
                    "AutoModelForSequenceClassification"),
    "gpt2": (dict(family="gpt2", activation="gelu_tanh", type_vocab=0, norm_eps=1e-5), "clm",
             "AutoModelForCausalLM"),
    "llama": (dict(family="llama", kv_heads=2, activation="silu", tie_embeddings=False,
                   norm_eps=1e-5, rope_theta=1000.0, type_vocab=0), "clm", "AutoModelForCausalLM"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_round_trip(case, tmp_path):
    fields, task, auto = EXPORT_CASES[case]
    fields = dict(vocab_size=V, hidden=32, layers=2, heads=4, mlp=48, max_len=40, **fields)
    cfg = jtl_config(task, **fields)
    ids, mask, tt = batch_arrays(seed=1, types=fields["family"] == "bert" and fields.get("type_vocab") != 0)
    h, out, params = jtl_outputs(cfg, (1, 1, 1), ids, mask, tt, load=False, num_labels=3)
    export_hf(cfg.model, params, tmp_path / "hf", task=task, pooling=cfg.task.pooling)
    model = getattr(transformers, auto).from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if tt is not None:
        kw["token_type_ids"] = torch.tensor(tt)
    with torch.no_grad():
        ref = model(**kw, output_hidden_states=True)
    assert maxdiff(h, ref.hidden_states[-1].numpy(), mask) < TOL
    if task == "classification":
        assert np.abs(out - ref.logits.numpy()).max() < TOL
    else:
        assert maxdiff(out, ref.logits.numpy(), mask) < TOL
    # ... and back: re-importing the export gives the very same parameters.
    cfg2 = resolve_config(jtl_config(task, tmp_path / "hf"))
    assert cfg2.model.family == cfg.model.family and cfg2.model.tie_embeddings == cfg.model.tie_embeddings
    mesh = S.make_mesh((1, 1, 1))
    _, abstract, _, _ = train.abstract_state(cfg2, TaskSpec(num_labels=3), mesh, 10)
    loaded = params_loader(cfg2)(abstract[0])
    original = dict(params.flat_state())
    assert loaded, "nothing re-imported"
    for path, arr in loaded.items():
        if path == ("backbone", "embed", "types") and path not in original:
            assert not np.asarray(arr).any()  # the zero row written for a type-less model
            continue
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(original[path][...]), err_msg=str(path))


def test_jtl_run_dir_backbone_and_export_run(tmp_path):
    import yaml
    from jtl import checkpoint
    from jtl.weights import export_run
    cfg = jtl_config("mlm", family="bert", vocab_size=V, hidden=32, layers=2, heads=4, mlp=48, max_len=40)
    mesh = S.make_mesh((1, 1, 1))
    graphdef, state, _ = train.init_state(cfg, TaskSpec(max_predictions=SEQ), mesh, 10)
    run = tmp_path / "run"
    raw = json.loads(json.dumps(cfg.to_dict()))
    mngr = checkpoint.manager(run / "checkpoints", async_save=False)
    checkpoint.save(mngr, 1, state, raw)
    checkpoint.wait(mngr)
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    # Fine-tuning from the run: architecture from its config.yaml, backbone from its checkpoint.
    user = jtl_config("classification", run, hidden=48, dropout=0.2)
    cfg2 = resolve_config(user)
    assert cfg2.model.hidden == 32 and cfg2.model.dropout == 0.2
    loaded = params_loader(cfg2)(_abstract(cfg2))
    original = dict(state[0].flat_state())
    assert loaded and all(p[0] == "backbone" for p in loaded)
    assert len(loaded) == sum(1 for p in original if p[0] == "backbone")
    for path, arr in loaded.items():
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(original[path][...]))
    # jtl export RUN_DIR OUT: a BertForMaskedLM with the same logits.
    export_run(run, tmp_path / "hf")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids, mask, tt = batch_arrays(seed=2, types=True)
    _, ref = torch_outputs(hf, ids, mask, tt)
    model = nnx.merge(graphdef, state)[0]
    with S.activate(mesh):
        out = model(cfg.model, {"input_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(mask),
                                "token_type_ids": jnp.asarray(tt),
                                "mlm_positions": jnp.broadcast_to(jnp.arange(SEQ), ids.shape)})
    assert maxdiff(np.asarray(out), ref, mask) < TOL


# ------------------------------------------------------------------ errors


def _abstract(cfg):
    mesh = S.make_mesh((1, 1, 1))
    _, abstract, shardings, _ = train.abstract_state(cfg, TaskSpec(num_labels=3), mesh, 10)
    return train.concrete_target(abstract, shardings)[0]  # what birth hands the loaders


def test_truncated_safetensors_names_the_file(saved, tmp_path):
    folder, _ = saved["bert"]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cfg = resolve_config(jtl_config("classification", bad))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*truncated"):
        params_loader(cfg)(_abstract(cfg))
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
    with pytest.raises(WeightsError, match=r"model\.safetensors: corrupt safetensors header"):
        params_loader(cfg)(_abstract(cfg))


def test_shape_problems_reported_together(saved, tmp_path):
    from safetensors.numpy import load_file, save_file
    folder, _ = saved["bert"]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["encoder.layer.0.attention.self.extra.weight"] = np.zeros((3, 3), np.float32)
    save_file(tensors, bad / "model.safetensors")
    # Model says 3 layers, a wider MLP and a larger vocab than the checkpoint has.
    cfg = resolve_config(jtl_config("classification", bad)).replace(
        **{"model.layers": 3, "model.mlp": 64, "model.vocab_size": 256})
    with pytest.raises(WeightsError) as err:
        params_loader(cfg)(_abstract(cfg))
    msg = str(err.value)
    assert "missing backbone.layers.q_w" in msg and "encoder.layer.2.attention.self.query.weight" in msg
    assert "shape backbone.layers.up_w" in msg and "(48, 32)" in msg
    assert "vocab size: checkpoint 128, model.vocab_size=256" in msg
    assert "unexpected encoder.layer.0.attention.self.extra.weight (3, 3)" in msg


def test_a_config_json_that_disagrees_with_its_tensors_is_blamed_not_the_users_keys(saved, tmp_path):
    folder, _ = saved["bert"]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    hf = json.loads((bad / "config.json").read_text())
    width = hf["hidden_size"]
    hf["hidden_size"] = 2 * width  # the user sets no model.* key: the sizes all come from here
    (bad / "config.json").write_text(json.dumps(hf))
    cfg = resolve_config(jtl_config("classification", bad))
    assert cfg.model.hidden == 2 * width
    with pytest.raises(WeightsError) as err:
        params_loader(cfg)(_abstract(cfg))
    msg = str(err.value)
    assert str(bad) in msg and "config.json" in msg and "that config disagrees with its tensors" in msg
    assert f"the checkpoint's tensors are {width} wide but the model is {2 * width} wide" in msg
    assert f"(width: checkpoint {width}, model.hidden={2 * width})" in msg
    assert "vocab size" not in msg  # the vocabulary agrees: no false lead


def test_wrong_family_and_unknown_model_type(saved, tmp_path):
    folder, _ = saved["bert"]
    cfg = jtl_config("clm", folder, family="llama", type_vocab=0)
    with pytest.raises(WeightsError, match="no llama weights found"):
        params_loader(cfg)(_abstract(cfg))
    other = tmp_path / "t5"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ConfigError, match=r"t5.*config\.json.*bert, roberta, gpt2, llama|config\.json.*t5"):
        resolve_config(jtl_config("classification", other))


def test_hub_name_downloads_only_safe_files(saved, monkeypatch):
    import huggingface_hub
    from jtl.weights import local_path
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(saved["gpt2"][0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    local_path.cache_clear()
    cfg = resolve_config(jtl_config("clm", "someone/tiny-gpt2"))
    assert cfg.model.family == "gpt2" and calls[0][0] == "someone/tiny-gpt2"
    assert "*.safetensors" in calls[0][1] and not any("bin" in p or "pt" in p for p in calls[0][1])
    local_path.cache_clear()


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="could not be fetched.*local folder"):
        resolve_config(jtl_config("classification", "no-such-org/no-such-model"))


def test_gguf_llama_permutation_round_trip():
    """llama.cpp permutes q/k rows for its RoPE; unpermute_rope must invert it exactly."""
    from jtl.convert.sources import unpermute_rope
    heads, dh, d = 3, 8, 5
    w = np.arange(heads * dh * d, dtype=np.float32).reshape(heads * dh, d)
    # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, dh/2, ...).swapaxes(1, 2)
    permuted = w.reshape(heads, 2, dh // 2, d).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rope(permuted, heads), w)


def test_gguf_tiny_llama_matches_transformers(saved, tmp_path):
    """A GGUF written the llama.cpp way (q/k rows permuted, F32/F16/Q8_0 tensors) loads with
    HF-equal logits: checks metadata, name mapping, unpermutation and dequantization."""
    gguf = pytest.importorskip("gguf")
    _, model = saved["llama_gqa_untied"]
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    permute = lambda w, n: w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(32)
    w.add_feed_forward_length(48)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500.0)
    w.add_context_length(64)
    w.add_vocab_size(V)
    for key, x in sd.items():
        if key.startswith("model.layers."):
            i, rest = key.split(".")[2], ".".join(key.split(".")[3:-1])
            name = f"blk.{i}.{parts[rest]}.weight"
            x = permute(x, 4) if rest == "self_attn.q_proj" else permute(x, 2) if rest == "self_attn.k_proj" else x
        else:
            name = names[key]
        if name.endswith("ffn_up.weight"):  # one quantized tensor: what the model then holds
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            sd[key] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(x.shape)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, x.astype(np.float16) if name.endswith("ffn_gate.weight") else x)
            if name.endswith("ffn_gate.weight"):
                sd[key] = x.astype(np.float16).astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref_model = hf_model("llama", tied=False)
    ref_model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
    ids, mask, _ = batch_arrays(seed=3)
    _, ref = torch_outputs(ref_model, ids, mask)
    cfg = resolve_config(jtl_config("clm", path))
    assert (cfg.model.kv_heads, cfg.model.rope_theta, cfg.model.tie_embeddings) == (2, 500.0, False)
    _, out, _ = jtl_outputs(cfg, (2, 2, 2), ids, mask)
    assert maxdiff(out, ref, mask) < TOL


# ------------------------------------------------------------------ real weights (opt-in)


@pytest.mark.skipif(not os.environ.get("JTL_MINILM_DIR"), reason="set JTL_MINILM_DIR")
def test_minilm_real_weights():
    folder = Path(os.environ["JTL_MINILM_DIR"])
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    sents = ["The quick brown fox jumps over the lazy dog.", "A short one.",
             "Transfer learning with JAX on a mesh of devices", "hello world"]
    enc = tok(sents, padding="max_length", max_length=16, truncation=True, return_tensors="np")
    ref_model = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    ref, _ = torch_outputs(ref_model, enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    cfg = resolve_config(jtl_config("classification", folder).replace(**{"data.seq_len": 16}))
    for mesh_shape in MESHES:
        h, _, _ = jtl_outputs(cfg, mesh_shape, enc["input_ids"], enc["attention_mask"],
                                 enc["token_type_ids"])
        d = maxdiff(h, ref, enc["attention_mask"])
        print(f"MiniLM last hidden state max abs diff on mesh {mesh_shape}: {d:.3g}")
        assert d < TOL


def _hf_llama_from_gguf(path: Path):
    """transformers' own GGUF import (needs accelerate); else HF Llama from our dequantized
    state dict (then only the model math, not the q/k unpermutation, is checked independently)."""
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval(), "transformers"
    except (ImportError, ValueError) as e:
        if "accelerate" not in str(e):
            raise
    from jtl.convert.hf import torch_llama_from_gguf
    return torch_llama_from_gguf(path), "state dict"


@pytest.mark.skipif(not os.environ.get("JTL_SMOLLM2_GGUF"), reason="set JTL_SMOLLM2_GGUF")
def test_smollm2_gguf_real_weights():
    path = Path(os.environ["JTL_SMOLLM2_GGUF"])
    ref_model, how = _hf_llama_from_gguf(path)
    from jtl.weights import load_hf_tokenizer_dir
    tok = transformers.AutoTokenizer.from_pretrained(load_hf_tokenizer_dir(str(path)))
    texts = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
             "Once upon a time"]
    enc = [tok(t)["input_ids"] for t in texts]
    n = max(len(e) for e in enc)
    ids = np.array([e + [0] * (n - len(e)) for e in enc])
    mask = np.array([[1] * len(e) + [0] * (n - len(e)) for e in enc])
    _, ref = torch_outputs(ref_model, ids, mask)
    cfg = resolve_config(jtl_config("clm", path).replace(**{"data.seq_len": n}))
    _, out, _ = jtl_outputs(cfg, (1, 1, 1), ids, mask)
    d = maxdiff(out, ref, mask)
    same = float((out.argmax(-1) == ref.argmax(-1))[mask.astype(bool)].mean())
    print(f"SmolLM2 GGUF vs {how}: logits max abs diff {d:.3g} (max |logit| {np.abs(ref).max():.1f}), "
          f"argmax agreement {same:.3f}")
    assert d < 1e-3
