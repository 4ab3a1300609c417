"Search, tagging and evaluate extras on a tiny trained model: API and CLI, one-line errors, reproducible embeddings, baseline."
import json, os, time
from pathlib import Path
import numpy as np
import pytest
import torch
from fashion_json_encoder.config import UserError, update_config, Config
from fashion_json_encoder.synthetic import make_synthetic_kfashion
from fashion_json_encoder.system import evaluate_checkpoint
from fashion_json_encoder.querybank import metrics_from_npz
from fashion_json_encoder.search import Searcher, check_query, field_retrieval
from fashion_json_encoder.checkpoints import side_path
from fashion_json_encoder.clip_text import CLIPTextEncoder, tiny_text_config
from fashion_json_encoder.cli import main
from conftest import train_tiny_run

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("search"))

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
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# cosine") and out[1].split() == ["field", "values"] and out[2].startswith("category")
    assert len(out) == len(system.config.fields) + 2
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
    from fashion_json_encoder.evaluation import format_metrics
    table = format_metrics(res)
    assert "clip_text_en" in table and "clip_text_ko" in table and "json encoder" in table and "distinct JSONs" in table

def test_field_retrieval_reports_each_field(run):
    system, _, _, _ = run
    val = system.prepared.val
    img = torch.nn.functional.normalize(val.features.float(), dim=1)
    r = field_retrieval(img, [it.json for it in val.items], system.trainer.encoder, system.prepared.vocab, k=10)
    assert set(r["per_field"]) <= set(system.config.fields) and "category" in r["per_field"]
    assert all(0 <= p <= 1 for p in r["per_field"].values()) and all(len(w) <= 3 for w in r["weakest"].values())

def test_openai_text_weights_fail_fast_offline(monkeypatch, tmp_path):
    import time
    for var in ("HF_HUB_CACHE", "HF_HOME", "HOME", "XDG_CACHE_HOME"): monkeypatch.setenv(var, str(tmp_path))  # an empty cache, whatever this machine holds
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e: CLIPTextEncoder("ViT-B-32", "openai")
    assert "--clip_pretrained" in str(e.value) and "\n" not in str(e.value)
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


# -- issue 15 / 12: damaged side files, an index that follows its data, input checks, readable output ------------------

import shutil, zipfile
from PIL import Image
from fashion_json_encoder.search import load_image_crop, format_hits
from fashion_json_encoder.search_index import SearchIndex
from fashion_json_encoder.calibration import load_calibration


def _warnings_naming(caplog, path) -> list:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and str(path) in r.getMessage()]


def _flip_feature_byte(path: Path, row: int, n: int, d: int):
    "Set the high (sign + exponent) byte of feature (row, 0) in the zip torch.save wrote: a 'flipped byte' worth ~1e4."
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size == n * d * 2)  # the (N, D) fp16 storage
    b = bytearray(path.read_bytes())
    start = info.header_offset + 30 + int.from_bytes(b[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(b[info.header_offset + 28:info.header_offset + 30], "little")
    b[start + row * d * 2 + 1] = 0x70  # fp16 0x70xx = 8192 and more
    path.write_bytes(bytes(b))


class _Payload:
    "A pickle that would create a file when unpickled without weights_only."
    def __init__(self, target): self.target = str(target)
    def __reduce__(self): return (open, (self.target, "w"))

@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "pickle"])
def test_damaged_search_index_is_rebuilt(run, caplog, damage, tmp_path):
    "Issue 15: a flipped byte made a corrupt item rank first (score ~1e4); truncated or garbage files crashed. Now: one warning, rebuild."
    system, ckpt, _, tower = run
    cat = system.prepared.vocab.fields["category"][0]
    good = Searcher(ckpt, tower=tower).search({"category": cat}, k=3)
    p = side_path(ckpt, "index")
    n = len(SearchIndex.load(p))
    if damage == "flip": _flip_feature_byte(p, n - 1, n, 512)
    elif damage == "truncate": p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage == "garbage": p.write_bytes(b"\x00garbage" * 100)
    else: torch.save({"features": _Payload(tmp_path / "pwned")}, p)   # a side file is never unpickled with code
    caplog.clear()
    with caplog.at_level("INFO", logger="fashion_json_encoder"): hits = Searcher(ckpt, tower=tower).search({"category": cat}, k=3)
    assert len(_warnings_naming(caplog, p)) == 1, caplog.text
    assert [h["key"] for h in hits] == [h["key"] for h in good] and all(abs(h["cosine"]) <= 1.001 for h in hits)
    assert SearchIndex.load(p).digest() and len(SearchIndex.load(p)) == n  # rebuilt and sound again
    assert not (tmp_path / "pwned").exists()


