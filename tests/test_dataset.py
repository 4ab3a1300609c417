"Index tests on generated K-Fashion data: every bad-input row, pairing, splits, cache, hostile trees, report."
import gzip, json, logging, os, shutil, signal, sys, time, unicodedata
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from fashion_json_encoder import dataset
from fashion_json_encoder.config import Config, UserError
from fashion_json_encoder.archives import LABEL_MAX_BYTES
from fashion_json_encoder.data import SKIP_REASONS
from fashion_json_encoder.dataset import build_index, data_report, format_report
from fashion_json_encoder.synthetic import expected_counts, make_synthetic_kfashion, synthetic_plan

N = 40  # normal photos per generated dataset
CFG = Config(num_workers=0)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    "One generated dataset with every bad case per layout."
    base = tmp_path_factory.mktemp("kf")
    return {lay: make_synthetic_kfashion(base / lay, n_photos=N, seed=3, bad_cases=True, layout=lay)
            for lay in ("split", "unzipped", "sample")}


@pytest.fixture(scope="module")
def index(datasets): return build_index(datasets["split"], CFG)


def by_key(index): return {it.key: it for its in index.items.values() for it in its}
def keys_of(index, stem): return sorted(k for k in by_key(index) if k.split("/")[1] == str(stem))
def stem_of(case): return next(p.stem for p in synthetic_plan(N, seed=3, bad_cases=True) if p.case == case)


# ---- every row of the bad-input table, as exact counts ---------------------------------------------------------
@pytest.mark.parametrize("layout", ["split", "unzipped", "sample"])
def test_exact_counts_per_reason(datasets, layout):
    idx = build_index(datasets[layout], CFG)
    exp = expected_counts(synthetic_plan(N, seed=3, bad_cases=True))
    assert dict(idx.skipped) == exp["skipped"]
    assert set(idx.skipped) <= set(SKIP_REASONS)
    assert sum(idx.records.values()) == sum(exp["records"].values())
    assert sum(map(len, idx.items.values())) == sum(exp["items"].values())
    assert idx.stats["box_clipped"] == exp["box_clipped"] == 1
    if layout != "sample":  # Training/Validation folders are the splits
        assert idx.records == {"train": exp["records"]["Training"], "val": exp["records"]["Validation"]}
        assert {s: len(v) for s, v in idx.items.items()} == {"train": exp["items"]["Training"], "val": exp["items"]["Validation"]}


def test_verify_images_skips_truncated_jpeg(datasets):
    idx = build_index(datasets["split"], replace(CFG, verify_images=True))
    exp = expected_counts(synthetic_plan(N, seed=3, bad_cases=True), verify_images=True)
    assert dict(idx.skipped) == exp["skipped"] and idx.skipped["bad_image"] == 1
    assert keys_of(idx, stem_of("truncated_jpeg")) == []


def test_bom_and_cp949_labels_are_decoded_and_used(index):
    assert index.stats["label_bom"] == 1 and index.stats["label_cp949"] == 1
    for case in ("utf8_bom", "cp949"):
        items = [by_key(index)[k] for k in keys_of(index, stem_of(case))]
        assert items and all(it.json.get("category") for it in items)


def test_unpaired_and_invalid_labels_give_no_items(index):
    for case in ("invalid_json", "empty_label", "bad_structure", "label_without_image", "image_without_label",
                 "all_groups_empty", "only_onepiece"):
        assert keys_of(index, stem_of(case)) == [], case


def test_box_geometry_cases(index):
    k = by_key(index)
    s = stem_of("box_partly_outside")
    clipped = next(it for it in k.values() if it.key.endswith(f"/{s}/상의"))
    assert clipped.box[2] == 240 and clipped.crop[2] == 240
    assert keys_of(index, stem_of("zero_area_box")) == [f"모던/{stem_of('zero_area_box')}/하의"]
    assert keys_of(index, stem_of("box_outside")) == [f"모던/{stem_of('box_outside')}/상의"]
    assert keys_of(index, stem_of("no_box")) == [f"모던/{stem_of('no_box')}/상의"]


def test_onepiece_only_photo_counts_when_targeted(datasets):
    idx = build_index(datasets["split"], replace(CFG, target_categories=["원피스"]))
    assert f"모던/{stem_of('only_onepiece')}/원피스" in by_key(idx)
    assert idx.skipped["no_target_group"] > 1  # now every photo without a 원피스 has no target group


