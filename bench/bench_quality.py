"""Learning quality against the Bayes-optimal retriever in a synthetic world (issue 6, section 3).

Usage: python bench/bench_quality.py [--sigmas 1,2] [--train 40000] [--gallery 5000] [--epochs 12]

Each value of each field gets a fixed random unit vector u in R^512 (PAD gets none). An item's clean direction is
t = normalise(sum_f w_f * mean of its field-f value vectors); its "image feature" is x = normalise(t + sigma*eps/sqrt(512)).
Items follow K-Fashion-like marginals (Zipf-skewed values, style with 1-2 values, material/detail with 0-3, every
field sometimes missing). The JSON encoder is trained with the project's own Trainer through the cached-feature path
(x plays the cached tower feature) and evaluated on a held-out gallery, JSON->image and image->JSON.
Yardstick: the Bayes-optimal scorer, score(i, q) = kappa<x_i, t_q> - log sum_{q' in bank} exp(kappa<x_i, t_q'>), with
kappa = 512 sqrt(1 + sigma^2) / sigma^2 and the bank = the training JSONs. Reported: learned MRR / Bayes MRR and top-1,
plain and with querybank normalisation (beta chosen on a separate val set), and a bag-of-attributes linear baseline.
Prints the figures and a final summary line; exits 1 if it cannot measure.
"""
import argparse, logging, math, os, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import torch.nn.functional as F

from fashion_json_encoder.config import Config
from fashion_json_encoder.evaluation import rank_metrics
from fashion_json_encoder.training import PairedData, Trainer, embed_rows
from fashion_json_encoder.vocab import PAD, Vocab, collate_json

D = 512
FIELDS = {"category": (21, 1.0, (1, 1), 0.05), "style": (23, 0.6, (1, 2), 0.10), "silhouette": (7, 0.5, (1, 1), 0.25),
          "material": (28, 0.7, (0, 3), 0.0), "detail": (40, 0.5, (0, 3), 0.0)}  # size, weight w_f, (min, max) values, p(missing)


class World:
    "The generator: value vectors, Zipf marginals, clean directions and noisy image features."
    def __init__(self, seed=0, zipf=1.1):
        self.g = torch.Generator().manual_seed(seed)
        self.u = {f: F.normalize(torch.randn(n, D, generator=self.g), dim=1) for f, (n, *_) in FIELDS.items()}
        self.p = {f: (1 / torch.arange(1, n + 1).float() ** zipf)[torch.randperm(n, generator=self.g)] for f, (n, *_) in FIELDS.items()}

    def items(self, n):
        "n item JSONs ({field: [value names]}), e.g. {'category': ['category_3'], 'material': []}."
        out = []
        for _ in range(n):
            j = {}
            for f, (size, w, (lo, hi), p_miss) in FIELDS.items():
                k = int(torch.randint(lo, hi + 1, (1,), generator=self.g))
                if torch.rand(1, generator=self.g).item() < p_miss: k = 0
                vals = torch.multinomial(self.p[f], k, replacement=False, generator=self.g).tolist() if k else []
                j[f] = [f"{f}_{v}" for v in vals]
            if not any(j.values()): j["category"] = [f"category_{int(torch.multinomial(self.p['category'], 1, generator=self.g))}"]
            out.append(j)
        return out

    def clean(self, jsons):
        "t: (N, D) unit clean directions."
        t = torch.zeros(len(jsons), D)
        for f, (size, w, *_) in FIELDS.items():
            for r, j in enumerate(jsons):
                if j[f]: t[r] += w * self.u[f][[int(v.split("_")[-1]) for v in j[f]]].mean(0)
        return F.normalize(t, dim=1)

    def image(self, t, sigma):
        return F.normalize(t + sigma * torch.randn(t.shape, generator=self.g) / math.sqrt(D), dim=1)


def ranks_from_scores(score_fn, n, chunk=512):
    "Strict 1-based ranks of each query's pair (ties count against); score_fn(rows) -> (len(rows), n) scores."
    out = torch.empty(n, dtype=torch.long)
    for s in range(0, n, chunk):
        rows = torch.arange(s, min(s + chunk, n))
        sc = score_fn(rows)
        pos = sc[torch.arange(len(rows)), rows]
        out[rows] = (sc >= pos[:, None]).sum(1)
    return out


