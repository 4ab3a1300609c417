"Tests of the on-disk CLIP feature cache (fashion_json_encoder.models.feature_cache)."
import json, os
from pathlib import Path
import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image
from safetensors import safe_open

from fashion_json_encoder.data import Item, load_crop
from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, tiny_clip_config
from fashion_json_encoder.models.feature_cache import (build_feature_cache, plan_photo_chunks, read_chunks, cache_path,
                                                       cache_key, chunk_digest, FeatureCache)
from fashion_json_encoder.data import CropDataset, collate_crops


def _item(key, path, crop=(4, 6, 70, 90)):
    return Item(key, str(path), "상의", tuple(map(float, crop)), tuple(crop), {"category": "블라우스"}, key)


def _jpegs(folder: Path, n: int, size=(80, 100)) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        p = folder / f"{i}.jpg"
        im = Image.new("RGB", size, (17 * i % 256, 90, 200 - 7 * i % 200))
        im.paste((255 - 13 * i % 256, 30, 60), (10, 20, 40 + i % 30, 60))
        im.save(p, quality=90)
        items.append(_item(f"모던/{i}/상의", p))
    return items


@pytest.fixture(scope="module")
def tower(): return CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(), seed=0)


@pytest.fixture
def items(tmp_path): return _jpegs(tmp_path / "img", 12)


def _count_calls(monkeypatch, tower, fail_after=None):
    calls = []
    real = type(tower).forward
    def forward(images):
        if fail_after is not None and len(calls) >= fail_after: raise KeyboardInterrupt("simulated interrupt")
        calls.append(len(images)); return real(tower, images)
    monkeypatch.setattr(tower, "forward", forward)
    return calls


def _build(items, tower, d, **kw): return build_feature_cache(items, tower, d, **{"batch_size": 4, "num_workers": 0, "progress": False, **kw})


def test_features_match_the_tower(items, tower, tmp_path):
    fc = _build(items, tower, tmp_path / "c")
    assert isinstance(fc, FeatureCache) and fc.features.shape == (12, 512) and fc.features.dtype == torch.float16
    assert fc.keys == [it.key for it in items] and fc.skipped == {} and fc.n_computed == 12
    assert fc.build_seconds > 0 and fc.images_per_s > 0
    direct = tower(torch.stack([tower.preprocess(load_crop(it, tower.image_size)) for it in items]))
    torch.testing.assert_close(fc.features.float(), direct, atol=2e-3, rtol=0)
    assert fc.index(items[5].key) == 5 and items[5].key in fc
    torch.testing.assert_close(fc.lookup([items[7].key, items[2].key]), fc.features[[7, 2]])


def test_second_build_is_a_pure_hit(items, tower, tmp_path, monkeypatch):
    first = _build(items, tower, tmp_path / "c")
    calls = _count_calls(monkeypatch, tower)
    again = _build(items, tower, tmp_path / "c")
    assert calls == [] and (again.n_cached, again.n_computed, again.images_per_s) == (12, 0, 0.)
    assert torch.equal(again.features, first.features) and again.path == first.path


def test_invalidation(items, tower, tmp_path, monkeypatch):
    d = tmp_path / "c"
    base = _build(items, tower, d, crop_padding=0.1)
    other_size = CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(image_size=32), seed=0)
    other_weights = CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(), seed=1)
    assert _build(items, tower, d, crop_padding=0.2).path != base.path
    assert _build(items, other_size, d, crop_padding=0.1).path != base.path
    assert _build(items, other_weights, d, crop_padding=0.1).path != base.path
    assert len({cache_path(d, cache_key(t, 0.1)) for t in (tower, other_size, other_weights)}) == 3
    calls = _count_calls(monkeypatch, tower)
    st_ = os.stat(items[3].image_path)
    os.utime(items[3].image_path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000))  # the photo was touched
    moved = [*items[:5], _item(items[5].key, items[5].image_path, (0, 0, 80, 100)), *items[6:]]  # its crop box changed
    fc = _build(moved, tower, d, crop_padding=0.1)
    assert fc.path == base.path and fc.n_computed == 2 and sum(calls) == 2
    unchanged = [i for i in range(12) if i not in (3, 5)]
    assert torch.equal(fc.features[unchanged], base.features[unchanged])
    assert not torch.equal(fc.features[5], base.features[5])