def test_spelling_variants_normalised(datasets):
    fields = dict(CFG.fields, length={"key": "기장", "multi": False}, neckline={"key": "넥라인", "multi": False},
                  collar={"key": "옷깃", "multi": False}, print={"key": "프린트", "multi": True})
    idx = build_index(datasets["split"], replace(CFG, fields=fields))
    s, k = stem_of("spelling_variants"), by_key(idx)
    top, outer, bottom = (k[f"키치/{s}/{g}"].json for g in ("상의", "아우터", "하의"))
    assert (top["silhouette"], top["length"], top["neckline"], top["collar"]) == ("노멀", "노멀", "홀터넥", "테일러드칼라")
    assert top["print"] == ["하운즈투스"] and top["material"] == ["시퀸/글리터"] and top["style"] == ["키치"]
    assert outer["neckline"] == "원숄더"
    import unicodedata
    assert unicodedata.is_normalized("NFC", bottom["category"])
    assert idx.stats["value_normalised"] >= 8


def test_same_stem_two_style_folders_are_two_records(index):
    s = stem_of("same_stem_two_folders")
    assert {k.split("/")[0] for k in keys_of(index, s)} == {"로맨틱", "모던"}


def test_etc_folder_without_style_and_item_without_category(index):
    etc = [by_key(index)[k] for k in keys_of(index, stem_of("etc_no_style"))]
    assert etc and all("style" not in it.json for it in etc) and all(it.key.startswith("기타/") for it in etc)
    (nocat,) = [by_key(index)[k] for k in keys_of(index, stem_of("no_category"))]
    assert "category" not in nocat.json and nocat.json["style"][0] == "모던"
    assert keys_of(index, stem_of("no_size"))  # image size read from the JPEG header


def test_dataset_path_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e: build_index(tmp_path / "missing", CFG)
    assert str(tmp_path / "missing") in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no K-Fashion label files \(\*\.json\)"): build_index(tmp_path / "empty", CFG)
    (tmp_path / "zips" / "Training").mkdir(parents=True); (tmp_path / "zips" / "Training" / "라벨링데이터.zip").write_bytes(b"PK")
    with pytest.raises(UserError, match="1 zip.s. cannot be opened"): build_index(tmp_path / "zips", CFG)  # release zips are read in place


# ---- splits --------------------------------------------------------------------------------------------------------
def test_split_deterministic_and_looks_disjoint(datasets):
    a, b = build_index(datasets["sample"], CFG), build_index(datasets["sample"], CFG)
    assert [it.key for it in a.items["val"]] == [it.key for it in b.items["val"]] and a.items["val"]
    looks = {s: {it.look for it in v} for s, v in a.items.items()}
    assert not looks["train"] & looks["val"]
    photos = {s: {it.key.rsplit("/", 1)[0] for it in v} for s, v in a.items.items()}
    assert not photos["train"] & photos["val"]  # no two crops of one photo on both sides
    assert any(l.startswith("shop:") for l in looks["train"] | looks["val"])
    c = build_index(datasets["sample"], replace(CFG, seed=CFG.seed + 1))
    assert {it.key for it in c.items["val"]} != {it.key for it in a.items["val"]}


def test_shop_look_in_two_style_folders_stays_on_one_side(datasets):
    idx = build_index(datasets["sample"], replace(CFG, val_fraction=0.5))
    side, folders = {}, {}
    for s, its in idx.items.items():
        for it in its:
            side.setdefault(it.look, set()).add(s); folders.setdefault(it.look, set()).add(it.key.split("/")[0])
    assert any(len(f) > 1 for f in folders.values())  # the generator files some looks under two styles
    assert all(len(v) == 1 for v in side.values())


def test_parallel_parse_equals_serial(datasets, monkeypatch):
    monkeypatch.setattr(dataset, "_PARALLEL_MIN", 1); monkeypatch.setattr(dataset, "_PARALLEL_HASH_MIN", 1)
    par, ser = build_index(datasets["split"], CFG, num_workers=2), build_index(datasets["split"], CFG)
    assert par.items == ser.items and par.skipped == ser.skipped and par.records == ser.records
    assert par.fingerprint == ser.fingerprint  # labels hashed in a pool: the same cache key


