"""Index build time for N generated K-Fashion labels: first (parsing) run and cached run, and where the time goes.

    python bench/bench_index.py [--n 100000] [--workers 2] [--dir /tmp/kf_bench] [--images stub|none|full]
                                [--layout split|zips] [--keep] [--json OUT.json] [--before DIR] [--project-workers 16] [--cold]

Labels are real-format synthetic labels (make_synthetic_kfashion). Images default to `stub`: one small flat JPEG of the
right size written for every photo, so pairing works; JPEGs are not decoded while indexing unless verify_images is on,
so their content does not change the timing. The page cache is warm (files were just written), as on a second run.
`--layout zips` writes the release as AI Hub ships it (label and image zips, real archive names) and indexes the zips in
place. `--json` writes the rates, for gpu_benches.sh's projection of a full run.

The first build's CPU time is split into this process's (listing archives' results, pairing, assembling the items,
writing the cache: it does not shrink with more workers) and the worker processes' (parsing labels, listing archives:
divided among the workers). `--project-workers W` projects the first build of the whole release (1,088,781 labels) on
W equally fast cores as main + workers / W, scaled by the label count: an estimate that assumes the workers' part
divides perfectly; the measured wall time on this machine is printed beside it.
After each build the bench times the cyclic garbage collector during a fixed piece of the caller's work (3M small
lists, 1 in 50 kept): the index's millions of objects are walked by whichever collections come next, so that time is
the index's cost too, paid outside `build_index`. A run's whole start-up on existing caches is `bench_startup.py`'s.
`--before DIR` runs the same measurement with the package in DIR (a checkout's package folder, e.g. the previous
release's) on the same generated data, in a subprocess, and prints both side by side.
`--cold` (root on Linux) also times the cached build from a cold page cache (`/proc/sys/vm/drop_caches` first), as the
first run after a reboot, or a dataset on a disk bigger than the memory, finds it: the unzipped tree's labels are then
read from the disk, if they are read at all.
"""
import argparse, gc, json, logging, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

from fashion_json_encoder.config import Config
from fashion_json_encoder.dataset import build_index, scan_dataset
from fashion_json_encoder.synthetic import make_synthetic_kfashion
from benchlib import drop_page_cache

RELEASE_LABELS = 967_806 + 120_975  # Training + Validation (docs/kfashion-format.md)


def gc_after(allocs: int = 3_000_000) -> float:
    "Seconds the cyclic garbage collector spends during the next `allocs` list allocations (1 in 50 kept), as the caller's work."
    spent, start = [0.0], [0.0]
    def clock(phase, info):
        if phase == "start": start[0] = time.perf_counter()
        else: spent[0] += time.perf_counter() - start[0]
    gc.callbacks.append(clock)
    keep = []
    try:
        for i in range(allocs):
            x = [i]
            if i % 50 == 0: keep.append(x)
    finally: gc.callbacks.remove(clock)
    return spent[0]


def measure(root, cache, workers, cold: bool = False):
    "Figures of a first and a cached build of `root` with `workers` processes (and a cached build from a cold page cache)."
    cfg = Config(num_workers=workers)
    zips = []
    t = time.time(); scan = scan_dataset(root, zips); t_scan = time.time() - t
    c0, k0 = time.process_time(), os.times()
    t = time.time(); first = build_index(root, cfg, cache_dir=cache); t_first = time.time() - t
    c1, k1 = time.process_time(), os.times()
    gc_first = gc_after()
    made = [(it.key, it.crop, json.dumps(it.json, sort_keys=True)) for its in first.items.values() for it in its]
    n_items, from_cache, steps = len(made), first.from_cache, getattr(first, "timings", {})
    del first; gc.collect()  # a run holds one index: the cached load's collector time is not spent on this one too
    t = time.time(); again = build_index(root, cfg, cache_dir=cache); t_cached = time.time() - t
    gc_cached = gc_after()
    assert again.from_cache and not from_cache
    t_cold = None
    if cold:
        del again; gc.collect(); drop_page_cache()
        t = time.time(); again = build_index(root, cfg, cache_dir=cache); t_cold = time.time() - t
        assert again.from_cache
    assert made == [(it.key, it.crop, json.dumps(it.json, sort_keys=True)) for its in again.items.values() for it in its]
    return {"first_seconds": t_first, "cached_seconds": t_cached, "cold_seconds": t_cold, "gc_first": gc_first, "gc_cached": gc_cached, "scan_seconds": t_scan, "zips": len(zips),
            "scan_labels": len(scan[0]), "scan_images": len(scan[1]), "items": n_items,
            "main_cpu": c1 - c0, "workers_cpu": (k1.children_user + k1.children_system) - (k0.children_user + k0.children_system),
            "steps": steps, "cache_mib": sum(p.stat().st_size for p in Path(cache).glob("*.json.gz")) / 2**20}