def test_resume_after_interrupt(items, tower, tmp_path, monkeypatch):
    reference = _build(items, tower, tmp_path / "ref")
    _count_calls(monkeypatch, tower, fail_after=2)
    with pytest.raises(KeyboardInterrupt): _build(items, tower, tmp_path / "c", chunk_size=4)
    root = cache_path(tmp_path / "c", cache_key(tower))
    assert len(list(root.glob("chunk_*.safetensors"))) == 2 and not list(root.glob("*.tmp"))
    assert len(read_chunks(root)[0]) == 8
    monkeypatch.undo()
    calls = _count_calls(monkeypatch, tower)
    fc = _build(items, tower, tmp_path / "c", chunk_size=4)
    assert sum(calls) == 4 and (fc.n_cached, fc.n_computed) == (8, 4)
    assert torch.equal(fc.features, reference.features)


def test_bad_and_missing_photos_are_skipped_not_fatal(items, tower, tmp_path):
    good = Path(items[0].image_path).read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    bad = [_item("모던/t/상의", tmp_path / "trunc.jpg"), _item("모던/j/하의", tmp_path / "junk.jpg"),
           _item("모던/m/아우터", tmp_path / "missing.jpg")]
    mixed = items[:3] + bad + items[3:6]
    fc = _build(mixed, tower, tmp_path / "c", num_workers=2)  # the real pipeline: decoding in worker processes
    assert fc.skipped == {"모던/t/상의": "bad_image", "모던/j/하의": "bad_image", "모던/m/아우터": "missing_image"}
    assert "trunc.jpg" in fc.skip_details["모던/t/상의"]
    assert fc.keys == [it.key for it in items[:6]] and fc.features.shape == (6, 512)
    again = _build(mixed, tower, tmp_path / "c", num_workers=2)  # a bad photo is not retried until its file changes
    assert again.n_computed == 0 and again.skipped == fc.skipped


