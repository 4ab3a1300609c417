"Issue 10 §1: the K-Fashion release read as downloaded (zips in place), with Korean Windows names and damaged archives."
import json, os, shutil, struct, unicodedata, zipfile, zlib
from pathlib import Path
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fashion_json_encoder import archives as A
from fashion_json_encoder import dataset as D
from fashion_json_encoder.archives import MEMBER_SEP, member_name, read_bytes, split_member
from fashion_json_encoder.config import Config
from fashion_json_encoder.dataset import build_index, data_report
from fashion_json_encoder.models.feature_cache import build_feature_cache, record_id
from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, tiny_clip_config
from fashion_json_encoder.synthetic import _CP949Info, damage_zip, expected_counts, make_synthetic_kfashion, synthetic_plan

CFG = Config(num_workers=0)
N, SEED = 30, 4


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("rel")
    out = {"unzipped": make_synthetic_kfashion(base / "unzipped", N, SEED, bad_cases=True, layout="unzipped")}
    for names in ("utf8", "cp949", "nfd"):
        out[names] = make_synthetic_kfashion(base / names, N, SEED, bad_cases=True, layout="zips", names=names)
    return out


def _summary(index):
    return (index.records, dict(index.skipped), {s: [(it.key, it.crop, it.json, it.look) for it in v] for s, v in index.items.items()})


# ---- names ----------------------------------------------------------------------------------------------------------
_NAME = st.text(st.sampled_from([chr(c) for c in range(0xAC00, 0xD7A4, 37)] + list("0123456789abcXYZ_-. ")), min_size=1, max_size=12)

@settings(max_examples=200, deadline=None)
@given(folder=_NAME, stem=_NAME)
def test_member_names_decode_to_nfc_whatever_the_encoding(folder, stem):
    name = f"{folder}/{stem}.jpg"
    def info(raw: bytes, flag: int):
        zi = zipfile.ZipInfo("x"); zi.filename, zi.flag_bits = raw.decode("utf-8" if flag else "cp437"), flag; return zi
    assert member_name(info(name.encode("utf-8"), 0x800)) == name  # flagged UTF-8
    assert member_name(info(name.encode("cp949"), 0)) == name  # Korean Windows: CP949, no flag
    assert member_name(info(unicodedata.normalize("NFD", name).encode("utf-8"), 0x800)) == name  # macOS: NFD
    assert member_name(info(name.encode("utf-8"), 0)) == name  # UTF-8 without the flag (old Info-ZIP)


@given(archive=_NAME, member=st.text(min_size=1, max_size=20))
def test_member_path_round_trip(archive, member):
    assert split_member(A.member_path(f"/d/{archive}.zip", member)) == (f"/d/{archive}.zip", member)


@pytest.mark.parametrize("names", ["utf8", "cp949", "nfd"])
def test_zip_release_indexes_like_the_unzipped_tree(trees, names):
    raw = {n for z in trees[names].rglob("*.zip") for n in zipfile.ZipFile(z).namelist()}
    if names == "cp949": assert not any("스트리트" in n for n in raw)  # zipfile alone shows mojibake
    z, u = build_index(trees[names], CFG), build_index(trees["unzipped"], CFG)
    assert _summary(z) == _summary(u)
    exp = expected_counts(synthetic_plan(N, SEED, bad_cases=True))
    assert sum(z.records.values()) == sum(exp["records"].values())
    it = z.items["train"][0]
    archive, member = split_member(it.image_path)
    assert archive.endswith(".zip") and Path(archive).is_file() and member == unicodedata.normalize("NFC", member)
    assert read_bytes(it.image_path)[:2] == b"\xff\xd8"
    assert not list(trees[names].rglob("*.jpg")) and not list(trees[names].rglob("*.json"))  # nothing extracted


def test_partly_unzipped_release(trees, tmp_path):
    "Labels unzipped, photos still zipped, and the label zip left next to its extracted copy: nothing counted twice."
    mixed = tmp_path / "mixed"
    for split in ("Training", "Validation"):
        shutil.copytree(trees["unzipped"] / split / "라벨링데이터", mixed / split / "라벨링데이터")
        for z in (trees["cp949"] / split).glob("*.zip"): shutil.copy(z, mixed / split / z.name)
    z, u = build_index(mixed, CFG), build_index(trees["unzipped"], CFG)
    assert _summary(z) == _summary(u)
    assert z.stats["archive_member_shadowed"] == sum(1 for _ in (trees["unzipped"]).rglob("*.json"))