@pytest.fixture
def own_run(run, tmp_path):
    "A copy of the trained checkpoint (no index, no calibration) and of the dataset, free to damage."
    ckpt = tmp_path / "run/checkpoints/best_model.pt"; ckpt.parent.mkdir(parents=True)
    shutil.copy(run[1], ckpt)
    ds = make_synthetic_kfashion(tmp_path / "kfashion", n_photos=40, seed=3)
    return ckpt, ds, run[3]


def test_search_index_follows_its_dataset(own_run, tmp_path, caplog):
    "Issue 15: after a photo was deleted `search` still returned it, and --dataset_path OTHER searched the old index."
    ckpt, ds, tower = own_run
    s = Searcher(ckpt, ds, tower=tower)
    assert len(s.index) > 0
    gone = Path(s.index.image_paths[0]); gone.unlink()          # a photo deleted from the dataset
    caplog.clear()
    with caplog.at_level("INFO", logger="fashion_json_encoder"): again = Searcher(ckpt, ds, tower=tower).index
    assert str(gone) not in again.image_paths and "changed since it was built" in caplog.text
    other = make_synthetic_kfashion(tmp_path / "other", n_photos=40, seed=3)
    caplog.clear()
    with caplog.at_level("INFO", logger="fashion_json_encoder"): moved = Searcher(ckpt, other, tower=tower).index
    assert all(p.startswith(str(other.resolve())) for p in moved.image_paths) and moved.dataset == str(other.resolve())
    assert f"built from {ds.resolve()}, not {other.resolve()}" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="fashion_json_encoder"): Searcher(ckpt, other, tower=tower).index
    assert "rebuilding" not in caplog.text  # unchanged data: the saved index is used


@pytest.mark.parametrize("content", [b"", b"\x00garbage", "truncate", "pickle"])
def test_damaged_calibration_is_removed_with_one_warning(own_run, caplog, content, tmp_path):
    "Issue 15 §3: a truncated or garbage best_model.calibration.pt crashed every command; now one warning and a recompute."
    ckpt, ds, tower = own_run
    s = Searcher(ckpt, ds, tower=tower); s.index                # builds the calibration and the index
    p = side_path(ckpt, "calibration")
    assert load_calibration(ckpt, s.encoder) is not None
    if content == "pickle": torch.save({"bank": _Payload(tmp_path / "pwned")}, p)   # never unpickled with code
    else: p.write_bytes(p.read_bytes()[:200] if content == "truncate" else content)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fashion_json_encoder"): assert load_calibration(ckpt, s.encoder) is None
    assert len(_warnings_naming(caplog, p)) == 1 and not p.exists() and not (tmp_path / "pwned").exists()
    again = Searcher(ckpt, ds, tower=tower, rebuild=True); again.index   # the next index build writes it again
    assert load_calibration(ckpt, s.encoder) is not None


@pytest.mark.parametrize("query,needle", [('{"category": ' + "[" * 1000 + '"x"' + "]" * 1000 + "}", "nested too deeply"),
                                          ('{"category": ' + "[" * 50 + '"x"' + "]" * 50 + "}", "string or a list of strings"),
                                          ('{"category": {"a": 1}}', "string or a list of strings"),
                                          ('["블라우스"]', "must be a JSON object")])