def test_all_bad_batch_and_whole_chunk_skipped(tower, tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    fc = _build([_item(f"k/{i}/상의", tmp_path / "junk.jpg") for i in range(5)], tower, tmp_path / "c", chunk_size=4)
    assert len(fc.skipped) == 5 and fc.features.shape == (0, 512)


def test_disjoint_shards_merge_into_one_cache(items, tower, tmp_path, monkeypatch):
    "Two 'ranks' encode their plan_photo_chunks shards into one folder: the same chunk files as one process writes (issue 7)."
    from fashion_json_encoder.decode import photo_groups
    single = _build(items, tower, tmp_path / "single", chunk_size=4)
    groups = photo_groups(range(len(items)), items)
    for rank in range(2):  # sequential stand-ins for two processes
        mine = [items[i] for c in plan_photo_chunks([len(g) for g in groups], 4, rank, 2) for p in c for i in groups[p]]
        _build(mine, tower, tmp_path / "shared", chunk_size=4)
    shared = cache_path(tmp_path / "shared", cache_key(tower))
    def files(root):  # name -> (metadata, features); safetensors orders header keys at random, so not raw bytes
        out = {}
        for p in root.glob("chunk_*.safetensors"):
            with safe_open(str(p), "pt") as f: out[p.name] = (f.metadata(), f.get_tensor("features"))
        return out
    a, b = files(shared), files(single.path)
    assert len(a) == 3 and a.keys() == b.keys()
    for name in a: assert a[name][0] == b[name][0] and torch.equal(a[name][1], b[name][1]), name
    calls = _count_calls(monkeypatch, tower)
    merged = _build(items, tower, tmp_path / "shared", chunk_size=4)
    assert calls == [] and torch.equal(merged.features, single.features) and merged.keys == single.keys


def test_unreadable_chunk_is_ignored_and_recomputed(items, tower, tmp_path):
    fc = _build(items, tower, tmp_path / "c", chunk_size=4)
    victim = sorted(fc.path.glob("chunk_*.safetensors"))[0]
    victim.write_bytes(b"garbage")
    (fc.path / ".chunk_leftover.123.tmp").write_bytes(b"partial write")  # a crash mid-write leaves only a tmp file
    again = _build(items, tower, tmp_path / "c", chunk_size=4)
    assert again.n_computed == 4 and torch.equal(again.features, fc.features)


@given(sizes=st.lists(st.integers(1, 4), max_size=200), size=st.integers(1, 50), world=st.integers(1, 5))
def test_plan_chunks_disjoint_and_complete(sizes, size, world):
    shards = [[i for c in plan_photo_chunks(sizes, size, r, world) for i in c] for r in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(len(sizes)))  # no gaps, no duplicates
    assert all(sum(sizes[p] for p in c) <= size or len(c) == 1 for c in plan_photo_chunks(sizes, size))
    n = len(sizes)   # one crop per photo: consecutive fixed-size chunks
    assert plan_photo_chunks([1] * n, size) == [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def test_crop_inputs_for_the_per_batch_path(items, tower, tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    ds = CropDataset(items[:2] + [_item("x/1/상의", tmp_path / "junk.jpg")], tower.preprocess, min_side=tower.image_size)
    pixels, ok, bad = collate_crops([ds[i] for i in range(3)])
    assert pixels.shape == (2, 3, 64, 64) and ok == [0, 1] and bad[0][0] == 2
    assert collate_crops([ds[2]])[0] is None


def test_bf16_tower_is_checked(items, tmp_path, monkeypatch):
    lp = CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(), seed=0, precision="bf16")
    fc = _build(items, lp, tmp_path / "c")
    assert fc.path.name.startswith("ViT-B-32-bf16-") and fc.features.shape == (12, 512)
    from fashion_json_encoder.models import feature_cache as fcm
    from fashion_json_encoder.config import UserError
    monkeypatch.setattr(fcm, "check_precision", lambda t, x: (_ for _ in ()).throw(UserError("bf16 CLIP features disagree")))
    with pytest.raises(UserError, match="disagree"): _build(items, lp, tmp_path / "c2")


def _data_start(path: Path) -> int:  # safetensors: 8-byte little-endian header length, the JSON header, then the tensor bytes
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("damage", ["flip", "truncate", "nan_fill"])
def test_damaged_chunk_is_detected_and_reencoded(items, tower, tmp_path, caplog, damage):
    "Issue 15: flipped bytes were used silently and a 0xFF fill (fp16 NaN) poisoned the run; now one warning and a re-encode."
    fc = _build(items, tower, tmp_path / "c", chunk_size=4)
    victim = sorted(fc.path.glob("chunk_*.safetensors"))[1]
    b, s = bytearray(victim.read_bytes()), _data_start(victim)
    if damage == "flip": b[s + 101] ^= 0x40          # one exponent bit of one fp16 value
    elif damage == "nan_fill": b[s:s + 64] = b"\xff" * 64
    else: b = b[: len(b) - 300]
    victim.write_bytes(bytes(b))
    caplog.clear()
    with caplog.at_level("WARNING", logger="fashion_json_encoder"): again = _build(items, tower, tmp_path / "c", chunk_size=4)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and victim.name in warned[0], warned
    assert again.n_computed == 4 and torch.isfinite(again.features.float()).all()
    assert torch.equal(again.features, fc.features)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fashion_json_encoder"): third = _build(items, tower, tmp_path / "c", chunk_size=4)
    assert third.n_computed == 0 and not caplog.records  # repaired: the next build is a pure hit


def test_legacy_chunks_are_verified_and_get_a_checksum(items, tower, tmp_path, monkeypatch):
    "Chunks written before checksums are kept when their rows are finite and unit-norm, then rewritten with a checksum."
    from safetensors.torch import save_file
    fc = _build(items, tower, tmp_path / "c", chunk_size=4)
    chunks = sorted(fc.path.glob("chunk_*.safetensors"))
    for i, p in enumerate(chunks):  # the format before issue 15: no 'sha256' metadata
        with safe_open(str(p), "pt") as f: meta, feats = f.metadata(), f.get_tensor("features")
        if i == 0: feats = feats * 3  # a damaged legacy chunk: rows are no longer unit-norm
        save_file({"features": feats}, str(p), metadata={"ids": meta["ids"], "skipped": meta["skipped"]})
    calls = _count_calls(monkeypatch, tower)
    again = _build(items, tower, tmp_path / "c", chunk_size=4)
    assert sum(calls) == 4 and again.n_computed == 4 and torch.equal(again.features, fc.features)
    for p in fc.path.glob("chunk_*.safetensors"):
        with safe_open(str(p), "pt") as f: assert "sha256" in f.metadata(), p


@pytest.mark.parametrize("manifest,kept", [(b'{"key": {"vers', True), (b"\x00\xffgarbage", True), (b"[1, 2]", True),
                                           (b'{"key": {"version": 0, "model": "other"}}', False)])
def test_damaged_manifest_is_rewritten(items, tower, tmp_path, caplog, manifest, kept):
    "Issue 15 §3: a truncated, garbage or foreign manifest.json raised (JSONDecodeError, bare RuntimeError); now one warning."
    fc = _build(items, tower, tmp_path / "c", chunk_size=4)
    (fc.path / "manifest.json").write_bytes(manifest)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fashion_json_encoder"): again = _build(items, tower, tmp_path / "c", chunk_size=4)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and str(fc.path / "manifest.json") in warned[0], warned
    assert again.n_computed == (0 if kept else 12) and torch.equal(again.features, fc.features)
    import json
    assert json.loads((fc.path / "manifest.json").read_text(encoding="utf-8"))["key"] == cache_key(tower)


def test_non_finite_tower_output_is_never_cached(items, tower, tmp_path, monkeypatch):
    "A row the tower returns as NaN is skipped ('bad_feature'), never written where every epoch would read it."
    real = type(tower).forward
    def forward(images):
        out = real(tower, images); out[0] = float("nan"); return out
    monkeypatch.setattr(tower, "forward", forward)
    fc = _build(items[:4], tower, tmp_path / "c", batch_size=4)
    assert list(fc.skipped.values()) == ["bad_feature"] and len(fc) == 3 and torch.isfinite(fc.features.float()).all()


def _count_reads(monkeypatch):
    "Count chunk reads by the build: load_chunk calls and every safe_open of the module (load_chunk's own included)."
    from fashion_json_encoder.models import feature_cache as fcm
    n = {"load_chunk": 0, "safe_open": 0}
    real_load, real_open = fcm.load_chunk, fcm.safe_open
    def load(p, *a, **k): n["load_chunk"] += 1; return real_load(p, *a, **k)
    def sopen(*a, **k): n["safe_open"] += 1; return real_open(*a, **k)
    monkeypatch.setattr(fcm, "load_chunk", load); monkeypatch.setattr(fcm, "safe_open", sopen)
    return n


def test_each_chunk_is_read_once_per_build(items, tower, tmp_path, monkeypatch):
    "Review fix: a chunk was opened by load_chunk, again for its rows, and chunks just written were read back; now once."
    reference = _build(items, tower, tmp_path / "ref", chunk_size=4)
    n = _count_reads(monkeypatch)
    cold = _build(items, tower, tmp_path / "c", chunk_size=4)  # 3 chunks written by this build: none read back
    assert n == {"load_chunk": 0, "safe_open": 0} and torch.equal(cold.features, reference.features)
    n.update(load_chunk=0, safe_open=0)
    hit = _build(items, tower, tmp_path / "c", chunk_size=4)  # fully cached: each chunk read (and verified) once
    assert n == {"load_chunk": 3, "safe_open": 3} and hit.n_computed == 0 and torch.equal(hit.features, reference.features)
    sorted(hit.path.glob("chunk_*.safetensors"))[0].unlink()
    n.update(load_chunk=0, safe_open=0)
    resumed = _build(items, tower, tmp_path / "c", chunk_size=4)  # 2 chunks read once, the re-encoded one not read
    assert n == {"load_chunk": 2, "safe_open": 2} and resumed.n_computed == 4 and torch.equal(resumed.features, reference.features)


def test_chunk_that_cannot_be_read_is_kept(items, tower, tmp_path, monkeypatch, caplog):
    "Review fix: an OSError (permissions, EIO) says nothing about the contents: one warning, the file stays, its crops are re-encoded."
    from fashion_json_encoder.models import feature_cache as fcm
    fc = _build(items, tower, tmp_path / "c", chunk_size=4)
    victim = sorted(fc.path.glob("chunk_*.safetensors"))[1]
    before = victim.read_bytes()
    real = fcm.load_chunk
    def load(p, *a, **k):
        if Path(p) == victim: raise PermissionError(13, "Permission denied", str(p))
        return real(p, *a, **k)
    monkeypatch.setattr(fcm, "load_chunk", load)
    extra = _jpegs(tmp_path / "more", 13)[12]  # one new crop, so the re-encoded chunk gets another name than the victim's
    caplog.clear()
    with caplog.at_level("WARNING", logger="fashion_json_encoder"): again = _build(items + [extra], tower, tmp_path / "c", chunk_size=8)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and victim.name in warned[0] and "left in place" in warned[0], warned
    assert victim.exists() and victim.read_bytes() == before  # not deleted, not rewritten
    assert again.n_computed == 5 and torch.equal(again.features[:12], fc.features) and len(again) == 13
    monkeypatch.undo()
    third = _build(items + [extra], tower, tmp_path / "c", chunk_size=8)  # readable again: a pure hit
    assert third.n_computed == 0 and torch.equal(third.features, again.features)


def test_chunk_without_read_permission_is_kept(items, tower, tmp_path):
    "The same with a real chmod 000 (safetensors reports it as an OSError); skipped where the process reads it anyway (root)."
    fc = _build(items, tower, tmp_path / "c", chunk_size=4)
    victim = sorted(fc.path.glob("chunk_*.safetensors"))[1]
    before, extra = victim.read_bytes(), _jpegs(tmp_path / "more", 13)[12]
    victim.chmod(0)
    try:
        try: victim.open("rb").close()
        except PermissionError: pass
        else: pytest.skip("this process reads a chmod-000 file anyway (root with CAP_DAC_OVERRIDE)")
        again = _build(items + [extra], tower, tmp_path / "c", chunk_size=8)
    finally: victim.chmod(0o644)
    assert victim.read_bytes() == before and again.n_computed == 5 and torch.equal(again.features[:12], fc.features)


@pytest.mark.parametrize("bad", ["types", "unhashable_after_wanted", "number_id", "short_skip"])
def test_damaged_metadata_chunk_is_removed(items, tower, tmp_path, bad):
    "A content error other than bytes (metadata of the wrong type, an id that is not a string) is still a damaged chunk: removed and re-encoded."
    from safetensors.torch import save_file
    fc = _build(items, tower, tmp_path / "c", chunk_size=4)
    victim = sorted(fc.path.glob("chunk_*.safetensors"))[0]
    with safe_open(str(victim), "pt") as f: feats, meta = f.get_tensor("features"), f.metadata()
    ids = json.loads(meta["ids"])
    if bad == "types": meta = {"ids": "{}", "skipped": "[]"}
    elif bad == "short_skip": meta = {"ids": json.dumps(ids[1:]), "skipped": json.dumps({ids[0]: ["k"]})}; feats = feats[1:]
    else: meta = {"ids": json.dumps(ids[:1] + [[1, 2] if bad == "unhashable_after_wanted" else 7] + ids[2:]), "skipped": "{}"}
    save_file({"features": feats}, str(victim), metadata=meta | {"sha256": chunk_digest(feats, meta)})  # its checksum holds
    again = _build(items, tower, tmp_path / "c", chunk_size=4)   # was: TypeError in the sink (a list after a wanted id)
    assert again.n_computed == 4 and torch.equal(again.features, fc.features)
    assert _build(items, tower, tmp_path / "c", chunk_size=4).n_computed == 0   # the damaged chunk is gone, not read again


@given(st.lists(st.booleans(), max_size=40), st.integers(1, 8))
def test_compaction_in_place_equals_indexing(mask, block):
    "Moving the kept rows to the front block by block, in place, gives `buf[keep]` for any mask and block size."
    from fashion_json_encoder.models.feature_cache import compact_rows
    buf = torch.arange(len(mask) * 3, dtype=torch.float16).view(len(mask), 3)
    keep = [i for i, m in enumerate(mask) if m]
    got = compact_rows(buf.clone(), keep, block)
    assert torch.equal(got, buf[keep])


def test_mapped_features_equal_the_in_memory_ones(items, tower, tmp_path):
    "A cache whose features live in a memory-mapped file gives the same rows (skips squeezed out), leaves no file behind."
    from fashion_json_encoder.models.feature_cache import is_mapped
    good = Path(items[0].image_path).read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 3])
    mixed = items[:5] + [_item("모던/t/상의", tmp_path / "trunc.jpg"), _item("모던/m/하의", tmp_path / "missing.jpg")] + items[5:]
    ref = _build(mixed, tower, tmp_path / "ref", chunk_size=4, mmap=False)
    cold = _build(mixed, tower, tmp_path / "c", chunk_size=4, mmap=True)     # rows written by this build
    warm = _build(mixed, tower, tmp_path / "c", chunk_size=4, mmap=True)     # rows read from the chunks
    assert not is_mapped(ref.features) and is_mapped(cold.features) and is_mapped(warm.features)
    assert len(ref) == 12 and cold.keys == warm.keys == ref.keys and set(ref.skipped) == {"모던/t/상의", "모던/m/하의"}
    assert torch.equal(cold.features, ref.features) and torch.equal(warm.features, ref.features)
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file() and not p.name.startswith("chunk_") and p.name != "manifest.json"]


