"""What several benches share: a generated release in zips, and one bench function run in a fresh interpreter (optionally
with another checkout's package first on the path, for the `--before DIR` comparisons)."""
import argparse, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

BENCH_DIR = str(Path(__file__).resolve().parent)


def stub_release(folder, n: int, workers: int = 0, layout: str = "zips") -> Path:
    "`n` generated photos as the release's zips (or `layout` 'split': the unzipped tree; small flat JPEGs) under `folder`/kfashion, written once and reused."
    folder = Path(folder); root, made = folder / "kfashion", folder / (f"made-{n}" if layout == "zips" else f"made-{n}-{layout}")
    if not made.exists():
        from fashion_json_encoder.synthetic import make_synthetic_kfashion
        shutil.rmtree(folder, ignore_errors=True)
        t = time.time()
        make_synthetic_kfashion(root, n_photos=n, seed=0, image_mode="stub", layout=layout, size=(64, 80), num_workers=workers)
        made.touch(); print(f"generated {n} photos ({'release zips' if layout == 'zips' else 'unzipped tree'}) in {time.time() - t:.1f}s")
    return root


def drop_page_cache():
    "Write dirty pages out and drop the page cache, dentries and inodes (Linux, root): the next reads come from the disk."
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        sys.exit("--cold drops the page cache: it needs root on Linux (/proc/sys/vm/drop_caches is not writable here)")
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f: f.write("3\n")
    except OSError as e: sys.exit(f"--cold cannot drop the page cache here ({e}): a container without CAP_SYS_ADMIN?")


def in_fresh_process(module: str, func: str, *args, pkg: str | None = None):
    "`module.func(*args)` (a bench module, JSON-able result) in a new interpreter, with `pkg`'s parent first on the path when given."
    env = dict(os.environ)
    if pkg: env["PYTHONPATH"] = os.pathsep.join([str(Path(pkg).resolve().parent)] + env.get("PYTHONPATH", "").split(os.pathsep))
    code = (f"import json, sys; sys.path.insert(0, {BENCH_DIR!r}); import {module} as b; "
            f"print(json.dumps(b.{func}({', '.join(map(repr, args))})))")
    with tempfile.TemporaryDirectory() as d:   # not the checkout: its package must not shadow `pkg`
        r = subprocess.run([sys.executable, "-c", code], env=env, cwd=d, capture_output=True, text=True)
    if r.returncode: sys.exit(f"run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def release_parser(doc: str, n: int, folder: str, repeat: int) -> argparse.ArgumentParser:
    "The arguments of a bench over a generated release: its size and folder, workers, runs a side, `--before DIR`, `--keep`."
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--n", type=int, default=n, help="photos to generate")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default=folder)
    ap.add_argument("--repeat", type=int, default=repeat, help="runs of each side, interleaved (the best is reported)")
    ap.add_argument("--before", help="also run the package in this folder (a checkout's package folder), interleaved")
    ap.add_argument("--keep", action="store_true", help="keep the generated data and caches")
    return ap