# ---- index cache ---------------------------------------------------------------------------------------------------
def test_index_cache_hit_and_invalidation(tmp_path):
    root = make_synthetic_kfashion(tmp_path / "kf", n_photos=15, seed=5, bad_cases=True)
    cache = tmp_path / "cache"
    first = build_index(root, CFG, cache_dir=cache)
    t = time.time(); hit = build_index(root, CFG, cache_dir=cache); dt = time.time() - t
    assert (first.from_cache, hit.from_cache) == (False, True) and dt < 2
    assert hit.items == first.items and hit.skipped == first.skipped and hit.records == first.records
    assert build_index(root, replace(CFG, crop_padding=0.2), cache_dir=cache).from_cache is False  # config key
    label = next(root.rglob("100003.json"))
    d = json.loads(label.read_text(encoding="utf-8"))
    d["이미지 정보"]["이미지 파일명"] = "NEW_001_01.jpg"
    label.write_text(json.dumps(d, ensure_ascii=False), encoding="utf-8")
    os.utime(label, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = build_index(root, CFG, cache_dir=cache)
    assert changed.from_cache is False
    assert any(it.look == "shop:NEW_001" for its in changed.items.values() for it in its)
    assert len(list(cache.glob("index-*.json.gz"))) == 1  # stale caches of this root removed
    (cache / next(cache.glob("index-*.json.gz")).name).write_bytes(b"garbage")
    assert build_index(root, CFG, cache_dir=cache).from_cache is False  # unreadable cache ignored


def _summary(index):
    return (index.records, dict(index.skipped), {s: [(it.key, it.crop, it.json, it.look) for it in v] for s, v in index.items.items()})


def _rename_look(label: Path) -> str:
    "Give a label another source file name of the same byte length (so another look); returns the new look."
    raw = label.read_bytes()
    old = json.loads(raw.decode("utf-8-sig"))["이미지 정보"]["이미지 파일명"]
    new = "Z_" + "7" * (len(old) - 9) + "_01.jpg"
    assert len(new.encode()) == len(old.encode()) and old.encode() in raw
    label.write_bytes(raw.replace(old.encode(), new.encode()))
    return f"shop:{new[:-7]}"


def test_index_cache_is_keyed_on_label_content(tmp_path):
    "A corrected label of the same size, copied with its mtime kept (cp -p, rsync -t), is parsed again."
    root = make_synthetic_kfashion(tmp_path / "kf", n_photos=15, seed=5)
    cache = tmp_path / "cache"
    build_index(root, CFG, cache_dir=cache)
    label = next(root.rglob("100003.json")); st_ = label.stat()
    look = _rename_look(label)
    os.utime(label, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert (label.stat().st_size, label.stat().st_mtime_ns) == (st_.st_size, st_.st_mtime_ns)
    changed = build_index(root, CFG, cache_dir=cache)
    assert changed.from_cache is False and any(it.look == look for its in changed.items.values() for it in its)
    os.utime(label, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))  # a touch alone keeps the cache
    assert build_index(root, CFG, cache_dir=cache).from_cache



def _reads(monkeypatch) -> list:
    "Paths of the labels the fingerprint reads from now on."
    real, seen = dataset._label_bytes, []
    monkeypatch.setattr(dataset, "_label_bytes", lambda path: seen.append(path) or real(path))
    return seen


def _need_ctime(path):
    if not dataset._ctime_trusted(path): pytest.skip(f"{path}: its file system keeps no change time to trust (no label memo there)")


def _rewrite(path: Path, data: bytes, keep_mtime: bool = False):
    "Write `data` to `path` (mtime kept when asked, as `cp -p` does) until its change time differs: a coarse clock can repeat it."
    before = path.stat() if path.exists() else None
    for _ in range(200):
        path.write_bytes(data)
        if keep_mtime: os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        if before is None or path.stat().st_ctime_ns != before.st_ctime_ns: return
        time.sleep(0.01)
    raise AssertionError(f"{path}: the file system kept its change time")


def test_cached_start_reads_no_label(tmp_path, monkeypatch):
    "Label digests are remembered under each chunk's stamp (size, mtime, ctime): an unchanged tree is not read again."
    _need_ctime(tmp_path)
    monkeypatch.setattr(dataset, "_SETTLED_NS", -10**12)  # every label counts as settled (written long ago)
    root = make_synthetic_kfashion(tmp_path / "kf", n_photos=15, seed=5)
    cache, labels = tmp_path / "cache", sorted(root.rglob("*.json"))
    first = build_index(root, CFG, cache_dir=cache)
    seen = _reads(monkeypatch)
    again = build_index(root, CFG, cache_dir=cache)
    assert again.from_cache and again.fingerprint == first.fingerprint and seen == []
    assert dataset.index_fingerprint(root, CFG, cache_dir=cache) == first.fingerprint and seen == []
    assert dataset.index_fingerprint(root, CFG) == first.fingerprint and len(seen) == len(labels)  # no cache folder: all read
    seen.clear()
    os.utime(labels[3], ns=(time.time_ns(), time.time_ns()))  # a touch: the chunk is read again, the index is the same
    touched = build_index(root, CFG, cache_dir=cache)
    assert touched.from_cache and touched.fingerprint == first.fingerprint and len(seen) == len(labels)
    seen.clear()
    assert build_index(root, CFG, cache_dir=cache).from_cache and seen == []  # and remembered again
    st_ = labels[3].stat()
    look = _rename_look(labels[3])  # `cp -p` of a corrected label: same size, same mtime, only the ctime tells
    os.utime(labels[3], ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert (labels[3].stat().st_size, labels[3].stat().st_mtime_ns) == (st_.st_size, st_.st_mtime_ns)
    changed = build_index(root, CFG, cache_dir=cache)
    assert not changed.from_cache and any(it.look == look for its in changed.items.values() for it in its)


def test_labels_changed_in_the_last_seconds_are_not_remembered(tmp_path, monkeypatch):
    "A label whose ctime is within `_SETTLED_NS` of the read may change again within the clock's tick: read every time."
    _need_ctime(tmp_path)
    root = make_synthetic_kfashion(tmp_path / "kf", n_photos=6, seed=5)  # written just now
    cache = tmp_path / "cache"
    build_index(root, CFG, cache_dir=cache)
    assert json.loads(next(cache.glob("labels-*.json")).read_text())["chunks"] == {}
    seen = _reads(monkeypatch)
    assert build_index(root, CFG, cache_dir=cache).from_cache and len(seen) == len(list(root.rglob("*.json")))


_EDITS = st.lists(st.tuples(st.sampled_from(["same_size_kept_mtime", "touch", "other_bytes", "delete", "add"]),
                            st.integers(0, 7)), max_size=6)


def test_a_label_that_failed_to_read_is_not_remembered(tmp_path, monkeypatch):
    "A label whose read failed (EIO, permissions) counts in its chunk's digest once, and is read again at the next start."
    _need_ctime(tmp_path)
    monkeypatch.setattr(dataset, "_SETTLED_NS", -10**12)
    root, cache = make_synthetic_kfashion(tmp_path / "kf", n_photos=12, seed=5), tmp_path / "cache"
    sick, real = next(root.rglob("100003.json")), dataset._label_file
    def flaky(path):
        if Path(path) == sick: raise OSError(5, "Input/output error")
        return real(path)
    monkeypatch.setattr(dataset, "_label_file", flaky)
    ill = dataset.index_fingerprint(root, CFG, cache_dir=cache)
    monkeypatch.setattr(dataset, "_label_file", real)    # the disk recovered
    seen = _reads(monkeypatch)
    well = dataset.index_fingerprint(root, CFG, cache_dir=cache)
    assert well != ill and well == dataset.index_fingerprint(root, CFG) and str(sick) in map(str, seen)


def test_no_memo_where_the_file_system_keeps_no_change_time(tmp_path, monkeypatch, caplog):
    "On FAT, exFAT, squashfs, FUSE mounts ... ctime is no change time: every label is read at each start, nothing is remembered."
    monkeypatch.setattr(dataset, "_SETTLED_NS", -10**12)
    monkeypatch.setattr(dataset, "_fs_type", lambda path: "vfat")
    root, cache = make_synthetic_kfashion(tmp_path / "kf", n_photos=6, seed=5), tmp_path / "cache"
    build_index(root, CFG, cache_dir=cache)
    seen = _reads(monkeypatch)
    with caplog.at_level("INFO", logger="fashion_json_encoder"): again = build_index(root, CFG, cache_dir=cache)
    assert again.from_cache and len(seen) == len(list(root.rglob("*.json"))) and not list(cache.glob("labels-*.json"))
    assert "keeps no change time" in caplog.text


def test_file_system_type_from_mountinfo(tmp_path):
    "The mount is found by the path's device number, else by the longest mount point (escaped as mountinfo writes it)."
    d = tmp_path / "my data"; d.mkdir()
    st_, real = os.stat(d), os.path.realpath(d)
    dev = f"{os.major(st_.st_dev)}:{os.minor(st_.st_dev)}"
    esc = real.replace(" ", "\\040")
    info = tmp_path / "mountinfo"
    info.write_text(f"1 0 0:1 / / rw - rootfs rootfs rw\n2 1 {dev} / /elsewhere rw - xfs /dev/sdb rw\n")
    assert dataset._fs_type(d, info) == "xfs"                       # by device number, wherever it is mounted
    info.write_text(f"1 0 0:1 / / rw - ext4 /dev/sda rw\n2 1 0:99 / {esc} rw shared:1 - vfat /dev/sdc rw\n"
                    f"3 1 0:98 / {esc}x rw - btrfs /dev/sdd rw\n")
    assert dataset._fs_type(d, info) == "vfat"                      # by the longest mount point holding it (not "my datax")
    assert dataset._fs_type(tmp_path / "missing", info) is None
    assert dataset._fs_type(d, tmp_path / "no-mountinfo") is None


@given(_EDITS, st.integers(1, 3))
def test_remembered_digests_equal_reading_every_label(edits, chunk):
    "After any edits between runs, the fingerprint with remembered digests is the one that reads every label (memo damaged too)."
    import tempfile
    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataset, "_SETTLED_NS", -10**12); mp.setattr(dataset, "_LABEL_CHUNK", chunk)
        _need_ctime(d)
        root, memo = Path(d) / "kf", Path(d) / "cache" / "labels.json"
        for i in range(5): (root / "s").mkdir(parents=True, exist_ok=True); (root / "s" / f"{i}.json").write_bytes(b'{"a": %d}' % i)
        def both():
            labels = dataset.scan_dataset(root)[0]
            return dataset._label_digests(str(root) + "/", labels, memo=memo), dataset._label_digests(str(root) + "/", labels)
        kept, fresh = both(); assert kept == fresh
        for n, (op, k) in enumerate(edits):
            files = sorted((root / "s").glob("*.json"))
            f = files[k % len(files)] if files else None
            if op == "add" or f is None: _rewrite(root / "s" / f"new{n}.json", b'{"b": %d}' % n)
            elif op == "delete": f.unlink()
            elif op == "touch": os.utime(f, ns=(time.time_ns(), f.stat().st_mtime_ns + 10**9))
            else:
                raw = f.read_bytes()
                new = bytes(reversed(raw)) if op == "same_size_kept_mtime" else raw + b" "
                _rewrite(f, new, keep_mtime=op == "same_size_kept_mtime")
            kept, fresh = both(); assert kept == fresh
        labels = dataset.scan_dataset(root)[0]
        stamps = [dataset._stamp(labels[i:i + chunk]) for i in range(0, len(labels), chunk)]
        bad = [5, "zz", "g" * 40, "a" * 39, None, ["0" * 40]]    # a damaged memo is ignored entry by entry
        memo.write_text(json.dumps({"version": 1, "chunks": {s: bad[i % len(bad)] for i, s in enumerate(stamps)}}))
        kept, fresh = both(); assert kept == fresh
        for text in ("not json", "[" * 200_000, '{"version": 1, "chunks": []}'):   # ... and a memo damaged as a whole
            memo.write_text(text)
            kept, fresh = both(); assert kept == fresh

_DAMAGES = ["truncated", "garbage", "flipped_byte", "not_json", "not_a_dict", "missing_key", "items_not_dict",
            "bad_item", "other_fingerprint"]

@pytest.mark.parametrize("damage", _DAMAGES)
def test_damaged_index_cache_is_one_warning_and_rebuilt(tmp_path, caplog, damage):
    root = make_synthetic_kfashion(tmp_path / "kf", n_photos=10, seed=5)
    cache = tmp_path / "cache"
    first = build_index(root, CFG, cache_dir=cache)
    (path,) = cache.glob("index-*.json.gz")
    raw = path.read_bytes(); d = json.loads(gzip.decompress(raw)); mid = len(raw) // 2
    gz = lambda obj: gzip.compress(json.dumps(obj, ensure_ascii=False).encode())
    bad_row = ["모던/1/상의", "Training/모던/1.jpg", "상의", "abcd", [0, 0, 9, 9], {}, "id:1"]  # a box of letters
    path.write_bytes({"truncated": raw[:mid], "garbage": b"\x00 not gzip " * 9, "flipped_byte": raw[:mid] + bytes([raw[mid] ^ 0xFF]) + raw[mid + 1:],
                      "not_json": gzip.compress(b'{"version": 2, "items'), "not_a_dict": gz([1, 2]),
                      "missing_key": gz({k: v for k, v in d.items() if k != "records"}), "items_not_dict": gz({**d, "items": [1]}),
                      "bad_item": gz({**d, "items": {**d["items"], "train": [bad_row]}}),
                      "other_fingerprint": gz({**d, "fingerprint": "0" * 40})}[damage])
    caplog.clear()
    with caplog.at_level(logging.WARNING): again = build_index(root, CFG, cache_dir=cache)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and path.name in warnings[0] and "rebuilding" in warnings[0], warnings
    assert again.from_cache is False and _summary(again) == _summary(first)
    assert build_index(root, CFG, cache_dir=cache).from_cache  # the rebuilt cache is whole again


@pytest.mark.parametrize("cached", [False, True])
def test_index_objects_start_in_the_oldest_gc_generation(tmp_path, cached):
    "Made with the collector paused, the items go straight to the oldest generation: no young collection walks them after the build."
    import gc
    root = make_synthetic_kfashion(tmp_path / "kf", n_photos=30, seed=4, image_mode="stub")
    if cached: build_index(root, CFG, cache_dir=tmp_path / "c")
    idx = build_index(root, CFG, cache_dir=tmp_path / "c")
    assert idx.from_cache == cached and gc.isenabled()
    young = {id(o) for g in (0, 1) for o in gc.get_objects(generation=g)}
    made = [o for its in idx.items.values() for it in its for o in (it, it.json)]
    assert len(made) > 60 and not [o for o in made if id(o) in young]
    mine = [[]]; gc.freeze()  # a caller's own frozen objects stay frozen: the promotion then does not run
    try:
        build_index(root, CFG, cache_dir=tmp_path / "c")
        assert gc.get_freeze_count() >= 1 and not any(o is mine for o in gc.get_objects())
    finally: gc.unfreeze()


# ---- hostile file trees and labels ---------------------------------------------------------------------------------
@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="names there are always Unicode")
def test_names_that_are_not_utf8_are_skipped_counted_and_named(tmp_path, caplog):
    "A Korean Windows zip unzipped on Linux without `-O cp949` leaves CP949 bytes for names: they crashed the index build."
    root = make_synthetic_kfashion(tmp_path / "kf", n_photos=16, seed=1, image_mode="stub")
    style = next(p for p in sorted((root / "Training").rglob("*")) if p.is_dir() and any(p.glob("*.json")))
    files = [p for p in style.iterdir() if p.suffix in (".json", ".jpg")]
    os.rename(bytes(style), os.path.join(bytes(style.parent), style.name.encode("cp949")))
    with caplog.at_level(logging.WARNING):
        idx = build_index(root, CFG, cache_dir=tmp_path / "c")
    assert idx.skipped["undecodable_name"] == len(files) > 0
    keys = [it.key for its in idx.items.values() for it in its]
    assert keys and all(k.encode("utf-8") for k in keys) and style.name not in {k.split("/")[0] for k in keys}
    line = next(r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage())
    assert f"{len(files)} file(s) skipped" in line and "unzip -O cp949" in line and "\n" not in line
    assert "undecodable_name" in format_report(data_report(idx))
    odd = Path(os.fsdecode(os.path.join(bytes(tmp_path), "데이터".encode("cp949"))))  # the dataset folder itself
    os.rename(bytes(root), bytes(odd))
    with pytest.raises(UserError, match=r"the dataset path is not UTF-8 .*convmv") as e: build_index(odd, CFG, cache_dir=tmp_path / "c")
    str(e.value).encode("utf-8")  # printable as it is