def test_features_over_the_host_budget_are_mapped_and_a_full_disk_is_a_clear_error(items, tower, tmp_path, monkeypatch, caplog):
    "Mapped when over half the available memory; no room on disk then: one line naming the folder; a forced map that fails: memory."
    import errno
    from fashion_json_encoder.config import UserError
    from fashion_json_encoder.models import feature_cache as fcm
    ref = _build(items, tower, tmp_path / "c")
    monkeypatch.setattr(fcm, "host_memory_available", lambda: 2 * ref.features.numel() * 2 - 1)  # just under twice their size
    small = _build(items, tower, tmp_path / "c")
    assert fcm.is_mapped(small.features) and torch.equal(small.features, ref.features)
    def full(fd, offset, length): raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fcm.os, "posix_fallocate", full)
    with pytest.raises(UserError, match="No space left on device") as e: _build(items, tower, tmp_path / "c")
    assert str(ref.path) in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(fcm, "host_memory_available", lambda: 2**40)     # they would fit in memory: a forced map falls back
    caplog.clear()
    with caplog.at_level("WARNING", logger="fashion_json_encoder"): kept = _build(items, tower, tmp_path / "c", mmap=True)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "No space left on device" in warned[0] and "keeping them in memory" in warned[0], warned
    assert not fcm.is_mapped(kept.features) and torch.equal(kept.features, ref.features)
    assert not list(kept.path.glob(".features-*"))