def test_query_shapes_are_one_line_errors(run, query, needle):
    with pytest.raises(UserError, match=needle) as e: check_query(query, run[0].prepared.vocab)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args,needle", [(["search", "--query", '{"category": ' + "[" * 1000 + "]" * 1000 + "}"], "nested too deeply"),
                                         (["tag", "--image", "IMG", "--box", "nan,nan,10,10"], "finite")])
def test_cli_deep_query_and_nan_box_are_one_line_exit_2(run, capsys, args, needle):
    "Issue 15 §5: a query nested 1000 deep was a RecursionError traceback, --box nan,nan,10,10 tagged the whole image."
    system, ckpt, _, _ = run
    args = [system.prepared.val.items[0].image_path if a == "IMG" else a for a in args]
    rc = main([args[0], "--checkpoint_path", str(ckpt), *args[1:], "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err


def test_counts_must_be_positive(run):
    "Issue 15 §5: k = -5 was a RuntimeError traceback, top = -3 silently returned all but 3 values."
    system, ckpt, _, tower = run
    s, cat = Searcher(ckpt, tower=tower), {"category": system.prepared.vocab.fields["category"][0]}
    it = system.prepared.val.items[0]
    for k in (-5, 0, 2.5, True):
        with pytest.raises(UserError, match="k must be a whole number >= 1"): s.search(cat, k=k)
    for top in (-3, 0):
        with pytest.raises(UserError, match="top must be a whole number >= 1"): s.tag(it.image_path, top=top)
    assert len(s.search(cat, k=10**6)) == len(s.index)          # a k beyond the gallery returns all of it


def test_missing_image_is_reported_before_the_tower_loads(own_run):
    "Issue 12 §4: `tag` with a missing --image built the index (and the tower) first."
    ckpt, ds, _ = own_run
    s = Searcher(ckpt, ds)                                        # no tower given: it would be built from the checkpoint
    with pytest.raises(UserError, match="no such image file"): s.tag(ckpt.parent / "missing.jpg")
    assert s._tower is None and not side_path(ckpt, "index").exists()


def _bomb_jpeg(path: Path, side: int = 20000) -> Path:
    "A small JPEG whose SOF0 header claims side x side pixels."
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path, quality=90)
    b = bytearray(path.read_bytes()); i = b.index(b"\xff\xc0")
    b[i + 5:i + 9] = side.to_bytes(2, "big") * 2
    path.write_bytes(bytes(b)); return path


def test_load_image_crop_checks_boxes_and_huge_headers(tmp_path, caplog):
    p = tmp_path / "photo.jpg"; Image.new("RGB", (240, 320), (10, 120, 200)).save(p)
    with pytest.raises(UserError, match="finite"): load_image_crop(p, (float("nan"), float("nan"), 10, 10))
    with pytest.raises(UserError, match="finite"): load_image_crop(p, (0, 0, float("inf"), 10))
    caplog.clear()
    with caplog.at_level("WARNING", logger="fashion_json_encoder"): crop = load_image_crop(p, (10, 10, 1000, 1200), pad=0)
    assert crop.size == (230, 310)
    assert "(10, 10, 1000, 1200)" in caplog.text and "clipped to (10, 10, 230, 310)" in caplog.text and str(p) in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fashion_json_encoder"): load_image_crop(p, (10, 10, 100, 100))
    assert not caplog.records                                      # a box inside the image says nothing
    with pytest.raises(UserError, match="outside"): load_image_crop(p, (500, 500, 10, 10))
    bomb = _bomb_jpeg(tmp_path / "bomb.jpg")
    with pytest.raises(UserError, match="too large") as e: load_image_crop(bomb)
    assert str(bomb) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="too large"): load_image_crop(_bomb_jpeg(tmp_path / "warn.jpg", 10000))  # 1e8 px: PIL only warns