def test_symlinks_followed_broken_ones_counted_no_folder_twice(datasets, tmp_path):
    base = build_index(datasets["unzipped"], CFG)
    root = Path(shutil.copytree(datasets["unzipped"], tmp_path / "kf"))
    photos = sorted((root / "Training").glob("원천데이터_*"))[0]
    shutil.move(photos, tmp_path / "elsewhere"); os.symlink(tmp_path / "elsewhere", photos)  # a valid folder link
    label = sorted((root / "Validation").rglob("*.json"))[0]
    shutil.move(label, tmp_path / "label.json"); os.symlink(tmp_path / "label.json", label)  # a valid file link
    os.symlink(tmp_path / "gone.jpg", root / "Training" / "dangling.jpg")
    os.symlink(root / "Training" / "self.json", root / "Training" / "self.json")  # ELOOP
    os.symlink(tmp_path / "gone", root / "Training" / "dangling_folder")
    os.symlink(root, root / "Training" / "up")  # a link to an ancestor
    os.symlink(photos, root / "Validation" / "again")  # a second way into the linked folder
    ix = build_index(root, CFG)
    assert ix.skipped["broken_link"] == 3 and ix.skipped["repeated_folder"] == 2
    rest = {k: v for k, v in ix.skipped.items() if k not in ("broken_link", "repeated_folder")}
    assert (ix.records, rest, _summary(ix)[2]) == (base.records, dict(base.skipped), _summary(base)[2])
    assert format_report(data_report(ix)).count("broken_link") == 1


