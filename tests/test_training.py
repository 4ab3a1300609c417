"Training: exact resume, atomic checkpoints, safe loading, and the run's output layout."
import dataclasses, json, pickle
from pathlib import Path
import pytest
import torch
from fashion_json_encoder.config import Config, UserError
from fashion_json_encoder.synthetic import make_synthetic_kfashion
from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, tiny_clip_config
from fashion_json_encoder.system import prepare_data, train_run, evaluate_checkpoint
from fashion_json_encoder.training import Trainer, CKPT_FORMAT, load_checkpoint, save_checkpoint, standalone_targets

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
    from fashion_json_encoder.training import tower_features
    _, tower, p = prepared
    items, cached = p.train.items[:6], p.train.features[:6].float()
    skipped = []
    bad = dataclasses.replace(items[0], image_path=items[0].image_path + ".missing")
    out = tower_features([bad] + items, tower, batch_size=4, on_skip=lambda it, why: skipped.append(it.key))
    assert skipped == [bad.key] and out[0].abs().sum() == 0       # the undecodable photo: reported, zero row
    assert torch.allclose(out[1:], cached, atol=2e-3)              # the same features the fp16 cache holds