def test_formatted_output_has_a_header_and_the_raw_cosine(run):
    "Issue 12 §2: the normalised score was printed with no header; now a note on its meaning, a header row and the raw cosine."
    system, _, _, _ = run
    hits = system.search({"category": system.prepared.vocab.fields["category"][0]}, k=3)
    assert all({"score", "cosine"} <= set(h) for h in hits)
    lines = format_hits(hits).splitlines()
    assert lines[0].startswith("# score: querybank-normalised") and lines[1].split()[:3] == ["rank", "score", "cosine"]
    assert len(lines) == 5 and f"{hits[0]['cosine']:7.4f}".strip() in lines[2] and f"{hits[0]['score']:8.4f}".strip() in lines[2]
    raw = system.search({"category": system.prepared.vocab.fields["category"][0]}, k=3, normalised=False)
    assert format_hits(raw).splitlines()[0].startswith("# score: the raw cosine")


# -- issue 14 §3: search at catalogue scale (the index itself: tests/test_search_index.py) --------------------------------

import dataclasses
from fashion_json_encoder import search_index
from fashion_json_encoder.search import search
from test_search_index import _storage_offset


def _brute_force(index, q, k, normalised):
    "Today's torch search: every score, then topk."
    cos = index.features.float() @ q
    score = index.beta * cos + index.qb_bias if normalised and index.qb_bias is not None else cos
    return [index.keys[i] for i in score.topk(min(k, len(index))).indices.tolist()], score


def _queries(vocab) -> list:
    v = vocab.fields
    return [{"category": v["category"][0]}, {"category": v["category"][-1], "style": [v["style"][0]]}, {"style": v["style"][-1]},
            json.dumps({"material": v["material"][0]})]


@pytest.mark.parametrize("normalised", [True, False])
def test_exact_search_matches_brute_force_torch(run, normalised):
    "A small gallery is searched exactly: the same ranking and scores as a brute-force torch ranking of every item."
    system, ckpt, _, tower = run
    s = Searcher(ckpt, tower=tower)
    assert s.index.ann is None and s.index.qb_bias is not None
    from fashion_json_encoder.models.json_encoder import encode_json
    for query in _queries(s.vocab):
        q = encode_json([check_query(query, s.vocab)], s.vocab, s.encoder).float()[0]
        keys, score = _brute_force(s.index, q, 7, normalised)
        hits = s.search(query, k=7, normalised=normalised)
        assert [h["key"] for h in hits] == keys
        for h in hits: assert h["score"] == pytest.approx(score[s.index.keys.index(h["key"])].item(), abs=1e-5)


def test_batch_search_equals_single(run):
    "A list of queries gives a list of hit lists, each the single query's hits; on the exact and on the IVF path."
    system, ckpt, _, tower = run
    s = Searcher(ckpt, tower=tower)
    qs = _queries(s.vocab)
    ivf = dataclasses.replace(s.index, ann=None).with_ann(threshold=1)
    assert ivf.ivf is not None
    for index in (s.index, ivf):
        for normalised in (True, False):
            batch = search(index, s.encoder, s.vocab, qs, k=5, normalised=normalised)
            assert len(batch) == len(qs)
            for query, hits in zip(qs, batch):
                single = search(index, s.encoder, s.vocab, query, k=5, normalised=normalised)
                assert [h["key"] for h in hits] == [h["key"] for h in single]
                assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in single], abs=1e-5)
    assert [h["key"] for h in search(ivf, s.encoder, s.vocab, qs[0], k=5)] == [h["key"] for h in s.search(qs[0], k=5)]  # all lists visited
    assert s.search(qs[:2], k=3) == search(s.index, s.encoder, s.vocab, qs[:2], k=3) and system.search(qs[:1], k=2)[0] == s.search(qs[0], k=2)
    assert search(s.index, s.encoder, s.vocab, [], k=3) == []
    with pytest.raises(UserError, match="unknown field"): s.search([qs[0], {"colour": "red"}])   # every query checked


