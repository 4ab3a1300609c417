"Training: exact resume, atomic checkpoints, safe loading, and the run's output layout."
import dataclasses, json, pickle, shutil
from pathlib import Path
import pytest
import torch
from fashion_json_encoder.config import Config, UserError
from fashion_json_encoder.synthetic import make_synthetic_kfashion
from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, tiny_clip_config
from fashion_json_encoder.prepare import prepare_data
from fashion_json_encoder.system import train_run, evaluate_checkpoint
from fashion_json_encoder.training import Trainer
from fashion_json_encoder.checkpoints import CKPT_FORMAT, load_checkpoint, save_checkpoint
from fashion_json_encoder.paired import standalone_targets

CFG = Config(batch_size=8, learning_rate=3e-3, standalone_epochs=1, max_epochs=4, save_every=2, clip_pretrained="none",
             num_workers=0, dropout_rate=0.1)

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    ds = make_synthetic_kfashion(d / "data", n_photos=40, seed=1, bad_cases=True)
    tower = CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(), seed=0)
    return ds, tower, prepare_data(CFG, ds, d / "prep", tower=tower, progress=False)

def _trainer(prepared, out):
    _, tower, p = prepared
    return Trainer(CFG, p.vocab, p.train, p.val, out, tower=tower, progress=False, info=p.info)

def test_resume_equals_uninterrupted(prepared, tmp_path, monkeypatch):
    # exact on CPU; CUDA's embedding backward accumulates with atomics, so there only float noise may differ
    tol = 1e-6 if not torch.cuda.is_available() else 1e-3
    full = _trainer(prepared, tmp_path / "full").fit()
    full_w = torch.load(tmp_path / "full/checkpoints/last.pt", weights_only=True)["encoder"]
    # interrupted run: crash during epoch 3 (after epochs 1-2 wrote last.pt), then resume in a fresh trainer
    crashing = _trainer(prepared, tmp_path / "cut")
    orig = Trainer._contrastive_epoch
    def crash(self, epoch):
        if epoch == 3: raise RuntimeError("simulated crash")
        return orig(self, epoch)
    monkeypatch.setattr(Trainer, "_contrastive_epoch", crash)
    with pytest.raises(RuntimeError, match="simulated crash"): crashing.fit()
    monkeypatch.setattr(Trainer, "_contrastive_epoch", orig)
    assert torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=True)["epoch"] == 2
    resumed = _trainer(prepared, tmp_path / "cut").fit(resume=tmp_path / "cut/checkpoints/last.pt")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    for a, b in zip(full["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=tol)
        assert a["val"]["mrr"] == pytest.approx(b["val"]["mrr"], abs=tol)
        assert a["val"]["loss"] == pytest.approx(b["val"]["loss"], abs=tol)
    res_w = torch.load(tmp_path / "cut/checkpoints/last.pt", weights_only=True)["encoder"]
    assert all(torch.allclose(full_w[k], res_w[k], atol=tol) for k in full_w)
    assert full["best_epoch"] == resumed["best_epoch"]

def test_resume_state_is_not_read_again(prepared, tmp_path, monkeypatch):
    "`fit(resume=p, resume_state=load_checkpoint(p))`, as `train_run` calls it, never reads `p` and trains as `fit(resume=p)`."
    import fashion_json_encoder.training as training
    _trainer(prepared, tmp_path / "cut").fit(1, 1)
    for d in ("path", "state"): shutil.copytree(tmp_path / "cut", tmp_path / d)
    st = load_checkpoint(tmp_path / "state/checkpoints/last.pt")
    reads = []
    def counting(path, *a, **kw):
        reads.append(Path(path).name); return load_checkpoint(path, *a, **kw)
    monkeypatch.setattr(training, "load_checkpoint", counting)
    by_path = _trainer(prepared, tmp_path / "path").fit(1, 3, resume=tmp_path / "path/checkpoints/last.pt")
    assert reads.count("last.pt") == 1
    reads.clear()
    by_state = _trainer(prepared, tmp_path / "state").fit(1, 3, resume=tmp_path / "state/checkpoints/last.pt", resume_state=st)
    assert "last.pt" not in reads
    assert len(st["history"]) == 2                                    # the caller's dict is left as it was
    keys = ("epoch", "stage", "train_loss", "val", "lr", "temperature")
    assert [{k: h[k] for k in keys} for h in by_state["history"]] == [{k: h[k] for k in keys} for h in by_path["history"]]
    w_path, w_state = (torch.load(tmp_path / d / "checkpoints/last.pt", weights_only=True)["encoder"] for d in ("path", "state"))
    assert all(torch.equal(w_path[k], w_state[k]) for k in w_path)

def test_the_tower_embeds_val_in_tower_batches(prepared, tmp_path, monkeypatch):
    "Without cached features the val split goes through the tower `tower_batch_size` crops at a time, not `batch_size`."
    _, tower, p = prepared
    import fashion_json_encoder.paired as paired
    sizes, orig = [], paired.tower_features
    def spy(items, tower, batch_size, *a, **kw):
        sizes.append(batch_size); return orig(items, tower, batch_size, *a, **kw)
    monkeypatch.setattr(paired, "tower_features", spy)
    cfg = dataclasses.replace(CFG, tower_batch_size=3)
    t = Trainer(cfg, p.vocab, p.train, dataclasses.replace(p.val, features=None), tmp_path, tower=tower, progress=False)
    assert sizes == [3]
    assert torch.allclose(t.val_feats, p.val.features.float(), atol=1e-3)   # the cache's features (stored in fp16)

def test_checkpoint_is_weights_only_and_self_contained(prepared, tmp_path):
    _trainer(prepared, tmp_path).fit(1, 1)
    st = torch.load(tmp_path / "checkpoints/best_model.pt", weights_only=True)
    assert st["format"] == CKPT_FORMAT and st["epoch"] == 2 and st["stage"] == "contrastive"
    assert set(st) >= {"encoder", "vocab", "config", "optimizer", "scheduler", "tower", "history", "logit_scale"}
    assert not any(k.startswith("clip") or k.startswith("visual") for k in st["encoder"])  # the frozen tower is not stored
    assert st["tower"]["pretrained"] == "none" and st["tower"]["fingerprint"] == prepared[1].fingerprint

class _Evil:
    def __reduce__(self): return (print, ("pwned",))

def test_malicious_checkpoint_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"format": CKPT_FORMAT, "x": _Evil()}, p)
    with pytest.raises(UserError, match="not a loadable fashion-json-encoder checkpoint"): load_checkpoint(p)
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match="text.pt"): load_checkpoint(tmp_path / "text.pt")

