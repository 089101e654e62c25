"""Generation (jtl.generate): the KV cache against a full recompute through the training
forward, batching and left padding, parity with transformers' generate, sampling, EOS and
stop strings, and the ``jtl generate`` command."""
from __future__ import annotations

import json
import sys

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from helpers import tiny_cfg  # noqa: E402

from jtl import cli, sharding as S  # noqa: E402
from jtl.config import ConfigError  # noqa: E402
from jtl.generate import Generator, load  # noqa: E402
from jtl.models import Model  # noqa: E402

V, N = 100, 6
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20], list(range(30, 48))]  # buckets 16 and 32


def tiny(family: str, mesh_shape=(1, 1, 1), **over):
    """A random tiny decoder whose greedy tokens vary (a large init keeps it from just
    repeating its last input token, which would hide cache and position bugs)."""
    # The shapes and constants of ``_hf_model``'s models: the compiled programs are shared.
    o = {"model.family": family, "model.vocab_size": V, "model.max_len": 64, "model.init_std": 0.3,
         "model.tie_embeddings": family == "gpt2", "model.mlp": 48, "model.norm_eps": 1e-5,
         "model.rope_theta": 500.0}
    if family == "gpt2":
        o.update({"model.kv_heads": None, "model.activation": "gelu_tanh", "model.mlp": 128})
    o.update(over)
    cfg = tiny_cfg("clm", **o)
    mesh = S.make_mesh(mesh_shape)
    with S.activate(mesh):
        graphdef, params = nnx.split(Model(cfg.model, "clm", rngs=nnx.Rngs(1)))
    return Generator(cfg, graphdef, params, mesh)


def full_recompute(gen: Generator, prompts, n: int, length: int = 64):
    """Greedy tokens from the training forward (``Model.__call__``, no cache): every step
    recomputes the whole sequence. Rows are right-padded: causal attention keeps the padding
    after a row's last token out of its logits, so each row is computed as if alone."""
    b = len(prompts)
    ids = np.zeros((b, length), np.int32)
    lens = np.array([len(p) for p in prompts])
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = p
    fwd = jax.jit(lambda params, ids, seg: nnx.merge(gen.graphdef, params)(
        gen.m, {"input_ids": ids, "segment_ids": seg}))
    out = [[] for _ in prompts]
    with S.activate(gen.mesh):
        for _ in range(n):
            seg = (np.arange(length)[None] < lens[:, None]).astype(np.int32)
            logits = np.asarray(fwd(gen.params, ids, seg))
            nxt = logits[np.arange(b), lens - 1].argmax(-1)
            for r in range(b):
                out[r].append(int(nxt[r]))
                ids[r, lens[r]] = nxt[r]
            lens += 1
    return out


@pytest.mark.parametrize("family,mesh_shape,over", [
    ("llama", (1, 1, 1), {}),
    ("llama", (2, 2, 2), {"model.scan_layers": True}),
    ("gpt2", (1, 1, 1), {}),
    ("gpt2", (2, 2, 2), {}),
])
def test_cached_greedy_equals_full_recompute(family, mesh_shape, over):
    gen = tiny(family, mesh_shape, **over)
    ref = full_recompute(gen, PROMPTS, N)
    assert len({t for row in ref for t in row}) > len(PROMPTS), f"degenerate test model: {ref}"
    got = gen.generate(PROMPTS, max_new_tokens=N, eos=[])  # one left-padded batch, bucket 32
    assert [c.tokens for c in got] == ref
    assert all(c.finish_reason == "length" for c in got)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_prompts_equal_one_at_a_time(family):
    gen = tiny(family)
    together = gen.generate(PROMPTS, max_new_tokens=N, eos=[])
    alone = [gen.generate([p], max_new_tokens=N, eos=[])[0] for p in PROMPTS]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    if family == "llama":  # batches of two: rows sorted by length into two batches and buckets
        pairs = gen.generate(PROMPTS, max_new_tokens=N, eos=[], batch_size=2)
        assert [c.tokens for c in pairs] == [c.tokens for c in alone]


# ------------------------------------------------------------------ transformers parity


