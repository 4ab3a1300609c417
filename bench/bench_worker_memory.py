"""Host memory of the feature-cache build's DataLoader workers: how much of the main process each one copies.

    python bench/bench_worker_memory.py [--n 100000] [--workers 2] [--dir /tmp/kf_workers] [--before DIR] [--keep]

Each DataLoader worker is a fork of the main process, which holds the dataset index: an `Item`, its JSON dict and
lists per crop, millions of small Python objects at the release's size. A forked page stays shared until it is
written, and merely reading a Python object writes it (its reference count; a full collection of the garbage
collector writes every object's header), so a worker that looks up the items it decodes copies, page by page, the
part of the index they live in. Writes (or reuses) `--n` generated photos as the release's zips (small flat JPEGs:
decoding is not what this measures), builds the index cache once, then, in a fresh process per side, loads the index
and builds the train split's feature cache into a new folder (a tiny open_clip tower with random weights, CPU decode,
`--workers` workers) while a thread samples each worker's private memory (USS: Private_Clean + Private_Dirty of
/proc/PID/smaps_rollup) every 0.5 s, and its private memory in anonymous mappings: Python's small-object arenas, where the index's objects
live (the [heap] and the shared-memory batches are elsewhere). Prints, per side, each worker's private memory (first
sample -> peak) and its anonymous part (first -> last sample), the most that part grew, and that growth scaled to
the release's 1.45M training crops (it grows with the items a worker touches: linearly in the crop count at most),
with the build's seconds (no slowdown is the other half of it).
`--before DIR` runs the same with the package in DIR (a checkout's package folder), interleaved, `--repeat` times.
"""
import os, sys, tempfile, threading, time
from pathlib import Path
from benchlib import in_fresh_process, release_parser, stub_release

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RELEASE_TRAIN_CROPS = 1_450_000


def uss_mib(pid: int) -> float | None:
    "Private memory (MiB) of `pid`: the pages only it holds; None when it is gone."
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(l.split()[1]) for l in f if l.startswith(("Private_Clean:", "Private_Dirty:"))) / 1024
    except (OSError, ValueError, IndexError): return None


def anon_mib(pid: int) -> float | None:
    "Private memory (MiB) of `pid` in anonymous mappings other than [heap]: where Python's small-object arenas (and so the index) live."
    try:
        tot, anon = 0, False
        with open(f"/proc/{pid}/smaps") as f:
            for l in f:
                head = l.split(maxsplit=6)
                if not head[0].endswith(":"): anon = len(head) < 6   # a mapping's first line: no path = anonymous
                elif anon and head[0] in ("Private_Clean:", "Private_Dirty:"): tot += int(head[1])
        return tot / 1024
    except (OSError, ValueError, IndexError): return None


def children(pid: int) -> list:
    "Pids whose parent is `pid`."
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit(): continue
        try:
            with open(f"/proc/{d}/stat") as f: st = f.read()
        except OSError: continue
        if int(st[st.rindex(")") + 2:].split()[1]) == pid: out.append(int(d))
    return out


def one_run(root: str, out: str, workers: int) -> dict:
    "Build the train split's feature cache in a new folder, sampling the workers' private memory."
    import logging
    logging.basicConfig(level=logging.ERROR)
    from fashion_json_encoder.config import Config
    from fashion_json_encoder.dataset import build_index
    from fashion_json_encoder.models.feature_cache import build_feature_cache
    from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, tiny_clip_config
    tower = CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(), seed=0)
    index = build_index(root, Config(num_workers=workers), cache_dir=Path(out) / "index", num_workers=workers, progress=False)
    items = index.items["train"]
    seen, stop = {}, threading.Event()   # worker pid -> {first, peak: USS; anon0, anon: its anonymous mappings, first and last}
    def sample():
        me = os.getpid()
        while not stop.is_set():
            for c in children(me):
                if (m := uss_mib(c)) is None or (a := anon_mib(c)) is None: continue
                s = seen.setdefault(c, {"first": m, "peak": m, "anon0": a, "anon": a})
                s["peak"], s["anon"] = max(s["peak"], m), a
            time.sleep(0.5)
    th = threading.Thread(target=sample, daemon=True); th.start()
    with tempfile.TemporaryDirectory(dir=out) as d:
        t = time.perf_counter()
        c = build_feature_cache(items, tower, d, num_workers=workers, progress=False, decode="cpu")
        secs = time.perf_counter() - t
    stop.set(); th.join()
    return {"crops": len(items), "encoded": c.n_computed, "seconds": secs,
            "workers": list(seen.values())}


def main(argv=None):
    a = release_parser(__doc__, 100_000, "/tmp/kf_workers", 1).parse_args(argv)
    if not Path("/proc/self/smaps_rollup").exists(): sys.exit("needs Linux's /proc/PID/smaps_rollup")
    root, out = stub_release(a.dir, a.n, a.workers), Path(a.dir) / "run"
    out.mkdir(parents=True, exist_ok=True)
    sides = {"this": None} | ({"before": a.before} if a.before else {})
    runs = {k: [] for k in sides}
    for _ in range(a.repeat):
        for k, pkg in sides.items():
            r = in_fresh_process("bench_worker_memory", "one_run", str(root), str(out), a.workers, pkg=pkg)
            if not r["workers"]: sys.exit(f"[{k}] no worker was sampled")
            runs[k].append(r)
    growth = {}
    for k, rs in runs.items():
        for r in rs:
            ws = r["workers"]
            g = max(w["anon"] - w["anon0"] for w in ws)
            growth.setdefault(k, []).append(g)
            print(f"[{k}] {r['encoded']:,} crops in {r['seconds']:.1f}s ({r['encoded'] / r['seconds']:,.0f}/s), {len(ws)} workers; "
                  f"private memory per worker, first sample -> peak: " + ", ".join(f"{w['first']:.0f} -> {w['peak']:.0f}" for w in ws) +
                  " MiB; of it in anonymous mappings, first -> last: " + ", ".join(f"{w['anon0']:.0f} -> {w['anon']:.0f}" for w in ws) +
                  f" MiB; the most that grew: {g:.0f} MiB = {g * RELEASE_TRAIN_CROPS / r['crops'] / 1024:.2f} GiB at the release's "
                  f"{RELEASE_TRAIN_CROPS:,} training crops (scaled by the crop count)")
    if a.before:
        b, t = min(growth["before"]), min(growth["this"])
        print(f"a worker's anonymous memory growth, before / this: {b:.0f} / {t:.0f} MiB")
    t = min(growth["this"])
    print(f"SUMMARY n={a.n} crops={runs['this'][0]['crops']} worker_growth_mib={t:.0f} "
          f"release_per_worker_gib={t * RELEASE_TRAIN_CROPS / runs['this'][0]['crops'] / 1024:.2f}")
    if not a.keep:
        import shutil; shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__": sys.exit(main())
