"torch.distributed on CPU (gloo, 2 processes started by the tests, loopback only): global negatives, sharded cache, torchrun."
import datetime, json, multiprocessing, os, socket, subprocess, sys
from pathlib import Path
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from fashion_json_encoder.data import Item
from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, tiny_clip_config
from fashion_json_encoder.models import feature_cache
from fashion_json_encoder.models.feature_cache import build_feature_cache, cache_contents
from fashion_json_encoder.models.json_encoder import JSONEncoder
from fashion_json_encoder.models.contrastive_learner import ContrastiveLearner
from fashion_json_encoder.distributed import gather_with_grad, get_rank, get_world_size, is_distributed
from fashion_json_encoder.paired import PairedData

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo talks over loopback only
SIZES = {"category": 9, "style": 12, "material": 15}


def _free_port() -> int:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


# a fork server that has imported torch and the package once starts each 2-process group in about a second
# (module names: Python 3.11's fork server does not see the tests folder on its path)
multiprocessing.get_context("forkserver").set_forkserver_preload(
    ["torch", "PIL.Image", "fashion_json_encoder.models.feature_cache", "fashion_json_encoder.training"])

def _spawn(fn, *args, world: int = 2):
    "Run fn(rank, world, *args) in `world` fresh processes joined in a gloo group."
    mp.start_processes(_entry, args=(fn, world, _free_port(), *args), nprocs=world, start_method="forkserver")


def _entry(rank, fn, world, port, *args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try: fn(rank, world, *args)
    finally: dist.destroy_process_group()


# -- (a) global negatives: 2 ranks == 1 process on the concatenated batch ------------------------------------------
def _batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    js = {f: torch.randint(0, v, (n, 3), generator=g) for f, v in SIZES.items()}  # (n, 3) ids, some PAD/UNK
    return js, torch.randn(n, 512, generator=g)  # (n, 512) cached image features


def _learner(ddp: bool):
    torch.manual_seed(0)
    enc = JSONEncoder(SIZES, dropout_rate=0.0)
    net = torch.nn.parallel.DistributedDataParallel(enc) if ddp else enc
    learner = ContrastiveLearner(net, temperature=0.07, learn_temperature=True)
    if ddp: learner.loss.gather = gather_with_grad
    return enc, learner


def _grads(enc, learner):
    return {**{k: p.grad.clone() for k, p in enc.named_parameters()}, "logit_scale": learner.logit_scale.grad.clone()}


def _step_ranks(rank, world, out, splits):
    assert is_distributed() and (get_rank(), get_world_size()) == (rank, world)
    res = []
    for sizes in splits:  # per-rank batch sizes, e.g. (3, 3) or the uneven (4, 2) of a last batch
        js, img = _batch(sum(sizes), seed=len(res))
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        enc, learner = _learner(ddp=True)
        loss = learner(img[lo:hi], {k: v[lo:hi] for k, v in js.items()})
        loss.backward()
        res.append({"loss": loss.detach(), "grads": _grads(enc, learner)})
    torch.save(res, Path(out) / f"rank{rank}.pt")


def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    splits = [(3, 3), (4, 2)]
    _spawn(_step_ranks, str(tmp_path), splits)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i, sizes in enumerate(splits):
        js, img = _batch(sum(sizes), seed=i)
        enc, learner = _learner(ddp=False)
        loss = learner(img, js); loss.backward()
        ref = _grads(enc, learner)
        for r in range(2):
            got = ranks[r][i]
            torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-5, rtol=0)
            assert set(got["grads"]) == set(ref)
            for k in ref: torch.testing.assert_close(got["grads"][k], ref[k], atol=1e-5, rtol=0, msg=k)


