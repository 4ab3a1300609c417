"Vocabulary, normalisation and collate properties."
import json, unicodedata
from collections import Counter

import pytest, torch
from hypothesis import given, strategies as st

from fashion_json_encoder.config import UserError
from fashion_json_encoder.vocab import (ALIASES, KFASHION_VALUES, PAD, UNK, Vocab, collate_json, field_values,
                                        normalise_value)

FIELDS = ["category", "style", "material", "detail"]
_value = st.one_of(st.sampled_from(["블라우스", "팬츠", "로맨틱", "우븐", "노말", "하운즈 투스", "원 숄더", "레이스"]),
                   st.text(min_size=1, max_size=5))
_item = st.dictionaries(st.sampled_from(FIELDS), st.one_of(st.none(), _value, st.lists(_value, max_size=4)), max_size=4)


@given(st.text(max_size=12))
def test_normalise_is_idempotent_nfc_and_trimmed(s):
    n = normalise_value(s)
    assert normalise_value(n) == n and unicodedata.is_normalized("NFC", n) and n == n.strip()


def test_alias_table_maps_to_canonical_values():
    canon = {v for vs in KFASHION_VALUES.values() for v in vs}
    assert all(v in canon for v in ALIASES.values())
    for raw, want in [("노말", "노멀"), ("하운즈 투스", "하운즈투스"), ("홀토넥", "홀터넥"), ("원 숄더", "원숄더"),
                      ("키치/키덜트", "키치"), ("테일러칼라", "테일러드칼라"), ("울 / 캐시미어", "울/캐시미어"),
                      (unicodedata.normalize("NFD", "블라우스"), "블라우스"), ("헤어니트", "헤어 니트")]:
        assert normalise_value(raw) == want, raw


@given(st.lists(_item, max_size=12))
def test_vocab_roundtrip_and_encode(tmp_path_factory, jsons):
    v = Vocab.build(jsons, FIELDS)
    p = v.save(tmp_path_factory.mktemp("v") / "vocab.json")
    w = Vocab.load(p)
    assert w == v and w.sizes == v.sizes == {f: len(v.fields[f]) + 2 for f in FIELDS}
    assert json.loads(p.read_text(encoding="utf-8"))["fields"] == v.fields
    for j in jsons:  # training values are known and decode back
        enc = w.encode(j)
        assert set(enc) == set(FIELDS) and all(UNK not in ids and PAD not in ids for ids in enc.values())
        assert w.decode(enc) == {f: field_values(j, f) for f in FIELDS}
    assert not w.unknown


def test_unknown_values_counted_and_scalar_accepted():
    v = Vocab.build([{"category": "블라우스", "style": ["로맨틱"]}], ["category", "style"])
    assert v.encode({"category": "스커트", "style": "로맨틱"}) == {"category": [UNK], "style": [2]}
    v.encode({"category": ["스커트"]})
    assert v.unknown == Counter({("category", "스커트"): 2})
    assert v.encode({}) == {"category": [], "style": []}


def test_vocab_load_errors(tmp_path):
    (tmp_path / "x.json").write_text("[1]", encoding="utf-8")
    with pytest.raises(UserError, match="not a vocabulary file"): Vocab.load(tmp_path / "x.json")
    with pytest.raises(UserError, match="cannot read"): Vocab.load(tmp_path / "missing.json")


_ids = st.lists(st.integers(2, 50), max_size=5)
@given(st.lists(st.fixed_dictionaries({f: _ids for f in FIELDS}), min_size=1, max_size=8))
def test_collate_pads_multi_and_empty_fields(encoded):
    b = collate_json(encoded, FIELDS)
    for f in FIELDS:
        t = b[f]
        assert t.dtype == torch.long and t.shape == (len(encoded), max(1, *(len(e[f]) for e in encoded)))
        for row, e in zip(t.tolist(), encoded):
            assert row[:len(e[f])] == e[f] and all(x == PAD for x in row[len(e[f]):])


def test_collate_all_empty_gives_one_pad_column():
    b = collate_json([{"style": []}, {}], ["style", "detail"])
    assert b["style"].tolist() == [[PAD], [PAD]] and b["detail"].shape == (2, 1)


# -- a whole split at once: each distinct raw value encoded once -------------------------------------------------
_odd = st.one_of(st.integers(0, 2), st.booleans(), st.sampled_from([1.0, 0.0]), st.none())  # 1 == True == 1.0, all distinct here
_raw = st.one_of(st.none(), _value, _odd, st.lists(st.one_of(_value, _odd), max_size=4), st.tuples(_value, _value),
                 st.lists(st.dictionaries(st.just("k"), _value, max_size=1), max_size=2))  # unhashable
_any_item = st.dictionaries(st.sampled_from(FIELDS), _raw, max_size=4)


@given(st.lists(_item, max_size=10), st.lists(_any_item, max_size=30))
def test_build_and_encode_batch_equal_item_by_item(train, jsons):
    "`Vocab.build` counts and `encode_batch` ids and unknown counts are those of the per-item definitions, whatever the values."
    train = train + jsons[:5]
    counts = {f: Counter(x for j in train for x in field_values(j, f)) for f in FIELDS}
    v = Vocab.build(train, FIELDS)
    assert v.fields == {f: sorted(c, key=lambda x: (-c[x], x)) for f, c in counts.items()}
    one, many = Vocab(v.fields), Vocab(v.fields)
    jsons = jsons + jsons[::-1]  # every raw value at least twice: unseen ones are counted per item
    rows = [one.encode(j) for j in jsons]
    got = many.encode_batch(jsons)
    assert many.unknown == one.unknown
    for f in FIELDS:
        width = max([1] + [len(r[f]) for r in rows])
        assert got[f].dtype == torch.long and got[f].tolist() == [r[f] + [PAD] * (width - len(r[f])) for r in rows]