def test_available_memory_is_capped_by_the_cgroup_limit(tmp_path):
    "A container's limit counts, not only the host's MemAvailable: cgroup v2 (own group or root), v1, and no limit."
    from fashion_json_encoder.models.feature_cache import host_memory_available
    mi = tmp_path / "meminfo"; mi.write_text("MemTotal: 100 kB\nMemAvailable:   8000 kB\n")
    own = tmp_path / "self_cgroup"; own.write_text("0::/pod/box\n")
    def cg(files):
        d = tmp_path / f"cg{len(list(tmp_path.iterdir()))}"
        for rel, text in files.items(): (d / rel).parent.mkdir(parents=True, exist_ok=True); (d / rel).write_text(text)
        return host_memory_available(mi, d, own)
    assert cg({}) == 8000 * 1024                                                                  # no cgroup files: the host's
    assert cg({"pod/box/memory.max": "3000000\n", "pod/box/memory.current": "1000000\n"}) == 2_000_000   # v2, own group
    assert cg({"memory.max": "max\n", "memory.current": "5\n"}) == 8000 * 1024                 # v2 without a limit
    assert cg({"memory/memory.limit_in_bytes": "5000000", "memory/memory.usage_in_bytes": "4000000"}) == 1_000_000   # v1
    assert cg({"memory/memory.limit_in_bytes": str(2**63 - 4096), "memory/memory.usage_in_bytes": "1"}) == 8000 * 1024
    assert host_memory_available(tmp_path / "none", tmp_path / "none", tmp_path / "none") is None