def test_rank_batches_split_the_global_permutation():
    data = PairedData({"category": torch.arange(23)[:, None]}, None, list(range(23)))
    for world in (2, 3):
        one = data.batches(4 * world, seed=5, epoch=2)
        per_rank = [data.batches(4, 5, 2, rank=r, world_size=world) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of steps
        assert [torch.cat(parts).tolist() for parts in zip(*per_rank)] == [b.tolist() for b in one]
        again = [data.batches(4, 5, 2, rank=r, world_size=world) for r in range(world)]
        assert [[b.tolist() for b in bs] for bs in per_rank] == [[b.tolist() for b in bs] for bs in again]  # reproducible


# -- (b) sharded cache build == single-process build; an interrupted sharded build resumes ----------------------------
def _items(folder: Path, n: int = 14) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        p = folder / f"{i}.jpg"
        Image.new("RGB", (80, 100), (17 * i % 256, 90, 200 - 7 * i % 200)).save(p, quality=90)
        items.append(Item(f"모던/{i}/상의", str(p), "상의", (4., 6., 70., 90.), (4, 6, 70, 90), {}, f"look{i}"))
    (folder / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    items.append(Item("모던/bad/상의", str(folder / "bad.jpg"), "상의", (0., 0., 5., 5.), (0, 0, 5, 5), {}, "bad"))
    return items


def _tower(): return CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(), seed=0)


def _build(items, d, **kw): return build_feature_cache(items, _tower(), d, batch_size=2, num_workers=0, progress=False, chunk_size=2, **kw)


def _build_ranks(rank, world, items, d, crash_after):
    if crash_after is not None:  # the job dies once each rank has written `crash_after` chunks
        real, n = feature_cache.write_chunk, [0]
        def write(*a, **k):
            if n[0] == crash_after: raise RuntimeError(f"simulated crash on rank {rank}")
            n[0] += 1; return real(*a, **k)
        feature_cache.write_chunk = write
    fc = _build(items, d)  # rank and world size come from the process group
    torch.save({"keys": fc.keys, "features": fc.features, "skipped": fc.skipped, "n_cached": fc.n_cached,
                "n_computed": fc.n_computed}, Path(d) / f"result{rank}.pt")


def test_sharded_build_equals_single_process_and_resumes(tmp_path):
    items = _items(tmp_path / "img")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: the same kernels give bit-identical fp16 features
    try: one = _build(items, tmp_path / "one")
    finally: torch.set_num_threads(threads)
    _spawn(_build_ranks, items, str(tmp_path / "two"), None)
    assert cache_contents(one.path) == cache_contents(tmp_path / "two" / one.path.name)  # same files, ids, features
    for r in range(2):  # after the barrier every rank holds the whole cache
        got = torch.load(tmp_path / "two" / f"result{r}.pt")
        assert got["keys"] == one.keys and torch.equal(got["features"], one.features)
        assert got["skipped"] == one.skipped == {"모던/bad/상의": "bad_image"} and got["n_computed"] == len(items)
    # interrupted: both ranks die after one chunk each; a fresh 2-rank build encodes only what is missing
    with pytest.raises(Exception, match="simulated crash"): _spawn(_build_ranks, items, str(tmp_path / "cut"), 1)
    done = len(list((tmp_path / "cut" / one.path.name).glob("chunk_*.safetensors")))
    assert 1 <= done <= 2
    _spawn(_build_ranks, items, str(tmp_path / "cut"), None)
    for r in range(2):
        got = torch.load(tmp_path / "cut" / f"result{r}.pt")
        assert got["keys"] == one.keys and torch.equal(got["features"], one.features) and got["skipped"] == one.skipped
        assert 0 < got["n_cached"] and got["n_cached"] + got["n_computed"] <= len(items)


# -- (c) torchrun train.py end to end -------------------------------------------------------------------------------
def _torchrun(*args, nproc=2):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "train.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_train_matches_one_process_with_the_global_batch(tmp_path):
    import shutil
    from fashion_json_encoder.cli import train_main
    from fashion_json_encoder.synthetic import make_synthetic_kfashion
    ds = make_synthetic_kfashion(tmp_path / "kfashion", n_photos=16, seed=3)
    (tmp_path / "cfg.json").write_text('{"dropout_rate": 0.0, "save_every": 0}', encoding="utf-8")
    common = ["--dataset_path", str(ds), "--config", str(tmp_path / "cfg.json"), "--epochs", "3", "--standalone_epochs", "1",
              "--clip_pretrained", "none", "--num_workers", "0", "--device", "cpu", "--quiet"]
    assert train_main([*common, "--batch_size", "8", "--output_dir", str(tmp_path / "one")]) == 0  # 1 process, batch 2B
    shutil.copytree(tmp_path / "one" / "cache", tmp_path / "two" / "cache")  # same ViT-B/32 features: skip a second encode
    r = _torchrun(*common, "--batch_size", "4", "--output_dir", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-4000:]
    files = sorted(str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("*") if p.is_file() and "cache" not in p.parts)
    assert [f for f in files if not f.startswith("logs/")] == [".lock", "checkpoints/best_model.pt", "checkpoints/last.pt",
                                                              "results/training_results.json", "results/vocab.json"]
    assert len([f for f in files if f.startswith("logs/")]) == 1  # one TensorBoard event file: rank 0's
    one, two = (json.loads((tmp_path / d / "results/training_results.json").read_text(encoding="utf-8")) for d in ("one", "two"))
    assert (two["world_size"], two["global_batch_size"], one["world_size"]) == (2, 8, 1)
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4)
        for k in ("loss", "mrr", "top1"): assert b["val"][k] == pytest.approx(a["val"][k], abs=1e-4), k
    w1, w2 = (torch.load(tmp_path / d / "checkpoints/last.pt", weights_only=True) for d in ("one", "two"))
    assert all(torch.allclose(w1["encoder"][k], w2["encoder"][k], atol=1e-4) for k in w1["encoder"])
    assert len(w2["rank_rng"]) == 2 and r.stdout.count("done: best epoch") >= 1


