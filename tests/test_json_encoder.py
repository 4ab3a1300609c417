"""Properties of the JSON encoder: 512-d, unit norm, and mean-pooled multi-valued fields, for any JSON-like input."""
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fashion_json_encoder.models.json_encoder import JSONEncoder, encode_json, masked_mean
from fashion_json_encoder.vocab import PAD, UNK, Vocab, collate_json

FIELDS = ["category", "style", "silhouette", "material", "detail"]
MULTI = {"style", "material", "detail"}
KNOWN = {"category": ["블라우스", "스커트", "재킷", "팬츠"], "style": ["로맨틱", "모던", "스트리트", "젠더리스"],
         "silhouette": ["루즈", "노멀", "타이트"], "material": ["우븐", "레이스", "니트", "데님", "시폰"],
         "detail": ["셔링", "프릴", "리본", "포켓", "단추"]}
TRAIN = [{f: (vs[i % len(vs)] if f not in MULTI else vs[i % len(vs):][:2]) for f, vs in KNOWN.items()}
         for i in range(6)] + [{f: vs for f, vs in KNOWN.items() if f in MULTI}]


@pytest.fixture(scope="module")
def vocab():
    return Vocab.build(TRAIN, FIELDS)


@pytest.fixture(scope="module")
def encoder(vocab):
    torch.manual_seed(0)
    return JSONEncoder(vocab.sizes).eval()  # eval: dropout off, so equal inputs give equal outputs


# --- strategies: JSON-like items -----------------------------------------------------------------------------------
def values(field):  # known values, Hangul/emoji/arbitrary unicode text the vocab has never seen, JSON null/numbers
    return st.one_of(st.sampled_from(KNOWN[field]), st.text(max_size=12),
                     st.text(alphabet=st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3), min_size=1, max_size=5),
                     st.none(), st.integers(), st.floats(allow_nan=False))


def field_value(field):  # a scalar or a (possibly empty) list, for any field
    return st.one_of(values(field), st.lists(values(field), max_size=6))


items_st = st.fixed_dictionaries({}, optional={f: field_value(f) for f in FIELDS}
                                 | {"colour": st.text(max_size=5), "비고": st.lists(st.text(max_size=5), max_size=2)})


def id_batches(sizes, max_b=16):
    "Hand-made collated batches {field: (B, L_f) ids} with PAD, UNK and empty rows."
    @st.composite
    def draw(d):
        B = d(st.integers(1, max_b))
        out = {}
        for f, n in sizes.items():
            L = d(st.integers(1, 5))
            out[f] = torch.tensor(d(st.lists(st.lists(st.integers(0, n - 1), min_size=L, max_size=L),
                                             min_size=B, max_size=B)), dtype=torch.long)
        return out
    return draw()


SIZES = {"category": 10, "style": 20, "silhouette": 8, "material": 30, "detail": 40}


def close(a, b): return torch.allclose(a, b, atol=1e-5, rtol=0)


# --- (1) + (2): always 512-d and unit norm ---------------------------------------------------------------------------
def test_user_snippet():
    enc = JSONEncoder(vocab_sizes=SIZES, embedding_dim=128, hidden_dim=256)
    out = enc({f: torch.randint(0, n, (3, 2)) for f, n in SIZES.items()})
    assert out.shape == (3, 512)


@given(items=st.lists(items_st, min_size=1, max_size=12))
def test_raw_items_512_unit_norm(vocab, encoder, items):
    out = encode_json(items, vocab, encoder)
    assert out.shape == (len(items), 512) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.allclose(out.norm(dim=-1), torch.ones(len(items)), atol=1e-5)


@given(batch=id_batches(SIZES), train=st.booleans())
def test_id_batches_512_unit_norm(batch, train):
    torch.manual_seed(0)
    enc = JSONEncoder(SIZES).train(train)  # train mode too: dropout must not break the norm
    out = enc(batch)
    B = next(iter(batch.values())).shape[0]
    assert out.shape == (B, 512) and torch.isfinite(out).all()
    assert torch.allclose(out.norm(dim=-1), torch.ones(B), atol=1e-5)


def test_all_missing_is_finite_and_learned(vocab, encoder):
    out = encode_json([{}, {"category": []}, {"category": "처음 보는 값"}, {"colour": "빨강"}], vocab, encoder)
    assert torch.isfinite(out).all()
    assert close(out[0], out[1]) and close(out[0], out[2]) and close(out[0], out[3])  # missing = empty = unknown
    assert not close(out[0], encode_json([{"category": "블라우스"}], vocab, encoder)[0])


def test_outputs_depend_on_values(vocab, encoder):  # guards against a constant encoder passing the properties
    out = encode_json([{"category": c} for c in KNOWN["category"]], vocab, encoder)
    sims = out @ out.T
    assert (sims - torch.eye(len(out))).max() < 0.999


def test_empty_item_list(vocab, encoder):
    assert encode_json([], vocab, encoder).shape == (0, 512)


def test_encode_json_restores_mode_and_no_grad(vocab):
    enc = JSONEncoder(vocab.sizes).train()
    out = encode_json([{"category": "블라우스"}], vocab, enc)
    assert enc.training and not out.requires_grad


def test_unknown_field_rejected():
    enc = JSONEncoder(SIZES)
    with pytest.raises(AssertionError, match="colour"):
        enc({"category": torch.tensor([[2]]), "colour": torch.tensor([[2]])})