def test_parallel_index_workers_read_members_like_one_process(trees, monkeypatch):
    monkeypatch.setattr(D, "_PARALLEL_MIN", 1)
    one = build_index(trees["cp949"], Config(num_workers=0))
    A._OPEN.clear(); A.open_archive(next(trees["cp949"].rglob("라벨링데이터.zip")))  # the parent holds a handle before forking
    assert _summary(build_index(trees["cp949"], Config(num_workers=2))) == _summary(one)


def _restore_stored(z: Path, edit=lambda name, data: data):
    "Rewrite zip `z` with every member stored (same names and times), `edit` applied to each member's bytes."
    with zipfile.ZipFile(z) as src: members = [(zi, edit(zi.filename, src.read(zi))) for zi in src.infolist()]
    with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED) as dst:
        for zi, data in members: zi.compress_type = zipfile.ZIP_STORED; dst.writestr(zi, data)


def test_index_cache_is_keyed_on_the_archives(trees, tmp_path):
    rel = shutil.copytree(trees["utf8"], tmp_path / "rel")
    z = rel / "Training" / "라벨링데이터.zip"
    _restore_stored(z)  # stored members: an edit of the same length keeps the zip's size
    first = build_index(rel, CFG, cache_dir=tmp_path / "cache")
    again = build_index(rel, CFG, cache_dir=tmp_path / "cache")
    assert again.from_cache and _summary(again) == _summary(first)
    assert again.items["train"][0].image_path == first.items["train"][0].image_path
    st_ = z.stat()
    os.utime(z, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
    assert build_index(rel, CFG, cache_dir=tmp_path / "cache").from_cache  # touched, same content: still valid
    stem = next(it.key.split("/")[1] for it in first.items["train"] if it.key.split("/")[1].startswith("1"))  # a normal photo
    def fix(name, data):  # a corrected label of the same length: another source file name, so another look
        if not name.endswith(f"/{stem}.json"): return data
        old = json.loads(data)["이미지 정보"]["이미지 파일명"]
        new = "Z_" + "7" * (len(old) - 9) + "_01.jpg"
        return data.replace(old.encode(), new.encode())
    _restore_stored(z, fix)
    os.utime(z, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert (z.stat().st_size, z.stat().st_mtime_ns) == (st_.st_size, st_.st_mtime_ns)
    fixed = build_index(rel, CFG, cache_dir=tmp_path / "cache")
    assert not fixed.from_cache
    looks = {i.look for its in fixed.items.values() for i in its if i.key.split("/")[1] == stem}
    assert looks and all(l.startswith("shop:Z_77") for l in looks), looks


def test_nfd_unzipped_labels_pair_with_zipped_photos(trees, tmp_path):
    "Labels unzipped on macOS (NFD folder names), photos still in the release zips (members read as NFC)."
    mixed = tmp_path / "mixed"
    for split in ("Training", "Validation"):
        shutil.copytree(trees["unzipped"] / split / "라벨링데이터", mixed / split / "라벨링데이터")
        for d in (mixed / split / "라벨링데이터").iterdir(): d.rename(d.parent / unicodedata.normalize("NFD", d.name))
        for z in (trees["nfd"] / split).glob("원천데이터*.zip"): shutil.copy(z, mixed / split / z.name)
    assert any(not unicodedata.is_normalized("NFC", p.name) for p in mixed.rglob("*"))
    assert _summary(build_index(mixed, CFG)) == _summary(build_index(trees["unzipped"], CFG))


# ---- damaged archives -------------------------------------------------------------------------------------------------
def _copy(trees, tmp_path, names="utf8"):
    return Path(shutil.copytree(trees[names], tmp_path / "rel"))


def test_not_a_zip_is_one_line_and_the_rest_is_used(trees, tmp_path, caplog):
    rel = _copy(trees, tmp_path)
    victim = next(p for p in sorted((rel / "Training").glob("원천데이터_*.zip")))
    stems = lambda z: {n.rsplit(".", 1)[0] for n in zipfile.ZipFile(z).namelist()}
    labelled = len(stems(victim) & stems(rel / "Training" / "라벨링데이터.zip"))
    damage_zip(victim, "not_zip")
    base, ix = build_index(trees["utf8"], CFG), build_index(rel, CFG)
    assert ix.skipped["bad_archive"] == 1 and labelled > 5
    assert ix.skipped["label_without_image"] - base.skipped["label_without_image"] == labelled  # their labels lost their photos
    assert 0 < sum(ix.records.values()) < sum(base.records.values())
    lines = [r for r in caplog.records if victim.name in r.getMessage() and r.levelname == "ERROR"]
    assert len(lines) == 1 and "cannot be opened" in lines[0].getMessage()


@pytest.mark.parametrize("how", ["crc", "bomb"])
def test_damaged_label_member_is_skipped_and_counted(trees, tmp_path, how):
    rel = _copy(trees, tmp_path)
    damage_zip(rel / "Training" / "라벨링데이터.zip", how, member=3)
    base, ix = build_index(trees["utf8"], CFG), build_index(rel, CFG)
    assert ix.skipped["bad_member"] == 1
    assert sum(ix.records.values()) == sum(base.records.values()) - 1


def test_truncated_archive_keeps_the_members_before_the_cut(trees, tmp_path):
    rel = _copy(trees, tmp_path)
    z = rel / "Training" / "라벨링데이터.zip"
    total = len(zipfile.ZipFile(z).namelist())
    damage_zip(z, "truncate")
    with pytest.raises(zipfile.BadZipFile): zipfile.ZipFile(z)
    ix = build_index(rel, CFG)
    assert ix.stats["archive_truncated"] == 1 and "bad_archive" not in ix.skipped
    kept = len(A.Archive(z).members)
    assert 0 < kept < total
    base = build_index(trees["utf8"], CFG)
    assert 0 < sum(ix.records.values()) < sum(base.records.values())
    assert ix.skipped["bad_member"] <= 1  # at most the member cut in the middle


# ---- feature cache ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tower(): return CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(), seed=0)


def test_cache_from_zips_is_bit_identical_to_the_unzipped_tree(trees, tower, tmp_path):
    z, u = build_index(trees["cp949"], CFG), build_index(trees["unzipped"], CFG)
    zi, ui = z.items["train"] + z.items["val"], u.items["train"] + u.items["val"]
    fz = build_feature_cache(zi, tower, tmp_path / "cz", batch_size=8, num_workers=2, progress=False)
    fu = build_feature_cache(ui, tower, tmp_path / "cu", batch_size=8, num_workers=2, progress=False)
    assert fz.keys == fu.keys and fz.skipped == fu.skipped and len(fz) > 20
    assert torch.equal(fz.features, fu.features)  # same bits, per item key
    assert record_id(zi[0]) != record_id(ui[0])  # ids: member size + CRC-32 vs file size + mtime


def test_damaged_photo_member_skips_its_crops(trees, tower, tmp_path):
    rel = _copy(trees, tmp_path)
    z = rel / "Training" / "원천데이터_2.zip"
    name = damage_zip(z, "crc", member=0)
    ix = build_index(rel, CFG)
    items = ix.items["train"] + ix.items["val"]
    hit = [it.key for it in items if split_member(it.image_path)[1] == A.member_name(zipfile.ZipFile(z).getinfo(name))]
    fc = build_feature_cache(items, tower, tmp_path / "c", batch_size=8, num_workers=0, progress=False)
    assert hit and {k: fc.skipped[k] for k in hit} == {k: "bad_member" for k in hit}
    assert "CRC" in fc.skip_details[hit[0]] and len(fc) == len(items) - len(fc.skipped)


def test_macos_resource_forks_in_zips_are_not_records(trees, tmp_path):
    "A release re-zipped on macOS holds `__MACOSX/.../._<id>.json` and `._<id>.jpg` members: they are not labels or photos."
    rel = _copy(trees, tmp_path)
    for z in rel.rglob("*.zip"):
        with zipfile.ZipFile(z) as src: names = [n for n in src.namelist() if not n.endswith("/")]
        with zipfile.ZipFile(z, "a") as dst:
            for n in names[:10]:
                folder, base = n.rsplit("/", 1) if "/" in n else ("", n)
                dst.writestr(f"__MACOSX/{folder}/._{base}", b"\x00\x05\x16\x07 AppleDouble")   # what Archive Utility adds
                dst.writestr(f"{folder}/._{base}".lstrip("/"), b"\x00\x05\x16\x07 AppleDouble")
    assert _summary(build_index(rel, CFG)) == _summary(build_index(trees["utf8"], CFG))


# ---- the directory reader against zipfile ------------------------------------------------------------------------------
_METHODS = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]

@settings(max_examples=60, deadline=None)
@given(members=st.lists(st.tuples(_NAME, st.binary(max_size=300), st.sampled_from(_METHODS), st.sampled_from(["utf8", "cp949"])),
                        min_size=1, max_size=8, unique_by=lambda m: m[0]),
       comment=st.binary(max_size=40), prefix=st.binary(max_size=64))
def test_directory_reader_finds_what_zipfile_finds(tmp_path_factory, members, comment, prefix):
    "Names, sizes, CRCs and offsets as zipfile has them (NFC names); every member reads back byte for byte, whatever its method."
    z = tmp_path_factory.mktemp("cd") / "a.zip"
    with zipfile.ZipFile(z, "w") as out:
        out.comment = comment
        for name, data, method, enc in members:
            zi = (_CP949Info if enc == "cp949" else zipfile.ZipInfo)(f"d/{name}.jpg")  # CP949: as Korean Windows writes names
            zi.compress_type = method
            out.writestr(zi, data)
    z.write_bytes(prefix + z.read_bytes())  # bytes in front of the zip move every offset
    a = A.Archive(z)
    assert not a.recovered and {n: a.read(n) for n in a.members} == {unicodedata.normalize("NFC", f"d/{n}.jpg"): d for n, d, *_ in members}
    if b"PK\x05\x06" not in comment:  # zipfile takes that signature in a comment for the end record, and gives up
        want = zipfile.ZipFile(z).infolist()
        assert [(n, *a.entry(n)) for n in a.members] == \
               [(member_name(zi), zi.flag_bits, zi.compress_type, zi.CRC, zi.compress_size, zi.file_size, zi.header_offset) for zi in want]
    a.close()


def test_zip64_directory_of_more_than_65535_members(tmp_path):
    "The label zip of Training holds 967,806 members: its directory is found through the zip64 end records."
    z, n = tmp_path / "labels.zip", 70_000
    with zipfile.ZipFile(z, "w") as out:
        for i in range(n): out.writestr(f"스트리트/{i}.json", b"{}" if i % 7 else f'{{"i": {i}}}'.encode())
    with open(z, "rb") as f: assert f.read()[-22 - 20 - 56:][:4] == b"PK\x06\x06"  # zipfile wrote the zip64 records
    a = A.Archive(z)
    assert len(a.members) == n and not a.recovered
    assert a.read("스트리트/69986.json") == b'{"i": 69986}' and a.read("스트리트/69999.json") == b"{}"
    # the same directory behind a plain end record whose count wrapped at 65,536, as tools without zip64 write it
    raw = z.read_bytes()
    cd_size, cd_off = A._END64.unpack_from(raw, len(raw) - 22 - 20 - 56)[-2:]
    wrapped = tmp_path / "wrapped.zip"
    wrapped.write_bytes(raw[:cd_off + cd_size] + A._END.pack(b"PK\x05\x06", 0, 0, n % 65536, n % 65536, cd_size, cd_off, 0))
    w = A.Archive(wrapped)
    assert len(w.members) == n and not w.recovered and w.read("스트리트/69986.json") == b'{"i": 69986}'


@pytest.mark.parametrize("pread", [True, False])
def test_one_archive_read_from_many_threads(tmp_path, monkeypatch, pread):
    "The app reads thumbnails from several threads through one handle: reads never see another's file position (no pread: Windows)."
    from concurrent.futures import ThreadPoolExecutor
    if not pread: monkeypatch.delattr(os, "pread", raising=False)
    z, data = tmp_path / "p.zip", {f"s/{i}.jpg": os.urandom(1000 + i) for i in range(64)}
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as out:
        for k, v in data.items(): out.writestr(k, v)
    for _ in range(20):  # the threads also race to open it: none may see a half-made handle
        A._OPEN.clear()
        with ThreadPoolExecutor(8) as ex:
            got = list(ex.map(lambda k: read_bytes(A.member_path(z, k)), list(data) * 4))
        assert got == list(data.values()) * 4


def test_flagged_name_that_is_not_utf8_is_still_listed(tmp_path):
    "A member flagged UTF-8 whose name is CP949 bytes (a broken zip tool) is guessed like an unflagged one, not a crash."
    z = tmp_path / "w.zip"
    name = "스트/1.jpg".encode("cp949")  # the archive is built by hand: zipfile flags only names it wrote as UTF-8
    local = A._LOCAL.pack(b"PK\x03\x04", 20, 0x800, 0, 0, 0, zlib.crc32(b"abc"), 3, 3, len(name), 0) + name + b"abc"
    central = A._CENTRAL.pack(b"PK\x01\x02", 20, 0, 20, 0, 0x800, 0, 0, 0, zlib.crc32(b"abc"), 3, 3, len(name), 0, 0, 0, 0, 0, 0) + name
    end = A._END.pack(b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local), 0)
    z.write_bytes(local + central + end)
    a = A.Archive(z)
    assert list(a.members) == ["스트/1.jpg"] and a.read("스트/1.jpg") == b"abc"
    assert not a.recovered  # read through its directory, not rescued by the local-header walk


