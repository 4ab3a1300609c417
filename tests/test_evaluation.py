"Whole-gallery metrics against an independent brute-force reference: duplicates, ties, chunking, querybank normalisation."
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from fashion_json_encoder.evaluation import (canonical_json, gallery_metrics, json_groups, make_hub_case, querybank_bias,
                                             rank_metrics, retrieval_ranks, calibrate)

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "Tiny galleries: on shared cores OpenMP hand-offs cost more than the work (5x here); restored after this module."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

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

def test_querybank_normalisation_fixes_hubs():
    img, txt, bank = make_hub_case(n=300, seed=1)
    raw = gallery_metrics(img, txt, groups=torch.arange(300))
    c = calibrate(img, txt, bank)
    norm = gallery_metrics(img, txt, groups=torch.arange(300), bank=bank, beta=c["beta"])
    assert norm["norm_j2i_mrr"] > raw["j2i_mrr"] + 0.1

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

from fashion_json_encoder.evaluation import strict_ranks, querybank_biases, BETAS

@given(n=st.integers(2, 30), rows=st.integers(1, 31), cols=st.integers(1, 31), seed=st.integers(0, 10_000))
def test_many_scorings_in_one_pass_equal_one_pass_each(n, rows, cols, seed):
    img, txt, groups = embeddings_with_ties(n, 3, seed)
    g = torch.Generator().manual_seed(seed)
    bias = torch.randint(-2, 3, (n,), generator=g).float() / 4            # coarse: ties stay exact ties
    scorings = [("i2j", 1.0, None), ("j2i", 1.0, None), ("j2i", 20.0, bias), ("i2j", 5.0, bias), ("i2j", 3.0, None)]
    got = strict_ranks(img, txt, scorings, tile=(rows, cols))
    for (d, sc, b), r in zip(scorings, got):
        q, gal = (img, txt) if d == "i2j" else (txt, img)
        assert torch.equal(r, retrieval_ranks(q, gal, 7, groups, scale=sc, bias=b)["strict"]), (d, sc, b is None)

def test_calibration_equals_one_pass_per_beta():
    img, txt, bank = make_hub_case(n=200, seed=2)
    prior = torch.log1p(torch.arange(200) % 3).float()
    c = calibrate(img, txt, bank, prior=prior, chunk=64)
    qb = querybank_biases(img, bank, BETAS)
    for b in BETAS:
        want = rank_metrics(retrieval_ranks(txt, img, 50, scale=b, bias=qb[b])["strict"])["mrr"]
        assert c["beta_mrr"][str(b)] == pytest.approx(want, abs=1e-6), b
        assert torch.allclose(qb[b], querybank_bias(img, bank, b), atol=1e-6)
    base = rank_metrics(retrieval_ranks(img, txt, 50)["strict"])["mrr"]
    with_prior = rank_metrics(retrieval_ranks(img, txt, 50, scale=c["beta"], bias=prior)["strict"])["mrr"]
    assert c["prior_gain"] == pytest.approx(with_prior - base, abs=1e-6) and c["use_prior"] == (with_prior > base)

@pytest.mark.parametrize("identical_groups", [True, False])
def test_non_finite_pairs_rank_last_not_first(identical_groups):
    img, txt, groups = embeddings_with_ties(30, 4, 5)
    if not identical_groups: groups = torch.arange(30)             # rows of a group need not be identical: two-pass path
    txt = txt.clone(); txt[:4] = float("nan")                        # a diverged encoder: NaN embeddings for 4 items
    m = gallery_metrics(img, txt, 14.3, chunk=7, groups=groups)
    r = strict_ranks(img, txt, [("i2j", 1.0, None), ("j2i", 20.0, None)], tile=(7, 7))
    assert all(torch.equal(x[:4], torch.full((4,), 30)) for x in r)   # the NaN pairs are last, never hits
    assert m["i2j_top1"] <= 26 / 30 and m["aware_j2i_top1"] <= 26 / 30 and math.isnan(m["loss"])
    nan_all = gallery_metrics(img, torch.full_like(txt, float("nan")), 14.3, groups=groups)
    assert nan_all["top1"] == 0 and nan_all["aware_top1"] == 0 and nan_all["mrr"] == pytest.approx(1 / 30)   # all last

