"""Search at catalogue scale: today's exact torch search against the FAISS IVF index `SearchIndex` builds, side by side.

    python bench/bench_search.py [--n 1000000] [--quick] [--queries 300] [--nprobe 8,16,32,64] [--threads 2]

The gallery is synthetic but shaped like real image embeddings: 512-d unit vectors drawn around `--clusters` centres
that share one direction (centre-centre cosine ~0.5, item-centre ~0.85), stored fp16 as `SearchIndex` stores them.
Each item gets the querybank term the real index carries, `querybank_bias` against a bank of 2000 JSON-like vectors
(drawn on the query side of a modality offset) with random log-counts, at β 20. Queries are drawn like the bank, half
of them between two cluster centres (a partial query matches several clusters).

Reported: build time of the IVF index (`SearchIndex.with_ann`), its size and the process RSS; p50/p95 latency of one
query (`SearchIndex.top`, k 10: the IVF search plus the exact re-scoring of its candidates; embedding the JSON query
is not included, it does not depend on N); queries/s in batches of 64; recall@10 of the querybank-normalised (and raw
cosine) ranking against exact search, for each nprobe in `--nprobe` (the row marked * is `IVF_NPROBE`, the default).
The exact baseline is today's code: one (N, D) float32 matrix times the query, the querybank term added, topk.
"""
import argparse, os, resource, sys, time
import numpy as np
import torch
import torch.nn.functional as F

from fashion_json_encoder import search_index as S
from fashion_json_encoder.evaluation import querybank_bias

D, BETA, CHUNK = 512, 20.0, 100_000


