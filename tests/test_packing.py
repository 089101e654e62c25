"""Packing: documents in one row never see each other; ids are checked against the vocab."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jtl import sharding as S
from jtl.data import lm
from jtl.data.sources import DataError
from jtl.data.tokenizer import train_tokenizer
from jtl.models import Model

from helpers import tiny_cfg


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_no_attention_across_documents(family):
    kind = "mlm" if family == "bert" else "clm"
    cfg = tiny_cfg(kind, **{"model.family": family, "model.kv_heads": 2 if family == "llama" else None})
    mesh = S.make_mesh((1, 1, 1), jax.devices()[:1])
    with S.activate(mesh):
        model = Model(cfg.model, "clm", rngs=nnx.Rngs(0))  # backbone + LM logits on every token
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 128, (1, 16)).astype(np.int32)
    seg = np.array([[1] * 6 + [2] * 7 + [0] * 3], np.int32)
    pos = np.array([list(range(6)) + list(range(7)) + [0] * 3], np.int32)
    batch = {"input_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos)}
    out = model(cfg.model, batch)
    # Change every token of document 2 and the padding: document 1 must not notice, and vice versa.
    ids2 = ids.copy()
    ids2[0, 6:] = rng.integers(5, 128, 10)
    out2 = model(cfg.model, {**batch, "input_ids": jnp.asarray(ids2)})
    np.testing.assert_allclose(out[0, :6], out2[0, :6], atol=1e-6)
    assert np.abs(np.asarray(out[0, 6:13] - out2[0, 6:13])).max() > 1e-3
    # Document 2 alone in its own row (positions from 0) gives the same outputs as packed.
    alone = {"input_ids": jnp.asarray(ids[:, 6:13]), "segment_ids": jnp.ones((1, 7), jnp.int32),
             "positions": jnp.arange(7)[None]}
    np.testing.assert_allclose(model(cfg.model, alone)[0], out[0, 6:13], atol=1e-5)


@pytest.fixture(scope="module")
def wordpiece():
    texts = [f"the movie number {i} was good and fun" for i in range(200)]
    return train_tokenizer(texts, 200, kind="wordpiece")


def test_pack_mlm_rows(wordpiece):
    texts = ["the movie was good", "fun", "the movie number 3 was good and fun " * 5]
    rows = lm.build_lm_rows(texts, ["a:1", "a:2", "a:3"], wordpiece, kind="mlm", seq_len=16, vocab_limit=200)
    seg, pos, ids = rows["segment_ids"], rows["positions"], rows["input_ids"]
    cls, sep = wordpiece.cls_token_id, wordpiece.sep_token_id
    for r in range(len(ids)):
        for s in set(seg[r][seg[r] > 0]):
            where = np.where(seg[r] == s)[0]
            assert (pos[r, where] == np.arange(len(where))).all()  # positions restart per document
            assert ids[r, where[0]] == cls and ids[r, where[-1]] == sep
    assert not rows["mlm_eligible"][ids == cls].any() and not rows["mlm_eligible"][seg == 0].any()
    assert seg[0].max() == 2  # the two short documents share the first row


def test_pack_clm_targets_stay_inside_document():
    bpe = train_tokenizer([f"story {i} ends here" for i in range(100)], 300, kind="bpe")
    rows = lm.build_lm_rows(["story 1 ends here", "story 2"], ["f:1", "f:2"], bpe, kind="clm",
                            seq_len=16, vocab_limit=300)
    seg, tgt, w, ids = rows["segment_ids"], rows["targets"], rows["loss_weights"], rows["input_ids"]
    for s in (1, 2):
        where = np.where(seg[0] == s)[0]
        # each input predicts the next token of the same document; the last predicts EOS
        assert (tgt[0, where[:-1]] == ids[0, where[1:]]).all()
        assert tgt[0, where[-1]] == bpe.eos_token_id
    assert (w[seg == 0] == 0).all() and (w[seg > 0] == 1).all()


def test_token_id_beyond_vocab_is_an_error(wordpiece):
    with pytest.raises(DataError, match=r"corpus.txt:7: token id \d+ >= model.vocab_size=50"):
        lm.build_lm_rows(["the movie number 9 was good"], ["corpus.txt:7"], wordpiece, kind="mlm",
                         seq_len=16, vocab_limit=50)


def test_processes_tokenize_disjoint_stripes_that_together_are_the_whole_text(wordpiece):
    """With P processes each tokenizes texts[p::P] (``lm.tokenize_all`` all-gathers the
    ids); here the gather is done by hand over 3 simulated processes."""
    texts = [f"the movie number {i} was " + "good " * (i % 4) for i in range(10)] + [""]
    seen = []

    def recording(batch, **kw):
        seen.append(list(batch))
        return wordpiece(batch, **kw)

    outs = [lm.tokenize_stripe(recording, texts, p, 3) for p in range(3)]
    assert all(set(a).isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1:])
    assert sorted(t for s in seen for t in s) == sorted(texts)  # each document once
    counts_PN = np.stack([c for c, _ in outs])  # what process_allgather returns
    longest = max(len(f) for _, f in outs)
    flat_PT = np.stack([np.pad(f, (0, longest - len(f))) for _, f in outs])
    got = lm.assemble_stripes(counts_PN, flat_PT, len(texts))
    assert got == wordpiece(texts, add_special_tokens=False)["input_ids"]