def test_atomic_write_keeps_old_file_on_crash(tmp_path, monkeypatch):
    p = save_checkpoint({"format": CKPT_FORMAT, "v": torch.tensor([1.0])}, tmp_path / "best_model.pt")
    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b"partial"); raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"): save_checkpoint({"format": CKPT_FORMAT, "v": torch.tensor([2.0])}, p)
    monkeypatch.undo()
    assert load_checkpoint(p)["v"].item() == 1.0
    assert [q.name for q in tmp_path.iterdir()] == ["best_model.pt"]  # no temporary file left

def test_standalone_targets_deterministic_and_distinct():
    ids = {"a": torch.tensor([[2, 3], [3, 2], [4, 0], [0, 0]]), "b": torch.tensor([[5], [5], [5], [0]])}
    t1, t2 = standalone_targets(ids, 16, seed=3), standalone_targets(ids, 16, seed=3)
    assert torch.equal(t1, t2) and torch.allclose(t1[0], t1[1])
    assert len({tuple(r.tolist()) for r in t1.round(decimals=5)}) == 3

def test_train_run_layout_and_evaluate(prepared, tmp_path):
    ds, tower, _ = prepared
    cfg = Config(**{**CFG.__dict__, "max_epochs": 3})
    res = train_run(cfg, ds, tmp_path, tower=tower, progress=False)
    files = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts}
    assert {"checkpoints/best_model.pt", "checkpoints/last.pt", "checkpoints/checkpoint_epoch_2.pt",
            "results/training_results.json", "results/vocab.json"} <= files
    assert any(f.startswith("logs/events.out.tfevents") for f in files)
    saved = json.loads((tmp_path / "results/training_results.json").read_text(encoding="utf-8"))
    assert [h["epoch"] for h in saved["history"]] == [1, 2, 3] and saved["config"]["max_epochs"] == 3
    assert saved["data"]["skipped"] and all(v > 0 for v in saved["data"]["skipped"].values())
    ev = evaluate_checkpoint(tmp_path / "checkpoints/best_model.pt", progress=False, tower=tower)
    assert ev["metrics"]["mrr"] == pytest.approx(res["best_metrics"]["mrr"], abs=1e-5)
    assert (tmp_path / "results/evaluation_results.json").is_file()