def test_implausible_compressed_size_is_refused_unread(tmp_path):
    "A directory entry that declares a few bytes but a huge compressed size is a MemberError before anything is read."
    z, data, name = tmp_path / "c.zip", b"abc", b"x/1.json"
    big = 200_000  # the file holds that much after the member, so only the plausibility check can refuse it
    local = A._LOCAL.pack(b"PK\x03\x04", 20, 0, 0, 0, 0, zlib.crc32(data), big, 3, len(name), 0) + name + data + bytes(big)
    central = A._CENTRAL.pack(b"PK\x01\x02", 20, 0, 20, 0, 0, 0, 0, 0, zlib.crc32(data), big, 3, len(name), 0, 0, 0, 0, 0, 0) + name
    z.write_bytes(local + central + A._END.pack(b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local), 0))
    with pytest.raises(A.MemberError, match="compressed size"): read_bytes(A.member_path(z, "x/1.json"), max_bytes=1000)


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_corrupt_compressed_member_is_a_member_error(tmp_path, method, damage):
    "Whatever the method, a damaged stream is a MemberError (counted as bad_member), never another exception."
    z, data = tmp_path / "m.zip", json.dumps({"x": list(range(300))}).encode()
    with zipfile.ZipFile(z, "w", method) as out: out.writestr("d/1.json", data)
    e = A.Archive(z).entry("d/1.json")
    raw = bytearray(z.read_bytes()); start = e.header_offset + 30 + len(b"d/1.json")
    if damage == "flip": raw[start + 2:start + e.compress_size - 2] = bytes(e.compress_size - 4)  # zeroed stream
    else:  # the stream cut to 4 bytes, the directory told so (an lzma member then lacks its own header)
        a = A.Archive(z); a.members["d/1.json"] = A.Member(e.flag_bits, method, e.CRC, 4, e.file_size, e.header_offset)
        with pytest.raises(A.MemberError): a.read("d/1.json")
        return
    z.write_bytes(bytes(raw))
    with pytest.raises(A.MemberError): read_bytes(A.member_path(z, "d/1.json"))


