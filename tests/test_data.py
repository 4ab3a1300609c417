"Record tests on generated K-Fashion data: boxes, crops, schema-driven JSON, one label parsed, crops as tensors."
import json, time

import pytest, torch
from hypothesis import given, settings, strategies as st

from fashion_json_encoder import data
from fashion_json_encoder.config import Config, UserError
from fashion_json_encoder.data import CropDataset, ImageDecodeError, collate_crops, crop_box, item_json, load_crop
from fashion_json_encoder.dataset import build_index
from fashion_json_encoder.synthetic import make_synthetic_kfashion, synthetic_plan

N = 40  # normal photos per generated dataset
CFG = Config(num_workers=0)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    "The index of one generated dataset with every bad case (the items the crop tests load)."
    return build_index(make_synthetic_kfashion(tmp_path_factory.mktemp("kf") / "split", n_photos=N, seed=3, bad_cases=True,
                                               layout="split"), CFG)


def by_key(index): return {it.key: it for its in index.items.values() for it in its}
def keys_of(index, stem): return sorted(k for k in by_key(index) if k.split("/")[1] == str(stem))
def stem_of(case): return next(p.stem for p in synthetic_plan(N, seed=3, bad_cases=True) if p.case == case)


# ---- crops as images and tensors ----------------------------------------------------------------------------------
def test_truncated_jpeg_is_indexed_then_fails_softly(index):
    bad = [by_key(index)[k] for k in keys_of(index, stem_of("truncated_jpeg"))]
    good = index.items["train"][0]
    assert bad, "without verify_images the photo is indexed; the failure shows at decode time"
    with pytest.raises(ImageDecodeError, match="cannot decode") as e: load_crop(bad[0])
    assert isinstance(e.value, UserError)
    ds = CropDataset([good, bad[0], good], transform=lambda im: torch.zeros(3, 8, 8))
    assert ds[1][0] is None and "cannot decode" in ds[1][2]
    dl = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collate_crops)
    (x, ok, failed), = list(dl)  # a worker survives the bad JPEG
    assert x.shape == (2, 3, 8, 8) and ok == [0, 2] and [j for j, _ in failed] == [1]
    x, ok, failed = collate_crops([ds[1], ds[1]])
    assert x is None and ok == [] and len(failed) == 2


def test_load_crop_draft_mode_keeps_min_side(index):
    it = max(index.items["train"], key=lambda i: (i.crop[2] - i.crop[0]) * (i.crop[3] - i.crop[1]))
    full, small = load_crop(it), load_crop(it, min_side=30)
    assert full.size == (it.crop[2] - it.crop[0], it.crop[3] - it.crop[1]) and full.mode == "RGB"
    assert 30 <= min(small.size) < min(full.size)


# ---- crop geometry -------------------------------------------------------------------------------------------------
@given(st.integers(8, 2000), st.integers(8, 2000), st.floats(0, 1), st.floats(0, 1), st.floats(0.001, 1),
       st.floats(0.001, 1), st.floats(0, 1))
def test_crop_contains_box_within_image(W, H, fx, fy, fw, fh, pad):
    x0, y0 = fx * (W - 1), fy * (H - 1)
    box = (x0, y0, min(W, x0 + max(fw * W, 0.01)), min(H, y0 + max(fh * H, 0.01)))
    c = crop_box(box, (W, H), pad)
    assert all(isinstance(v, int) for v in c)
    assert 0 <= c[0] <= box[0] and 0 <= c[1] <= box[1] and box[2] <= c[2] <= W and box[3] <= c[3] <= H
    assert c[2] > c[0] and c[3] > c[1]


@given(st.floats(-500, 500), st.floats(-500, 500), st.integers(-5, 400), st.integers(-5, 400))
def test_parsed_boxes_are_clipped_positive_and_inside(tmp_path_factory, x, y, w, h):
    d = tmp_path_factory.mktemp("box")
    rect = {"X좌표": x, "Y좌표": y, "가로": w, "세로": h}
    label = {"이미지 정보": {"이미지 너비": 240, "이미지 높이": 320, "이미지 식별자": 1},
             "데이터셋 정보": {"데이터셋 상세설명": {"렉트좌표": {"상의": [rect]}, "라벨링": {"상의": [{"카테고리": "탑"}]}}}}
    (d / "1.json").write_text(json.dumps(label, ensure_ascii=False), encoding="utf-8")
    r = data.parse_photo(d / "1.json", d / "1.jpg", CFG.fields, ["상의"])
    if r["items"]:
        (_, b, c, j), = r["items"]
        assert 0 <= b[0] < b[2] <= 240 and 0 <= b[1] < b[3] <= 320 and j == {"category": "탑"}
        assert c[0] <= b[0] and c[1] <= b[1] and b[2] <= c[2] <= 240 and b[3] <= c[3] <= 320
    else:
        (reason,) = r["skipped"]
        assert reason == ("box_zero_area" if w <= 0 or h <= 0 else "box_outside_image")


