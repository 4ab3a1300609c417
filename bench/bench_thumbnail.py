"""Time of one gallery thumbnail (`data.item_thumbnail`, the app's search results and the retrieval figures).

    python bench/bench_thumbnail.py --before DIR [--reps 40] [--rounds 5]

Two photo sizes with textured content (so JPEG decoding costs what it does on real photos): K-Fashion's 800x1040 and
a 3000x2000 catalogue shot, each with a garment box of about a third of the photo, 256-px thumbnails. `--before DIR`
holds an older package (`git archive <commit> fashion_json_encoder | tar -x -C DIR`). Each round runs the old and the
new package in fresh processes, alternately; the summary is the median over rounds of ms per thumbnail and their ratio.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
from fashion_json_encoder.data import item_thumbnail
reps, cases = int(sys.argv[1]), json.loads(sys.argv[2])
out = {}
for name, path, box in cases:
    item_thumbnail(path, box, pad=0.1)   # warm: imports, first decode
    t = time.perf_counter()
    for _ in range(reps): im = item_thumbnail(path, box, pad=0.1)
    out[name] = 1000 * (time.perf_counter() - t) / reps
print(json.dumps(out))
"""


def photos(folder: Path) -> list:
    import numpy as np
    from PIL import Image
    rng, cases = np.random.default_rng(0), []
    for name, (w, h) in (("800x1040", (800, 1040)), ("3000x2000", (3000, 2000))):
        small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        noise = rng.normal(0, 12, (h, w, 3))
        img = np.clip(np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=float) + noise, 0, 255).astype(np.uint8)
        p = folder / f"{name}.jpg"; Image.fromarray(img).save(p, quality=90)
        cases.append((name, str(p), [w * 0.3, h * 0.3, w * 0.7, h * 0.75]))
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="folder holding an older fashion_json_encoder package")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    here = str(Path(__file__).resolve().parents[1])
    work = Path(tempfile.mkdtemp(prefix="bench_thumb_"))
    cases = photos(work)
    times = {"before": [], "after": []}
    for _ in range(a.rounds):
        for name, path in (("before", a.before), ("after", here)):
            r = subprocess.run([sys.executable, "-c", CHILD, str(a.reps), json.dumps(cases)], cwd=work, capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=path))
            if r.returncode: sys.exit(f"bench_thumbnail: {name} failed:\n{r.stderr[-2000:]}")
            times[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
    parts = []
    for name, *_ in cases:
        b, n = (statistics.median(t[name] for t in times[k]) for k in ("before", "after"))
        print(f"{name}: before {b:6.1f} ms, after {n:6.1f} ms per 256-px thumbnail = {b / n:.2f}x")
        parts.append(f"{name}={b:.1f}/{n:.1f}ms({b / n:.2f}x)")
    print("SUMMARY " + " ".join(parts) + f" rounds={a.rounds} reps={a.reps}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__": sys.exit(main())
