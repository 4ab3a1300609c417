"""A run's start-up once its caches exist: what every `train.py` (and, for one split, `evaluate`) does before the first step.

    python bench/bench_startup.py [--n 20000] [--workers 2] [--dir /tmp/kf_startup] [--repeat 3] [--before DIR] [--keep]
                                  [--layout zips|split] [--cold]

Writes (or reuses) `--n` generated photos as the release's zips (small flat JPEGs: decoding is not what this
measures), then runs `prepare_data` once to build the index cache and the feature cache (a tiny open_clip tower,
random weights), and then times `prepare_data` again `--repeat` times, each in a fresh process: the cached
index load, the garbage collector's walks of its objects, the vocabulary, the feature cache's record ids and
chunk reads, and both splits' JSON ids. Also the garbage collector's time, and each step's share.
`--before DIR` runs the same timed calls with the package in DIR (a checkout's package folder, e.g. the previous
release's) on the same data and caches, interleaved with this one's, and prints the ratio. Figures at the
release's size (1,088,781 photos) are the measured ones scaled by the photo count: the work is linear in it.
`--layout split` writes the unzipped tree instead of the zips (its start-up walks and stats every file, and reads the
labels whose digests it does not remember). `--cold` (root on Linux) drops the page cache before each timed run, as
the first run after a reboot finds it: the index, the feature-cache chunks and the dataset's files come from the disk.
"""
import gc, os, sys, time
from pathlib import Path
from benchlib import drop_page_cache, in_fresh_process, release_parser, stub_release

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RELEASE_PHOTOS = 1_088_781


def one_run(root: str, out: str, workers: int) -> dict:
    "Seconds of one cached `prepare_data` in this process, with the collector's share and the item counts."
    import logging
    logging.basicConfig(level=logging.ERROR)
    from fashion_json_encoder.config import Config
    from fashion_json_encoder import prepare
    from fashion_json_encoder.prepare import prepare_data
    build, encoded = prepare.build_feature_cache, []
    def counted(*args, **kw):  # how many crops went through the tower: none in a cached start-up
        c = build(*args, **kw); encoded.append(c.n_computed); return c
    prepare.build_feature_cache = counted
    from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, tiny_clip_config
    tower = CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(), seed=0)
    spent, start = [0.0], [0.0]
    def clock(phase, info):
        if phase == "start": start[0] = time.perf_counter()
        else: spent[0] += time.perf_counter() - start[0]
    gc.collect(); gc.callbacks.append(clock)
    t = time.perf_counter()
    p = prepare_data(Config(num_workers=workers, clip_pretrained="none"), root, out, tower=tower, progress=False)
    secs = time.perf_counter() - t
    gc.callbacks.remove(clock)
    return {"seconds": secs, "gc_seconds": spent[0], "train": len(p.train), "val": len(p.val), "index_cached": p.index.from_cache, "encoded": sum(encoded),
            "built": p.info["timings"].get("cache_build_seconds", 0.0), "index_seconds": p.info["timings"].get("index_seconds", 0.0)}


def main(argv=None):
    ap = release_parser(__doc__, 20_000, "/tmp/kf_startup", 3)
    ap.add_argument("--layout", default="zips", choices=["zips", "split"], help="the release's zips, or the unzipped tree")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each timed run (root, Linux)")
    a = ap.parse_args(argv)
    if a.cold: drop_page_cache()   # fails fast without root
    root, out = stub_release(a.dir, a.n, layout=a.layout), str(Path(a.dir) / "run")
    first = in_fresh_process("bench_startup", "one_run", str(root), out, a.workers)
    print(f"caches ready ({first['train']:,} train / {first['val']:,} val crops; that run encoded {first['encoded']:,} crops in {first['built']:.1f}s)")
    sides = {"this": None} | ({"before": a.before} if a.before else {})
    if a.before: in_fresh_process("bench_startup", "one_run", str(root), out, a.workers, pkg=a.before)  # its own index cache, should its key differ
    runs = {k: [] for k in sides}
    for _ in range(a.repeat):
        for k, pkg in sides.items():
            if a.cold: drop_page_cache()
            r = in_fresh_process("bench_startup", "one_run", str(root), out, a.workers, pkg=pkg)
            if not r["index_cached"] or r["encoded"]:  # e.g. a --before package whose index key differs replaces this one's cache
                sys.exit(f"[{k}] a timed run rebuilt the index or encoded crops: not a cached start-up")
            runs[k].append(r)
    scale = RELEASE_PHOTOS / a.n
    for k, rs in runs.items():
        best = min(rs, key=lambda r: r["seconds"])
        each = ", ".join(f"{r['seconds']:.2f}" for r in rs)
        print(f"[{k}] cached start-up (prepare_data): {best['seconds']:.2f}s (runs: {each}); "
              f"index load {best['index_seconds']:.2f}s; the garbage collector {best['gc_seconds']:.2f}s; "
              f"{a.n / best['seconds']:,.0f} photos/s; the release: {best['seconds'] * scale:.0f}s")
    if a.before:
        t, b = (min(r["seconds"] for r in runs[k]) for k in ("this", "before"))
        print(f"this / before: {b:.2f}s -> {t:.2f}s ({b / t:.2f}x); the release: {b * scale:.0f}s -> {t * scale:.0f}s")
    t = min(r["seconds"] for r in runs["this"])
    print(f"SUMMARY n={a.n} crops={first['train'] + first['val']} startup={t:.2f}s release_projection={t * scale:.0f}s")
    if not a.keep:
        import shutil; shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__": sys.exit(main())