def rss_mib() -> tuple:
    "(current, peak) resident memory of this process in MiB."
    cur = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
    return cur, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_gallery(n: int, clusters: int, n_queries: int, seed: int = 0) -> tuple:
    "(N, D) fp16 clustered unit features, (N,) querybank term at BETA, (Q, D) queries."
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(D, generator=g), dim=0)
    centres = F.normalize(torch.randn(clusters, D, generator=g) / D**.5 + u, dim=1)
    shift = 0.4 * F.normalize(torch.randn(D, generator=g), dim=0)      # JSON embeddings sit apart from images (modality gap)
    def draw(m, noise, off=0., mix=1):  # mix: centres summed, as a partial query sits between the clusters it matches
        c = sum(centres[torch.randint(clusters, (m,), generator=g)] for _ in range(mix))
        return F.normalize(F.normalize(c, dim=1) + noise * torch.randn(m, D, generator=g) / D**.5 + off, dim=1)
    bank, logw = draw(2000, 1.0, shift), torch.rand(2000, generator=g) * 5
    x, bias = torch.empty(n, D, dtype=torch.float16), torch.empty(n)
    for s in range(0, n, CHUNK):
        c = draw(min(CHUNK, n - s), 0.6).half()
        x[s:s + len(c)], bias[s:s + len(c)] = c, querybank_bias(c.float(), bank, BETA, logw)
    return x, bias, torch.cat([draw(n_queries - n_queries // 2, 1.0, shift), draw(n_queries // 2, 1.0, shift, mix=2)])[torch.randperm(n_queries, generator=g)]


def pct(ts) -> str: return f"p50 {np.percentile(ts, 50) * 1e3:7.2f} ms  p95 {np.percentile(ts, 95) * 1e3:7.2f} ms"


def timed(f, n) -> list:
    ts = []
    for i in range(n): t = time.perf_counter(); f(i); ts.append(time.perf_counter() - t)
    return ts


def recall(got, want) -> float:
    return sum(len(set(a) & set(b)) for a, b in zip(got.tolist(), want.tolist())) / want.numel()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="gallery items")
    ap.add_argument("--quick", action="store_true", help="a 50k gallery and fewer queries: a minute, not ten")
    ap.add_argument("--clusters", type=int, default=None, help="cluster centres (default N/250, at most 4000)")
    ap.add_argument("--queries", type=int, default=300, help="queries timed one by one and scored for recall")
    ap.add_argument("--exact_queries", type=int, default=20, help="queries timed on the exact torch search")
    ap.add_argument("--nprobe", default="8,16,32,64", help="IVF lists visited per query, comma-separated")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="FAISS (OpenMP) and torch threads")
    a = ap.parse_args(argv)
    if a.quick: a.n, a.queries = min(a.n, 50_000), min(a.queries, 200)
    import faiss
    faiss.omp_set_num_threads(a.threads); torch.set_num_threads(a.threads)
    clusters = a.clusters or max(50, min(4000, a.n // 250))
    print(f"n={a.n} d={D} clusters={clusters} beta={BETA} threads={a.threads} cpus={os.cpu_count()} faiss={faiss.__version__}")

    t = time.perf_counter(); x, bias, q = make_gallery(a.n, clusters, max(a.queries, 64)); t_gen = time.perf_counter() - t
    print(f"generated gallery and querybank term in {t_gen:.1f}s; RSS {rss_mib()[0]:.0f} MiB")
    ix = S.SearchIndex(x, list(range(a.n)), [], [], [], "bench", beta=BETA, qb_bias=bias)

    # today's exact search: the float32 copy of the features is made once, then one matrix-vector product per query
    f32 = x.float()
    def exact_one(i): cos = f32 @ q[i]; (BETA * cos + bias).topk(10)
    def exact_64(): (BETA * (q[:64] @ f32.T) + bias).topk(10, dim=1)
    exact_one(0); exact_64()   # warm, as the IVF rows are (their p95 over many queries): cold pages and allocations out of both
    ts_exact = timed(exact_one, a.exact_queries)
    t = time.perf_counter(); exact_64(); qps_exact = 64 / (time.perf_counter() - t)
    print(f"exact torch (today)   : {pct(ts_exact)}  batch-64 {qps_exact:8.0f} q/s  (float32 copy {f32.numel() * 4 / 2**20:.0f} MiB)")
    del f32
    want = {nm: torch.cat([ix._exact_top(q[s:min(s + 50, a.queries)], 10, nm)[0] for s in range(0, a.queries, 50)])
            for nm in (True, False)}   # the reference rankings, 50 queries at a time

    before = rss_mib()[0]
    t = time.perf_counter(); ix = ix.with_ann(threshold=0); t_build = time.perf_counter() - t
    ivf, cur = ix.ivf, rss_mib()
    print(f"IVF build             : {t_build:.1f}s  ({ivf.nlist} lists, {a.n / t_build:,.0f} items/s)  index {ix.ann.numel() / 2**20:.0f} MiB "
          f"(features fp16 {x.numel() * 2 / 2**20:.0f} MiB)  RSS {before:.0f} -> {cur[0]:.0f} MiB, peak {cur[1]:.0f} MiB")
    rows = []
    for p in map(int, a.nprobe.split(",")):
        S.IVF_NPROBE = p
        ts = timed(lambda i: ix.top(q[i:i + 1], 10), a.queries)
        nb = max(1, a.queries // 64)
        t = time.perf_counter()
        for b in range(nb): ix.top(q[b * 64:(b + 1) * 64], 10)
        qps = nb * 64 / (time.perf_counter() - t)
        r, rr = recall(ix.top(q[:a.queries], 10, True)[0], want[True]), recall(ix.top(q[:a.queries], 10, False)[0], want[False])
        mark = "*" if p == DEFAULT_NPROBE else " "
        print(f"IVF nprobe {p:4d}{mark}      : {pct(ts)}  batch-64 {qps:8.0f} q/s  recall@10 {r:.4f}  (raw cosine {rr:.4f})")
        rows.append((p, np.percentile(ts, 95) * 1e3, qps, r, rr))
    S.IVF_NPROBE = DEFAULT_NPROBE
    p, p95, qps, r, rr = next((row for row in rows if row[0] == DEFAULT_NPROBE), rows[-1])
    e95 = np.percentile(ts_exact, 95) * 1e3
    print(f"SUMMARY n={a.n} build={t_build:.1f}s index={ix.ann.numel() / 2**20:.0f}MiB rss_peak={rss_mib()[1]:.0f}MiB nprobe={p} "
          f"p95={p95:.2f}ms exact_p95={e95:.1f}ms ({e95 / p95:.0f}x) batch64={qps:.0f}q/s exact_batch64={qps_exact:.0f}q/s "
          f"({qps / qps_exact:.0f}x) recall@10={r:.4f} raw_recall@10={rr:.4f}")


DEFAULT_NPROBE = S.IVF_NPROBE

if __name__ == "__main__": sys.exit(main())