def test_tower_pass_matches_the_cache_and_reports_bad_photos(prepared):
    from fashion_json_encoder.paired import tower_features
    _, tower, p = prepared
    items, cached = p.train.items[:6], p.train.features[:6].float()
    skipped = []
    bad = dataclasses.replace(items[0], image_path=items[0].image_path + ".missing")
    out, keep = tower_features([bad] + items, tower, batch_size=4, on_skip=lambda it, why: skipped.append(it.key))
    assert skipped == [bad.key] and keep.tolist() == [False] + [True] * 6   # the undecodable photo: reported, no row
    assert torch.allclose(out, cached, atol=2e-3)                  # the same features the fp16 cache holds


def test_without_the_cache_an_undecodable_val_photo_leaves_the_gallery(prepared, tmp_path):
    "As with the cache: the photo is counted and dropped, not kept as a zero row that scores 0 against every query."
    _, tower, p = prepared
    bad = dataclasses.replace(p.val.items[0], image_path=p.val.items[0].image_path + ".missing")
    val = dataclasses.replace(p.val, features=None, items=[bad] + p.val.items[1:])
    t = Trainer(CFG, p.vocab, p.train, val, tmp_path, tower=tower, progress=False)
    assert len(t.val_data) == len(val) - 1 and t.val_data.items[0] is val.items[1] and t.undecodable == 1
    assert t.val_feats.shape[0] == len(t.val_data) and (t.val_feats.abs().sum(1) > 0).all()
    assert torch.equal(t.val_data.json["category"], val.json["category"][1:])
    assert t.validate()["gallery_size"] == len(val) - 1

# -- resident steps, the val subset and the final whole-split evaluation -----------------------------------------------
from fashion_json_encoder.paired import val_subset_rows

def _legacy_epoch(t, epoch, stage):
    "The per-batch loop the trainer ran before device-resident steps: host-side indexing and a .item() per step."
    t.learner.train(); total, n = 0.0, 0
    for i, idx in enumerate(t._batches(epoch)):
        t._set_lr(t._step0(epoch) + i)
        js = {k: v.to(t.device) for k, v in t.train_data.batch(idx).items()}
        if stage == "standalone":
            err = 1 - (t.encoder(js) * t.targets[idx].to(t.device)).sum(1); loss = err.mean()
        else: loss = t.learner(t.train_data.features[idx].to(t.device), js)
        t.opt.zero_grad(set_to_none=True); loss.backward(); t.opt.step()
        total += loss.item() * len(idx); n += len(idx)
    return total / n

def _run_stages(t, epoch_fn, S=1, C=2):
    losses = []
    for e in range(1, S + C + 1):
        stage = "standalone" if e <= S else "contrastive"
        if stage != t.stage: t._new_stage(stage, S, C)
        losses.append(epoch_fn(t, e, stage))
    return losses

def test_resident_steps_equal_the_per_batch_loop(prepared, tmp_path):
    new = _trainer(prepared, tmp_path / "a")
    got = _run_stages(new, lambda t, e, s: t._standalone_epoch(e) if s == "standalone" else t._contrastive_epoch(e))
    old = _trainer(prepared, tmp_path / "b")
    want = _run_stages(old, _legacy_epoch)
    assert new.train_path == ("cpu" if new.device.type == "cpu" else new.train_path)
    assert got == pytest.approx(want, abs=1e-6 if new.device.type == "cpu" else 1e-3)
    for k, v in new.encoder.state_dict().items():
        assert torch.allclose(v, old.encoder.state_dict()[k], atol=1e-6 if new.device.type == "cpu" else 1e-3), k

def test_val_subset_is_seeded_sorted_and_optional():
    a, b = val_subset_rows(100, 10, seed=3), val_subset_rows(100, 10, seed=3)
    assert torch.equal(a, b) and len(a) == 10 and torch.equal(a, a.sort().values) and len(set(a.tolist())) == 10
    assert not torch.equal(a, val_subset_rows(100, 10, seed=4))
    assert val_subset_rows(10, 10, 3) is None   # a split no larger than the subset is validated whole