# ---- schema-driven JSON --------------------------------------------------------------------------------------------
def test_item_json_is_linear_in_the_number_of_values():
    "A 40k-value 디테일 list (O(n^2) dedup took ~9 s): first occurrences kept in order, in well under a second."
    values = [f"디테일{i % 20_000}" for i in range(40_000)]
    t = time.perf_counter(); j = item_json({"디테일": values, "카테고리": ["팬츠", "팬츠"]}, [], CFG.fields); dt = time.perf_counter() - t
    assert j["detail"] == values[:20_000] and j["category"] == "팬츠"
    assert dt < 1.0, f"{dt:.2f}s"


_val = st.one_of(st.none(), st.text(max_size=6), st.sampled_from(["노말", "우븐", "원 숄더", " "]))
@given(st.dictionaries(st.sampled_from(["카테고리", "핏", "소재", "디테일", "색상"]), st.one_of(_val, st.lists(_val, max_size=3))),
       st.lists(st.one_of(st.none(), st.sampled_from(["로맨틱", "키치/키덜트"])), max_size=2))
def test_item_json_follows_schema(attrs, style):
    j = item_json(attrs, style, CFG.fields)
    assert set(j) <= set(CFG.fields)
    for f, v in j.items():
        if CFG.fields[f]["multi"]: assert isinstance(v, list) and v and len(set(v)) == len(v) and all(x.strip() for x in v)
        else: assert isinstance(v, str) and v.strip()
    assert "노말" not in json.dumps(j, ensure_ascii=False)


def test_item_thumbnail_cuts_the_padded_box_from_a_file_or_a_zip_member(tmp_path, caplog):
    "One crop helper for the app's gallery and the retrieval figures: the training crop, shrunk; a grey tile when unreadable."
    import zipfile
    from PIL import Image
    from fashion_json_encoder.data import item_thumbnail
    p = tmp_path / "photo.jpg"; Image.new("RGB", (400, 300), "navy").save(p)
    z = tmp_path / "photos.zip"
    with zipfile.ZipFile(z, "w") as zf: zf.write(p, "a/photo.jpg")
    for path in (p, f"{z}::a/photo.jpg"):
        assert item_thumbnail(path, (100, 100, 200, 150), pad=0.1).size == (120, 60)   # 100x50 box + 10% a side
        assert item_thumbnail(path, (0, 0, 400, 300), size=64).size == (64, 48)
    with caplog.at_level("WARNING", logger="fashion_json_encoder"):
        tile = item_thumbnail(f"{z}::a/gone.jpg", (0, 0, 10, 10), size=32)
    assert tile.size == (32, 32) and tile.getpixel((0, 0)) == (200, 200, 200)
    assert sum("cannot show the crop" in r.getMessage() for r in caplog.records) == 1


def test_item_thumbnail_decodes_a_large_photo_only_as_large_as_the_thumbnail_needs(tmp_path, monkeypatch):
    "A 3000x2000 photo, 256-px thumbnail of a 1200x900 box: JPEG DCT scaling to 1/4, same size and look as a full decode."
    import numpy as np
    from PIL import Image
    from fashion_json_encoder.data import item_thumbnail
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    p = tmp_path / "big.jpg"; Image.fromarray(small).resize((3000, 2000), Image.BICUBIC).save(p, quality=90)
    from PIL.JpegImagePlugin import JpegImageFile
    scales, real = [], JpegImageFile.draft
    def spy(self, mode, size): r = real(self, mode, size); scales.append(self.decoderconfig); return r
    monkeypatch.setattr(JpegImageFile, "draft", spy)
    box = (1000.0, 500.0, 2200.0, 1400.0)
    thumb = item_thumbnail(p, box, pad=0.0)
    assert scales == [(4, 0)]                      # 1200x900 decoded as 300x225, still over 256 on the long side
    with Image.open(p) as im: full = im.convert("RGB").crop((1000, 500, 2200, 1400))
    full.thumbnail((256, 256))
    assert thumb.size == full.size == (256, 192)
    assert np.abs(np.asarray(thumb, dtype=float) - np.asarray(full, dtype=float)).mean() < 3   # grey levels of 255


