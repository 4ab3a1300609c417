"The synthetic generator writes the raw K-Fashion format, deterministically, with label-dependent pixels."
import json
from dataclasses import replace

import pytest
from PIL import Image

from fashion_json_encoder.config import KFASHION_GROUPS
from fashion_json_encoder.synthetic import make_synthetic_kfashion, synthetic_plan, label_json, draw_photo, _hue
from fashion_json_encoder.vocab import KFASHION_VALUES


@pytest.fixture(scope="module")
def root(tmp_path_factory): return make_synthetic_kfashion(tmp_path_factory.mktemp("kf") / "a", n_photos=30, seed=7)


def test_deterministic(root, tmp_path):
    other = make_synthetic_kfashion(tmp_path / "b", n_photos=30, seed=7)
    files = sorted(p.relative_to(root) for p in root.rglob("*.*"))
    assert files == sorted(p.relative_to(other) for p in other.rglob("*.*"))
    assert all((root / f).read_bytes() == (other / f).read_bytes() for f in files)


def test_label_format(root):
    orders = set()
    for p in root.rglob("*.json"):
        text = p.read_text(encoding="utf-8")
        assert "\n" not in text and "\\u" not in text  # one line, Hangul unescaped
        d = json.loads(text)
        assert p.stem == str(d["이미지 정보"]["이미지 식별자"]) == str(d["데이터셋 정보"]["파일 번호"])
        det = d["데이터셋 정보"]["데이터셋 상세설명"]
        for sec in ("렉트좌표", "폴리곤좌표", "라벨링"):
            assert set(KFASHION_GROUPS) <= set(det[sec])
            assert all(isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict) for v in det[sec].values())
        assert p.parent.name == det["라벨링"]["스타일"][0]["스타일"]
        for g in KFASHION_GROUPS:
            a = det["라벨링"][g][0]
            assert all(isinstance(a.get(k, []), list) for k in ("소재", "프린트", "디테일"))
            assert all(isinstance(a[k], str) for k in ("카테고리", "핏") if k in a)
        orders.add(tuple(d))
    assert len(orders) == 2  # key order varies between files


def test_pixels_depend_on_category():
    for spec in synthetic_plan(10, seed=1)[:5]:
        for g, x in spec.garments.items():  # each garment alone, without detail marks
            im = draw_photo(replace(spec, garments={g: {"rect": x["rect"], "attrs": {**x["attrs"], "디테일": []}}}))
            r = x["rect"]
            cx, cy = int(r["X좌표"] + r["가로"] * 0.5), int(r["Y좌표"] + r["세로"] * 0.5)
            want = _hue(KFASHION_VALUES["카테고리"], x["attrs"]["카테고리"])
            px = [im.getpixel((cx + d, cy)) for d in range(-3, 4)]  # fill colour or its darker stripes
            assert any(p == want or p == tuple(c // 2 for c in want) for p in px)


def test_image_modes(tmp_path):
    stub = make_synthetic_kfashion(tmp_path / "s", n_photos=4, image_mode="stub")
    jpgs = sorted(stub.rglob("*.jpg"))
    assert len(jpgs) == 4 and len({p.read_bytes() for p in jpgs}) == 1 and Image.open(jpgs[0]).size == (240, 320)
    none = make_synthetic_kfashion(tmp_path / "n", n_photos=4, image_mode="none")
    assert not list(none.rglob("*.jpg")) and len(list(none.rglob("*.json"))) == 4


def test_shop_looks_shared():
    plan = synthetic_plan(60, seed=0)
    looks = {}
    for p in plan:
        if p.source_name.count("_") == 2: looks.setdefault(p.source_name.rsplit("_", 1)[0], set()).add(p.split)
    assert any(True for _ in looks) and all(len(s) == 1 for s in looks.values())