def test_damaged_ivf_index_is_rebuilt(own_run, monkeypatch, caplog):
    "Above the threshold the Searcher saves an IVF index; a damaged one gives one warning and is rebuilt."
    ckpt, ds, tower = own_run
    monkeypatch.setattr(search_index, "APPROX_THRESHOLD", 10)
    s = Searcher(ckpt, ds, tower=tower)
    q = {"category": s.vocab.fields["category"][0]}
    good = s.search(q, k=3)
    p = side_path(ckpt, "index"); n = SearchIndex.load(p).ann.numel()
    raw = bytearray(p.read_bytes()); raw[_storage_offset(p, n) + n - 100] ^= 0xFF; p.write_bytes(bytes(raw))
    caplog.clear()
    with caplog.at_level("INFO", logger="fashion_json_encoder"): hits = Searcher(ckpt, ds, tower=tower).search(q, k=3)
    assert len(_warnings_naming(caplog, p)) == 1 and "checksum mismatch" in caplog.text, caplog.text
    assert [h["key"] for h in hits] == [h["key"] for h in good] and SearchIndex.load(p).ivf is not None


def test_previous_format_index_is_rebuilt_with_one_warning(own_run, caplog):
    "An index-2 file (its sha256 from the removed content digest: never verifiable) is refused with one warning and rebuilt."
    ckpt, ds, tower = own_run
    ix = Searcher(ckpt, ds, tower=tower).index
    p = side_path(ckpt, "index"); fields = ix._fields(); fields.pop("ann")
    torch.save({"format": "fashion-json-encoder/index-2", **fields, "sha256": ix.digest()}, p)   # even with a digest this version accepts
    with pytest.raises(ValueError, match="previous format"): SearchIndex.load(p)
    caplog.clear()
    with caplog.at_level("INFO", logger="fashion_json_encoder"): again = Searcher(ckpt, ds, tower=tower).index
    assert len(_warnings_naming(caplog, p)) == 1 and "previous format (index-2" in caplog.text, caplog.text
    assert again.keys == ix.keys and torch.equal(again.features, ix.features)
    assert torch.load(p, weights_only=True)["format"] == search_index.INDEX_FORMAT == "fashion-json-encoder/index-3"


def test_a_rebuild_walks_the_dataset_once_beyond_the_staleness_check(own_run, monkeypatch):
    "A stale index was rebuilt after three walks and hashes of the dataset (check, build, fingerprint again); now two, a fresh build one."
    from fashion_json_encoder import dataset
    from fashion_json_encoder.config import update_config
    from fashion_json_encoder.dataset import index_fingerprint
    ckpt, ds, tower = own_run
    s = Searcher(ckpt, ds, tower=tower)
    assert index_fingerprint(ds, update_config(s.cfg, feature_cache=True)) == index_fingerprint(ds, update_config(s.cfg, feature_cache=False))
    real, calls = dataset._fingerprint, []
    monkeypatch.setattr(dataset, "_fingerprint", lambda *a, **k: calls.append(1) or real(*a, **k))
    s.index
    assert len(calls) == 1                                       # no saved index: the build's own walk only (was 2)
    Path(s.index.image_paths[0]).unlink(); calls.clear()          # the data changed: the saved index is stale
    again = Searcher(ckpt, ds, tower=tower).index
    assert len(calls) == 2                                       # the staleness check, then the build (was 3)
    calls.clear(); Searcher(ckpt, ds, tower=tower).index        # the fingerprint the build saved is the one a check computes:
    assert len(calls) == 1 and again.data == search_index.dataset_fingerprint(ds, s.cfg)   # one walk, nothing rebuilt


def test_the_staleness_check_reads_no_unchanged_label(own_run, monkeypatch):
    "A saved index's check on an unzipped tree reads only the labels whose stamp changed (the run's remembered digests)."
    from fashion_json_encoder import dataset
    ckpt, ds, tower = own_run
    monkeypatch.setattr(dataset, "_SETTLED_NS", -10**12)   # the generated labels count as written long ago
    if not dataset._ctime_trusted(ds): pytest.skip(f"{ds}: its file system keeps no change time to trust")
    Searcher(ckpt, ds, tower=tower).index                  # a build (or check) remembers the digests
    real, read = dataset._label_bytes, []
    monkeypatch.setattr(dataset, "_label_bytes", lambda p: read.append(p) or real(p))
    assert Searcher(ckpt, ds, tower=tower).saved_index() is not None and read == []
    label = next(Path(ds).rglob("*.json")); os.utime(label, ns=(time.time_ns(), time.time_ns()))   # touched, same bytes
    assert Searcher(ckpt, ds, tower=tower).saved_index() is not None and 0 < len(read) <= dataset._LABEL_CHUNK