# --- (4): multi-valued fields ----------------------------------------------------------------------------------------
@given(items=st.lists(items_st, min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_value_order_invariant(vocab, encoder, items, seed):
    rnd = random.Random(seed)
    shuffled = [{k: rnd.sample(v, len(v)) if isinstance(v, list) else v for k, v in it.items()} for it in items]
    assert close(encode_json(items, vocab, encoder), encode_json(shuffled, vocab, encoder))


@given(items=st.lists(items_st, min_size=1, max_size=8))
def test_one_element_list_equals_scalar(vocab, encoder, items):
    as_list = [{k: [v] if isinstance(v, str) else v for k, v in it.items()} for it in items]
    as_scalar = [{k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in it.items()} for it in items]
    assert close(encode_json(as_list, vocab, encoder), encode_json(as_scalar, vocab, encoder))


@given(items=st.lists(items_st, min_size=1, max_size=8))
def test_batch_padding_never_changes_result(vocab, encoder, items):
    "An item's embedding is the same alone as in a batch whose longer lists pad it."
    together = encode_json(items, vocab, encoder)
    alone = torch.cat([encode_json([it], vocab, encoder) for it in items])
    assert close(together, alone)


@given(batch=id_batches(SIZES), extra=st.integers(1, 4), field=st.sampled_from(list(SIZES)))
def test_extra_pad_columns_never_change_result(batch, extra, field):
    torch.manual_seed(0)
    enc = JSONEncoder(SIZES).eval()
    ids = batch[field]
    padded = {**batch, field: torch.cat([ids, torch.full((ids.shape[0], extra), PAD)], 1)}
    assert close(enc(batch), enc(padded))


@given(batch=id_batches(SIZES), seed=st.integers(0, 2**16))
def test_id_order_within_rows_invariant(batch, seed):
    torch.manual_seed(0)
    enc = JSONEncoder(SIZES).eval()
    g = torch.Generator().manual_seed(seed)
    perm = {f: torch.gather(ids, 1, torch.rand(ids.shape, generator=g).argsort(1)) for f, ids in batch.items()}
    assert close(enc(batch), enc(perm))


def test_masked_mean_is_a_mean():  # the pooling itself, against a hand computation
    emb = torch.arange(12.).reshape(1, 3, 4)  # (1, 3, 4)
    ids = torch.tensor([[5, PAD, 7]])
    out = masked_mean(emb, ids, torch.full((4,), -1.))
    assert torch.equal(out, (emb[0, 0] + emb[0, 2])[None] / 2)
    assert torch.equal(masked_mean(emb, torch.tensor([[PAD, UNK, PAD]]), torch.full((4,), -1.)), torch.full((1, 4), -1.))


# --- packed ids: every field pooled at once equals the per-field masked mean ------------------------------------------
def _per_field(enc, batch):
    "The per-field definition: for each field its own lookup and `masked_mean` (the encoder's path before packing)."
    B = next(iter(batch.values())).shape[0]
    vecs = []
    for i, f in enumerate(enc.field_names):
        ids = batch.get(f, torch.full((B, 1), PAD))
        ids = ids.unsqueeze(1) if ids.dim() == 1 else ids
        vecs.append(masked_mean(enc.embeddings[f](ids), ids, enc.missing[i]))
    return torch.stack(vecs, 1)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(2, 9), min_size=1, max_size=5), B=st.integers(1, 6), data=st.data())
def test_packed_pooling_equals_the_per_field_masked_mean(sizes, B, data):
    "Any vocab sizes (PAD/UNK-only fields too), list lengths, absent and 1-D fields: same vectors and same gradients."
    names = [f"f{i}" for i in range(len(sizes))]
    torch.manual_seed(data.draw(st.integers(0, 2**16)))
    enc = JSONEncoder(dict(zip(names, sizes)), embedding_dim=4, hidden_dim=8, output_dim=6, dropout_rate=0.0)
    kinds = data.draw(st.lists(st.sampled_from(["absent", "1d", "2d"]), min_size=len(names), max_size=len(names)))
    if all(k == "absent" for k in kinds): kinds[-1] = "2d"   # a batch needs one field to take its size from
    batch = {}
    for f, n, kind in zip(names, sizes, kinds):
        if kind == "absent": continue
        L = data.draw(st.integers(1, 4))
        ids = torch.tensor(data.draw(st.lists(st.integers(0, n - 1), min_size=B * L, max_size=B * L))).view(B, L)
        batch[f] = ids[:, 0] if kind == "1d" else ids
    got, want = enc.field_vectors(batch), _per_field(enc, batch)
    assert torch.allclose(got, want, atol=1e-6)
    w = torch.randn_like(want)
    g1 = torch.autograd.grad((got * w).sum(), list(enc.parameters()), allow_unused=True)
    g2 = torch.autograd.grad((want * w).sum(), list(enc.parameters()), allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6))


def test_packing_keeps_the_checkpoint_format_and_refuses_ids_past_a_field():
    enc = JSONEncoder({"category": 5, "style": 4}, embedding_dim=4, hidden_dim=8)
    assert set(enc.state_dict()) == {"missing", "embeddings.category.weight", "embeddings.style.weight",
                                     "mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias"}   # no new keys: old checkpoints load
    assert torch.equal(enc.pack({"category": torch.tensor([[2], [4]]), "style": torch.tensor([[3, 0], [2, 2]])}),
                       torch.tensor([[2, 8, 5], [4, 7, 7]]))       # style's ids shifted by category's 5 rows
    with pytest.raises(AssertionError, match="field 'category': ids outside 0..4"):
        enc.pack({"category": torch.tensor([[5]])})               # would read style's first row