def _train_ranks(rank, world, ds, out, crash_epoch=None, resume=None):
    from fashion_json_encoder.config import Config
    from fashion_json_encoder.system import train_run
    from fashion_json_encoder.training import Trainer
    if crash_epoch:  # both ranks die in this epoch, after last.pt of the epoch before
        orig = Trainer._contrastive_epoch
        def crash(self, epoch):
            if epoch == crash_epoch:   # once rank 0 has saved the epoch before: an instant raise on rank 1 let spawn kill rank 0 mid-save
                torch.distributed.barrier(); raise RuntimeError("simulated crash")
            return orig(self, epoch)
        Trainer._contrastive_epoch = crash
    cfg = Config(batch_size=4, learning_rate=3e-3, standalone_epochs=1, max_epochs=4, save_every=0, clip_pretrained="none",
                 num_workers=0, dropout_rate=0.2, device="cpu")
    train_run(cfg, ds, out, resume=resume, progress=False, tower=_tower())


def test_every_rank_resumes_from_last_pt_exactly(tmp_path):
    from fashion_json_encoder.synthetic import make_synthetic_kfashion
    ds = str(make_synthetic_kfashion(tmp_path / "kfashion", n_photos=16, seed=4))
    _spawn(_train_ranks, ds, str(tmp_path / "full"))
    with pytest.raises(Exception, match="simulated crash"): _spawn(_train_ranks, ds, str(tmp_path / "cut"), 3)
    last = tmp_path / "cut/checkpoints/last.pt"
    assert torch.load(last, weights_only=True)["epoch"] == 2
    _spawn(_train_ranks, ds, str(tmp_path / "cut"), None, str(last))
    full, cut = (json.loads((tmp_path / d / "results/training_results.json").read_text(encoding="utf-8")) for d in ("full", "cut"))
    assert [h["epoch"] for h in cut["history"]] == [1, 2, 3, 4]
    for a, b in zip(full["history"], cut["history"]):  # dropout included: each rank restored its own RNG stream
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-6)
        assert b["val"]["mrr"] == pytest.approx(a["val"]["mrr"], abs=1e-6)
    w1, w2 = (torch.load(tmp_path / d / "checkpoints/last.pt", weights_only=True)["encoder"] for d in ("full", "cut"))
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)
