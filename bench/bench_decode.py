"""Benchmark the feature-cache input pipeline of issue 10: unzipped tree vs release zips, per-crop vs per-photo decode, CPU vs GPU decode.

Usage: python bench/bench_decode.py [--photos 2000] [--device cpu|cuda|auto] [--num-workers N] [--batch-size 256]
                                    [--precision auto|fp32|bf16] [--cpu-shares 0.25,0.4] [--gpu-path-on-cpu] [--out-json F]
Generates K-Fashion-sized synthetic photos (800 x 1040, 1-3 target garments each) once as the unzipped tree and once as
the release zips (same bytes), then measures in one run: the tower alone on ready tensors, and full cache builds
(index -> crops -> tower -> fp16 chunks on disk) for each input path. Random-init ViT-B/32 (same FLOPs as OpenAI's),
no network. Prints crops/s, the ratio to the tower-alone rate and a projection for the full release (1.63 M crops).
With GPU decode, `--cpu-shares` adds zip builds where that share of the photos is decoded by the CPU workers alongside
the GPU (config `decode_cpu_share`). `--gpu-path-on-cpu` runs the GPU-decode builds with the tower on the CPU
(torchvision's CPU decoder stands in for nvJPEG): it checks this script and the path's logic, it measures no GPU.
"""
import argparse, json, logging, os, shutil, sys, tempfile, time, zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import torch.nn.functional as F

RELEASE_CROPS = 1_630_000


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize(device)