def test_calibration_read_only_for_a_build_and_the_encoder_hashed_once(run, monkeypatch):
    "A search over a saved index never reads the calibration; the encoder digest is computed once per Searcher."
    from fashion_json_encoder import search as search_mod
    system, ckpt, _, tower = run
    Searcher(ckpt, tower=tower).index                               # the index exists
    reads, digests = [], []
    real_load, real_digest = search_mod.load_calibration, search_mod.encoder_digest
    monkeypatch.setattr(search_mod, "load_calibration", lambda *a, **k: reads.append(1) or real_load(*a, **k))
    monkeypatch.setattr(search_mod, "encoder_digest", lambda e: digests.append(1) or real_digest(e))
    s = Searcher(ckpt, tower=tower)
    s.search({"category": system.prepared.vocab.fields["category"][0]}, k=2); s.index
    assert reads == [] and len(digests) == 1
    s.build_index()                                                 # a build reads it, once, and hashes nothing again
    assert len(reads) == 1 and len(digests) == 1


def test_load_image_crop_reads_zip_members_with_one_line_errors(tmp_path):
    p = tmp_path / "photo.jpg"; Image.new("RGB", (240, 320), (10, 120, 200)).save(p)
    z = tmp_path / "photos.zip"
    with zipfile.ZipFile(z, "w") as zf: zf.write(p, "a/photo.jpg"); zf.writestr("a/junk.jpg", b"not a jpeg"); zf.write(_bomb_jpeg(tmp_path / "b.jpg"), "a/bomb.jpg")
    crop = load_image_crop(f"{z}::a/photo.jpg", (10, 20, 100, 50), pad=0)
    assert crop.size == (100, 50) and crop.tobytes() == load_image_crop(p, (10, 20, 100, 50), pad=0).tobytes()
    for path, needle in ((f"{z}::a/gone.jpg", "no such image file"), (f"{tmp_path}/none.zip::a/photo.jpg", "no such image file"),
                         (f"{z}::a/junk.jpg", "cannot read image"), (f"{z}::a/bomb.jpg", "too large")):
        with pytest.raises(UserError, match=needle) as e: load_image_crop(path)
        assert path in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="outside"): load_image_crop(f"{z}::a/photo.jpg", (500, 500, 10, 10))


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), OSError(5, "Input/output error")])
def test_unreadable_calibration_is_kept_with_one_warning(own_run, monkeypatch, caplog, error):
    "An OSError reading the calibration (a permission, a bad disk) is not damage: the file stays; a MemoryError is not swallowed."
    ckpt, ds, tower = own_run
    s = Searcher(ckpt, ds, tower=tower); s.index
    p = side_path(ckpt, "calibration"); before = p.read_bytes()
    def fail(*a, **k): raise error
    monkeypatch.setattr(torch, "load", fail)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fashion_json_encoder"): assert load_calibration(ckpt, s.encoder) is None
    assert len(_warnings_naming(caplog, p)) == 1 and "not readable" in caplog.text and p.read_bytes() == before
    def oom(*a, **k): raise MemoryError
    monkeypatch.setattr(torch, "load", oom)
    with pytest.raises(MemoryError): load_calibration(ckpt, s.encoder)
    assert p.read_bytes() == before


