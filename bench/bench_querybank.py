"""`evaluate`'s querybank work on the val split: the β choice on the whole split, then the two-fold cross-fit.

    python bench/bench_querybank.py [--n 10000] [--bank 50000] [--device cpu] [--before DIR] [--repeat 1]

Its cost is the val images' products with the bank of distinct training JSONs (about 70 % of the training items are
distinct: some 1M at the release's size) and one log-sum-exp per β over each. Generates `--n` unit image and JSON
embeddings (D = 512) with JSON groups and priors, a `--bank` of unit embeddings with log counts (seeded), then, in a
fresh process per side, runs what `evaluate_checkpoint` runs: `calibrate` on the whole split and
`crossfit_normalised_metrics` (each half calibrated and scored), this package computing the biases once and handing
them on (`biases=`), a `--before DIR` package (a checkout's package folder) as it does it. Prints each side's seconds,
the number of image rows that went through `querybank_biases`, the ratio, and checks that both chose the same β and
agree on every metric to 1e-5.
"""
import argparse, inspect, os, sys, time
from benchlib import in_fresh_process

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def one_run(n: int, bank_n: int, device: str, seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F
    from fashion_json_encoder import evaluation, querybank as qbm
    from fashion_json_encoder.querybank import BETAS, calibrate, crossfit_normalised_metrics
    g = torch.Generator().manual_seed(seed)
    hub = F.normalize(torch.randn(512, generator=g), dim=0)
    img = F.normalize(torch.randn(n, 512, generator=g) / 512 ** .5 + 0.3 * hub, dim=1)
    groups = torch.randint(0, max(2, n * 7 // 10), (n,), generator=g)            # about 70 % distinct JSONs
    base = F.normalize(torch.randn(int(groups.max()) + 1, 512, generator=g), dim=1)
    txt = F.normalize(base[groups] + 0.8 * img, dim=1)
    bank = F.normalize(torch.randn(bank_n, 512, generator=g) + 0.3 * hub, dim=1)
    lw = torch.log1p(torch.randint(0, 5, (bank_n,), generator=g).float())
    prior = torch.log1p(torch.randint(0, 5, (n,), generator=g).float())
    img, txt, bank, lw, prior, groups = (x.to(device) for x in (img, txt, bank, lw, prior, groups))
    rows = []
    real = evaluation.querybank_biases
    def counted(image, *a, **k): rows.append(len(image)); return real(image, *a, **k)
    qbm.querybank_biases = evaluation.querybank_biases = counted   # querybank's own calls and those of evaluation.querybank_bias
    if device.startswith("cuda"): torch.cuda.synchronize()
    t = time.perf_counter()
    if "biases" in inspect.signature(crossfit_normalised_metrics).parameters:   # this release: one pass, handed on
        qb = counted(img, bank, BETAS, lw)
        c = calibrate(img, txt, bank, lw, prior, biases=qb)
        m = crossfit_normalised_metrics(img, txt, bank, lw, prior=prior, groups=groups, seed=seed, split="val", biases=qb)
    else:
        c = calibrate(img, txt, bank, lw, prior)
        m = crossfit_normalised_metrics(img, txt, bank, lw, prior=prior, groups=groups, seed=seed, split="val")
    if device.startswith("cuda"): torch.cuda.synchronize()
    secs = time.perf_counter() - t
    return {"seconds": secs, "rows": sum(rows), "beta": c["beta"], "use_prior": c["use_prior"],
            "metrics": {k: v for k, v in m.items() if isinstance(v, float)}, "fold_beta": m["fold_beta"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="val items")
    ap.add_argument("--bank", type=int, default=50_000, help="distinct training JSONs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--before", help="also run the package in this folder, interleaved")
    a = ap.parse_args(argv)
    sides = {"this": None} | ({"before": a.before} if a.before else {})
    runs = {k: [] for k in sides}
    for _ in range(a.repeat):
        for k, pkg in sides.items(): runs[k].append(in_fresh_process("bench_querybank", "one_run", a.n, a.bank, a.device, pkg=pkg))
    for k, rs in runs.items():
        print(f"[{k}] {a.n:,} val items x {a.bank:,} bank JSONs on {a.device}: " + ", ".join(f"{r['seconds']:.1f}s" for r in rs) +
              f"; {rs[0]['rows']:,} image rows through querybank_biases; beta {rs[0]['beta']:g}, fold betas {rs[0]['fold_beta']}")
    if a.before:
        t, b = (min(r["seconds"] for r in runs[k]) for k in ("this", "before"))
        x, y = runs["this"][0], runs["before"][0]
        same = (x["beta"], x["use_prior"], x["fold_beta"]) == (y["beta"], y["use_prior"], y["fold_beta"])
        diff = max(abs(x["metrics"][k] - y["metrics"][k]) for k in x["metrics"])
        print(f"before / this: {b:.1f}s -> {t:.1f}s ({b / t:.2f}x); same choices: {same}; largest metric difference {diff:.1e}")
        if not same or diff > 1e-5: sys.exit("the two sides disagree")
    print(f"SUMMARY n={a.n} bank={a.bank} device={a.device} seconds={min(r['seconds'] for r in runs['this']):.1f}")


if __name__ == "__main__": sys.exit(main())
