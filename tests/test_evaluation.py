"Whole-gallery metrics against an independent brute-force reference: duplicates, ties, chunking, the querybank term."
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from fashion_json_encoder.evaluation import canonical_json, gallery_metrics, json_groups, querybank_bias, retrieval_ranks

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny galleries run on one thread

def brute(img, txt, groups, scale=1.0, bias=None):
    "Reference: full score matrix in numpy float64, ranks by explicit loops."
    img, txt = img.double().numpy(), txt.double().numpy()
    groups = groups.numpy(); n = len(img); out = {}
    for name, q, g in (("i2j", img, txt), ("j2i", txt, img)):
        cos = q @ g.T
        s = scale * cos + (0 if bias is None or name == "i2j" else bias.double().numpy()[None, :])
        strict, aware = [], []
        for i in range(n):
            strict.append(1 + sum(1 for j in range(n) if j != i and s[i, j] >= s[i, i] - 1e-7))
            hits = [j for j in range(n) if groups[j] == groups[i]]
            best = max(s[i, j] for j in hits)
            aware.append(1 + sum(1 for j in range(n) if groups[j] != groups[i] and s[i, j] >= best - 1e-7))
        out[name] = (np.array(strict), np.array(aware))
    cos = img @ txt.T
    off = ~np.eye(n, dtype=bool); diff = groups[:, None] != groups[None, :]
    out["pos"], out["neg"], out["neg_diff"] = np.diag(cos).mean(), cos[off].mean(), cos[diff].mean() if diff.any() else 0.0
    return out

def embeddings_with_ties(n, d, seed, dup=0.3):
    "Embeddings on a coarse grid (many exact ties) with a share of duplicated JSON rows."
    g = torch.Generator().manual_seed(seed)
    txt = torch.randint(-1, 2, (n, d), generator=g).float(); txt[txt.abs().sum(1) == 0, 0] = 1
    groups = torch.arange(n)
    for i in range(1, n):
        if torch.rand(1, generator=g).item() < dup:
            j = int(torch.randint(0, i, (1,), generator=g)); txt[i], groups[i] = txt[j], groups[j]
    img = torch.randint(-1, 2, (n, d), generator=g).float() + txt; img[img.abs().sum(1) == 0, 0] = 1
    return F.normalize(img, dim=1), F.normalize(txt, dim=1), json_groups([str(int(x)) for x in groups])

def rank_stats(r):  # ranks -> (top1, top5, top10, mrr) as numpy
    r = np.asarray(r, dtype=float); return (r <= 1).mean(), (r <= 5).mean(), (r <= 10).mean(), (1 / r).mean()

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_brute_force_with_duplicates_and_ties(seed):
    img, txt, groups = embeddings_with_ties(40, 4, seed)
    m, ref = gallery_metrics(img, txt, 10.0, chunk=7, groups=groups), brute(img, txt, groups)
    for d in ("i2j", "j2i"):
        for var, r in (("", ref[d][0]), ("aware_", ref[d][1])):
            assert [m[f"{var}{d}_{k}"] for k in ("top1", "top5", "top10", "mrr")] == pytest.approx(rank_stats(r), abs=1e-6)
    assert m["distinct_jsons"] == len(set(groups.tolist())) < 40
    assert (m["pos_cosine"], m["neg_cosine"], m["neg_cosine_aware"]) == pytest.approx((ref["pos"], ref["neg"], ref["neg_diff"]), abs=1e-5)
    assert m["cosine_gap"] == pytest.approx(ref["pos"] - ref["neg"], abs=1e-5)
    assert m["aware_mrr"] >= m["mrr"]

def test_strict_tie_counts_against_the_query():
    q = F.normalize(torch.tensor([[1., 0], [0, 1]]), dim=1)
    r = retrieval_ranks(q, q.clone()[[0, 0]] if False else torch.stack([q[0], q[0]]))  # gallery 0 and 1 identical
    assert r["strict"].tolist() == [2, 2] and r["aware"].tolist() == [2, 2]
    r = retrieval_ranks(q, torch.stack([q[0], q[0]]), groups=torch.tensor([0, 0]))
    assert r["aware"].tolist() == [1, 1]