def test_per_epoch_subset_and_final_whole_split(prepared, tmp_path):
    ds, tower, p = prepared
    k = len(p.val) - 2
    assert k >= 2, "the fixture's val split is too small for this test"
    cfg = dataclasses.replace(CFG, val_subset=k, max_epochs=3)
    t = Trainer(cfg, p.vocab, p.train, p.val, tmp_path, tower=tower, progress=False, info=p.info)
    res = t.fit()
    assert [h["val_items"] for h in res["history"]] == [k] * 3
    assert res["validation"] == {"per_epoch": "subset", "per_epoch_items": k, "val_items": len(p.val), "subset_seed": cfg.seed}
    fin = res["final"]
    assert fin["recomputed"] and fin["epoch"] == res["best_epoch"] and fin["items"] == len(p.val)
    assert res["final_metrics"]["gallery_size"] == len(p.val)
    saved = json.loads((tmp_path / "results/training_results.json").read_text(encoding="utf-8"))
    assert saved["final_metrics"] == pytest.approx(res["final_metrics"])
    ev = evaluate_checkpoint(tmp_path / "checkpoints/best_model.pt", progress=False, tower=tower)   # the whole split too
    assert ev["metrics"]["mrr"] == pytest.approx(fin["metrics"]["mrr"], abs=1e-5)
    # evaluate encodes the val crops again into its own cache; on the H100 that left the loss 3e-4 apart (MRR equal)
    assert ev["metrics"]["loss"] == pytest.approx(fin["metrics"]["loss"], abs=1e-4 if t.device.type == "cpu" else 1e-3)
    # the best epoch was chosen on the subset: its numbers are those of k items, not the final ones
    assert res["best_metrics"]["gallery_size"] == k