def test_nfd_label_folders_pair_with_nfc_photo_folders(datasets, tmp_path):
    "Labels extracted on macOS (NFD Hangul names), photos on Linux (NFC)."
    root = Path(shutil.copytree(datasets["unzipped"], tmp_path / "kf"))
    renamed = 0
    for d in sorted(root.glob("*/라벨링데이터/*")):
        nfd = d.parent / unicodedata.normalize("NFD", d.name)
        if nfd.name != d.name: d.rename(nfd); renamed += 1
    assert renamed > 3
    ix, base = build_index(root, CFG), build_index(datasets["unzipped"], CFG)
    assert _summary(ix) == _summary(base) and sum(ix.records.values()) > N // 2
    assert all(unicodedata.is_normalized("NFC", it.key) for its in ix.items.values() for it in its)


def test_label_over_the_size_limit_is_skipped_unread(datasets, tmp_path):
    root = Path(shutil.copytree(datasets["split"], tmp_path / "kf"))
    stem = stem_of("box_partly_outside")
    label = next(root.rglob(f"{stem}.json"))
    raw = label.read_bytes(); label.write_bytes(raw + b" " * (LABEL_MAX_BYTES + 1 - len(raw)))  # valid JSON, one byte too many
    base, ix = build_index(datasets["split"], CFG), build_index(root, CFG)
    assert ix.skipped["label_too_large"] == 1 and keys_of(ix, stem) == [] and keys_of(base, stem)
    assert sum(ix.records.values()) == sum(base.records.values()) - 1


