"Querybank normalisation: hubs, the choice of beta in one pass, and the honest (cross-fit) normalised numbers."
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from fashion_json_encoder.evaluation import gallery_metrics, querybank_bias, querybank_biases, rank_metrics, retrieval_ranks
from fashion_json_encoder.querybank import (BETAS, calibrate, crossfit_folds, crossfit_normalised_metrics, half_metrics,
                                            make_hub_case, strict_ranks)
from test_evaluation import embeddings_with_ties

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny galleries run on one thread

def test_querybank_normalisation_fixes_hubs():
    img, txt, bank = make_hub_case(n=300, seed=1)
    raw = gallery_metrics(img, txt, groups=torch.arange(300))
    c = calibrate(img, txt, bank)
    norm = gallery_metrics(img, txt, groups=torch.arange(300), bank=bank, beta=c["beta"])
    assert norm["norm_j2i_mrr"] > raw["j2i_mrr"] + 0.1


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

# -- the honest (cross-fit) choice of beta -----------------------------------------------------------------------------

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


@given(n=st.integers(4, 40), seed=st.integers(0, 10_000), split_seed=st.integers(0, 3))
def test_the_cross_fit_takes_the_callers_biases_and_computes_them_once(n, seed, split_seed):
    "An image's querybank bias depends on it and the bank alone: `evaluate` computes them once, for the β choice and both halves."
    from fashion_json_encoder import querybank as qbm
    img, txt, bank, groups, prior = _hub_case_with_prior(n, seed)
    lw = torch.log1p(torch.arange(len(bank)) % 5.0)
    ref = crossfit_normalised_metrics(img, txt, bank, lw, prior=prior, groups=groups, seed=split_seed)
    qb = querybank_biases(img, bank, BETAS, lw)
    assert calibrate(img, txt, bank, lw, prior, biases=qb) == calibrate(img, txt, bank, lw, prior)
    calls, real = [], qbm.querybank_biases
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qbm, "querybank_biases", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
        given_ = crossfit_normalised_metrics(img, txt, bank, lw, prior=prior, groups=groups, seed=split_seed, biases=qb)
        own = crossfit_normalised_metrics(img, txt, bank, lw, prior=prior, groups=groups, seed=split_seed)
    assert calls == [n]   # none with the caller's biases; one pass over all the images without them (not one per half)
    for m in (given_, own):
        assert m["fold_beta"] == ref["fold_beta"] and m["fold_use_prior"] == ref["fold_use_prior"]
        assert all(m[k] == pytest.approx(v, abs=1e-6) for k, v in ref.items() if isinstance(v, float)), m


def test_biases_for_other_images_are_refused():
    img, txt, bank = make_hub_case(n=40, seed=2)
    qb = querybank_biases(img[:30], bank, BETAS)
    with pytest.raises(ValueError, match="biases for \\[30\\] images given with 40 images"):
        crossfit_normalised_metrics(img, txt, bank, groups=torch.arange(40), biases=qb)


@pytest.mark.parametrize("change,kept", [(None, True), ("bank_1e-6", True), ("bank_1e-3", False), ("beta", False),
                                         ("use_prior", False), ("strings", False), ("logw", False), ("damaged", False), ("missing", False)])
def test_a_calibration_recomputed_on_another_device_keeps_its_file(tmp_path, change, kept):
    "The same choices from the same bank up to another device's rounding keep the saved file (and the search index built on it)."
    from fashion_json_encoder.calibration import _calib_digest, _holds_same
    g = torch.Generator().manual_seed(0)
    old = {"bank_strings": ["a", "b", "c"], "bank_logw": torch.rand(3, generator=g), "bank": F.normalize(torch.randn(3, 8, generator=g), dim=1),
           "encoder": "e1", "beta": 20.0, "use_prior": True, "prior_gain": 0.01, "beta_mrr": {"20.0": 0.5}}
    p = tmp_path / "best_model.calibration.pt"
    if change != "missing": torch.save(old | {"sha256": _calib_digest(old)}, p)
    if change == "damaged": p.write_bytes(p.read_bytes()[:-40])
    new = {**old, "prior_gain": 0.0100001, "beta_mrr": {"20.0": 0.5000001}}   # what another device's rounding changes
    if change == "bank_1e-6": new["bank"] = old["bank"] + 1e-6
    if change == "bank_1e-3": new["bank"] = old["bank"] + 1e-3
    if change == "beta": new["beta"] = 30.0
    if change == "use_prior": new["use_prior"] = False
    if change == "strings": new["bank_strings"] = ["a", "b", "d"]
    if change == "logw": new["bank_logw"] = old["bank_logw"] + 1
    assert _holds_same(p, new, _calib_digest(new)) is kept
    if change is None: assert _holds_same(p, old, _calib_digest(old))   # the identical one, by its checksum