def test_normalised_metrics_match_brute_force():
    img, txt, groups = embeddings_with_ties(30, 5, 3)
    bank = F.normalize(torch.randn(50, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    beta = 20.0
    bias = querybank_bias(img, bank, beta)
    ref_bias = -torch.logsumexp(beta * img.double() @ bank.double().T, 1)
    assert bias.double() == pytest.approx(ref_bias, abs=1e-4)
    m = gallery_metrics(img, txt, 10.0, chunk=4, groups=groups, bank=bank, beta=beta)
    ref = brute(img, txt, groups, scale=beta, bias=ref_bias.float())
    assert m["norm_j2i_mrr"] == pytest.approx(rank_stats(ref["j2i"][0])[3], abs=1e-6)
    assert m["norm_aware_j2i_top1"] == pytest.approx(rank_stats(ref["j2i"][1])[0], abs=1e-6)
    assert m["norm_i2j_mrr"] == pytest.approx(m["i2j_mrr"], abs=1e-6)  # no prior -> image->json unchanged

@given(n=st.integers(2, 30), chunk=st.integers(1, 31), seed=st.integers(0, 10_000))
def test_chunking_does_not_change_any_metric(n, chunk, seed):
    img, txt, groups = embeddings_with_ties(n, 3, seed)
    bank = txt[: max(1, n // 2)]
    a = gallery_metrics(img, txt, 14.3, chunk=chunk, groups=groups, bank=bank, beta=10.0)
    b = gallery_metrics(img, txt, 14.3, chunk=n, groups=groups, bank=bank, beta=10.0)
    assert a.keys() == b.keys()
    for k in a: assert a[k] == pytest.approx(b[k], abs=1e-5), k

def test_info_nce_matches_full_cross_entropy():
    img, txt, groups = embeddings_with_ties(25, 6, 4)
    logits = 14.3 * img @ txt.T; y = torch.arange(25)
    ref = ((F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2).item()
    assert gallery_metrics(img, txt, 14.3, chunk=6, groups=groups)["loss"] == pytest.approx(ref, abs=1e-4)

def test_canonical_json_ignores_order_spacing_and_empties():
    a = canonical_json({"style": ["모던", "로맨틱"], "category": "블라우스", "detail": []})
    assert a == canonical_json({"category": ["블라우스"], "style": ["로맨틱 ", "모던"]})
    assert a != canonical_json({"category": "블라우스"})

from fashion_json_encoder.evaluation import paired_ranks

@given(n=st.integers(2, 40), rows=st.integers(1, 41), cols=st.integers(1, 41), seed=st.integers(0, 10_000),
       scale=st.sampled_from([1.0, 14.3, 60.0]))
def test_one_pass_ranks_equal_two_passes(n, rows, cols, seed, scale):
    img, txt, groups = embeddings_with_ties(n, 3, seed)       # duplicated JSONs have identical JSON rows
    p = paired_ranks(img, txt, groups, lse_scale=scale, tile=(rows, cols))
    for d, q, g in (("i2j", img, txt), ("j2i", txt, img)):
        r = retrieval_ranks(q, g, 5, groups, lse_scale=scale)
        assert torch.equal(p[d]["strict"], r["strict"]) and torch.equal(p[d]["aware"], r["aware"]), d
        assert torch.allclose(p[d]["lse"], r["lse"], atol=1e-4), d

def test_one_pass_declines_groups_with_different_rows():
    img, txt, groups = embeddings_with_ties(30, 4, 7)
    assert paired_ranks(img, txt, groups) is not None
    bad = txt.clone(); j = int((groups == groups[torch.bincount(groups)[groups] > 1][0]).nonzero()[1]); bad[j] = -bad[j]
    assert paired_ranks(img, bad, groups) is None
    a, b = gallery_metrics(img, bad, 14.3, groups=groups), brute(img, bad, groups)   # the two-pass fallback
    assert a["aware_j2i_mrr"] == pytest.approx(rank_stats(b["j2i"][1])[3], abs=1e-6)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_metrics_equal_cpu_metrics():
    g = torch.Generator().manual_seed(0)
    txt = F.normalize(torch.randn(3000, 64, generator=g), dim=1); txt[1500:] = txt[:1500]   # half the JSONs twice
    img = F.normalize(txt + 0.8 * torch.randn(3000, 64, generator=g) / 8, dim=1)
    groups = json_groups([str(i % 1500) for i in range(3000)])
    bank = txt[:500]
    cpu = gallery_metrics(img, txt, 14.3, groups=groups, bank=bank, beta=20.0)
    gpu = gallery_metrics(img.cuda(), txt.cuda(), 14.3, groups=groups.cuda(), bank=bank.cuda(), beta=20.0)
    assert cpu.keys() == gpu.keys()
    for k in cpu: assert gpu[k] == pytest.approx(cpu[k], abs=1e-5), k

# -- recall@10 ---------------------------------------------------------------------------------------------------------

@given(n=st.integers(2, 40), seed=st.integers(0, 10_000), chunk=st.integers(1, 41))
def test_recall_at_10_counts_ranks_like_brute_force(n, seed, chunk):
    img, txt, groups = embeddings_with_ties(n, 3, seed)           # coarse grid: many exact ties, duplicated JSONs
    m, ref = gallery_metrics(img, txt, 14.3, chunk=chunk, groups=groups), brute(img, txt, groups)
    for d in ("i2j", "j2i"):
        for var, r in (("", ref[d][0]), ("aware_", ref[d][1])):
            assert m[f"{var}{d}_top10"] == pytest.approx(np.mean(np.asarray(r) <= 10), abs=1e-6), (var, d)
    assert m["top10"] == pytest.approx((m["i2j_top10"] + m["j2i_top10"]) / 2) and m["top10"] >= m["top5"] >= m["top1"]


def test_canonical_jsons_are_the_per_item_strings():
    "The split-at-once strings are canonical_json's for any values: odd types, unhashable ones, repeats, missing fields."
    from hypothesis import given, settings, strategies as st
    from fashion_json_encoder.evaluation import canonical_jsons
    fields = ["style", "category", "detail"]
    value = st.one_of(st.sampled_from(["모던", "로맨틱 ", "블라우스", "노말", "a\"b", "\\", "\n"]), st.text(max_size=4),
                      st.integers(0, 2), st.booleans(), st.sampled_from([1.0, None]))
    raw = st.one_of(value, st.lists(value, max_size=3), st.lists(st.dictionaries(st.just("k"), value, max_size=1), max_size=1))
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.dictionaries(st.sampled_from(fields + ["other"]), raw, max_size=4), max_size=20))
    def check(jsons):
        jsons = jsons + jsons[::-1]
        assert canonical_jsons(jsons, fields) == [canonical_json(j, fields) for j in jsons]
        assert canonical_jsons(jsons, []) == [canonical_json(j, []) for j in jsons]  # no fields: each item's own keys
    check()


def test_the_querybank_products_show_progress_and_give_the_same_biases(caplog, monkeypatch):
    "evaluate's querybank pass (val x every training JSON: about an hour on a CPU at release size) ran without a sign of life."
    from fashion_json_encoder import progress as progress_mod
    from fashion_json_encoder.evaluation import querybank_biases
    monkeypatch.setattr(progress_mod, "progress_mode", lambda enable=True: "log")   # log lines, also under `pytest -s` in a terminal
    g = torch.Generator().manual_seed(0)
    img, bank = (torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1) for n in (50, 30))
    quiet = querybank_biases(img, bank, [10., 20.], chunk=8)
    with caplog.at_level("INFO", logger="fashion_json_encoder"):
        shown = querybank_biases(img, bank, [10., 20.], chunk=8, show=True)
    assert all(torch.equal(quiet[b], shown[b]) for b in (10., 20.))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("querybank (50 x 30)")]
    assert lines and "done, 7 chunks" in lines[-1], lines