# ---- report --------------------------------------------------------------------------------------------------------
def test_data_report_and_table(index):
    rep = data_report(index)
    assert rep["records"] == index.records and rep["items"] == {s: len(v) for s, v in index.items.items()}
    assert sum(n["train"] for n in rep["items_per_group"].values()) == rep["items"]["train"]
    assert rep["skipped"] == dict(index.skipped) and set(rep["vocab_sizes"]) == set(CFG.fields)
    assert all(n >= 0 for n in rep["unknown_values"].values())
    json.dumps(rep, ensure_ascii=False)  # serialisable for --json
    table = format_report(rep)
    assert all(reason in table for reason in rep["skipped"]) and "items (crops)" in table


# ---- arbitrary label content never crashes the index ---------------------------------------------------------------
_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 500), st.floats(allow_nan=True), st.text(max_size=4),
                               st.sampled_from(["상의", "X좌표", "가로", "카테고리", "노말"])),
                     lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(
                         st.sampled_from(["상의", "하의", "렉트좌표", "라벨링", "스타일", "X좌표", "Y좌표", "가로", "세로",
                                          "카테고리", "소재", "이미지 너비", "이미지 높이"]), c, max_size=4)), max_leaves=12)

@given(_json, _json)
def test_any_label_content_is_parsed_or_counted(tmp_path_factory, rects, labels):
    d = tmp_path_factory.mktemp("odd")
    label = {"이미지 정보": {"이미지 너비": 240, "이미지 높이": 320},
             "데이터셋 정보": {"데이터셋 상세설명": {"렉트좌표": rects, "라벨링": labels}}}
    (d / "1.json").write_text(json.dumps(label, ensure_ascii=False), encoding="utf-8")
    r = dataset._parse_safe(d / "1.json", d / "1.jpg", CFG.fields, ["상의", "하의"])
    assert set(r) == {"skip"} and r["skip"] in SKIP_REASONS or set(r) == {"look", "items", "skipped", "stats"}
    for _, b, c, j in r.get("items", []):
        assert 0 <= b[0] < b[2] <= 240 and 0 <= b[1] < b[3] <= 320 and set(j) <= set(CFG.fields)