def test_a_draft_scaled_crop_at_the_photos_edge_has_no_black_column(tmp_path):
    "603 px wide at 1/2 scale: 603 × (302/603) lands just over 302 in floats; the crop once grew a black column there."
    from PIL import Image
    from fashion_json_encoder.data import Item, item_thumbnail, load_crop
    from fashion_json_encoder.decode import decode_crops
    p = tmp_path / "p.jpg"; Image.new("RGB", (603, 900), (200, 120, 61)).save(p, quality=95)
    it = Item("k", str(p), "상의", (0., 0., 603., 900.), (0, 0, 603, 900), {}, "l")
    crops = [load_crop(it, min_side=224), decode_crops(p.read_bytes(), [it.crop], 224)[0][0], item_thumbnail(p, it.crop, pad=0)]
    assert [c.size for c in crops] == [(302, 450), (302, 450), (172, 256)]
    for c in crops:
        r, g, b = c.getpixel((c.size[0] - 1, c.size[1] // 2))
        assert abs(r - 200) + abs(g - 120) + abs(b - 61) < 12, (c.size, (r, g, b))


@given(st.integers(1, 700), st.integers(1, 700), st.sampled_from([16, 64, 256]))
def test_thumbnail_size_is_pillows(w, h, size):
    "The size item_thumbnail resizes to is the one Image.thumbnail would give the full-size crop."
    from PIL import Image
    from fashion_json_encoder.data import _thumb_size
    im = Image.new("L", (w, h)); im.thumbnail((size, size))
    assert _thumb_size(w, h, size) == (None if w <= size and h <= size else im.size)


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    import numpy as np
    from PIL import Image
    small = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    p = tmp_path_factory.mktemp("thumb") / "t.jpg"; Image.fromarray(small).resize((1200, 1800), Image.BICUBIC).save(p, quality=90)
    return p


@settings(max_examples=40, deadline=None)
@given(st.floats(0, 0.9), st.floats(0, 0.9), st.floats(0.02, 1), st.floats(0.02, 1), st.sampled_from([64, 192, 256]))
def test_thumbnail_matches_a_full_decode_thumbnail(textured, fx, fy, fw, fh, size):
    "Any box: the draft-decoded thumbnail has the full decode's size exactly and its look (mean difference under 8 of 255)."
    import numpy as np
    from PIL import Image
    from fashion_json_encoder.data import crop_box, item_thumbnail
    x0, y0 = 1200 * fx, 1800 * fy
    box = (x0, y0, x0 + max(1.0, (1200 - x0) * fw), y0 + max(1.0, (1800 - y0) * fh))
    new = item_thumbnail(textured, box, pad=0.1, size=size)
    with Image.open(textured) as im: old = im.convert("RGB").crop(crop_box(box, im.size, 0.1))
    old.thumbnail((size, size))
    assert new.size == old.size
    assert np.abs(np.asarray(new, dtype=float) - np.asarray(old, dtype=float)).mean() < 8


# ---- per-label shortcuts of the index build agree with their plain definitions --------------------------------------------
_PATHS = st.lists(st.sampled_from(["a", "b.", ".", "..", "x.json", "_3", "스", "\u1109", "\u1173", "Training", "VALIDATION",
                                   "원천데이터_2.zip::", "::", "/", "//", " "]), max_size=8).map("".join)

@settings(max_examples=400, deadline=None)
@given(rel=_PATHS)
def test_pair_key_with_its_folder_memo_is_the_split_of_the_whole_path(rel):
    import unicodedata
    from fashion_json_encoder.dataset import _SPLITS, pair_key
    parts = unicodedata.normalize("NFC", rel.replace("::", "/")).split("/")
    want = (next((_SPLITS[p.lower()] for p in parts[:-1] if p.lower() in _SPLITS), None),
            parts[-2] if len(parts) > 1 else "", parts[-1].rsplit(".", 1)[0])
    assert pair_key(rel) == want and pair_key(rel) == want  # the second call reads the folder from the memo


@settings(max_examples=400, deadline=None)
@given(s=_PATHS)
def test_stem_is_paths_stem(s):
    from pathlib import Path
    assert data._stem(s) == Path(s).stem