def test_search_and_evaluate_share_one_calibration_and_the_index_follows_it(run, tmp_path, caplog):
    """Search calibrated on the decodable training crops and evaluate on every labelled one (two banks, one file); a β that
    evaluate chose again left a saved index with the old one. Now: one bank, an identical calibration is not rewritten,
    and a changed one rebuilds the index."""
    from fashion_json_encoder.calibration import _calib_digest
    from fashion_json_encoder.search_index import file_stamp
    from fashion_json_encoder.prepare import prepare_data
    from fashion_json_encoder.checkpoints import RunDir
    ckpt = tmp_path / "run/checkpoints/best_model.pt"; ckpt.parent.mkdir(parents=True); shutil.copy(run[1], ckpt)
    ds, tower = make_synthetic_kfashion(tmp_path / "kfashion", n_photos=40, seed=3, bad_cases=True), run[3]
    s = Searcher(ckpt, ds, tower=tower); ix = s.index
    p = side_path(ckpt, "calibration"); mine = load_calibration(ckpt, s.encoder); stamp = file_stamp(p)
    ev = evaluate_checkpoint(ckpt, ds, tower=tower, progress=False)
    prep = prepare_data(update_config(s.cfg, feature_cache=True), ds, RunDir.of(ckpt).root, vocab=s.vocab, tower=tower, progress=False)
    assert len(prep.index.items["train"]) > len(prep.train.items), "the data should hold training crops that do not decode"
    theirs = load_calibration(ckpt, s.encoder)
    assert theirs["bank_strings"] == mine["bank_strings"] and torch.equal(theirs["bank_logw"], mine["bank_logw"])
    assert file_stamp(p) == stamp and Searcher(ckpt, ds, tower=tower).saved_index() is not None   # kept: the same calibration
    other = dict(theirs, beta=theirs["beta"] * 2)          # a calibration chosen again, with another beta
    time.sleep(0.01); torch.save(other | {"sha256": _calib_digest(other)}, p)
    caplog.clear()
    with caplog.at_level("INFO", logger="fashion_json_encoder"): assert Searcher(ckpt, ds, tower=tower).saved_index() is None
    assert "calibration" in caplog.text and "changed since it was built" in caplog.text
    assert Searcher(ckpt, ds, tower=tower).index.beta == other["beta"] != ix.beta
    # a copy of the run (new timestamps, the same content) keeps its index: a CPU server must not rebuild for hours
    shutil.copy(p, p.with_suffix(".copy")); time.sleep(0.01); os.replace(p.with_suffix(".copy"), p)
    assert file_stamp(p) != Searcher(ckpt, ds, tower=tower).index.calibration_file
    assert Searcher(ckpt, ds, tower=tower).saved_index() is not None
    # an index saved before it recorded its calibration (no fields, the same checksum) is read and kept, unless the
    # calibration was written after it
    old = side_path(ckpt, "index"); saved = torch.load(old, weights_only=True)
    legacy = {k: v for k, v in saved.items() if k not in ("calibration_file", "calibration", "sha256")}
    torch.save(legacy | {"sha256": SearchIndex(**{k: v for k, v in legacy.items() if k != "format"}).digest()}, old)
    assert SearchIndex.load(old).calibration_file == SearchIndex.load(old).calibration == ""
    assert Searcher(ckpt, ds, tower=tower).saved_index() is not None
    later = old.stat().st_mtime_ns + 10**9; os.utime(p, ns=(later, later))
    caplog.clear()
    with caplog.at_level("INFO", logger="fashion_json_encoder"): assert Searcher(ckpt, ds, tower=tower).saved_index() is None
    assert "changed since it was built" in caplog.text and "checksum" not in caplog.text


