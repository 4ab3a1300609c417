"""Scale: whole-gallery evaluation of a 100k-item gallery (time, peak memory, ratio to its matmul floor) and search latency.

Usage: python bench/bench_scale.py [--n 100000] [--queries 200] [--skip-eval] [--device cpu|cuda]

Evaluation: `evaluation.gallery_metrics` on N unit 512-d image/JSON embedding pairs with Zipf-duplicated JSONs (strict
and identical-JSON-aware ranks, both directions, whole-gallery InfoNCE); peak memory is the process's peak RSS growth
during the call (the full N x N similarity matrix would need N*N*4 bytes). The floor is the bare chunked matrix product
the evaluation needs: image @ JSON.T over the same tiles, one product per score (both directions come from one pass),
timed just before and just after the evaluation (the mean of the two is the floor). Search: `search.search` through a trained-size
JSONEncoder over an N-item `SearchIndex` with querybank normalisation, one query at a time; p50/p95 ms per query.
The index build for 100k labels is measured by bench/bench_index.py. Prints the figures and a final summary line.
"""
import argparse, logging, os, resource, sys, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import torch.nn.functional as F

from fashion_json_encoder.data import Item
from fashion_json_encoder.evaluation import _TILE, _tiles, gallery_metrics, json_groups
from fashion_json_encoder.models.json_encoder import JSONEncoder
from fashion_json_encoder.search import search
from fashion_json_encoder.search_index import build_search_index
from fashion_json_encoder.vocab import KFASHION_VALUES, Vocab


def peak_rss_mib() -> float: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_floor(img, txt) -> float:
    "Seconds of the bare tiled products image @ txt.T that one evaluation pass needs (same tiles, preallocated output)."
    n, dev = len(img), img.device
    R, C = (min(x, n) for x in _TILE["cuda" if dev.type == "cuda" else "cpu"])
    buf = torch.empty(R * C, device=dev)
    if dev.type == "cuda": torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for r0, r, c0, c in _tiles(n, None, dev):   # the tiles `gallery_metrics` walks
        torch.mm(img[r0:r0 + r], txt[c0:c0 + c].T, out=buf[:r * c].view(r, c))
    if dev.type == "cuda": torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def embeddings(n, d=512, seed=0):
    "Unit image/JSON pairs; JSON ids Zipf-distributed so that many items share a JSON."
    g = torch.Generator().manual_seed(seed)
    n_json = max(1, n // 4)
    p = 1 / torch.arange(1, n_json + 1).float() ** 1.1
    groups = torch.multinomial(p, n, replacement=True, generator=g)
    bank = F.normalize(torch.randn(n_json, d, generator=g), dim=1)
    txt = bank[groups]
    img = F.normalize(txt + 1.5 * torch.randn(n, d, generator=g) / d ** .5, dim=1)
    return img, txt, groups, bank


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    img, txt, groups, bank = embeddings(a.n)
    lines = []
    if not a.skip_eval:
        dev = torch.device(a.device)
        gi, ti, gr = img.to(dev), txt.to(dev), json_groups(groups.tolist()).to(dev)
        f0 = matmul_floor(gi, ti)
        base = peak_rss_mib()
        t0 = time.perf_counter(); m = gallery_metrics(gi, ti, groups=gr)
        if dev.type == "cuda": torch.cuda.synchronize(dev)
        secs = time.perf_counter() - t0
        peak = peak_rss_mib() - base
        floor = (f0 + matmul_floor(gi, ti)) / 2
        full = a.n * a.n * 4 / 2**30
        print(f"evaluation on {dev.type}, {a.n} items ({m['distinct_jsons']} distinct JSONs): {secs:.1f} s = {secs / floor:.2f} x its matmul floor "
              f"({floor:.1f} s), peak host memory +{peak:.0f} MiB (full similarity matrix would be {full:.1f} GiB); "
              f"strict mrr {m['mrr']:.4f}, aware mrr {m['aware_mrr']:.4f}")
        lines.append(f"eval {a.n}: {secs:.0f} s = {secs / floor:.2f} x floor, +{peak:.0f} MiB")
    # search: a JSONEncoder of the trained size over an N-item index with the querybank term
    vocab = Vocab({"category": KFASHION_VALUES["카테고리"], "style": KFASHION_VALUES["스타일"], "silhouette": KFASHION_VALUES["핏"],
                   "material": KFASHION_VALUES["소재"], "detail": KFASHION_VALUES["디테일"]})
    enc = JSONEncoder(vocab.sizes).eval()
    items = [Item(f"s/{i}/상의", f"/data/{i}.jpg", "상의", (0., 0., 10., 10.), (0, 0, 10, 10), {}, str(i)) for i in range(a.n)]
    t0 = time.perf_counter()
    index = build_search_index(items, img, enc, calibration={"beta": 30.0, "bank": bank[:20000], "bank_logw": None})
    build = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    def pick(f): vs = vocab.fields[f]; return vs[int(torch.randint(len(vs), (1,), generator=g))]
    queries = [{"category": pick("category"), "material": [pick("material")]} if i % 2 else {"style": [pick("style")]}
               for i in range(a.queries)]
    search(index, enc, vocab, queries[0], k=10)  # warm-up
    ms = []
    for q in queries:
        t0 = time.perf_counter(); hits = search(index, enc, vocab, q, k=10); ms.append((time.perf_counter() - t0) * 1000)
    assert len(hits) == 10
    ms = torch.tensor(ms)
    p50, p95 = ms.quantile(0.5).item(), ms.quantile(0.95).item()
    print(f"search, {a.n}-item index (built in {build:.1f} s, querybank-normalised): p50 {p50:.1f} ms, p95 {p95:.1f} ms per query "
          f"over {a.queries} queries")
    lines.append(f"search {a.n}: p50 {p50:.1f} ms, p95 {p95:.1f} ms")
    print("SUMMARY " + "; ".join(lines))
    return 0


if __name__ == "__main__": sys.exit(main())