def report(tag, f, n, a):
    print(f"[{tag}] scan only (walk + stat of {f['scan_labels']} labels, {f['scan_images']} images, {f['zips']} zips): {f['scan_seconds']:.2f}s")
    print(f"[{tag}] first build ({a.workers} workers): {f['first_seconds']:.1f}s = {n / f['first_seconds']:.0f} labels/s -> {f['items']} items")
    if f["steps"]: print(f"[{tag}]   steps: " + ", ".join(f"{k} {v:.2f}s" for k, v in f["steps"].items()))
    print(f"[{tag}]   CPU: this process {f['main_cpu']:.1f}s ({f['main_cpu'] / n * 1e6:.0f} us a label), "
          f"workers {f['workers_cpu']:.1f}s ({f['workers_cpu'] / n * 1e6:.0f} us a label)")
    w = a.project_workers
    proj = (f["main_cpu"] + f["workers_cpu"] / w) * RELEASE_LABELS / n
    print(f"[{tag}]   projected first build of the release ({RELEASE_LABELS} labels) on {w} such cores: {proj:.0f}s")
    print(f"[{tag}] cached build: {f['cached_seconds']:.2f}s (cache file {f['cache_mib']:.1f} MiB); "
          f"the release: {f['cached_seconds'] * RELEASE_LABELS / n:.0f}s")
    if f.get("cold_seconds"):
        print(f"[{tag}] cached build from a cold page cache: {f['cold_seconds']:.2f}s; the release: {f['cold_seconds'] * RELEASE_LABELS / n:.0f}s")
    if "gc_first" in f:
        print(f"[{tag}] the garbage collector afterwards, in the caller's next 3M allocations: {f['gc_first']:.2f}s after the first "
              f"build, {f['gc_cached']:.2f}s after the cached one")
    return proj


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="number of photos (label files)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="index-building processes")
    ap.add_argument("--dir", default="/tmp/kf_bench", help="where to generate (reused if it already holds --n labels)")
    ap.add_argument("--images", default="stub", choices=["stub", "none", "full"])
    ap.add_argument("--layout", default="split", choices=["split", "zips"], help="unzipped tree or the release's zips")
    ap.add_argument("--keep", action="store_true", help="keep the generated dataset")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--before", help="also measure the package in this folder (its parent goes first on PYTHONPATH)")
    ap.add_argument("--project-workers", type=int, default=16, help="cores of the machine to project the release's build for")
    ap.add_argument("--cold", action="store_true", help="also time a cached build after dropping the page cache (root, Linux)")
    ap.add_argument("--figures-only", action="store_true", help=argparse.SUPPRESS)  # the --before subprocess: JSON to --json
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    root, cache = Path(a.dir) / "kfashion", Path(a.dir) / "cache"
    t = time.time()
    made = Path(a.dir) / f"made-{a.n}-{a.images}-{a.layout}"
    if not made.exists():
        shutil.rmtree(a.dir, ignore_errors=True)
        make_synthetic_kfashion(root, n_photos=a.n, seed=0, image_mode=a.images, layout=a.layout)
        made.touch()
        print(f"generated {a.n} labels ({a.images} images, {a.layout} layout) in {time.time() - t:.1f}s")
    shutil.rmtree(cache, ignore_errors=True)
    if a.cold: drop_page_cache()   # fails fast without root, before the first build
    f = measure(root, cache, a.workers, a.cold)
    shutil.rmtree(cache, ignore_errors=True)
    if a.figures_only:
        Path(a.json).write_text(json.dumps(f)); return
    proj = report("this", f, a.n, a)
    before = None
    if a.before:
        pkg = Path(a.before).resolve()
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "before.json"
            args = [sys.executable, __file__, "--n", str(a.n), "--workers", str(a.workers), "--dir", a.dir, "--images", a.images,
                    "--layout", a.layout, "--figures-only", "--json", str(out)] + (["--cold"] if a.cold else [])
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg.parent)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
            subprocess.run(args, check=True, env=env, cwd=d)
            before = json.loads(out.read_text())
        proj_b = report("before", before, a.n, a)
        print(f"this / before: first build {before['first_seconds'] / f['first_seconds']:.2f}x faster, this process's CPU "
              f"{before['main_cpu'] / f['main_cpu']:.2f}x less, workers' CPU {before['workers_cpu'] / f['workers_cpu']:.2f}x less, "
              f"projected release build {proj_b:.0f}s -> {proj:.0f}s, cached build {before['cached_seconds'] / f['cached_seconds']:.2f}x faster")
        if a.cold and before.get("cold_seconds"):
            print(f"this / before, cached build from a cold page cache: {before['cold_seconds']:.2f}s -> {f['cold_seconds']:.2f}s "
                  f"({before['cold_seconds'] / f['cold_seconds']:.2f}x); the release: {before['cold_seconds'] * RELEASE_LABELS / a.n:.0f}s -> "
                  f"{f['cold_seconds'] * RELEASE_LABELS / a.n:.0f}s")
        if "gc_first" in before:
            b, t = before["cached_seconds"] + before["gc_cached"], f["cached_seconds"] + f["gc_cached"]
            print(f"this / before, cached build plus the collector's time after it: {b:.2f}s -> {t:.2f}s ({b / t:.2f}x); "
                  f"the release: {b * RELEASE_LABELS / a.n:.0f}s -> {t * RELEASE_LABELS / a.n:.0f}s")
    print(f"SUMMARY n={a.n} layout={a.layout} workers={a.workers} cpus={os.cpu_count()} first={f['first_seconds']:.1f}s "
          f"({a.n / f['first_seconds']:.0f} labels/s) cached={f['cached_seconds']:.2f}s cold={f['cold_seconds'] or 0:.2f}s gc_after_cached={f['gc_cached']:.2f}s items={f['items']} "
          f"main_cpu_us_per_label={f['main_cpu'] / a.n * 1e6:.0f} workers_cpu_us_per_label={f['workers_cpu'] / a.n * 1e6:.0f} "
          f"projected_release_s@{a.project_workers}={proj:.0f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"labels": a.n, "layout": a.layout, "workers": a.workers, "cpus": os.cpu_count(),
                                            "first_seconds": f["first_seconds"], "cached_seconds": f["cached_seconds"],
                                            "labels_per_s": a.n / f["first_seconds"], "items": f["items"],
                                            "main_cpu_s": f["main_cpu"], "workers_cpu_s": f["workers_cpu"],
                                            "projected_release_s": proj, "projected_for_workers": a.project_workers,
                                            "before": before}, indent=1) + "\n")
    if not a.keep: shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__": sys.exit(main())
