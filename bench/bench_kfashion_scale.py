"""Train and evaluate at K-Fashion's real size on generated cached features (issue 11, section 4).

Usage: python bench/bench_kfashion_scale.py [--scale 0.1] [--train 1450000] [--val 180000] [--epochs 2] [--device auto]
                                            [--cache-rate 31.2] [--index-rate 5751] [--startup-rate 18600] [--json OUT.json]

Items follow K-Fashion-like marginals (21 categories, 23 styles with 1-2 values, 7 fits, 0-3 materials of 28, 0-3
details of 40, Zipf-skewed, some fields missing), drawn vectorised; each item's "cached tower feature" is a noisy unit
vector around a direction made from its values (as in bench_quality), stored fp16 like the real cache. No JPEG is
decoded: this measures everything after the feature cache. The project's real Trainer runs `--standalone` stage-1
epochs and `--epochs` contrastive epochs with per-epoch validation (the config's seeded `val_subset`), then the final
whole-split evaluation, then a search index over train + val and one query, and the cost of a trained run's index's
querybank term (every gallery item against every distinct training JSON; timed on `--qb-rows` rows with a random bank of
the real distinct count, then scaled: on a CPU at full size it takes hours, on a GPU about a minute).
Prints samples/s, seconds per epoch, per-epoch validation seconds, final evaluation seconds, peak host and GPU
memory, and a projected full run (index + cache build + the run's start-up at the given rates + 5 standalone and 95
contrastive epochs + final evaluation) for the machine it ran on. The start-up term (the vocabulary, the feature
cache's record ids, both splits' ids: serial work of the main process) is `bench_startup.py`'s cached start-up,
which also loads the index again: a slight over-count. With --scale s < 1 the sizes are multiplied by s and the projection
scales epoch times by 1/s and the final evaluation by 1/s^2 (it is quadratic in the val size).
Works against older versions of the package too (keys it lacks are skipped), so one script measures before and after.
"""
import argparse, dataclasses, json, logging, math, os, resource, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
import torch.nn.functional as F

import fashion_json_encoder
from fashion_json_encoder.config import Config
from fashion_json_encoder.data import Item
from fashion_json_encoder.search import search
try:   # this tree
    from fashion_json_encoder.search_index import build_search_index
    from fashion_json_encoder.paired import PairedData
except ImportError:   # an older package (gpu_benches.sh's "before" run): the same names in their earlier homes
    from fashion_json_encoder.search import build_search_index
    from fashion_json_encoder.training import PairedData
try:   # the index's querybank term, on the GPU when there is one
    from fashion_json_encoder.search_index import gallery_bias
except ImportError:   # before: always on the CPU, the whole gallery at once
    from fashion_json_encoder.evaluation import querybank_bias
    def gallery_bias(x, c, device=None): return querybank_bias(x, c["bank"], c["beta"], c["bank_logw"])
from fashion_json_encoder.training import Trainer
from fashion_json_encoder.vocab import Vocab

D = 512
# field: (values, weight of the field in the feature direction, (min, max) values per item, p(field missing))
FIELDS = {"category": (21, 1.0, (1, 1), 0.02), "style": (23, 0.6, (1, 2), 0.05), "silhouette": (7, 0.5, (1, 1), 0.25),
          "material": (28, 0.7, (0, 3), 0.05), "detail": (40, 0.5, (0, 3), 0.10)}
FULL_PHOTOS, FULL_CROPS = 1_088_781, 1_630_000  # K-Fashion Training + Validation photos, their target-group crops


