"The search index: its IVF index at catalogue scale, the querybank term folded into it, a checksummed round trip."
import zipfile
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from fashion_json_encoder import search_index as search_mod
from fashion_json_encoder.search_index import SearchIndex, fold_gallery, fold_queries
from fashion_json_encoder.evaluation import querybank_bias


def _clustered(n: int, d: int = 512, clusters: int = 60, seed: int = 0, beta: float = 20.) -> tuple:
    "A gallery like real embeddings (unit vectors around shared-direction cluster centres), its querybank term, queries."
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(d, generator=g), dim=0)
    centres = F.normalize(torch.randn(clusters, d, generator=g) / d**.5 + u, dim=1)
    def draw(m, noise): return F.normalize(centres[torch.randint(clusters, (m,), generator=g)] + noise * torch.randn(m, d, generator=g) / d**.5, dim=1)
    x = draw(n, 0.6)
    bias = querybank_bias(x, draw(300, 1.0), beta, torch.rand(300, generator=g) * 3)
    return x, bias, draw(60, 1.0)


def _index(x, bias=None, beta=None) -> search_mod.SearchIndex:
    n = len(x)
    return search_mod.SearchIndex(x.half(), [f"k{i}" for i in range(n)], [f"/img/{i}.jpg" for i in range(n)], [[0, 0, 1, 1]] * n,
                                  [{"i": i} for i in range(n)], "enc", beta=beta, qb_bias=bias)


def _recall(got, want) -> float:
    return sum(len(set(a) & set(b)) for a, b in zip(got.tolist(), want.tolist())) / want.numel()


@pytest.mark.parametrize("normalised", [True, False])
def test_ivf_recall_on_clustered_gallery(normalised):
    "Above the threshold the gallery gets an IVF index; its top 10 (re-scored exactly) agree with exact search."
    x, bias, q = _clustered(6000)
    ix = _index(x, bias, 20.).with_ann(threshold=1000)
    assert ix.ivf is not None and search_mod.IVF_NPROBE < ix.ivf.nlist          # approximate: not every list is visited
    ids, sc, cos = ix.top(q, 10, normalised)
    exact_ids, exact_sc, _ = ix._exact_top(q, 10, normalised)
    assert _recall(ids, exact_ids) >= 0.99
    want_cos = q @ ix.features.float().T
    torch.testing.assert_close(cos, want_cos.gather(1, ids))                     # the returned cosine is the exact one
    torch.testing.assert_close(sc, (20 * want_cos + bias).gather(1, ids) if normalised else cos)
    assert (sc[:, :-1] >= sc[:, 1:]).all()
    assert _index(x[:999], bias[:999], 20.).with_ann(threshold=1000).ann is None  # below the threshold: searched exactly


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(2, 16), beta=st.floats(1., 100.), seed=st.integers(0, 10**6))
def test_folded_bias_equals_querybank_score(n, d, beta, seed):
    "[q, 1]·[x_i, bias_i/β − c] = (β·cos + bias_i)/β − c for the mean c of bias/β, and [q, 0]·[x_i, ...] = cos."
    g = torch.Generator().manual_seed(seed)
    x, q = F.normalize(torch.randn(n, d, generator=g), dim=1), F.normalize(torch.randn(3, d, generator=g), dim=1)
    bias = querybank_bias(x, F.normalize(torch.randn(5, d, generator=g), dim=1), beta)
    c = (bias / beta).mean()
    torch.testing.assert_close(fold_queries(q, True) @ fold_gallery(x, bias, beta).T, (beta * q @ x.T + bias) / beta - c, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(fold_queries(q, False) @ fold_gallery(x, bias, beta).T, q @ x.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fold_gallery(x)[:, -1], torch.zeros(n))          # no calibration: the extra coordinate is 0


def _storage_offset(path: Path, nbytes: int) -> int:
    "Where the data of the zip entry holding `nbytes` bytes starts in the file torch.save wrote."
    with zipfile.ZipFile(path) as z: info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size == nbytes)
    b = path.read_bytes()[info.header_offset:info.header_offset + 30]
    return info.header_offset + 30 + int.from_bytes(b[26:28], "little") + int.from_bytes(b[28:30], "little")


def test_ivf_index_round_trips_with_its_checksum(tmp_path):
    "The IVF index is saved in the index file (uint8 tensor) under its sha256; a flipped byte in it is a checksum mismatch."
    x, bias, q = _clustered(3000, d=64)
    ix = _index(x, bias, 20.).with_ann(threshold=1000)
    p = ix.save(tmp_path / "best_model.index.pt")
    again = SearchIndex.load(p)
    assert again.digest() == ix.digest() and again.ivf.ntotal == 3000
    for a, b in zip(again.top(q, 10), ix.top(q, 10)): assert torch.equal(a, b)
    raw = bytearray(p.read_bytes()); raw[_storage_offset(p, ix.ann.numel()) + ix.ann.numel() // 2] ^= 0x40; p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch"): SearchIndex.load(p)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_gallery_bias_in_row_blocks_equals_the_whole_product(device):
    "The index's querybank term, a block of gallery rows at a time on `device`, equals `querybank_bias` over the whole gallery."
    x, _, q = _clustered(300, d=64)
    g = torch.Generator().manual_seed(1)
    calib = {"bank": q, "bank_logw": torch.rand(len(q), generator=g) * 3, "beta": 20.0}
    want = querybank_bias(x, q, 20.0, calib["bank_logw"])
    got = search_mod.gallery_bias(x, calib, device, rows=7)
    assert got.device.type == "cpu" and got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4 if device == "cuda" else 1e-6, rtol=0)
    assert search_mod.gallery_bias(x[:0], calib, device).shape == (0,)
    once = search_mod.gallery_bias(x, {**calib, "bank_logw": None}, device, rows=64)   # no counts: each bank JSON once
    assert torch.allclose(once, querybank_bias(x, q, 20.0), atol=1e-4 if device == "cuda" else 1e-6, rtol=0)


@pytest.mark.parametrize("per_block,warned", [(400.0, True), (1.0, False)])
def test_a_slow_cpu_querybank_term_is_projected_after_its_first_block(caplog, per_block, warned):
    "On a CPU, a term projected (from its first block's time) past SLOW_QUERYBANK_S is one warning with the time left; a quick one is not."
    x, _, q = _clustered(40, d=16)
    ticks = iter(per_block * i for i in range(100))
    calib = {"bank": q, "bank_logw": None, "beta": 20.0}
    with caplog.at_level("WARNING", logger="fashion_json_encoder.search_index"):
        got = search_mod.gallery_bias(x, calib, "cpu", rows=10, clock=lambda: next(ticks))
    assert torch.allclose(got, querybank_bias(x, q, 20.0), atol=1e-6, rtol=0)
    lines = [r.getMessage() for r in caplog.records if "querybank term" in r.getMessage()]
    if warned:   # the first 10 rows took 400 s: 30 more rows, 20 min
        assert len(lines) == 1 and "about 20 min 00 s more on this CPU" in lines[0] and "40 gallery items against 60" in lines[0]
    else: assert lines == []
