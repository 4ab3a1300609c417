"""Host memory of loading a fully built feature cache for training: peak anonymous memory over the features' own size.

    python bench/bench_cache_memory.py [--items 400000] [--before DIR] [--dir /tmp/fje_cache_mem]

The cache holds `--items` crops of one small JPEG (distinct keys and boxes, so distinct record ids) as real chunks of
random unit 512-d fp16 features (the same ones for every package, each under its own cache key), written once. Each measurement runs in a fresh Python process that builds the tower
(tiny open_clip config with a 512-d output: the features are K-Fashion's size, the tower is not what is measured), then
calls the trainer's own `prepare._cached_split` on the items, which reads and verifies every chunk and hands back the
training features. A thread samples `RssAnon` of /proc/self/status every 2 ms; the bench prints the peak over the
level before the call, and the resident file-backed pages at the end, each as a multiple of the features' size.
Runs: `--before DIR` (an older package unpacked there, e.g. `git archive <commit> fashion_json_encoder | tar -x -C DIR`),
this tree with the features in memory, and this tree with the host memory made to look small, so the build maps them.
Linux only (/proc). Every run's features are checked equal to the first's (sha256).
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

CHILD = r"""
import hashlib, json, os, sys, threading, time
from collections import Counter
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
torch.set_num_threads(1)
from fashion_json_encoder.config import Config
from fashion_json_encoder.data import Item
from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, tiny_clip_config
from fashion_json_encoder import prepare
n, jpeg, cache, squeeze = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
def anon():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in f) if k in ("RssAnon", "RssFile")}
items = [Item(f"s/{i}/상의", jpeg, "상의", (0.0, 0.0, 8.0 + i % 50, 8.0 + i // 50 % 50), (0, 0, 8 + i % 50, 8 + i // 50 % 50),
              {"category": "블라우스"}, f"id:{i}") for i in range(n)]
tower = CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(), seed=0)
if squeeze:   # the host looks as if it had just the features' size available: over the budget, so they are mapped
    from fashion_json_encoder.models import feature_cache as fcm
    fcm.host_memory_available = lambda: n * 512 * 2
cfg = Config(clip_pretrained="none", num_workers=0)
base, peak, stop = anon()["RssAnon"], [0], threading.Event()
def sample():
    while not stop.is_set(): peak[0] = max(peak[0], anon()["RssAnon"]); time.sleep(0.002)
th = threading.Thread(target=sample, daemon=True); th.start()
t0 = time.perf_counter()
kept, feats, fc = prepare._cached_split(items, tower, cache, cfg, False, Counter())
secs = time.perf_counter() - t0
stop.set(); th.join()
end = anon()
mapped = feats.untyped_storage().filename is not None
import fashion_json_encoder
print(json.dumps({"package": os.path.dirname(fashion_json_encoder.__file__), "n": len(kept), "computed": fc.n_computed, "peak_anon": max(peak[0], end["RssAnon"]) - base,
                  "end_anon": end["RssAnon"] - base, "end_file": end["RssFile"], "seconds": secs, "mapped": mapped,
                  "sha256": hashlib.sha256(feats.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()}))
"""


PREP = r"""
import sys, torch
from pathlib import Path
from PIL import Image
from fashion_json_encoder.data import Item
from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, tiny_clip_config
from fashion_json_encoder.models.feature_cache import cache_key, cache_path, record_id, write_chunk, _write_manifest
n, jpeg, cache = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
tower = CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(), seed=0)
key = cache_key(tower, 0.1)   # Config's crop_padding
root = cache_path(cache, key)
done = root / f"done-{n}"     # per cache key: each package version reads the folder of its own key
if done.exists(): sys.exit(0)
root.mkdir(parents=True, exist_ok=True); _write_manifest(root, key)
g = torch.Generator().manual_seed(0)
for s in range(0, n, 1024):
    ids = [record_id(Item(f"s/{i}/상의", str(jpeg), "상의", (0.0, 0.0, 8.0 + i % 50, 8.0 + i // 50 % 50),
                          (0, 0, 8 + i % 50, 8 + i // 50 % 50), {"category": "블라우스"}, f"id:{i}")) for i in range(s, min(s + 1024, n))]
    write_chunk(root, ids, torch.nn.functional.normalize(torch.randn(len(ids), 512, generator=g), dim=1), {})
done.touch()
"""


def setup(n: int, folder: Path, packages: list) -> tuple:
    "One JPEG, and for each package a cache (under its own key) holding features of all `n` items: written once, reused."
    from PIL import Image
    jpeg, cache = folder / "photo.jpg", folder / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    if not jpeg.exists(): Image.new("RGB", (64, 64), (120, 30, 200)).save(jpeg)
    for path in packages:
        r = subprocess.run([sys.executable, "-c", PREP, str(n), str(jpeg), str(cache)], capture_output=True, text=True, cwd=folder,
                           env=dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1"))
        if r.returncode: sys.exit(f"bench_cache_memory: writing the cache failed:\n{r.stderr[-3000:]}")
    return jpeg, cache


def run(pythonpath: str, n: int, jpeg: Path, cache: Path, squeeze: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(jpeg), str(cache), "1" if squeeze else "0"],
                         env=env, capture_output=True, text=True, cwd=cache.parent)   # not this tree's cwd: PYTHONPATH decides
    if out.returncode: sys.exit(f"bench_cache_memory: a run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=400_000)
    ap.add_argument("--before", help="folder holding an older fashion_json_encoder package")
    ap.add_argument("--dir", default="/tmp/fje_cache_mem")
    a = ap.parse_args(argv)
    here = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, here)
    t = time.time(); jpeg, cache = setup(a.items, Path(a.dir), [here] + ([a.before] if a.before else []))
    print(f"cache of {a.items:,} crops ready in {time.time() - t:.1f}s")
    size = a.items * 512 * 2
    runs = ([("before", a.before, False)] if a.before else []) + [("after, in memory", here, False), ("after, mapped", here, True)]
    rows, ref = {}, None
    for name, path, squeeze in runs:
        r = rows[name] = run(path, a.items, jpeg, cache, squeeze)
        assert r["n"] == a.items and r["computed"] == 0 and Path(r["package"]).parent == Path(path).resolve(), r
        ref = ref or r["sha256"]
        assert r["sha256"] == ref, f"{name}: features differ from the first run's"
        print(f"{name:17s} peak anon {r['peak_anon'] / 2**20:7.0f} MiB = {r['peak_anon'] / size:4.2f}x the features; at the end "
              f"{r['end_anon'] / 2**20:6.0f} MiB anon ({r['end_anon'] / size:4.2f}x), {r['end_file'] / 2**20:6.0f} MiB file-backed; "
              f"{r['seconds']:.1f}s; mapped: {r['mapped']}")
    after = rows["after, in memory"]
    line = f"SUMMARY items={a.items} features={size / 2**20:.0f}MiB after_peak={after['peak_anon'] / size:.2f}x mapped_peak={rows['after, mapped']['peak_anon'] / size:.2f}x"
    if a.before: line += f" before_peak={rows['before']['peak_anon'] / size:.2f}x before/after={rows['before']['peak_anon'] / after['peak_anon']:.2f}"
    print(line)


if __name__ == "__main__": sys.exit(main())