def bank_lse(x, bank, logw, scale, chunk=1024):
    "log sum_b w_b exp(scale <x, bank_b>) for each row of x: (N,)."
    return torch.cat([torch.logsumexp(scale * x[s:s + chunk] @ bank.T + logw, 1) for s in range(0, len(x), chunk)])


def both_directions(x, t, lse=None, prior=None):
    "MRR/top-1 of JSON->image and image->JSON for scores <x_i, t_q> (minus a per-image lse, plus a per-JSON prior)."
    lse = torch.zeros(len(x)) if lse is None else lse
    prior = torch.zeros(len(t)) if prior is None else prior
    j2i = ranks_from_scores(lambda q: t[q] @ x.T - lse[None, :], len(x))          # query JSON q, gallery images
    i2j = ranks_from_scores(lambda i: x[i] @ t.T - lse[i, None] + prior[None, :], len(x))  # query image i, gallery JSONs
    return {"j2i": rank_metrics(j2i), "i2j": rank_metrics(i2j)}


def distinct(t, jsons):
    "Distinct rows of the bank with their log counts (the empirical prior)."
    keys = [repr(sorted((f, tuple(sorted(v))) for f, v in j.items())) for j in jsons]
    first, counts = {}, {}
    for i, k in enumerate(keys): first.setdefault(k, i); counts[k] = counts.get(k, 0) + 1
    idx = torch.tensor(list(first.values()))
    return t[idx], torch.tensor([math.log(counts[k]) for k in first]), keys, first


def choose_beta(x_val, e_val, bank, logw, betas=(10, 20, 30, 40, 60, 80, 100, 150)):
    "Querybank beta with the best JSON->image MRR on the val set."
    best = max(betas, key=lambda b: rank_metrics(ranks_from_scores(
        lambda q: b * e_val[q] @ x_val.T - bank_lse(x_val, bank, logw, b)[None, :], len(x_val)))["mrr"])
    return best


def bag_of_attributes(train_j, x_train, test_j, vocab, lam=1.0):
    "Ridge regression from per-field mean-normalised multi-hot attributes to image features."
    names = list(vocab.fields)
    def design(jsons):
        cols = []
        for f in names:
            m = torch.zeros(len(jsons), vocab.sizes[f])
            for r, j in enumerate(jsons):
                ids = vocab.encode(j)[f]
                if ids: m[r, ids] = 1.0 / len(ids)
            cols.append(m)
        return torch.cat(cols + [torch.ones(len(jsons), 1)], 1)
    A = design(train_j)
    W = torch.linalg.solve(A.T @ A + lam * torch.eye(A.shape[1]), A.T @ x_train)
    return F.normalize(design(test_j) @ W, dim=1)