def draw_items(n: int, seed: int, sigma: float = 1.0, chunk: int = 200_000) -> tuple:
    "({field: (n, L) ids with PAD=0 and value v at id v + 2}, (n, D) fp16 unit features) with Zipf marginals."
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    ids, u = {}, {}
    for f, (size, w, (lo, hi), p_miss) in FIELDS.items():
        p = 1 / np.arange(1, size + 1) ** 1.1; p = rng.permutation(p / p.sum())
        k = rng.integers(lo, hi + 1, n); k[rng.random(n) < p_miss] = 0
        # k distinct values per row: the k largest of log p + Gumbel noise (sampling without replacement)
        top = np.argsort(-(np.log(p)[None, :] + rng.gumbel(size=(n, size))), axis=1)[:, :max(hi, 1)]
        col = np.arange(top.shape[1])[None, :]
        ids[f] = torch.from_numpy(np.where(col < k[:, None], top + 2, 0))
        u[f] = F.normalize(torch.randn(size + 2, D, generator=g), dim=1); u[f][:2] = 0
    feats = torch.empty(n, D, dtype=torch.float16)
    for s in range(0, n, chunk):  # x = normalise(t + sigma * eps / sqrt(D)), t = normalise(sum_f w_f mean(u_f[values]))
        t = torch.zeros(min(chunk, n - s), D)
        for f, (size, w, *_) in FIELDS.items():
            x = ids[f][s:s + chunk]; m = (x > 1).float()
            t += w * (u[f][x] * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        t = F.normalize(t, dim=1)
        feats[s:s + chunk] = F.normalize(t + sigma * torch.randn(t.shape, generator=g) / math.sqrt(D), dim=1).half()
    return ids, feats


def vocab_of() -> Vocab:
    return Vocab({f: [f"{f}_{v}" for v in range(size)] for f, (size, *_) in FIELDS.items()})


def item_jsons(ids: dict, vocab: Vocab, rows) -> list:
    "Item JSON dicts of `rows` (for the search index)."
    names = {f: np.array(["", ""] + vs, dtype=object) for f, vs in vocab.fields.items()}
    cols = {f: names[f][v[rows].numpy()] for f, v in ids.items()}
    return [{f: [x for x in cols[f][i] if x] for f in ids} for i in range(len(rows))]


def bare_epoch(train: PairedData, vocab: Vocab, cfg: Config, dev, seed: int) -> float:
    "Seconds of one epoch of a bare loop: same encoder, same batch order, just forward, loss, backward and an Adam step."
    from fashion_json_encoder.models.json_encoder import JSONEncoder
    from fashion_json_encoder.models.contrastive_learner import ContrastiveLearner
    torch.manual_seed(seed)
    enc = JSONEncoder(vocab.sizes, cfg.embedding_dim, cfg.hidden_dim, cfg.output_dim, cfg.dropout_rate).to(dev)
    lrn = ContrastiveLearner(enc, None, cfg.temperature).to(dev)
    opt = torch.optim.Adam(enc.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    x = train.features.to(dev)
    packed = hasattr(enc, "pack")   # this tree: ids packed once, as the trainer does; an older package: per-field dicts
    ids = enc.pack(train.json).to(dev) if packed else {k: v.to(dev) for k, v in train.json.items()}
    if packed:
        from fashion_json_encoder.resident import RowsLoss
        rows_loss = RowsLoss(enc, lrn, ids, features=x)
    batches = train.batches(cfg.batch_size, seed, 1)
    order = torch.cat(batches).to(dev).split([len(b) for b in batches])
    if dev.type == "cuda": torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for idx in order:
        loss = rows_loss(idx) if packed else lrn(x[idx], {k: v[idx] for k, v in ids.items()})
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    if dev.type == "cuda": torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def peak_host_mib() -> float: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fmt_s(s: float) -> str: return f"{s / 60:.1f} min" if s >= 90 else f"{s:.1f} s"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply --train and --val by this (0.1 on a 2-core machine)")
    ap.add_argument("--train", type=int, default=1_450_000)
    ap.add_argument("--val", type=int, default=180_000)
    ap.add_argument("--epochs", type=int, default=2, help="contrastive epochs to run")
    ap.add_argument("--standalone", type=int, default=1, help="stage-1 epochs to run")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--config", default=None, help="a config JSON (e.g. configs/kfashion-fast.json) instead of the defaults")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-rate", type=float, default=31.2, help="crops/s of the feature-cache build on this machine "
                    "(bench_decode / bench_cache; default: this README's 2-core bf16 figure)")
    ap.add_argument("--index-rate", type=float, default=5751, help="labels/s of the index build (bench_index)")
    ap.add_argument("--startup-rate", type=float, default=18_600, help="photos/s of a run's cached start-up: vocabulary, record "
                    "ids, both splits' ids (bench_startup.py --n 100000; default: this project's 2-core CPU machine, zips, 2026-11-28)")
    ap.add_argument("--full-epochs", default="5,95", help="standalone,contrastive epochs of the projected full run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bare", type=int, default=1, help="also time a bare loop of the same steps (0: skip)")
    ap.add_argument("--qb-rows", type=int, default=0, help="gallery rows the querybank term is timed on, then scaled to the "
                    "whole gallery (default: 20,000 on CUDA, 1,000 on a CPU)")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else "cpu" if a.device == "auto" else a.device)
    n_tr, n_va = max(2, round(a.train * a.scale)), max(2, round(a.val * a.scale))
    version = getattr(fashion_json_encoder, "__file__", "?")
    print(f"K-Fashion-scale bench: {n_tr:,} train / {n_va:,} val items (scale {a.scale:g}), device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else f" ({torch.get_num_threads()} CPU threads)")
          + f", package {Path(version).parent}")

    t0 = time.perf_counter()
    ids, feats = draw_items(n_tr + n_va, a.seed)
    vocab = vocab_of()
    rows = np.arange(n_tr + n_va)   # each item's JSON (the trainer groups val by it, the search index keeps it)
    items = [Item(f"s/{i}/상의", f"/data/{i}.jpg", "상의", (0., 0., 10., 10.), (0, 0, 10, 10), j, str(i))
             for i, j in zip(rows, item_jsons(ids, vocab, rows))]
    split = lambda sl: PairedData({f: v[sl] for f, v in ids.items()}, feats[sl], items[sl])
    train, val = split(slice(0, n_tr)), split(slice(n_tr, n_tr + n_va))
    print(f"data drawn in {time.perf_counter() - t0:.1f} s ({feats.numel() * 2 / 2**20:.0f} MiB of fp16 features)")

    known = {f.name for f in dataclasses.fields(Config)}
    base = json.loads(Path(a.config).read_text(encoding="utf-8")) if a.config else {"batch_size": a.batch_size}
    cfg = Config(**{k: v for k, v in {**base, "save_every": 0, "num_workers": 0, "clip_pretrained": "none",
                                       "device": str(dev), "seed": a.seed, "max_epochs": a.standalone + a.epochs,
                                       "standalone_epochs": a.standalone}.items() if k in known})
    if dev.type == "cuda": torch.cuda.reset_peak_memory_stats(dev)
    bare = [bare_epoch(train, vocab, cfg, dev, a.seed)] if a.bare else []
    with tempfile.TemporaryDirectory() as out:
        t1 = time.perf_counter()
        trainer = Trainer(cfg, vocab, train, val, out, device=str(dev), progress=False)
        t_init = time.perf_counter() - t1
        res = trainer.fit(a.standalone, a.epochs)
        t_fit = time.perf_counter() - t1 - t_init
        h = res["history"]
        st = [x for x in h if x["stage"] == "standalone"]; co = [x for x in h if x["stage"] == "contrastive"]
        # the first epoch of a stage includes one-time work (CUDA graph capture, device copies): report the steadiest
        sec_st = min(x["train_seconds"] for x in st) if st else float("nan")   # projected as a contrastive epoch if not run
        sec_co = min(x["train_seconds"] for x in co)
        val_secs = [x.get("val_seconds") for x in h]
        val_sec = min(v for v in val_secs if v is not None) if any(v is not None for v in val_secs) else \
            (t_fit - sum(x["train_seconds"] for x in h)) / len(h)   # older versions: all per-epoch overhead
        fin = res.get("final") or {}
        t_final = fin.get("seconds", float("nan")) if fin.get("recomputed", True) else float("nan")
        other = (t_fit - sum(x["train_seconds"] for x in h) - sum(v or 0 for v in val_secs) - (0 if math.isnan(t_final) else t_final)) / len(h)

        if a.bare: bare.append(bare_epoch(train, vocab, cfg, dev, a.seed))   # before and after the run: the load may change
        t2 = time.perf_counter()
        index = build_search_index(items, feats, trainer.encoder.cpu())
        t_index = time.perf_counter() - t2
        t3 = time.perf_counter(); hits = search(index, trainer.encoder, vocab, {"category": "category_0"}, k=10); t_query = time.perf_counter() - t3
        # the index above has no querybank term; a trained run's has one: every gallery item against every distinct training
        # JSON (the calibration's bank). Its cost, on a sample of rows with a bank of the real distinct count, scaled by rows
        n_bank = len(torch.unique(torch.cat([v[:n_tr].sort(dim=1, descending=True).values for v in ids.values()], 1), dim=0))
        qb_n = min(n_tr + n_va, a.qb_rows or (20_000 if dev.type == "cuda" else 1_000))
        g = torch.Generator().manual_seed(a.seed)
        calib = {"bank": F.normalize(torch.randn(n_bank, D, generator=g), dim=1), "bank_logw": torch.zeros(n_bank), "beta": 20.0}
        x = F.normalize(feats[:qb_n].float(), dim=1)
        gallery_bias(x[:8], calib, dev)   # warm-up: CUDA context, kernels
        if dev.type == "cuda": torch.cuda.synchronize(dev)
        t4 = time.perf_counter(); gallery_bias(x, calib, dev); t_qb = (time.perf_counter() - t4) * (n_tr + n_va) / qb_n
    gpu_peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else 0.0

    sps = n_tr / sec_co
    print(f"train path: {res.get('train_path', 'per-batch host loop (before device-resident steps)')}")
    print(f"contrastive epoch: {sec_co:.2f} s = {sps:,.0f} samples/s at batch {cfg.batch_size}; "
          f"standalone epoch: {sec_st:.2f} s; trainer setup {t_init:.1f} s")
    if bare: print(f"trainer epoch / bare loop of the same steps (forward, loss, backward, Adam; eager, data on {dev.type}): "
                   f"{sec_co:.2f} s / {min(bare):.2f} s = {sec_co / min(bare):.2f}")
    print(f"per-epoch validation: {val_sec:.2f} s on {h[-1].get('val_items', n_va):,} items "
          f"= {100 * val_sec / sec_co:.1f} % of a training epoch"
          + (f" ({100 * val_sec / (sec_co / a.scale):.1f} % at full size: the subset stays {h[-1].get('val_items', n_va):,} items)"
             if a.scale < 1 and (res.get("validation") or {}).get("per_epoch") == "subset" else "")
          + f"; checkpoints and logs {other:.2f} s per epoch")
    print(f"final whole-split evaluation ({n_va:,} items): " + (f"{t_final:.1f} s" if not math.isnan(t_final) else "none (per-epoch validation was already whole-split)")
          + f"; val mrr best epoch {res['best_metrics']['mrr']:.4f}" + (f", whole split {fin['metrics']['mrr']:.4f}" if fin else ""))
    print(f"search index over {len(index):,} items: {t_index:.1f} s; one query {1000 * t_query:.1f} ms ({len(hits)} hits)")
    full_qb = t_qb * FULL_CROPS / (n_tr + n_va) * (1 / a.scale)   # rows x bank size, both scale with the data
    print(f"its querybank term ({n_tr + n_va:,} gallery items x {n_bank:,} distinct training JSONs, timed on {qb_n:,} rows, on {dev.type}): "
          f"{fmt_s(t_qb)}; at full size ({FULL_CROPS:,} x {round(n_bank / a.scale):,}, the bank scaled by 1/scale: an over-estimate, "
          f"distinct JSONs grow more slowly than items): {fmt_s(full_qb)} (the first search after training)")
    print(f"peak memory: host {peak_host_mib():,.0f} MiB (process RSS)" + (f", GPU {gpu_peak:,.0f} MiB allocated" if dev.type == "cuda" else ""))

    S, C = map(int, a.full_epochs.split(","))
    f = 1 / a.scale
    val_full = val_sec if (res.get("validation") or {}).get("per_epoch") == "subset" else val_sec * f * f
    proj_final = (t_final if not math.isnan(t_final) else val_sec) * f * f
    proj = {"index": FULL_PHOTOS / a.index_rate, "cache build": FULL_CROPS / a.cache_rate, "start-up": FULL_PHOTOS / a.startup_rate,
            "standalone epochs": S * ((sec_st if st else sec_co) * f + val_full + other), "contrastive epochs": C * (sec_co * f + val_full + other),
            "final evaluation": proj_final}
    total = sum(proj.values())
    print(f"PROJECTED full run on this machine ({FULL_CROPS:,} crops, {S} + {C} epochs, batch {cfg.batch_size}): {fmt_s(total)} = "
          + " + ".join(f"{k} {fmt_s(v)}" for k, v in proj.items())
          + f"  [index at {a.index_rate:,.0f} labels/s, cache at {a.cache_rate:,.0f} crops/s, start-up at {a.startup_rate:,.0f} photos/s, given]")
    print(f"SUMMARY {dev.type}: {sps:,.0f} samples/s at batch {cfg.batch_size}; validation {100 * val_sec / sec_co:.1f} % of an epoch; "
          f"final eval {t_final:.1f} s for {n_va:,}; projected full run {fmt_s(total)}")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": str(dev), "n_train": n_tr, "n_val": n_va, "scale": a.scale,
                                            "samples_per_s": sps, "epoch_seconds": sec_co, "standalone_epoch_seconds": sec_st,
                                            "val_seconds": val_sec, "final_eval_seconds": t_final, "index_seconds": t_index, "querybank_term_seconds": t_qb, "querybank_term_full_seconds": full_qb, "bank_size": n_bank,
                                            "peak_host_mib": peak_host_mib(), "peak_gpu_mib": gpu_peak,
                                            "train_path": res.get("train_path"), "bare_epoch_seconds": min(bare) if bare else None, "projection_seconds": proj, "projected_total_seconds": total,
                                            "history": [{k: v for k, v in x.items() if k != "val"} for x in h]}, indent=1))
    return 0


if __name__ == "__main__": sys.exit(main())