def test_cli_search_tag_serve_take_a_device_checked_first(run, capsys, monkeypatch):
    "--device picks where the tower and the index build run; a malformed one is a one-line error before the checkpoint is read."
    system, ckpt, _, _ = run
    for cmd, extra in (("search", ["--query", '{"category": "x"}']), ("tag", ["--image", "missing.jpg"])):
        assert main([cmd, "--checkpoint_path", str(ckpt), *extra, "--device", "gpu", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err == "error: device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'\n", err
    import fashion_json_encoder.app as app_mod
    seen = {}
    monkeypatch.setattr(app_mod, "make_app", lambda *a, **kw: seen.update(kw) or (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit): main(["serve", "--checkpoint_path", str(ckpt), "--device", "cpu", "--quiet"])
    assert seen["device"] == "cpu"
    s = Searcher(ckpt, device="cpu")
    assert s.device == torch.device("cpu") and s.tower.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_searcher_on_cuda_tags_and_builds_like_the_cpu(run, tmp_path):
    "A Searcher on CUDA: its tower runs there, tags agree with the CPU's and the index it builds holds the same querybank term."
    system, ckpt, _, _ = run
    it = system.prepared.val.items[0]; b = it.box; box = (b[0], b[1], b[2] - b[0], b[3] - b[1])
    cpu, gpu = Searcher(ckpt, device="cpu", rebuild=True), Searcher(ckpt, device="cuda", rebuild=True)
    assert gpu.tower.device.type == "cuda"
    tc, tg = cpu.tag(it.image_path, box, 3), gpu.tag(it.image_path, box, 3)
    for f in tc: assert [round(s, 3) for _, s in tc[f]] == pytest.approx([round(s, 3) for _, s in tg[f]], abs=2e-3)
    ic, ig = cpu.build_index(), gpu.build_index()
    assert ic.keys == ig.keys and torch.allclose(ic.qb_bias, ig.qb_bias, atol=1e-3, rtol=0)


def test_a_run_that_decoded_on_its_gpu_evaluates_and_searches_on_a_cpu(own_run, caplog):
    "decode 'gpu' recorded in the checkpoint (a GPU run) was refused by evaluate and search on a CPU machine ('--decode gpu needs ...')."
    from fashion_json_encoder.checkpoints import load_checkpoint, save_checkpoint
    ckpt, ds, tower = own_run
    st = load_checkpoint(ckpt); st["config"]["decode"] = "gpu"; st["dataset_path"] = str(ds)
    save_checkpoint(st, ckpt)
    with caplog.at_level("INFO", logger="fashion_json_encoder"):
        m = evaluate_checkpoint(ckpt, device="cpu", tower=tower, progress=False)
        hits = Searcher(ckpt, tower=tower, device="cpu").search({"category": Searcher(ckpt).vocab.fields["category"][0]}, k=2)
    assert 0 <= m["metrics"]["mrr"] <= 1 and len(hits) == 2
    assert sum("decoded on the CPU" in r.getMessage() for r in caplog.records) == 2


def test_a_calibration_recomputed_on_another_device_keeps_the_index(own_run):
    "evaluate on a CPU after a GPU built the index: the bank differs in its last bits and the file was rewritten (a rebuild of hours)."
    import copy
    from fashion_json_encoder.calibration import calibrate_checkpoint
    from fashion_json_encoder.evaluation import canonical_jsons
    from fashion_json_encoder.paired import embed_rows
    from fashion_json_encoder.prepare import prepare_data
    from fashion_json_encoder.checkpoints import RunDir
    from fashion_json_encoder.search_index import file_stamp
    ckpt, ds, tower = own_run
    s = Searcher(ckpt, ds, tower=tower); s.index
    p = side_path(ckpt, "calibration"); stamp, saved = file_stamp(p), load_calibration(ckpt, s.encoder)
    prep = prepare_data(update_config(s.cfg, feature_cache=True), ds, RunDir.of(ckpt).root, vocab=s.vocab, tower=tower, progress=False)
    other = copy.deepcopy(s.encoder)   # "another device": the same weights up to the last bits of its arithmetic
    with torch.no_grad():
        for w in other.parameters(): w.mul_(1 + 1e-7)
    vi = torch.nn.functional.normalize(prep.val.features.float(), dim=1)
    again = calibrate_checkpoint(ckpt, other, s.vocab, [it.json for it in prep.index.items["train"]], vi, embed_rows(other, prep.val, "cpu"),
                                 canonical_jsons([it.json for it in prep.val.items], list(s.vocab.fields)), s.digest)
    assert not torch.equal(again["bank"], saved["bank"]) and again["beta"] == saved["beta"]
    assert file_stamp(p) == stamp and Searcher(ckpt, ds, tower=tower).saved_index() is not None