def test_local_header_offset_past_the_end_is_a_member_error(tmp_path):
    "A zip64 extra that puts a member's header at 2**63 is a MemberError, not an OverflowError from pread."
    z, name, data = tmp_path / "o.zip", b"x/1.json", b"abc"
    local = A._LOCAL.pack(b"PK\x03\x04", 45, 0, 0, 0, 0, zlib.crc32(data), 3, 3, len(name), 0) + name + data
    extra = struct.pack("<HHQ", 1, 8, 2**63 + 5)
    central = A._CENTRAL.pack(b"PK\x01\x02", 45, 0, 45, 0, 0, 0, 0, 0, zlib.crc32(data), 3, 3, len(name), len(extra), 0, 0, 0, 0,
                              0xFFFFFFFF) + name + extra
    z.write_bytes(local + central + A._END.pack(b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local), 0))
    with pytest.raises(A.MemberError, match="past the end"): read_bytes(A.member_path(z, "x/1.json"))


@pytest.mark.parametrize("quirk", ["disk numbers", "locator look-alike"])
def test_end_record_quirks_zipfile_reads_are_read_through_the_directory(tmp_path, quirk):
    "Disk numbers in the plain end record are ignored, and a locator signature without a zip64 record leaves the plain one standing."
    z = tmp_path / "q.zip"
    with zipfile.ZipFile(z, "w") as out:
        out.writestr("d/2.json", b"[]")
        zi = zipfile.ZipInfo("d/1.json")
        if quirk == "locator look-alike": zi.comment = b"PK\x06\x07" + bytes(16)  # the last 20 bytes before the end record
        out.writestr(zi, b"{}")
    raw = bytearray(z.read_bytes())
    if quirk == "disk numbers": raw[-18:-14] = b"\xff\xff\xff\xff"  # the plain record's two disk numbers
    z.write_bytes(bytes(raw))
    assert len(zipfile.ZipFile(z).namelist()) == 2  # zipfile reads it
    a = A.Archive(z)
    assert not a.recovered and a.read("d/1.json") == b"{}" and a.read("d/2.json") == b"[]"