# -- recall@10 and the honest (cross-fit) choice of beta ---------------------------------------------------------------
from fashion_json_encoder.evaluation import crossfit_folds, crossfit_normalised_metrics, half_metrics

@given(n=st.integers(2, 40), seed=st.integers(0, 10_000), chunk=st.integers(1, 41))
def test_recall_at_10_counts_ranks_like_brute_force(n, seed, chunk):
    img, txt, groups = embeddings_with_ties(n, 3, seed)           # coarse grid: many exact ties, duplicated JSONs
    m, ref = gallery_metrics(img, txt, 14.3, chunk=chunk, groups=groups), brute(img, txt, groups)
    for d in ("i2j", "j2i"):
        for var, r in (("", ref[d][0]), ("aware_", ref[d][1])):
            assert m[f"{var}{d}_top10"] == pytest.approx(np.mean(np.asarray(r) <= 10), abs=1e-6), (var, d)
    assert m["top10"] == pytest.approx((m["i2j_top10"] + m["j2i_top10"]) / 2) and m["top10"] >= m["top5"] >= m["top1"]

def _null_case(seed, n=30, d=4, n_bank=5):
    "Images, JSONs and bank drawn independently: no signal, every ranking is at chance."
    g = torch.Generator().manual_seed(seed)
    f = lambda m: F.normalize(torch.randn(m, d, generator=g), dim=1)
    return f(n), f(n), f(n_bank)

WIDE = (-100., -30., -10., -3., 3., 10., 30., 100.)   # betas that rank very differently: a choice among them can overfit

def test_crossfit_is_at_chance_where_in_sample_choice_is_not():
    "No signal: choosing beta on the reported pairs lifts the normalised MRR above chance; the cross-fit does not."
    H = lambda n: sum(1 / k for k in range(1, n + 1))             # E[1/rank] = H(n)/n for a uniform rank in n
    in_sample, crossfit = [], []
    for seed in range(60):
        img, txt, bank = _null_case(seed)
        c = calibrate(img, txt, bank, betas=WIDE)                     # the old rule: choose on the evaluated pairs ...
        old = gallery_metrics(img, txt, groups=torch.arange(30), bank=bank, beta=c["beta"])["norm_j2i_mrr"]  # ... report them
        in_sample.append(old - H(30) / 30)
        m = crossfit_normalised_metrics(img, txt, bank, groups=torch.arange(30), betas=WIDE, seed=seed)
        n0, n1 = m["fold_size"]
        crossfit.append(m["norm_j2i_mrr"] - (n0 * H(n0) / n0 + n1 * H(n1) / n1) / 30)   # chance within the halves
    se = lambda x: np.std(x, ddof=1) / len(x) ** 0.5
    assert np.mean(in_sample) > 4 * se(in_sample), (np.mean(in_sample), se(in_sample))   # the trap is real here
    assert abs(np.mean(crossfit)) < 2.5 * se(crossfit), (np.mean(crossfit), se(crossfit))
    assert np.mean(in_sample) - np.mean(crossfit) > 0.01

def _renumber(g): return torch.unique(g, return_inverse=True)[1]

def _hub_case_with_prior(n, seed):
    img, txt, bank = make_hub_case(n=n, d=8, seed=seed)
    _, txt, groups = embeddings_with_ties(n, 8, seed)                  # duplicated JSON rows -> JSON groups
    txt = F.normalize(txt + 2 * F.normalize(torch.randn(8, generator=torch.Generator().manual_seed(seed)), dim=0), dim=1)
    prior = torch.log1p(groups.float() % 3)                              # a per-JSON log count
    return img, txt, bank, groups, prior

