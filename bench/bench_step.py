"""One cached-feature training step, before and after packing the JSON ids and capturing whole steps (issue 11, section 1).

Usage: python bench/bench_step.py [--device auto] [--rows 200000] [--steps 400] [--batch-size 64] [--threads 0]

A step is what the Trainer's resident epoch runs per batch: gather the batch's JSON ids and cached features, encode,
InfoNCE, backward, Adam. Measured side by side in one run on the same data, encoder size (the Config defaults) and
batch order:
  per-field  : the previous encoder path: one gather, one embedding lookup and one masked mean per field (5 of each)
  packed     : `JSONEncoder.pack` once for the whole set, then one gather and one lookup for all fields (this release)
  graph      : packed, with 16 whole steps (Adam included) per CUDA graph replay (`ResidentSteps`; CUDA only)
Prints, per variant, the operator calls per step (torch.profiler, one eager step) and, on CUDA, the kernels per step
and the GPU kernel time per step (one profiled block: close to the wall time means GPU-bound, far below it host-bound),
then ms per step and samples/s: the median over blocks of 32 steps, the variants' blocks interleaved so that a shared
machine's drift hits them alike (`--steps` steps per variant, after a warm-up block), and the ratios to per-field.
"""
import argparse, os, statistics, sys, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from fashion_json_encoder.config import Config
from fashion_json_encoder.models.contrastive_learner import ContrastiveLearner
from fashion_json_encoder.models.json_encoder import encoder_from_config, masked_mean
from fashion_json_encoder.resident import ResidentSteps, RowsLoss
from fashion_json_encoder.training import make_adam
from fashion_json_encoder.vocab import PAD

# K-Fashion-like fields: (values incl. PAD/UNK, ids per row) as in bench_kfashion_scale
FIELDS = {"category": (23, 1), "style": (25, 2), "silhouette": (9, 1), "material": (30, 3), "detail": (42, 3)}


class PerFieldLoss(torch.nn.Module):
    "The previous RowsLoss and encoder path: a gather, an embedding lookup and a masked mean per field."
    def __init__(self, encoder, learner, json, features):
        super().__init__()
        self.encoder, self.json, self.features = encoder, json, features
        object.__setattr__(self, "learner", learner)

    def forward(self, idx):
        enc, js = self.encoder, {k: v.index_select(0, idx) for k, v in self.json.items()}
        vecs = [masked_mean(enc.embeddings[f](js[f]), js[f], enc.missing[i]) for i, f in enumerate(enc.field_names)]
        out = F.normalize(enc.mlp(torch.stack(vecs, 1).flatten(1)), dim=-1)
        img = F.normalize(self.features.index_select(0, idx).float(), dim=-1)
        return self.learner.loss(img, out, self.learner.logit_scale.exp())["contrastive_loss"]


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    js = {}
    for f, (size, L) in FIELDS.items():
        ids = torch.randint(2, size, (n, L), generator=g)
        ids[torch.rand(n, L, generator=g) < 0.3] = PAD
        js[f] = ids
    return js, F.normalize(torch.randn(n, 512, generator=g), dim=1).half()


def make(kind: str, js, feats, dev, cfg: Config, seed: int) -> ResidentSteps:
    "The trainer's step runner (`ResidentSteps`: its optimiser and encoder recipe) over `kind`'s loss."
    torch.manual_seed(seed)
    enc = encoder_from_config(cfg, {f: s for f, (s, _) in FIELDS.items()}).to(dev)
    lrn = ContrastiveLearner(enc, None, cfg.temperature, cfg.learn_temperature).to(dev).train()
    opt = make_adam([p for p in lrn.parameters() if p.requires_grad], cfg.learning_rate, cfg.weight_decay)
    if kind == "per-field": mod = PerFieldLoss(enc, lrn, {k: v.to(dev) for k, v in js.items()}, feats.to(dev))
    else: mod = RowsLoss(enc, lrn, enc.pack(js).to(dev), features=feats.to(dev))
    rs = ResidentSteps(mod, opt, lrn.clamp_logit_scale_, cfg.batch_size, graph=kind == "graph")
    assert kind != "graph" or rs.mode == "cuda-graph", "capture failed (see the warning above)"
    return rs


