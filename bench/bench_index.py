"""Index build time for N generated K-Fashion labels: first (parsing) run and cached run.

    python bench/bench_index.py [--n 100000] [--workers 2] [--dir /tmp/kf_bench] [--images stub|none|full]
                                [--layout split|zips] [--keep] [--json OUT.json]

Labels are real-format synthetic labels (make_synthetic_kfashion). Images default to `stub`: one small flat JPEG of the
right size written for every photo, so pairing works; JPEGs are not decoded while indexing unless verify_images is on,
so their content does not change the timing. The page cache is warm (files were just written), as on a second run.
`--layout zips` writes the release as AI Hub ships it (label and image zips, real archive names) and indexes the zips in
place. `--json` writes the rates, for gpu_benches.sh's projection of a full run.
"""
import argparse, json, logging, os, shutil, sys, time
from pathlib import Path

from fashion_json_encoder.config import Config
from fashion_json_encoder.dataset import build_index, scan_dataset
from fashion_json_encoder.synthetic import make_synthetic_kfashion


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="number of photos (label files)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="index-building processes")
    ap.add_argument("--dir", default="/tmp/kf_bench", help="where to generate (reused if it already holds --n labels)")
    ap.add_argument("--images", default="stub", choices=["stub", "none", "full"])
    ap.add_argument("--layout", default="split", choices=["split", "zips"], help="unzipped tree or the release's zips")
    ap.add_argument("--keep", action="store_true", help="keep the generated dataset")
    ap.add_argument("--json", help="write the figures here")
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
    cfg = Config(num_workers=a.workers)
    zips = []
    t = time.time(); scan = scan_dataset(root, zips); t_scan = time.time() - t
    t = time.time(); first = build_index(root, cfg, cache_dir=cache); t_first = time.time() - t
    t = time.time(); again = build_index(root, cfg, cache_dir=cache); t_cached = time.time() - t
    assert again.from_cache and not first.from_cache and again.items == first.items
    n_items = sum(map(len, first.items.values()))
    size = sum(p.stat().st_size for p in cache.glob("*.json.gz")) / 2**20
    print(f"scan only (walk + stat of {len(scan[0])} labels, {len(scan[1])} images, {len(zips)} zips): {t_scan:.2f}s")
    print(f"first build ({a.workers} workers): {t_first:.1f}s = {a.n / t_first:.0f} labels/s -> {n_items} items")
    print(f"cached build: {t_cached:.2f}s (cache file {size:.1f} MiB)")
    print(f"SUMMARY n={a.n} layout={a.layout} workers={a.workers} cpus={os.cpu_count()} first={t_first:.1f}s "
          f"({a.n / t_first:.0f} labels/s) cached={t_cached:.2f}s items={n_items}")
    if a.json:
        Path(a.json).write_text(json.dumps({"labels": a.n, "layout": a.layout, "workers": a.workers, "cpus": os.cpu_count(),
                                            "first_seconds": t_first, "cached_seconds": t_cached, "labels_per_s": a.n / t_first,
                                            "items": n_items}, indent=1) + "\n")
    if not a.keep: shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__": sys.exit(main())