def zip_tree(src: Path, dst: Path):
    "The release zips of an `unzipped`-layout tree: <split>/<part>/<style>/<file> -> <split>/<part>.zip::<style>/<file>."
    for part in sorted(p for p in src.glob("*/*") if p.is_dir()):
        out = dst / part.parent.name / f"{part.name}.zip"; out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(out, "w") as z:
            for f in sorted(part.rglob("*.*")):
                z.write(f, f.relative_to(part).as_posix(), zipfile.ZIP_DEFLATED, 1 if f.suffix == ".jpg" else 6)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=2000)
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--num-workers", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16")
    ap.add_argument("--cpu-shares", default="0.25,0.4", help="GPU decode: shares of the photos the CPU workers decode alongside")
    ap.add_argument("--gpu-path-on-cpu", action="store_true", help="run the GPU-decode builds on the CPU device (a check, not a measurement)")
    ap.add_argument("--out-json", help="also write the results here")
    ap.add_argument("--keep", help="generate into (or reuse) this folder instead of a temporary one")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from fashion_json_encoder.config import Config, resolve_device
    from fashion_json_encoder.dataset import build_index
    from fashion_json_encoder.decode import decode_crops
    from fashion_json_encoder.models import feature_cache as fcm
    from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, check_precision
    from fashion_json_encoder.synthetic import make_synthetic_kfashion

    dev = resolve_device(a.device)
    prec = a.precision if a.precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "no GPU"
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), device {dev} ({gpu}), "
          f"tower ViT-B/32 {prec}, {a.num_workers} workers, batch {a.batch_size}")
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench_decode_"))
    tree, zips = work / "unzipped", work / "zips"
    t0 = time.perf_counter()
    if not (tree / "Training").is_dir():
        make_synthetic_kfashion(tree, n_photos=a.photos, seed=0, layout="unzipped", size=(800, 1040), num_workers=max(1, os.cpu_count() or 1))
    t_gen = time.perf_counter() - t0
    if not (zips / "Training").is_dir(): zip_tree(tree, zips)
    t_zip = time.perf_counter() - t0 - t_gen
    cfg = Config(num_workers=a.num_workers)
    t0 = time.perf_counter(); it_tree = build_index(tree, cfg); t_it = time.perf_counter() - t0
    t0 = time.perf_counter(); it_zip = build_index(zips, cfg); t_iz = time.perf_counter() - t0
    items = {"tree": it_tree.items["train"] + it_tree.items["val"], "zips": it_zip.items["train"] + it_zip.items["val"]}
    n, photos = len(items["tree"]), len({it.image_path for it in items["tree"]})
    assert n == len(items["zips"]) and it_tree.records == it_zip.records, "the two forms index differently"
    size_gb = sum(f.stat().st_size for f in zips.rglob("*.zip")) / 1e9
    print(f"data: {photos} photos 800x1040, {n} crops ({n / photos:.2f}/photo), generated in {t_gen:.1f}s, zipped in {t_zip:.1f}s "
          f"({size_gb:.2f} GB); index tree {t_it:.1f}s, zips {t_iz:.1f}s")

    tower = CLIPImageEncoder("ViT-B-32", pretrained="none", precision=prec, seed=0, device=str(dev))
    # tower alone on ready tensors already on the device (crops of the first photos, repeated to the build's size)
    k = min(n, 256)
    by = {}
    for it in items["tree"][:k]: by.setdefault(it.image_path, []).append(it.crop)
    ready = torch.cat([torch.stack([tower.preprocess(im) for im in decode_crops(Path(p).read_bytes(), cs, tower.image_size)[0]])
                       for p, cs in by.items()])
    ready = ready.repeat((n + len(ready) - 1) // len(ready), 1, 1, 1)[:n].to(dev)
    if prec != "fp32": check_precision(tower, ready[:16])
    tower(ready[:a.batch_size]); sync(dev)
    t0 = time.perf_counter()
    for i in range(0, n, a.batch_size): tower(ready[i:i + a.batch_size])
    sync(dev); tower_rate = n / (time.perf_counter() - t0)
    print(f"tower alone on ready tensors: {tower_rate:8.1f} crops/s -> {RELEASE_CROPS / tower_rate / 60:6.1f} min for 1.63 M crops")
    real_check = fcm.check_precision
    fcm.check_precision = lambda t, x: 1.0  # checked once above; not part of each build's time

    runs = [("tree", "per-crop", "cpu", 0), ("tree", "per-photo", "cpu", 0), ("zips", "per-crop", "cpu", 0), ("zips", "per-photo", "cpu", 0)]
    shares = [float(x) for x in a.cpu_shares.split(",") if x.strip() and float(x) > 0]
    gpu_path = dev.type == "cuda" or a.gpu_path_on_cpu
    if gpu_path:
        runs += [("tree", "per-photo", "gpu", 0), ("zips", "per-photo", "gpu", 0)] + [("zips", "per-photo", "gpu", x) for x in shares]
    if a.gpu_path_on_cpu and dev.type != "cuda": fcm.resolve_decode = lambda d, *_a, **_k: d if d != "auto" else "cpu"
    res, feats = {}, {}
    for src, mode, dec, share in runs:
        cache = work / f"cache-{src}-{mode}-{dec}-{share}"; shutil.rmtree(cache, ignore_errors=True)
        sync(dev)
        fc = fcm.build_feature_cache(items[src], tower, cache, batch_size=a.batch_size, num_workers=a.num_workers, progress=False,
                                     decode=dec, per_photo=mode == "per-photo", cpu_share=share)
        sync(dev)
        rate = fc.n_computed / fc.build_seconds
        name = f"{src:<5} {mode:<9} {dec}" + (f" cpu share {share:g}" if share else "")
        res[name] = {"crops_per_s": rate, "seconds": fc.build_seconds, "ratio_to_tower": rate / tower_rate,
                     "release_minutes": RELEASE_CROPS / rate / 60, "skipped": len(fc.skipped), **fc.decode_stats}
        feats[(src, mode, dec, share)] = dict(zip(fc.keys, fc.features.float()))
        print(f"build {name}: {rate:8.1f} crops/s ({fc.build_seconds:5.1f}s) | x{rate / tower_rate:.2f} of tower alone | "
              f"1.63 M crops in {RELEASE_CROPS / rate / 60:6.1f} min | decodes/photo {fc.decode_stats.get('decodes', 0) / max(1, fc.decode_stats.get('photos', 1)):.2f}"
              + (f" | GPU-decoded {fc.decode_stats.get('gpu_decoded', 0)}, CPU share {fc.decode_stats.get('cpu_share_photos', 0)}, "
                 f"CPU fallback {sum(v for k2, v in fc.decode_stats.items() if k2.startswith('gpu_decode_fallback'))}" if dec == "gpu" else ""))
        st = fc.decode_stats   # where the main process spent the build
        print(f"    main process: waiting for decoded photos {st.get('wait_loader_s', 0):.2f}s, preparing and launching the tower {st.get('main_s', 0):.2f}s"
              + (f" (GPU decode and crops {st.get('gpu_decode_s', 0):.2f}s)" if dec == "gpu" else "")
              + f", waiting for the tower {st.get('wait_tower_s', 0):.2f}s")
    fcm.check_precision = real_check
    a_, b_ = feats[("tree", "per-photo", "cpu", 0)], feats[("zips", "per-photo", "cpu", 0)]
    same = all(torch.equal(a_[k2], b_[k2]) for k2 in a_) and a_.keys() == b_.keys()
    print(f"zips vs tree (per-photo cpu): features bit-identical per item: {same}")
    out = {"photos": photos, "crops": n, "device": str(dev), "gpu": gpu, "precision": prec, "workers": a.num_workers,
           "batch_size": a.batch_size, "index_labels_per_s": {"tree": photos / t_it, "zips": photos / t_iz}, "tower_alone_crops_per_s": tower_rate, "builds": res, "zips_bit_identical": same}
    if gpu_path:
        c = feats[("tree", "per-photo", "cpu", 0)]
        for key in [k2 for k2 in feats if k2[2] == "gpu"]:
            g = feats[key]
            cos = F.cosine_similarity(torch.stack([g[k2] for k2 in c]), torch.stack([c[k2] for k2 in c]))
            out.setdefault("gpu_vs_cpu_cosine", {})[" ".join(map(str, key))] = {"min": cos.min().item(), "mean": cos.mean().item()}
            print(f"{' '.join(map(str, key))} vs CPU decode, per crop cosine: min {cos.min().item():.5f}, mean {cos.mean().item():.6f} over {len(cos)} crops")
    r = lambda s: res[s]["crops_per_s"]
    zr = r("zips  per-photo cpu") / r("tree  per-photo cpu")
    best = max(res, key=r)
    print(f"SUMMARY tower={tower_rate:.1f}/s; tree per-crop cpu={r('tree  per-crop  cpu'):.1f}/s; tree per-photo cpu={r('tree  per-photo cpu'):.1f}/s "
          f"(x{r('tree  per-photo cpu') / r('tree  per-crop  cpu'):.2f}); zips/tree={zr:.3f}; best={best.split()} {r(best):.1f}/s "
          f"= x{r(best) / tower_rate:.2f} of tower, 1.63M crops in {RELEASE_CROPS / r(best) / 60:.1f} min; device={dev} workers={a.num_workers}")
    if a.out_json: Path(a.out_json).write_text(json.dumps(out, indent=1) + "\n")
    if not a.keep: shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