def test_index_cache_written_by_forked_writers_is_the_one_process_file(tmp_path, monkeypatch):
    "Slices serialised by forked processes (concatenated gzip members) hold the same JSON text, and load back to the same index."
    import gzip
    from fashion_json_encoder import dataset as D
    if "fork" not in __import__("multiprocessing").get_all_start_methods(): pytest.skip("forked writers need fork")
    root = make_synthetic_kfashion(tmp_path / "kf", 60, seed=3, image_mode="stub")
    index = build_index(root, Config(num_workers=0))
    monkeypatch.setattr(D, "_PARALLEL_MIN", 1)  # 60 photos: fork anyway
    one, many = tmp_path / "c1" / "one.json.gz", tmp_path / "c2" / "many.json.gz"
    D._save_index(index, one, workers=0); D._save_index(index, many, workers=3)
    n = len(str(index.root)) + 1  # the text the previous release wrote with one json.dumps: existing caches stay valid
    whole = {"version": D._CACHE_VERSION, "fingerprint": index.fingerprint, "records": index.records, "skipped": index.skipped,
             "stats": index.stats, "examples": index.examples, "items": {s: [[it.key, it.image_path[n:], it.group, it.box, it.crop, it.json, it.look] for it in its]
                                             for s, its in index.items.items()}}
    assert gzip.decompress(many.read_bytes()) == gzip.decompress(one.read_bytes()) == json.dumps(whole, ensure_ascii=False).encode()
    assert many.read_bytes() != one.read_bytes()  # the forked path ran: several gzip members
    back = D._load_index(index.root, many, index.fingerprint)
    assert back.items == index.items and back.records == index.records and back.skipped == index.skipped
    assert back.examples == index.examples
    old = tmp_path / "c3" / "old.json.gz"; old.parent.mkdir()   # a cache written before skip examples: still loads, without them
    del whole["examples"]; old.write_bytes(gzip.compress(json.dumps(whole, ensure_ascii=False).encode()))
    assert D._load_index(index.root, old, index.fingerprint).examples == {}


# ---- a worker that dies (multiprocessing.Pool waited forever for its task) ---------------------------------------
def _killed(*_):
    "What the out-of-memory killer does to a worker, done from inside it."
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
def deadline():
    "Fails a test that hangs instead of hanging the suite."
    def _hung(*_): raise TimeoutError("hung: the build waited for a dead worker")
    old = signal.signal(signal.SIGALRM, _hung); signal.alarm(120)
    yield
    signal.alarm(0); signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("step, name", [("_hash_labels", "hashing the labels"), ("_parse_safe", "parsing the labels")])