def test_validation_counts_the_same_json_as_evaluate(prepared, tmp_path):
    # two val items whose JSONs differ only by a value training never saw embed identically; they are still two JSONs
    from fashion_json_encoder.evaluation import canonical_jsons, gallery_metrics, json_groups
    from fashion_json_encoder.paired import embed_rows, make_paired
    _, tower, p = prepared
    items = list(p.val.items)
    a, b = items[0], items[1]
    twin = dict(a.json, detail=list(a.json.get("detail") or []) + ["값-훈련에-없음"])
    items[1] = dataclasses.replace(b, json=twin)
    val = make_paired(items, p.vocab, p.val.features)
    t = Trainer(CFG, p.vocab, p.train, val, tmp_path, tower=tower, progress=False, info=p.info)
    m = t.validate(whole=True)
    strings = canonical_jsons([it.json for it in items], list(p.vocab.fields))
    assert m["distinct_jsons"] == len(set(strings))
    img = torch.nn.functional.normalize(val.features.float(), dim=1)
    txt = embed_rows(t.encoder, val, t.device)
    assert torch.equal(txt[0], txt[1]), "the twin should embed like the original (its extra value is unknown)"
    ref = gallery_metrics(img, txt, t.learner.logit_scale.exp().item(), groups=json_groups(strings))
    assert m["aware_mrr"] == pytest.approx(ref["aware_mrr"], abs=1e-7) and m["distinct_jsons"] == ref["distinct_jsons"]
    # a subset is grouped the same way
    t.val_rows = torch.tensor([0, 1, 2, 3]); t.val_image = t._val_image(t.val_rows)
    assert t.validate()["distinct_jsons"] == len(set(strings[:4]))

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_epochs_shorter_than_one_graph_run_eagerly(prepared, tmp_path):
    "Batches of 8: fewer full batches per epoch than one replay holds, so nothing is captured and the path says so."
    ds, tower, p = prepared
    cfg = dataclasses.replace(CFG, dropout_rate=0.0, cuda_graphs=True, device="cuda")
    t = Trainer(cfg, p.vocab, p.train, p.val, tmp_path, tower=tower, device="cuda", progress=False, info=p.info)
    t.fit(1, 1)
    assert t.steps_per_epoch < 16 and t.train_path == "device-resident"

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_whole_step_graphs_match_eager_steps(prepared, tmp_path):
    "Batches of 2: enough steps per epoch for graph replays of 16 whole steps (Adam included) and an eager rest."
    ds, tower, p = prepared
    runs = {}
    for graphs in (True, False):
        cfg = dataclasses.replace(CFG, batch_size=2, dropout_rate=0.0, learn_temperature=True, cuda_graphs=graphs, device="cuda")
        t = Trainer(cfg, p.vocab, p.train, p.val, tmp_path / str(graphs), tower=tower, device="cuda", progress=False, info=p.info)
        res = t.fit(1, 2)
        assert t.steps_per_epoch >= 16, "the fixture is too small for one graph replay"
        assert t.train_path == ("cuda-graph" if graphs else "device-resident")
        runs[graphs] = ([h["train_loss"] for h in res["history"]], [h["lr"] for h in res["history"]],
                        t.learner.logit_scale.item(), {k: v.cpu() for k, v in t.encoder.state_dict().items()})
    (lg, rg, sg, wg), (le, re, se, we) = runs[True], runs[False]
    assert lg == pytest.approx(le, abs=1e-4) and rg == re and sg == pytest.approx(se, abs=1e-5)
    for k in wg: assert torch.allclose(wg[k], we[k], atol=1e-4), k

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_features_streamed_from_host_memory_give_the_same_loss(tmp_path, monkeypatch):
    "Features that do not fit on the GPU stay in host memory (or their mapped file); rows pass through a pinned buffer; same loss."
    from fashion_json_encoder.resident import RowsLoss, resident
    from fashion_json_encoder.models.json_encoder import JSONEncoder
    from fashion_json_encoder.models.contrastive_learner import ContrastiveLearner
    from fashion_json_encoder.models.feature_cache import feature_buffer
    enc = JSONEncoder({"category": 6, "material": 8}, 8, 16, 32, dropout_rate=0.0).cuda()
    lrn = ContrastiveLearner(enc).cuda()
    ids = enc.pack({"category": torch.randint(2, 6, (50, 1)), "material": torch.randint(0, 8, (50, 3))}).cuda()
    f = torch.randn(50, 32).half()
    mapped = feature_buffer(50, 32, tmp_path, mmap=True); mapped.copy_(f)
    assert resident(f, "cuda").device.type == "cuda"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 2**40))   # a GPU without room
    assert resident(f, "cuda") is f and resident(mapped, "cuda") is mapped               # no copy, pinned or not
    monkeypatch.undo()
    want = RowsLoss(enc, lrn, ids, features=f.cuda())(torch.tensor([4, 8, 15, 16, 23, 42], device="cuda")).item()
    for host in (f, mapped):
        mod = RowsLoss(enc, lrn, ids, features=host)
        for idx in ([4, 8, 15, 16, 23, 42], [1, 2, 3], [4, 8, 15, 16, 23, 42]):   # the buffer is reused across batches
            got = mod(torch.tensor(idx, device="cuda")).item()
            if len(idx) == 6: assert got == pytest.approx(want, abs=1e-6)
        assert mod.staging.is_pinned() and len(mod.staging) == 6


def test_training_on_memory_mapped_features_equals_in_memory(prepared, tmp_path):
    "A feature cache over the host budget lives in a memory-mapped file: training reads its rows there, with the same result."
    from fashion_json_encoder.models.feature_cache import feature_buffer, is_mapped
    _, tower, p = prepared
    mapped = feature_buffer(*p.train.features.shape, tmp_path, mmap=True); mapped.copy_(p.train.features)
    runs = {}
    for name, train in (("memory", p.train), ("mapped", dataclasses.replace(p.train, features=mapped))):
        t = Trainer(CFG, p.vocab, train, p.val, tmp_path / name, tower=tower, progress=False)
        res = t.fit(1, 2)
        runs[name] = ([h["train_loss"] for h in res["history"]], t.encoder.state_dict())
    assert is_mapped(t.train_data.features) and not is_mapped(p.train.features)
    assert runs["mapped"][0] == runs["memory"][0]
    assert all(torch.equal(v, runs["memory"][1][k]) for k, v in runs["mapped"][1].items())


