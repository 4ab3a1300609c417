"""Benchmark the sharded feature-cache build: 1 process vs N gloo ranks (real ViT-B/32 architecture, random init).

Usage: python bench/bench_distributed_cache.py [--photos 40] [--ranks 2] [--batch-size 32] [--num-workers 0]
Each build runs in fresh processes on a fresh cache folder; the rate is crops / wall time of `build_feature_cache`
(the slowest rank, barriers included; process start and tower construction excluded). The 1-process build gets every
core's threads, each of the N ranks cores/N threads (what torchrun's OMP_NUM_THREADS default gives, or more).
Prints both rates, the speed-up and a final summary line. On CPU the ranks share the same cores, so expect little gain;
on N GPUs each rank has its own tower.
"""
import argparse, datetime, json, os, socket, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _build(rank, world, port, items_file, cache_dir, threads, batch_size, num_workers, out):
    torch.set_num_threads(threads)
    from fashion_json_encoder.models.image_encoder import CLIPImageEncoder
    from fashion_json_encoder.models.feature_cache import build_feature_cache
    import pickle
    items = pickle.loads(Path(items_file).read_bytes())
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=1800))
    tower = CLIPImageEncoder("ViT-B-32", "none", seed=0)
    if world > 1: dist.barrier()  # start the clock together
    t0 = time.perf_counter()
    fc = build_feature_cache(items, tower, cache_dir, batch_size=batch_size, num_workers=num_workers, progress=False,
                             chunk_size=batch_size)
    secs = time.perf_counter() - t0
    Path(out, f"r{rank}.json").write_text(json.dumps({"secs": secs, "n": fc.n_computed, "rows": len(fc)}))
    if world > 1: dist.destroy_process_group()


def run(world, items_file, root, threads, a):
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp(dir=root))
    mp.start_processes(_build, args=(world, port, items_file, str(out / "cache"), threads, a.batch_size, a.num_workers, str(out)),
                       nprocs=world, start_method="spawn")
    res = [json.loads((out / f"r{r}.json").read_text()) for r in range(world)]
    secs = max(r["secs"] for r in res)
    return res[0]["n"], secs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=40, help="synthetic K-Fashion photos (about 1.7 crops each)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=0)
    a = ap.parse_args(argv)
    import pickle
    from fashion_json_encoder.config import Config
    from fashion_json_encoder.dataset import build_index
    from fashion_json_encoder.synthetic import make_synthetic_kfashion
    root = Path(tempfile.mkdtemp())
    index = build_index(make_synthetic_kfashion(root / "kfashion", n_photos=a.photos, seed=0), Config(num_workers=0))
    items = index.items["train"] + index.items["val"]
    (root / "items.pkl").write_bytes(pickle.dumps(items))
    cores = os.cpu_count() or 1
    n1, s1 = run(1, root / "items.pkl", root, cores, a)
    nN, sN = run(a.ranks, root / "items.pkl", root, max(1, cores // a.ranks), a)
    r1, rN = n1 / s1, nN / sN
    print(f"1 process ({cores} threads):        {n1} crops in {s1:.2f} s = {r1:.1f} crops/s")
    print(f"{a.ranks} ranks ({max(1, cores // a.ranks)} thread(s) each, gloo): {nN} crops in {sN:.2f} s = {rN:.1f} crops/s")
    print(f"summary: sharded cache build, ViT-B/32 on {cores} CPU cores: 1 process {r1:.1f} crops/s, "
          f"{a.ranks} ranks {rN:.1f} crops/s, speed-up x{rN / r1:.2f}")
    return 0


if __name__ == "__main__": sys.exit(main())