def test_a_killed_index_worker_stops_the_build_with_one_error(datasets, tmp_path, monkeypatch, deadline, step, name):
    monkeypatch.setattr(dataset, "_PARALLEL_MIN", 1); monkeypatch.setattr(dataset, "_PARALLEL_HASH_MIN", 1)
    monkeypatch.setattr(dataset, step, _killed)  # forked workers see the patched module
    with pytest.raises(UserError) as e:
        build_index(datasets["split"], CFG, cache_dir=tmp_path / "c", num_workers=2)
    assert str(e.value) == (f"{name}: a worker process died (SIGKILL, most often the out-of-memory killer); nothing of this "
                            "step was kept: rerun with fewer workers (num_workers, 2 now) or more memory")
    assert not list(tmp_path.rglob("*.json.gz"))  # no partial index cached
    monkeypatch.undo()
    assert build_index(datasets["split"], CFG, cache_dir=tmp_path / "c", num_workers=2).records  # the next run builds


def test_a_killed_worker_is_one_line_from_the_cli(datasets, tmp_path, monkeypatch, deadline, capsys):
    from fashion_json_encoder.cli import main
    monkeypatch.setattr(dataset, "_PARALLEL_MIN", 1); monkeypatch.setattr(dataset, "_parse_safe", _killed)
    assert main(["inspect_data", "--dataset_path", str(datasets["split"]), "--cache_dir", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: parsing the labels: a worker process died (SIGKILL") and "\n" not in err, err


def test_label_values_of_the_wrong_type_skip_the_photo_by_name(tmp_path, caplog):
    """A number, object or nested list where K-Fashion has text, or a 스타일 that is not [{...}], was turned into a string and
    learnt as a value (or dropped the style unsaid); now the photo is an `unreadable_label` skip whose log line names the file."""
    ds = make_synthetic_kfashion(tmp_path / "kf", n_photos=12, seed=3)
    before = build_index(ds, CFG)
    files = sorted((ds / "Training").rglob("*.json"))
    edits = {"int": lambda L, g: L[g][0].__setitem__("카테고리", 7), "dict": lambda L, g: L[g][0].__setitem__("소재", [{"a": 1}]),
             "nested": lambda L, g: L["스타일"][0].__setitem__("스타일", ["스트리트", "펑크"]), "bare": lambda L, g: L.__setitem__("스타일", "스트리트")}
    for f, edit in zip(files, edits.values()):
        d = json.loads(f.read_text(encoding="utf-8")); L = d["데이터셋 정보"]["데이터셋 상세설명"]["라벨링"]
        edit(L, next(g for g in ("상의", "하의", "아우터") if L[g] and L[g][0]))
        f.write_text(json.dumps(d, ensure_ascii=False), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="fashion_json_encoder"): after = build_index(ds, CFG)
    assert after.skipped.get("unreadable_label", 0) - before.skipped.get("unreadable_label", 0) == len(edits)
    assert sum(after.records.values()) == sum(before.records.values()) - len(edits)
    assert all(str(f) in caplog.text for f in files[:len(edits)])
    values = {v for s in ("train", "val") for it in after.items[s] for v in (it.json.get("category"), *it.json.get("material", []))}
    assert "7" not in values and "{'a': 1}" not in values


@pytest.mark.parametrize("layout", ["split", "zips"])
def test_each_skip_names_files_to_look_at(tmp_path, layout):
    "A count alone cannot find 2 bad labels among a million files: each reason keeps up to three files, in the cache too."
    import zipfile
    ds = make_synthetic_kfashion(tmp_path / "kf", n_photos=N, seed=3, bad_cases=True, layout="zips" if layout == "zips" else "split")
    for again in (False, True):   # the first build, then the cached index
        index = build_index(ds, CFG, cache_dir=tmp_path / "cache")
        assert index.from_cache == again
        report = data_report(index)
        named = {r for r in report["skipped"] if r not in ("broken_link", "undecodable_name", "repeated_folder", "bad_archive", "bad_member")}
        assert named and set(report["skip_examples"]) >= named
        for r, ex in report["skip_examples"].items():
            assert 1 <= len(ex) <= min(3, index.skipped[r])
            for rel in ex:
                arch, _, member = rel.partition("::")
                assert (ds / arch).is_file(), (r, rel)
                if member:
                    with zipfile.ZipFile(ds / arch) as z: assert member in z.namelist(), (r, rel)
        assert all(f"e.g. {report['skip_examples'][r][0]}" in format_report(report) for r in named)


def test_unlabelled_photos_inside_and_outside_the_splits_are_counted_and_named():
    "A stray photo outside Training/Validation (split None) next to one inside: sorting their keys raised TypeError."
    from fashion_json_encoder.dataset import pair_files
    ex = {}
    pairs, sk = pair_files([("Training/모던/1.json", 1, 0, 0)], [("cover.jpg", 1, 0), ("Training/모던/1.jpg", 1, 0),
                                                                ("Training/모던/2.jpg", 1, 0), ("extra/3.jpg", 1, 0)], ex)
    assert pairs == [("Training/모던/1.json", "Training/모던/1.jpg")] and sk == {"image_without_label": 3}
    assert ex == {"image_without_label": ["cover.jpg", "Training/모던/2.jpg", "extra/3.jpg"]}