def _tokenizer():
    """A word-level tokenizer over the tiny vocab ("w3" .. ), with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(len(words), V)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant :{% endif %}")
    return fast


def _hf_model(family: str):
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        cfg = T.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                            rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
        model = T.LlamaForCausalLM(cfg)
    else:
        cfg = T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                           eos_token_id=2, pad_token_id=0, attn_implementation="eager")
        model = T.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # larger weights than HF's init: greedy tokens then vary
        for name, p in model.named_parameters():
            norm = p.ndim == 1 and ("norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"))
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.1) + (1.0 if norm and "weight" in name else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    out = {}
    for family in ("llama", "gpt2"):
        model = _hf_model(family)
        folder = tmp_path_factory.mktemp(f"hf-{family}")
        model.save_pretrained(folder, safe_serialization=True)
        _tokenizer().save_pretrained(folder)
        out[family] = (folder, model)
    return out


@pytest.fixture(scope="module")
def llama_gen(hf_folders):
    return load(hf_folders["llama"][0], mesh=(1, 1, 1))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_tokens_equal_transformers_generate(family, hf_folders):
    import torch
    folder, model = hf_folders[family]
    gen = load(folder, mesh=(1, 1, 1))
    assert not list(folder.glob("*.bin")) and list(folder.glob("*.safetensors"))
    got = gen.generate(PROMPTS, max_new_tokens=N, eos=[])
    want = []
    for p in PROMPTS:
        with torch.no_grad():
            seq = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
        want.append(seq[0, len(p):].tolist())
    assert len({t for row in want for t in row}) > len(PROMPTS), f"degenerate test model: {want}"
    assert [c.tokens for c in got] == want


# ------------------------------------------------------------------ sampling, EOS, stop strings


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    gen = tiny("llama")
    greedy = [c.tokens for c in gen.generate(PROMPTS, max_new_tokens=N, eos=[])]
    sample = lambda seed, **kw: [c.tokens for c in gen.generate(
        PROMPTS, max_new_tokens=N, eos=[], temperature=1.0, seed=seed, **kw)]
    a, b, c = sample(0), sample(0), sample(1)
    assert a == b
    assert a != c and a != greedy
    assert sample(3, top_k=1) == greedy
    assert sample(3, top_p=1e-6) == greedy
    assert sample(0, top_k=8, top_p=0.9) != sample(1, top_k=8, top_p=0.9)
    # A row's sample depends on its row id, not on its place in the batch (one key per row).
    flipped = gen.generate(PROMPTS[::-1], max_new_tokens=N, eos=[], temperature=1.0, seed=0, row_ids=[3, 2, 1, 0])
    assert [c.tokens for c in flipped] == a[::-1]
    with pytest.raises(ConfigError, match="top_p"):
        gen.generate(PROMPTS, temperature=1.0, top_p=0.0)


def test_eos_and_stop_strings_end_generation(llama_gen):
    gen, n = llama_gen, 8  # the CLI test's max_new_tokens: the same programs
    prompt = "w10 w11 w12 w13"
    free = gen.generate([prompt], max_new_tokens=n, eos=[])[0]
    toks = free.tokens
    assert len(toks) == n and free.finish_reason == "length"
    # EOS: a token the free run produces at step 3 ends the row right there (included).
    eos = toks[3]
    first = toks.index(eos)
    got = gen.generate([prompt], max_new_tokens=n, eos=[eos])[0]
    assert got.tokens == toks[:first + 1] and got.finish_reason == "eos"
    # A stop string: the text is cut before it, the tokens end with the one that completed it.
    k = 4
    stop = " " + free.text.split()[k]
    cut = free.text.find(stop)
    assert 0 < cut
    for check_every in (1, 4):
        got = gen.generate([prompt], max_new_tokens=n, eos=[], stop=[stop], check_every=check_every)[0]
        assert got.finish_reason == "stop" and got.text == free.text[:cut]
        assert got.tokens == toks[:len(got.tokens)] and len(got.tokens) < n
        assert stop in gen.decode_text(got.tokens) and stop not in gen.decode_text(got.tokens[:-1])
    # Streaming gives the same text, piece by piece.
    pieces = []
    got = gen.generate([prompt], max_new_tokens=n, eos=[], stop=[stop], on_text=lambda i, s: pieces.append(s))[0]
    assert "".join(pieces) == got.text and len(pieces) > 1


# ------------------------------------------------------------------ jtl generate


def test_cli_jsonl_round_trip_and_streaming(llama_gen, hf_folders, tmp_path, capsys):
    folder = hf_folders["llama"][0]
    rows = [{"id": "a", "prompt": "w10 w11 w12"},
            {"id": "b", "prompt": "w40", "extra": [1, 2]},
            {"id": "c", "messages": [{"role": "user", "content": "w20 w21"}]}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = cli.main(["-q", "generate", str(folder), "mesh.data=1", "--input", str(inp), "--output", str(out),
                   "--max-new-tokens", "8"])
    assert rc == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    expect = llama_gen.generate([r.get("messages", r.get("prompt")) for r in rows], max_new_tokens=8)
    assert [{k: v for k, v in w.items() if k != "completion"} for w in written] == rows
    assert [w["completion"] for w in written] == [c.text for c in expect]
    chat_ids = llama_gen.encode(rows[2]["messages"])
    assert llama_gen.tokenizer.decode(chat_ids).startswith("user : w20 w21 assistant")
    capsys.readouterr()
    rc = cli.main(["-q", "generate", str(folder), "mesh.data=1", "--prompt", "w10 w11 w12", "--max-new-tokens", "8"
                   ])
    assert rc == 0
    assert capsys.readouterr().out.strip() == expect[0].text.strip()


def test_cli_bad_row_is_named_and_leaves_no_output(hf_folders, tmp_path, capsys):
    folder = hf_folders["llama"][0]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    for bad, says in (('{"text": "w10"}', '"prompt" is missing'), ("{oops", "not valid JSON"),
                      ('{"messages": [{"role": "user"}]}', '"messages" must be')):
        inp.write_text('{"prompt": "w10 w11"}\n' + bad + "\n")
        rc = cli.main(["-q", "generate", str(folder), "mesh.data=1", "--input", str(inp), "--output", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and f"{inp}:2" in err and says in err, err
        assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]


def test_cli_dtype_bfloat16(hf_folders, tmp_path, capsys):
    import jax.numpy as jnp
    folder = hf_folders["llama"][0]
    gen = load(folder, mesh=(1, 1, 1), overrides=["model.dtype=bfloat16", "model.param_dtype=bfloat16"])
    assert {a.dtype for layer in gen.layers() for a in layer.values()} == {jnp.dtype(jnp.bfloat16)}
    want = gen.generate(["w10 w11 w12"], max_new_tokens=8)[0].text
    rc = cli.main(["-q", "generate", str(folder), "mesh.data=1", "--prompt", "w10 w11 w12", "--max-new-tokens", "8",
                   "--dtype", "bfloat16"])
    assert rc == 0 and capsys.readouterr().out.strip() == want.strip()


def test_decoding_commands_take_back_jtls_training_xla_flag_but_never_the_users(tmp_path):
    """jtl's XLA:CPU flag (YNN dot fusion off) suits the train step but halves batch-8 decoding
    speed; generate / eval-prompted / lm-eval drop it before XLA starts, a user's flags stay."""
    import os
    import subprocess
    flag = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"
    probe = (
        "import os, sys, jtl\n"
        "from jtl import cli\n"
        "before = os.environ['XLA_FLAGS']\n"
        "rc = cli.main(['generate', sys.argv[1], '--prompt', 'hi'])\n"
        "print(repr(before)); print(repr(os.environ['XLA_FLAGS'])); print(rc)\n")
    missing = str(tmp_path / "no-such-model")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JTL_XLA_DEFAULTS")}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    out = subprocess.run([sys.executable, "-c", probe, missing], env=env, capture_output=True, text=True,
                         timeout=120)
    before, after, rc = out.stdout.strip().splitlines()[-3:]
    assert flag in before and flag not in after and "device_count=2" in after, out.stdout + out.stderr
    assert rc == "2"  # the missing model is still reported as usual
    env["XLA_FLAGS"] += " " + flag  # the user's own choice is theirs
    out = subprocess.run([sys.executable, "-c", probe, missing], env=env, capture_output=True, text=True,
                         timeout=120)
    assert flag in out.stdout.strip().splitlines()[-2], out.stdout + out.stderr
    late = ("import os, jax, jtl\njax.devices()\n"  # XLA has started: the flags it read stay as they are
            f"print(jtl.use_xla_defaults_for_decoding(), {flag!r} in os.environ['XLA_FLAGS'])\n")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    out = subprocess.run([sys.executable, "-c", late], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr
