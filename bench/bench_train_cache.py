"""Feature cache vs running the frozen tower every step, and whole-run efficiency (issue 6, section 1).

Usage: python bench/bench_train_cache.py [--photos 1400] [--batch-size 64] [--num-workers 2] [--epochs 20] [--precision fp32]

On one generated K-Fashion dataset (>= 2,000 train crops on disk, 800x1040 JPEGs, real ViT-B/32 architecture with
random init), measured side by side in this run:
  (a) one contrastive epoch the way open_clip's locked-image training runs it: decode + frozen tower on every batch
      (the trainer's --no_cache path);
  (b) one contrastive epoch from the feature cache (the default path; mean of the run's contrastive epochs);
  the one-time cache build, the (a)/(b) ratio and the break-even epoch count;
  the whole-run efficiency: wall time of a complete N-epoch `train_run` (index, cache build, every epoch with
  validation, checkpoints and logs) divided by one pass of the tower alone over the same crops on ready tensors.
Prints the figures and a final summary line; exits 1 if it cannot measure.
"""
import argparse, logging, os, shutil, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

from fashion_json_encoder.config import Config
from fashion_json_encoder.data import CropDataset, collate_crops
from fashion_json_encoder.dataset import build_index
from fashion_json_encoder.synthetic import make_synthetic_kfashion
from fashion_json_encoder.models.image_encoder import make_tower
from fashion_json_encoder.system import train_run
from fashion_json_encoder.paired import make_paired
from fashion_json_encoder.training import Trainer
from fashion_json_encoder.vocab import Vocab


def ready_tensors(items, tower, num_workers):
    "Every crop decoded and preprocessed into one (N, 3, 224, 224) tensor (not timed)."
    dl = torch.utils.data.DataLoader(CropDataset(items, tower.preprocess, tower.image_size), batch_size=64,
                                     num_workers=num_workers, collate_fn=collate_crops)
    return torch.cat([px for px, ok, bad in dl if px is not None])


def tower_pass(tower, pixels, batch_size):
    "Seconds for one pass of the tower alone over ready tensors (after a warm-up batch)."
    tower(pixels[:8])
    t0 = time.perf_counter()
    for i in range(0, len(pixels), batch_size): tower(pixels[i:i + batch_size])
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=1500, help="synthetic photos (about 1.5 target crops each)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=20, help="epochs of the whole run (1 standalone + the rest contrastive)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--min-crops", type=int, default=2000, help="refuse to measure on fewer train crops")
    ap.add_argument("--workdir", help="keep the generated data here (default: a temporary folder)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="fje-bench-"))
    data = work / "kfashion"
    if not data.exists(): make_synthetic_kfashion(data, n_photos=a.photos, seed=0, size=(800, 1040))
    cfg = Config(batch_size=a.batch_size, num_workers=a.num_workers, clip_pretrained="none", clip_precision=a.precision,
                 device="cpu", max_epochs=a.epochs, standalone_epochs=1, save_every=5, learning_rate=1e-3)
    index = build_index(data, cfg)
    train_items, val_items = index.items["train"], index.items["val"]
    if len(train_items) < a.min_crops: print(f"only {len(train_items)} train crops (< {a.min_crops}): raise --photos"); return 1
    vocab = Vocab.build([it.json for it in train_items], list(cfg.fields))
    tower = make_tower(cfg, "cpu")
    print(f"{len(train_items)} train / {len(val_items)} val crops, ViT-B/32 random init, {a.precision}, "
          f"batch {a.batch_size}, {a.num_workers} workers, {torch.get_num_threads()} torch threads")

    # (a) one epoch with the frozen tower on every batch (decode + tower + step)
    val_feats = torch.zeros(len(val_items), 512)  # validation is not part of this timing
    tr = Trainer(cfg, vocab, make_paired(train_items, vocab), make_paired(val_items, vocab, val_feats), work / "a",
                 tower=tower, device="cpu", progress=False)
    tr._new_stage("contrastive", 1)
    t0 = time.perf_counter(); tr._contrastive_epoch(1); tower_epoch = time.perf_counter() - t0
    print(f"(a) tower every step : {tower_epoch:8.1f} s/epoch  ({len(train_items) / tower_epoch:.1f} crops/s)")

    # the whole run: index, cache build, every epoch with validation, checkpoints, TensorBoard, results
    out = work / "run"; shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter(); res = train_run(cfg, data, out, progress=False, tower=tower); run_secs = time.perf_counter() - t0
    build = res["timings"]["cache_build_seconds"]
    con = [h["train_seconds"] for h in res["history"] if h["stage"] == "contrastive"]
    cached_epoch = sum(con) / len(con)
    ratio = tower_epoch / cached_epoch
    print(f"(b) feature cache    : {cached_epoch:8.4f} s/epoch  (mean of {len(con)} contrastive epochs)")
    print(f"    cache build      : {build:8.1f} s for {len(train_items) + len(val_items)} crops (train + val)")
    print(f"    ratio (a)/(b)    : {ratio:8.0f}x   (target >= 500x)")
    print(f"    break-even       : {build / (tower_epoch - cached_epoch):8.2f} epochs")

    # the physical floor: one pass of the tower alone over the same crops on ready tensors
    pixels = ready_tensors(train_items + val_items, tower, a.num_workers)
    floor = tower_pass(tower, pixels, a.batch_size)
    eff = run_secs / floor
    print(f"whole {a.epochs}-epoch run : {run_secs:8.1f} s  (cache build {build:.1f} s, fit {res['timings']['fit_seconds']:.1f} s)")
    print(f"tower alone, 1 pass  : {floor:8.1f} s  ({len(pixels) / floor:.1f} img/s on ready tensors)")
    print(f"    run / tower pass : {eff:8.3f}   (target <= 1.25)")
    print(f"SUMMARY cached epoch {ratio:.0f}x faster than tower-every-step (target >=500x: {'met' if ratio >= 500 else 'MISSED'}); "
          f"break-even {build / (tower_epoch - cached_epoch):.2f} epochs; whole {a.epochs}-epoch run = {eff:.3f} x one tower pass "
          f"(target <=1.25: {'met' if eff <= 1.25 else 'MISSED'})")
    if a.workdir is None: shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__": sys.exit(main())