def test_a_mapped_buffer_is_read_at_random_and_files_of_killed_builds_are_removed(tmp_path):
    "The mapping is advised for random reads (no read-ahead per row); a file a killed process of this machine left goes."
    import socket, subprocess, sys
    from fashion_json_encoder.models.feature_cache import feature_buffer
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".features-{socket.gethostname()}-{int(p.stdout)}-0123abcd.f16"; dead.write_bytes(b"x" * 10)
    alive = tmp_path / f".features-{socket.gethostname()}-{os.getpid()}-0123abcd.f16"; alive.write_bytes(b"x")
    other = tmp_path / f".features-another-host-{int(p.stdout)}-0123abcd.f16"; other.write_bytes(b"x")
    t = feature_buffer(1000, 512, tmp_path, mmap=True)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([alive.name, other.name])
    if Path("/proc/self/smaps").exists():
        start, flags = None, None
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-")); start = lo <= t.data_ptr() < hi
            elif start and line.startswith("VmFlags:"): flags = line.split()[1:]; break
        assert flags is not None and "rr" in flags, flags


def test_a_failing_sink_leaves_the_chunks_alone_and_repeated_items_get_their_rows(items, tower, tmp_path, monkeypatch):
    "Review fixes: an error while copying a verified chunk's rows is not damage (the chunk stays); an item listed twice gets its row."
    from fashion_json_encoder.models import feature_cache as fcm
    ref = _build(items, tower, tmp_path / "c", chunk_size=4)
    names = sorted(p.name for p in ref.path.glob("chunk_*"))
    real = fcm.feature_buffer
    monkeypatch.setattr(fcm, "feature_buffer", lambda n, d, folder, mmap=None: real(n, d + 1, folder, mmap))  # one column too many
    with pytest.raises(RuntimeError): _build(items, tower, tmp_path / "c", chunk_size=4)
    monkeypatch.undo()
    assert sorted(p.name for p in ref.path.glob("chunk_*")) == names
    again = _build(items[:3] + items[:3] + items[3:], tower, tmp_path / "d", chunk_size=4)   # cold: a chunk holds a record twice
    warm = _build(items[:3] + items[:3] + items[3:], tower, tmp_path / "d", chunk_size=4)
    for fc in (again, warm):
        assert len(fc) == 15 and torch.equal(fc.features[:3], fc.features[3:6]) and torch.equal(fc.features[6:], ref.features[3:])


