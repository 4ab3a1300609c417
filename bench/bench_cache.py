"""Benchmark the CLIP feature-cache build (real ViT-B/32 architecture, random init) on synthetic K-Fashion crops.

Usage: python bench/bench_cache.py [--crops 1024] [--batch-size 64] [--num-workers 2] [--photo-size 800x1040] [--device cpu]
Prints: decode-only rate, tower-alone rate on ready tensors, cache-build rate, fp32 and bf16, and a summary line.
Exits 1 if it cannot measure. Random weights run exactly as fast as OpenAI's (same architecture, same FLOPs).
"""
import argparse, logging, os, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from torch.utils.data import DataLoader


def rate(n, secs): return n / secs if secs > 0 else float("nan")


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize(device)


def tower_alone(tower, pixels, batch_size):
    "Seconds for the tower alone on ready (N, 3, 224, 224) tensors already on its device, after a warm-up batch."
    pixels = pixels.to(tower.device)
    tower(pixels[:8 if tower.device.type == "cpu" else batch_size]); sync(tower.device)
    t0 = time.perf_counter()
    for i in range(0, len(pixels), batch_size): tower(pixels[i:i + batch_size])
    sync(tower.device)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crops", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--photo-size", default="800x1040", help="WxH of the synthetic photos (K-Fashion: ~800 wide)")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from fashion_json_encoder.config import Config
    from fashion_json_encoder.synthetic import make_synthetic_kfashion
    from fashion_json_encoder.dataset import build_index
    from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, check_bf16_agreement
    from fashion_json_encoder.models.feature_cache import build_feature_cache
    from fashion_json_encoder.data import CropDataset, collate_crops

    W, H = map(int, a.photo_size.lower().split("x"))
    gpu = torch.cuda.get_device_name() if a.device != "cpu" and torch.cuda.is_available() else "no GPU used"
    print(f"machine: {os.cpu_count()} CPUs visible, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"device {a.device} ({gpu}); cores may be shared with other jobs, so CPU figures are noisy")
    work = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    t0 = time.perf_counter()
    make_synthetic_kfashion(work / "ds", n_photos=max(8, a.crops * 3 // 4 + 8), seed=0, size=(W, H))
    index = build_index(work / "ds", Config(num_workers=1))
    items = (index.items["train"] + index.items.get("val", []))[: a.crops]
    if len(items) < a.crops: print(f"only {len(items)} crops generated (asked {a.crops})", file=sys.stderr)
    if not items: print("no crops to measure", file=sys.stderr); return 1
    print(f"data: {len(items)} crops of {W}x{H} synthetic JPEGs in {time.perf_counter() - t0:.1f}s")

    towers = {p: CLIPImageEncoder("ViT-B-32", pretrained="none", precision=p, seed=0, device=a.device)
              for p in a.precisions.split(",")}
    any_tower = next(iter(towers.values()))

    # decode + crop + transform alone (the DataLoader half of the pipeline)
    ds = CropDataset(items, any_tower.preprocess, min_side=any_tower.image_size)
    t0 = time.perf_counter()
    chunks = [px for px, ok, bad in DataLoader(ds, batch_size=a.batch_size, num_workers=a.num_workers, collate_fn=collate_crops)]
    t_dec = time.perf_counter() - t0
    pixels = torch.cat(chunks)  # (N, 3, 224, 224)
    print(f"decode+crop+transform only ({a.num_workers} workers): {rate(len(pixels), t_dec):7.1f} img/s")

    res = {}
    for p, tower in towers.items():
        t_tower = tower_alone(tower, pixels, a.batch_size)
        fc = build_feature_cache(items, tower, work / "cache", batch_size=a.batch_size, num_workers=a.num_workers, progress=False)
        if fc.n_computed != len(items) or len(fc) != len(pixels): print(f"{p}: cache build incomplete", file=sys.stderr); return 1
        res[p] = (rate(len(pixels), t_tower), fc.images_per_s)
        print(f"{p}: tower alone on ready tensors {res[p][0]:7.1f} img/s | cache build {res[p][1]:7.1f} img/s "
              f"({fc.build_seconds:.1f}s for {fc.n_computed} crops{', incl. the fp32 agreement check' if p != 'fp32' else ''}) "
              f"| build/tower {res[p][1] / res[p][0]:.2f}")
        t0 = time.perf_counter(); hit = build_feature_cache(items, tower, work / "cache", progress=False)
        print(f"{p}: second build (all cached) {time.perf_counter() - t0:.2f}s, {hit.n_computed} crops encoded")
    if "fp32" in towers and "bf16" in towers:
        cos = check_bf16_agreement(towers["fp32"], towers["bf16"], pixels[:64].to(towers["fp32"].device))
        print(f"bf16 vs fp32: min cosine {cos:.5f} on {min(64, len(pixels))} crops; speed-up tower {res['bf16'][0] / res['fp32'][0]:.2f}x, "
              f"cache build {res['bf16'][1] / res['fp32'][1]:.2f}x")
    print("SUMMARY " + " ".join(f"{p}: tower={t:.1f} build={b:.1f} img/s;" for p, (t, b) in res.items())
          + f" decode={rate(len(pixels), t_dec):.1f} img/s; crops={len(pixels)} batch={a.batch_size} workers={a.num_workers}"
          + f" device={a.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
