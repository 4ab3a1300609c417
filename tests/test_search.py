"Search, tagging and evaluate extras on a tiny trained model: API and CLI, one-line errors, reproducible embeddings, baseline."
import json
from pathlib import Path
import numpy as np
import pytest
import torch
from fashion_json_encoder.config import UserError, update_config, Config
from fashion_json_encoder.synthetic import make_synthetic_kfashion
from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, tiny_clip_config
from fashion_json_encoder.system import FashionEncoderSystem, evaluate_checkpoint
from fashion_json_encoder.evaluation import metrics_from_npz
from fashion_json_encoder.search import Searcher, check_query, field_retrieval, side_path
from fashion_json_encoder.clip_text import CLIPTextEncoder, tiny_text_config
from fashion_json_encoder.cli import main

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("search")
    ds = make_synthetic_kfashion(d / "kfashion", n_photos=40, seed=3)
    tower = CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(), seed=0)
    system = FashionEncoderSystem(output_dir=d / "run", batch_size=16, progress=False, clip_pretrained="none", num_workers=0)
    system.setup_data(ds, tower=tower).setup_trainer().train(standalone_epochs=1, contrastive_epochs=2)
    return system, d / "run/checkpoints/best_model.pt", ds, tower

def test_search_api_returns_items_and_saves_index(run):
    system, ckpt, _, _ = run
    v = system.prepared.vocab.fields
    hits = system.search({"category": v["category"][0], "style": [v["style"][0]]}, k=4)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert all(Path(h["image_path"]).is_file() and len(h["box"]) == 4 and isinstance(h["json"], dict) for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert side_path(ckpt, "index").is_file() and side_path(ckpt, "calibration").is_file()
    s = Searcher(ckpt, tower=run[3])                       # reloads the saved index, nothing rebuilt
    assert s.search({"category": v["category"][0]}, k=2)[0]["key"] == system.search({"category": v["category"][0]}, k=2)[0]["key"]

def test_tag_api_ranks_every_field(run):
    system, _, _, _ = run
    it = system.prepared.val.items[0]; b = it.box
    tags = system.tag(it.image_path, box=(b[0], b[1], b[2] - b[0], b[3] - b[1]), top=3)
    assert list(tags) == list(system.config.fields)
    for f, vs in tags.items():
        assert 1 <= len(vs) <= 3 and all(v in system.prepared.vocab.fields[f] for v, _ in vs)
        assert [s for _, s in vs] == sorted((s for _, s in vs), reverse=True)
    with pytest.raises(UserError, match="outside"): system.tag(it.image_path, box=(1e5, 1e5, 10, 10))

@pytest.mark.parametrize("query,needle", [({"colour": "red"}, "valid fields: category, style, silhouette, material, detail"),
                                          ({"category": "블라우즈"}, "closest valid values:"),
                                          ("{not json", "not valid JSON"), ({}, "empty query")])
def test_bad_queries_name_what_is_valid(run, query, needle):
    with pytest.raises(UserError, match=needle) as e: check_query(query, run[0].prepared.vocab)
    assert "\n" not in str(e.value)

@pytest.mark.parametrize("args,needle", [(["--query", '{"colour": "red"}'], "valid fields"),
                                         (["--query", '{"category": "블라우즈"}'], "closest valid values")])
def test_cli_search_errors_are_one_line_exit_2(run, capsys, args, needle):
    rc = main(["search", "--checkpoint_path", str(run[1]), *args, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err

def test_cli_search_and_tag(run, capsys):
    system, ckpt, _, _ = run
    cat = system.prepared.vocab.fields["category"][0]
    assert main(["search", "--checkpoint_path", str(ckpt), "--query", json.dumps({"category": cat}), "--k", "3", "--json", "--quiet"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and {"image_path", "box", "score", "json"} <= set(hits[0])
    it = system.prepared.val.items[0]; b = it.box
    assert main(["tag", "--checkpoint_path", str(ckpt), "--image", it.image_path, "--box",
                 f"{b[0]},{b[1]},{b[2] - b[0]},{b[3] - b[1]}", "--top", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("category") and len(out.splitlines()) == len(system.config.fields)
    assert main(["tag", "--checkpoint_path", str(ckpt), "--image", it.image_path, "--box", "1,2,3", "--quiet"]) == 2
    assert "x,y,w,h" in capsys.readouterr().err

def test_save_embeddings_reproduces_every_metric_and_baseline_runs(run, tmp_path):
    system, ckpt, ds, tower = run
    res = evaluate_checkpoint(ckpt, ds, tower=tower, progress=False, save_embeddings=tmp_path / "emb.npz", baseline="clip_text",
                              text_tower=CLIPTextEncoder(pretrained="none", model_cfg=tiny_text_config()))
    z = np.load(tmp_path / "emb.npz")
    assert z["image"].shape == z["json"].shape and len(z["keys"]) == len(z["json_strings"]) == res["metrics"]["gallery_size"]
    again = metrics_from_npz(tmp_path / "emb.npz")
    assert again.keys() == res["metrics"].keys() and "norm_j2i_mrr" in again
    for k, v in res["metrics"].items(): assert again[k] == pytest.approx(v, abs=1e-6), k
    assert set(res["baselines"]) == {"clip_text_en", "clip_text_ko"}
    from fashion_json_encoder.system import format_metrics
    table = format_metrics(res)
    assert "clip_text_en" in table and "clip_text_ko" in table and "json encoder" in table and "distinct JSONs" in table

def test_field_retrieval_reports_each_field(run):
    system, _, _, _ = run
    val = system.prepared.val
    img = torch.nn.functional.normalize(val.features.float(), dim=1)
    r = field_retrieval(img, [it.json for it in val.items], system.trainer.encoder.cpu(), system.prepared.vocab, k=10)
    assert set(r["per_field"]) <= set(system.config.fields) and "category" in r["per_field"]
    assert all(0 <= p <= 1 for p in r["per_field"].values()) and all(len(w) <= 3 for w in r["weakest"].values())

def test_openai_text_weights_fail_fast_offline(monkeypatch):
    import time
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    try: CLIPTextEncoder("ViT-B-32", "openai")
    except UserError as e: assert "--clip_pretrained" in str(e) and "\n" not in str(e)
    else: pytest.skip("openai weights are cached on this machine")
    assert time.perf_counter() - t0 < 10

def test_cli_evaluate_plot_embeddings_and_baseline(run, tmp_path, capsys):
    system, ckpt, ds, _ = run   # the CLI rebuilds the recorded ViT-B-32 random tower: numbers are meaningless, paths are not
    rc = main(["evaluate", "--checkpoint_path", str(ckpt), "--dataset_path", str(ds), "--split", "val", "--output_dir", str(tmp_path),
               "--save_embeddings", str(tmp_path / "e.npz"), "--plot", "--baseline", "clip_text", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "clip_text_en" in out and "clip_text_ko" in out and "json->image QB" in out
    assert (tmp_path / "results/umap.png").read_bytes()[:4] == b"\x89PNG"
    res = json.loads((tmp_path / "results/evaluation_results.json").read_text(encoding="utf-8"))
    again = metrics_from_npz(tmp_path / "e.npz")
    for k, v in res["metrics"].items(): assert again[k] == pytest.approx(v, abs=1e-6), k