def count_ops(rs: ResidentSteps, idx, dev) -> tuple:
    "(operator calls, device kernels) of one eager step."
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        rs._step(idx, 1e-4)
        if dev.type == "cuda": torch.cuda.synchronize(dev)
    evs = prof.events()
    ops = sum(1 for e in evs if e.name.startswith("aten::") and e.cpu_parent is None)   # top-level operator calls
    kernels = sum(1 for e in evs if e.device_type == torch.autograd.DeviceType.CUDA) if dev.type == "cuda" else None
    return ops, kernels


def runner(kind, js, feats, order, dev, cfg, seed):
    "(its ResidentSteps, a function (first step, steps) -> seconds that trains `kind` on those batches of `order`, the losses)."
    rs, B = make(kind, js, feats, dev, cfg, seed), cfg.batch_size
    losses = torch.empty(len(order) // B, device=dev)

    def block(i0: int, n: int) -> float:
        if dev.type == "cuda": torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in rs.run(order[i0 * B:(i0 + n) * B], [B] * n, [1e-4] * n, losses[i0:i0 + n]): pass
        if dev.type == "cuda": torch.cuda.synchronize(dev)
        return time.perf_counter() - t0
    return rs, block, losses


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rows", type=int, default=200_000, help="resident training rows the batches are drawn from")
    ap.add_argument("--steps", type=int, default=400, help="timed steps per variant")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else "cpu" if a.device == "auto" else a.device)
    cfg = Config(batch_size=a.batch_size)
    js, feats = data(a.rows, a.seed)
    need = (a.steps + 96) * a.batch_size   # warm-up, timed and profiled blocks
    order = torch.randperm(a.rows, generator=torch.Generator().manual_seed(a.seed)).repeat(1 + need // a.rows)[:need].to(dev)
    print(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}, {a.rows:,} rows, batch {a.batch_size}, {a.steps} timed steps; encoder "
          f"{cfg.embedding_dim}/{cfg.hidden_dim}/{cfg.output_dim}, dropout {cfg.dropout_rate}")
    kinds = ["per-field", "packed"] + (["graph"] if dev.type == "cuda" else [])
    run = {k: runner(k, js, feats, order, dev, cfg, a.seed) for k in kinds}
    counts = {}
    for k in ("per-field", "packed"): counts[k] = count_ops(run[k][0], order[:a.batch_size], dev)
    n, rounds = 32, max(1, a.steps // 32)   # interleaved blocks of 32 steps: drift of a shared machine hits every variant alike
    times = {k: [] for k in kinds}
    for k in kinds: run[k][1](0, n)        # warm-up block
    for r in range(rounds):
        for k in kinds: times[k].append(run[k][1](n * (r + 1), n) / n)
    busy = {}
    if dev.type == "cuda":   # GPU kernel time per step (graph kernels included): GPU-bound when it is close to the wall time
        for k in kinds:
            with profile(activities=[ProfilerActivity.CUDA]) as prof: run[k][1](n * (rounds + 1), n)
            busy[k] = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / n / 1e6
    res = {}
    for k in kinds:
        assert torch.isfinite(run[k][2][:n * (rounds + 1)]).all(), k
        sec = res[k] = statistics.median(times[k])
        ops, kernels = counts.get(k, (None, None))
        c = "" if ops is None else f"{ops} operator calls" + (f", {kernels} kernels" if kernels is not None else "") + " per step; "
        print(f"{k:>9}: {c}{1e3 * sec:.3f} ms/step = {a.batch_size / sec:,.0f} samples/s (median of {rounds} blocks of {n})"
              + (f", {res['per-field'] / sec:.2f}x per-field" if k != "per-field" else "")
              + (f"; GPU kernels {1e3 * busy[k]:.3f} ms/step = {100 * busy[k] / sec:.0f}% of the wall time" if k in busy else ""))

if __name__ == "__main__":
    main()