def test_a_cpu_share_of_a_gpu_decode_build_is_decoded_by_the_workers(tower, tmp_path, monkeypatch, caplog):
    "decode 'gpu' with cpu_share 0.5: half the photos take the CPU path in the workers, the rest the GPU path, row for row."
    from fashion_json_encoder.models import feature_cache as fcm
    from fashion_json_encoder.decode import on_cpu_share
    items = _jpegs(tmp_path / "img", 12, size=(300, 400))
    cpu = _build(items, tower, tmp_path / "c")
    monkeypatch.setattr(fcm, "resolve_decode", lambda *a, **k: "gpu")  # the GPU path's logic on the CPU device (torchvision's decoder)
    gpu = _build(items, tower, tmp_path / "g")
    mixed = _build(items, tower, tmp_path / "m", cpu_share=0.5, num_workers=1)   # the share is decoded by the workers
    shared = [on_cpu_share(i, 0.5) for i in range(12)]   # one photo per item, in item order
    assert gpu.decode_stats["gpu_decoded"] == 12 and gpu.decode_stats["cpu_share_photos"] == 0
    assert mixed.decode_stats["cpu_share_photos"] == sum(shared) == 6 and mixed.decode_stats["gpu_decoded"] == 6
    assert not any(torch.equal(cpu.features[i], gpu.features[i]) for i in range(12))  # the paths round differently: rows tell them apart
    for i, s in enumerate(shared): assert torch.equal(mixed.features[i], (cpu if s else gpu).features[i]), i
    with caplog.at_level("WARNING", logger="fashion_json_encoder"):
        alone = _build(items, tower, tmp_path / "w0", cpu_share=0.5, num_workers=0)   # no workers: nothing to run beside the GPU
    assert alone.decode_stats["gpu_decoded"] == 12 and any("needs DataLoader workers" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def photo_zip(tmp_path_factory):
    "A zip holding two members, and a loose JPEG beside it."
    import zipfile
    d = tmp_path_factory.mktemp("ids")
    with zipfile.ZipFile(d / "원천데이터_1.zip", "w") as z:
        z.writestr("모던/1.jpg", b"\xff\xd8 one"); z.writestr("모던/2.jpg", b"\xff\xd8 two two")
    (d / "loose.jpg").write_bytes(b"\xff\xd8 loose")
    return d


_crop_value = st.one_of(st.integers(-5, 10**12), st.floats(-1e3, 1e3, allow_nan=False), st.booleans())


@given(st.lists(st.tuples(st.text(max_size=12),  # any key: quotes, backslashes, control characters, Hangul, surrogates
                          st.sampled_from(["원천데이터_1.zip::모던/1.jpg", "원천데이터_1.zip::모던/2.jpg", "loose.jpg",
                                           "원천데이터_1.zip::모던/9.jpg", "missing.jpg", "없는.zip::a.jpg"]),
                          st.one_of(st.tuples(*[st.integers(0, 10**6)] * 4), st.tuples(*[_crop_value] * 4))), max_size=12))
def test_record_ids_are_the_per_item_record_ids(photo_zip, rows):
    "The split-at-once ids (the record text written directly) are `record_id`'s, byte for byte, for any key and crop."
    from fashion_json_encoder.models.feature_cache import record_id, record_ids
    items = []
    for key, rel, crop in rows:
        try: items.append(Item(key, str(photo_zip / rel), "상의", (0., 0., 1., 1.), crop, {}, key))
        except Exception: continue
    want = []
    for it in items:
        try: want.append(record_id(it))
        except UnicodeEncodeError: return  # a lone surrogate: neither can hash it (json.dumps keeps it, encode() refuses)
    assert record_ids(items) == want


def test_a_cached_build_keeps_no_tracked_object_per_record(tower, tmp_path, monkeypatch):
    "At the release's size a million live lists or (Path, row) tuples set off the collector's full walks of the whole index."
    import gc
    from fashion_json_encoder.models import feature_cache as fcm
    photos = _jpegs(tmp_path / "img", 4)
    items = [_item(f"k{i}", photos[i % 4].image_path, (i % 7, i % 5, 60 + i % 11, 80 + i % 13)) for i in range(1500)]   # 1,500 records
    first = _build(items, tower, tmp_path / "c", batch_size=256, chunk_size=512)
    rows, _ = read_chunks(first.path)
    gc.collect()
    assert len(rows) == 1500 and not any(gc.is_tracked(v) for v in rows.values())
    live, real = [], fcm.compact_rows
    def probe(out, keep):  # called while the build's per-record tables are alive
        gc.collect(); live.append(len(gc.get_objects())); return real(out, keep)
    monkeypatch.setattr(fcm, "compact_rows", probe)
    gc.collect(); before = len(gc.get_objects())
    fc = _build(items, tower, tmp_path / "c", batch_size=256, chunk_size=512)
    assert fc.n_computed == 0 and torch.equal(fc.features, first.features)
    assert live[0] - before < 150, f"{live[0] - before} tracked objects alive for 1,500 records"


def test_a_split_reads_only_its_own_chunks_of_the_shared_folder(items, tower, tmp_path, monkeypatch, caplog):
    "Train and val share the cache folder; each split's build reads (and verifies) its own chunks, not the other's."
    from fashion_json_encoder.models import feature_cache as fcm
    train, val = items[:8], items[8:]
    t0, v0 = _build(train, tower, tmp_path / "c", chunk_size=4), _build(val, tower, tmp_path / "c", chunk_size=4)
    theirs = {f: ids for f, (ids, _, _) in fcm.cache_contents(t0.path).items()}
    own = {s: {f for f, ids in theirs.items() if set(ids) <= set(fcm.record_ids(part))} for s, part in (("train", train), ("val", val))}
    assert len(own["train"]) == 2 and len(own["val"]) == 1
    victim = t0.path / next(iter(own["train"]))   # a damaged train chunk: the val build does not look at it
    b = bytearray(victim.read_bytes()); b[_data_start(victim) + 101] ^= 0x40; victim.write_bytes(bytes(b))
    read, real = [], fcm.load_chunk
    def load(p, *a, **k):  # the chunks whose features were read (not those passed over after their header)
        read.append(Path(p).name)
        if (got := real(p, *a, **k)) is None: read.pop()
        return got
    monkeypatch.setattr(fcm, "load_chunk", load)
    with caplog.at_level("WARNING", logger="fashion_json_encoder"): v1 = _build(val, tower, tmp_path / "c", chunk_size=4)
    assert read == sorted(own["val"]) and v1.n_computed == 0 and torch.equal(v1.features, v0.features)
    assert victim.exists() and not caplog.records
    read.clear()
    with caplog.at_level("WARNING", logger="fashion_json_encoder"): t1 = _build(train, tower, tmp_path / "c", chunk_size=4)
    assert sorted(read) == sorted(own["train"]) and t1.n_computed == 4 and torch.equal(t1.features, t0.features)
    assert any(victim.name in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    real(victim)   # written again, whole (same records, same name)


def test_crops_the_other_decoder_cached_are_read_not_encoded_again(items, tower, tmp_path, monkeypatch, caplog):
    """A GPU run's cache (GPU-decoded) evaluated or resumed on a CPU was keyed apart and every crop encoded again (hours at
    release size). Crops this decoder's cache lacks are read from the other's; its own rows win; the rest are encoded here."""
    from fashion_json_encoder.models.feature_cache import write_chunk
    d = tmp_path / "c"
    own = _build(items[:8], tower, d)                                  # CPU-decoded: items 0-7
    gpu_root = cache_path(d, cache_key(tower, None, "gpu")); gpu_root.mkdir(parents=True)
    theirs = torch.nn.functional.normalize(torch.randn(10, 512), dim=1).half()   # "GPU-decoded": items 2-11, other values
    ids = [__import__("fashion_json_encoder.models.feature_cache", fromlist=["record_id"]).record_id(it) for it in items[2:12]]
    write_chunk(gpu_root, ids[:8], theirs[:8], {}); write_chunk(gpu_root, ids[8:], theirs[8:], {})
    calls = _count_calls(monkeypatch, tower)
    with caplog.at_level("INFO", logger="fashion_json_encoder"):
        fc = _build(items + [_item("모던/99/상의", tmp_path / "img/0.jpg", crop=(1, 2, 50, 60))], tower, d)
    assert fc.keys[:12] == [it.key for it in items] and fc.n_computed == 1 and sum(calls) == 1   # only the crop neither holds
    assert torch.equal(fc.features[:8], own.features)                  # its own rows win where both hold a crop
    assert torch.equal(fc.features[8:12], theirs[6:])                  # items 8-11: the other decoder's
    assert "4 crops read from the GPU-decoded cache" in caplog.text and fc.decode_stats.get("read_from_gpu_decode") == 4