# -- the learning-rate schedule, extended runs, non-finite losses, per-step logs -----------------------------------------
def test_extended_run_follows_the_schedule_of_its_new_length(prepared, tmp_path):
    "`--resume last.pt --epochs 6` after 4: the lr is the cosine of the 6-epoch run from there on, never past its end."
    short = _trainer(prepared, tmp_path / "run").fit(1, 3)
    assert short["history"][-1]["lr"] < 0.1 * CFG.learning_rate          # annealed to near 0 at the end of 4 epochs
    ext = _trainer(prepared, tmp_path / "run").fit(1, 5, resume=tmp_path / "run/checkpoints/last.pt")
    fresh = _trainer(prepared, tmp_path / "fresh").fit(1, 5)
    lrs = [h["lr"] for h in ext["history"]]
    assert lrs[4:] == pytest.approx([h["lr"] for h in fresh["history"]][4:])  # epochs 5-6 as in an uninterrupted 6-epoch run
    assert lrs[4] > lrs[5] and lrs[5] < 0.1 * CFG.learning_rate               # ... decaying to 0 again, not climbing

def test_warmup_rises_linearly_then_follows_the_cosine(prepared, tmp_path):
    t = _trainer(prepared, tmp_path)
    t.cfg = dataclasses.replace(CFG, warmup_steps=4)
    t._new_stage("contrastive", 1, 10)
    first = t.steps_per_epoch                       # the contrastive stage starts after one standalone epoch
    got = [t.lr_at(first + i) for i in range(6)]
    lr = CFG.learning_rate
    assert got[:4] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr])   # step 4 is the cosine's first: the peak
    assert got[4] == pytest.approx(lr) and got[5] < got[4]

def test_resuming_a_finished_run_says_so_and_trains_nothing(prepared, tmp_path, caplog):
    _trainer(prepared, tmp_path).fit(1, 1)
    before = (tmp_path / "checkpoints/last.pt").read_bytes()
    res = _trainer(prepared, tmp_path).fit(1, 1, resume=tmp_path / "checkpoints/last.pt")
    assert res["already_finished"] and len(res["history"]) == 2
    assert "already finished (epoch 2 of 2)" in caplog.text
    assert (tmp_path / "checkpoints/last.pt").read_bytes() == before

def test_zero_epochs_is_refused(prepared, tmp_path):
    with pytest.raises(UserError, match="nothing to train"): _trainer(prepared, tmp_path).fit(0, 0)

def test_standalone_only_is_announced(prepared, tmp_path, caplog):
    res = _trainer(prepared, tmp_path).fit(2, 0)
    assert res["best_epoch"] in (1, 2) and (tmp_path / "checkpoints/best_model.pt").is_file() and "standalone only" in caplog.text

def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    _, tower, p = prepared
    feats = p.train.features.clone(); feats[3] = float("nan")     # one poisoned row: the batch holding it has a NaN loss
    train = dataclasses.replace(p.train, features=feats)
    t = Trainer(CFG, p.vocab, train, p.val, tmp_path, tower=tower, progress=False, info=p.info)
    with pytest.raises(UserError, match=r"epoch 2, step \d+ of \d+ \(contrastive\): the training loss is nan") as e:
        t.fit(1, 2)
    assert "last.pt holds epoch 1" in str(e.value) and "\n" not in str(e.value)
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["epoch"] == 1   # the NaN weights were never written
    assert not (tmp_path / "checkpoints/best_model.pt").exists()

def test_per_step_scalars_and_config_text_in_tensorboard(prepared, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    t = _trainer(prepared, tmp_path)
    t.cfg = dataclasses.replace(CFG, log_every_n_steps=2)
    t.fit(1, 2)
    ea = EventAccumulator(str(tmp_path / "logs"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    spe = t.steps_per_epoch
    steps = [e.step for e in ea.Scalars("train_step/loss_contrastive")]
    assert steps == [g for g in range(spe, 3 * spe) if g % 2 == 0]
    assert [e.step for e in ea.Scalars("train_step/lr")] == [g for g in range(3 * spe) if g % 2 == 0]
    temps = ea.Scalars("train_step/temperature")
    assert temps and all(abs(e.value - 0.07) < 0.02 for e in temps)
    assert "config" in " ".join(ea.Tags()["tensors"])


def test_the_run_record_keeps_the_data_notes_and_skip_examples(prepared):
    "training_results.json's `data` lacked what inspect_data reports beside the skips (a truncated zip, CP949 labels ...)."
    _, _, p = prepared
    assert p.info["data"]["notes"] == dict(sorted(p.index.stats.items())) and p.info["data"]["notes"]
    ex = p.info["data"]["skip_examples"]
    assert ex and all(p.info["data"]["skipped"].get(r) for r in ex) and ex.get("invalid_json") == p.index.examples["invalid_json"]