def run_sigma(sigma, a, world, out_dir):
    n_tr, n_ga = a.train, a.gallery
    js = world.items(n_tr + 2 * n_ga)
    t = world.clean(js); x = world.image(t, sigma)
    tr, va, te = slice(0, n_tr), slice(n_tr, n_tr + n_ga), slice(n_tr + n_ga, n_tr + 2 * n_ga)
    vocab = Vocab.build(js[tr], list(FIELDS))
    names = list(vocab.fields)
    def paired(sl): return PairedData(collate_json([vocab.encode(j) for j in js[sl]], names), x[sl].half(), js[sl])
    cfg = Config(batch_size=a.batch_size, learning_rate=a.lr, max_epochs=a.epochs, standalone_epochs=0, save_every=0,
                 dropout_rate=0.0, weight_decay=0.0, num_workers=0, clip_pretrained="none", device="cpu", seed=a.seed)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, vocab, paired(tr), paired(va), out_dir / f"sigma{sigma}", device="cpu", progress=False)
    res = trainer.fit(0, a.epochs)
    secs = time.perf_counter() - t0
    enc = trainer.encoder
    e = {k: embed_rows(enc, paired(sl), "cpu") for k, sl in (("train", tr), ("val", va), ("test", te))}
    xv, xt = x[va], x[te]
    kappa = D * math.sqrt(1 + sigma ** 2) / sigma ** 2
    tb, tlogw, keys, first = distinct(t[tr], js[tr])
    eb = e["train"][torch.tensor(list(first.values()))]
    # Bayes-optimal: kappa-scaled scores minus the per-image log-partition over the training-JSON bank
    bayes = both_directions(kappa * xt, t[te], lse=bank_lse(xt, tb, tlogw, kappa))
    plain = both_directions(xt, e["test"])
    beta = choose_beta(xv, e["val"], eb, tlogw)
    qb = both_directions(beta * xt, e["test"], lse=bank_lse(xt, eb, tlogw, beta))
    # image->JSON: the JSON prior (log frequency of the exact JSON in training) as the matching correction
    keys_te = [repr(sorted((f, tuple(sorted(v))) for f, v in j.items())) for j in js[te]]
    cnt = {k: 0 for k in keys_te}
    for k in keys: cnt[k] = cnt.get(k, 0) + 1
    prior = torch.tensor([math.log(cnt[k] + 1) for k in keys_te])
    prior_i2j = both_directions(beta * xt, e["test"], prior=prior)["i2j"]
    boa = both_directions(xt, bag_of_attributes(js[tr], x[tr], js[te], vocab))
    return {"bayes": bayes, "plain": plain, "qb": qb, "prior_i2j": prior_i2j, "boa": boa, "beta": beta, "train_seconds": secs,
            "best_val_mrr": res["best_metrics"]["mrr"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sigmas", default="1,2")
    ap.add_argument("--train", type=int, default=40000)
    ap.add_argument("--gallery", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    world = World(a.seed)
    summary = []
    with tempfile.TemporaryDirectory() as d:
        for sigma in map(float, a.sigmas.split(",")):
            r = run_sigma(sigma, a, world, Path(d))
            print(f"\nsigma = {sigma:g}  ({a.train} train, {a.gallery} gallery, {a.epochs} epochs in {r['train_seconds']:.0f} s, beta {r['beta']})")
            print(f"{'scorer':<34}{'j2i MRR':>9}{'j2i top1':>9}{'i2j MRR':>9}{'i2j top1':>9}{'j2i/Bayes':>10}{'i2j/Bayes':>10}")
            B = r["bayes"]
            rows = [("Bayes-optimal", B), ("learned, plain cosine", r["plain"]), ("learned + querybank norm.", r["qb"]),
                    ("bag-of-attributes linear", r["boa"])]
            for name, m in rows:
                print(f"{name:<34}{m['j2i']['mrr']:>9.4f}{m['j2i']['top1']:>9.4f}{m['i2j']['mrr']:>9.4f}{m['i2j']['top1']:>9.4f}"
                      f"{m['j2i']['mrr'] / B['j2i']['mrr']:>10.3f}{m['i2j']['mrr'] / B['i2j']['mrr']:>10.3f}")
            p = r["prior_i2j"]
            print(f"{'learned + QB, i2j with JSON prior':<34}{'':>9}{'':>9}{p['mrr']:>9.4f}{p['top1']:>9.4f}{'':>10}{p['mrr'] / B['i2j']['mrr']:>10.3f}")
            best_i2j = max(r["qb"]["i2j"]["mrr"], r["plain"]["i2j"]["mrr"])
            summary.append((sigma, r["qb"]["j2i"]["mrr"] / B["j2i"]["mrr"], best_i2j / B["i2j"]["mrr"]))
    ok = all(j >= 0.95 and i >= 0.95 for _, j, i in summary)
    print("SUMMARY " + "; ".join(f"sigma {s:g}: learned/Bayes MRR j2i {j:.3f}, i2j {i:.3f}" for s, j, i in summary)
          + f" (target >= 0.95 both: {'met' if ok else 'MISSED'})")
    return 0


if __name__ == "__main__": sys.exit(main())