@given(n=st.integers(4, 40), seed=st.integers(0, 10_000), split_seed=st.integers(0, 3))
def test_each_half_is_scored_by_the_other_halfs_choice(n, seed, split_seed):
    "Reference: calibrate each half alone, score the other half alone with gallery_metrics, pool by half size."
    img, txt, bank, groups, prior = _hub_case_with_prior(n, seed)
    m = crossfit_normalised_metrics(img, txt, bank, prior=prior, groups=groups, seed=split_seed, chunk=7)
    folds = crossfit_folds(groups, split_seed)
    idx = [(folds == f).nonzero().flatten() for f in (0, 1)]
    if len(groups.unique()) > 1:                                          # (one JSON only: split by item)
        assert all(len(set(folds[groups == g].tolist())) == 1 for g in groups.unique())   # no JSON straddles the halves
    cal = [calibrate(img[i], txt[i], bank, prior=prior[i]) for i in idx]
    assert m["fold_beta"] == [c["beta"] for c in cal] and m["fold_use_prior"] == [c["use_prior"] for c in cal]
    assert m["fold_size"] == [len(i) for i in idx] and f"beta {cal[1]['beta']:g}" in m["beta_source"]
    per = [gallery_metrics(img[i], txt[i], groups=_renumber(groups[i]), bank=bank, beta=cal[1 - f]["beta"], prior=prior[i],
                           use_prior=cal[1 - f]["use_prior"]) for f, i in enumerate(idx)]
    for k in (k for k in per[0] if k.startswith("norm_")):
        assert m[k] == pytest.approx(sum(len(i) * p[k] for i, p in zip(idx, per)) / n, abs=1e-6), k
        raw = k[len("norm_"):]                                          # half_ = plain cosine on the same halves
        assert m["half_" + raw] == pytest.approx(sum(len(i) * p[raw] for i, p in zip(idx, per)) / n, abs=1e-6), raw

@given(n=st.integers(4, 40), seed=st.integers(0, 10_000), altered=st.sampled_from([0, 1]), data=st.data())
def test_a_halfs_choice_never_looks_at_the_other_half(n, seed, altered, data):
    "Altering or permuting every pair of one half leaves the beta and prior switch chosen on the other half unchanged."
    img, txt, bank, groups, prior = _hub_case_with_prior(n, seed)
    kept = 1 - altered
    a = crossfit_normalised_metrics(img, txt, bank, prior=prior, groups=groups, seed=seed)
    i = (crossfit_folds(groups, seed) == altered).nonzero().flatten()
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    img2, txt2, prior2 = img.clone(), txt.clone(), prior.clone()
    img2[i] = F.normalize(torch.randn(len(i), 8, generator=g), dim=1)   # the altered half: new images, JSON rows, prior
    new_txt = F.normalize(torch.randn(int(groups.max()) + 1, 8, generator=g), dim=1)
    txt2[i] = new_txt[groups[i]]; prior2[i] = torch.rand(len(i), generator=g) * 3
    b = crossfit_normalised_metrics(img2, txt2, bank, prior=prior2, groups=groups, seed=seed)
    for k in ("fold_beta", "fold_use_prior", "fold_prior_gain", "fold_size"): assert a[k][kept] == b[k][kept], k

@given(n=st.integers(4, 30), seed=st.integers(0, 10_000))
def test_crossfit_ignores_item_order(n, seed):
    "Pairs permuted together (JSON ids and prior with them) give the same halves, choices and metrics."
    img, txt, bank, groups, prior = _hub_case_with_prior(n, seed)
    p = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a = crossfit_normalised_metrics(img, txt, bank, prior=prior, groups=groups)
    b = crossfit_normalised_metrics(img[p], txt[p], bank, prior=prior[p], groups=groups[p])
    assert a.keys() == b.keys()
    for k in a: assert b[k] == (a[k] if isinstance(a[k], str) else pytest.approx(a[k], abs=1e-6)), k

def test_half_metrics_keep_looks_together_and_equal_the_crossfits_raw_half():
    img, txt, bank, groups, prior = _hub_case_with_prior(40, 3)
    looks = [f"look{i // 3}" for i in range(40)]                         # three crops per photo
    f = crossfit_folds(looks, seed=2)
    assert all(len(set(f[3 * k:3 * k + 3].tolist())) == 1 for k in range(13))
    m = crossfit_normalised_metrics(img, txt, bank, prior=prior, groups=groups, seed=2, split_by=looks, split="val")
    h = half_metrics(img, txt, groups, seed=2, split_by=looks)
    assert all(m[k] == h[k] for k in h) and "given unit" in m["beta_source"] and "on val" in m["beta_source"]
