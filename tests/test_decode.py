"Issue 10 §2-3: one decode per photo (exact pixels of the per-crop path) and batched GPU decode (features agree)."
import io
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from PIL import Image
from fashion_json_encoder.decode import decode_jpegs

from fashion_json_encoder.config import Config, UserError
from fashion_json_encoder.data import Item, load_crop
from fashion_json_encoder.dataset import build_index
from fashion_json_encoder.decode import crop_tensor, decode_crops, draft_scales, gpu_refusal, resolve_decode
from fashion_json_encoder.models.feature_cache import build_feature_cache
from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, tiny_clip_config
from fashion_json_encoder.synthetic import make_synthetic_kfashion

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    p = tmp_path_factory.mktemp("ph") / "p.jpg"
    im = Image.effect_noise((800, 1040), 50).convert("RGB")
    im.paste((200, 40, 90), (100, 200, 500, 700))
    im.save(p, quality=88)
    return p


@pytest.fixture(scope="module")
def tower(): return CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(), seed=0)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_synthetic_kfashion(tmp_path_factory.mktemp("rel") / "z", 40, 5, layout="zips", size=(800, 1040), num_workers=2)


_box = st.tuples(st.integers(0, 790), st.integers(0, 1030), st.integers(1, 800), st.integers(1, 1040)).map(
    lambda t: (t[0], t[1], min(800, t[0] + t[2]), min(1040, t[1] + t[3])))

@settings(max_examples=25, deadline=None)
@given(crops=st.lists(_box, min_size=1, max_size=4), min_side=st.sampled_from([None, 32, 64, 224]))
def test_one_decode_per_photo_gives_the_exact_pixels_of_load_crop(photo, crops, min_side):
    ims, n = decode_crops(photo.read_bytes(), crops, min_side)
    assert 1 <= n <= len({s for s in draft_scales(photo.read_bytes(), crops, min_side)})
    for c, im in zip(crops, ims):
        assert im.tobytes() == load_crop(Item("k", str(photo), "상의", c, c, {}, "l"), min_side).tobytes()


def test_per_photo_cache_equals_per_crop_cache(release, tower, tmp_path):
    ix = build_index(release, Config(num_workers=0))
    items = ix.items["train"] + ix.items["val"]
    a = build_feature_cache(items, tower, tmp_path / "a", batch_size=16, num_workers=2, progress=False, per_photo=True)
    b = build_feature_cache(items, tower, tmp_path / "b", batch_size=16, num_workers=2, progress=False, per_photo=False)
    assert a.keys == b.keys and len(a) == len(items) > len({it.image_path for it in items})
    torch.testing.assert_close(a.features.float(), b.features.float(), atol=2e-3, rtol=0)  # fp16 rounding, batching
    assert a.decode_stats["photos"] == len({it.image_path for it in items}) < b.decode_stats["photos"] == len(items)
    assert a.decode_stats["decodes"] < b.decode_stats["decodes"]


def _cosines(release, tower, pool: bool):
    ix = build_index(release, Config(num_workers=0))
    by_photo = {}
    for it in ix.items["train"] + ix.items["val"]: by_photo.setdefault(it.image_path, []).append(it.crop)
    cos = []
    for path, crops in list(by_photo.items())[:12]:
        from fashion_json_encoder.archives import read_bytes
        data = read_bytes(path)
        cpu = torch.stack([tower.preprocess(im) for im in decode_crops(data, crops, tower.image_size)[0]])
        img = decode_jpegs([torch.frombuffer(bytearray(data), dtype=torch.uint8)], "cpu")[0]
        dev = crop_tensor(img, crops, tower.image_size, tower.preprocess_cfg["mean"], tower.preprocess_cfg["std"],
                          draft_scales(data, crops, tower.image_size) if pool else None)
        cos += F.cosine_similarity(tower(cpu), tower(dev)).tolist()
    return cos


def test_tensor_preprocessing_matches_the_pil_path(release):
    "The GPU path's math, run on the CPU: features of every crop within cosine 0.999 of the Pillow path's."
    b32 = CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(image_size=224), seed=0)  # 224 px inputs: draft scales > 1
    cos = _cosines(release, b32, pool=True)
    assert min(cos) >= 0.999, (min(cos), sum(cos) / len(cos))
    assert min(_cosines(release, b32, pool=False)) < min(cos)  # the draft-scale pooling is what closes the gap


def test_gpu_refusal_reasons(photo, tmp_path):
    data = photo.read_bytes()
    assert gpu_refusal(data) is None
    buf = io.BytesIO(); Image.open(photo).convert("CMYK").save(buf, "JPEG"); assert gpu_refusal(buf.getvalue()) == "cmyk"
    buf = io.BytesIO(); Image.open(photo).save(buf, "JPEG", progressive=True); assert gpu_refusal(buf.getvalue()) == "progressive"
    buf = io.BytesIO(); Image.open(photo).save(buf, "PNG"); assert gpu_refusal(buf.getvalue()) == "not_jpeg"
    assert gpu_refusal(data[: len(data) // 2]) == "truncated"


def test_resolve_decode():
    assert resolve_decode("auto", "cpu") == "cpu" and resolve_decode("cpu", "cpu") == "cpu"
    with pytest.raises(UserError, match="CUDA"): resolve_decode("gpu", "cpu")
    with pytest.raises(UserError, match="decode must be"): resolve_decode("nvjpeg", "cpu")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_build_agrees_with_cpu_build_and_falls_back(release, tmp_path):
    tw = CLIPImageEncoder("ViT-B-32", pretrained="none", seed=0, device="cuda")
    ix = build_index(release, Config(num_workers=0))
    items = ix.items["train"] + ix.items["val"]
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (800, 1040), (10, 200, 30, 0)).save(cmyk, "JPEG")
    items.append(Item("모던/cmyk/상의", str(cmyk), "상의", (10., 10., 400., 500.), (10, 10, 400, 500), {}, "cmyk"))
    g = build_feature_cache(items, tw, tmp_path / "g", batch_size=32, num_workers=2, progress=False, decode="gpu")
    c = build_feature_cache(items, tw, tmp_path / "c", batch_size=32, num_workers=2, progress=False, decode="cpu")
    assert g.decode == "gpu" and g.path != c.path and g.keys == c.keys and len(g) == len(items)
    assert g.decode_stats["gpu_decode_fallback_cmyk"] == 1 and g.decode_stats["gpu_decoded"] == len({it.image_path for it in items}) - 1
    cos = F.cosine_similarity(g.features.float(), c.features.float())
    assert cos.min() >= 0.999, (cos.min().item(), cos.mean().item())
    m = build_feature_cache(items, tw, tmp_path / "m", batch_size=32, num_workers=2, progress=False, decode="gpu", cpu_share=0.4)
    st_, photos = m.decode_stats, len({it.image_path for it in items})   # the workers decode 40 % of the photos alongside
    assert st_["cpu_share_photos"] > 0 and st_["cpu_share_photos"] + st_["gpu_decoded"] + st_.get("gpu_decode_fallback_cmyk", 0) == photos
    assert m.keys == c.keys and F.cosine_similarity(m.features.float(), c.features.float()).min() >= 0.999


def test_a_loose_photo_over_the_size_limit_is_skipped_unread(photo, tower, tmp_path, monkeypatch):
    "Zip members were capped; a loose file now is too: the cache build counts it as a skip naming the file, reads no more."
    from fashion_json_encoder import decode
    from fashion_json_encoder.archives import read_bytes
    size = photo.stat().st_size
    with pytest.raises(OSError, match=f"over the {size - 1}-byte limit"): read_bytes(photo, max_bytes=size - 1)
    assert read_bytes(photo, max_bytes=size) == photo.read_bytes()
    from fashion_json_encoder import data
    from fashion_json_encoder.data import ImageDecodeError
    monkeypatch.setattr(data, "IMAGE_MAX_BYTES", size - 1)     # the per-crop loader refuses it too
    with pytest.raises(ImageDecodeError, match="byte limit"): load_crop(Item("k", str(photo), "상의", (0, 0, 9, 9), (0, 0, 9, 9), {}, "l"))
    monkeypatch.setattr(decode, "IMAGE_MAX_BYTES", size - 1)   # the photo is one byte too big
    items = [Item(f"k{i}", str(photo), "상의", c, c, {}, "l") for i, c in enumerate([(0, 0, 300, 400), (100, 200, 500, 700)])]
    fc = build_feature_cache(items, tower, tmp_path / "c", batch_size=4, num_workers=0, progress=False)
    assert len(fc) == 0 and fc.skipped == {"k0": "bad_image", "k1": "bad_image"}
    assert all(str(photo) in why and "byte limit" in why for why in fc.skip_details.values())


@given(st.floats(0, 1), st.integers(0, 10**6), st.integers(1, 2000))
def test_the_cpu_share_is_even_over_any_stretch_of_photos(share, start, n):
    "Any run of n consecutive photos holds share × n of the CPU-decoded ones, to within 4: no clumps at the start or end."
    from fashion_json_encoder.decode import on_cpu_share
    got = sum(on_cpu_share(p, share) for p in range(start, start + n))
    assert abs(got - share * n) <= 4
    assert not any(on_cpu_share(p, 0.0) for p in range(start, start + 50)) and all(on_cpu_share(p, 1.0) for p in range(start, start + 50))


class _Unpicklable(Item):
    "An item a DataLoader worker must never receive (nor read: reading a Python object in a fork writes its page)."
    def __reduce__(self): raise AssertionError("an item went to a worker")


_crop = st.one_of(st.tuples(*[st.integers(0, 2000)] * 4), st.tuples(*[st.floats(0, 2000, allow_nan=False)] * 4))
_name = st.text(st.characters(codec="utf-8", exclude_characters="\0/"), min_size=1, max_size=12) | st.sampled_from(["원천데이터_1.zip::레트로/1.jpg", "a\udcc0b.jpg"])


@settings(max_examples=60, deadline=None)
@given(photos=st.lists(st.tuples(_name, st.lists(_crop, min_size=1, max_size=3)), max_size=8), cpu_share=st.sampled_from([0.0, 1.0]))
def test_photo_dataset_gives_each_photos_path_rows_and_crops_without_holding_items(photos, cpu_share):
    from fashion_json_encoder.decode import PhotoDataset
    import pickle
    items, groups = [], []
    for j, (name, crops) in enumerate(photos):
        groups.append([])
        for c in crops:
            groups[-1].append(len(items)); items.append(_Unpicklable(f"k{len(items)}", f"/nowhere/{j}/{name}", "상의", c, c, {}, "l"))
    ds = PhotoDataset(items, groups, None, 224, mode="gpu", cpu_share=cpu_share)
    ds = pickle.loads(pickle.dumps(ds))   # what a spawned worker gets: no item in it
    assert len(ds) == len(groups)
    for p, g in enumerate(groups):
        assert ds.path(p) == items[g[0]].image_path
        out = ds[p]   # no such file: every crop of the photo is skipped with the photo's path in the message
        assert [b[0] for b in out["bad"]] == g and all(items[g[0]].image_path in b[2] for b in out["bad"])
        s, e = ds._starts[p], ds._starts[p + 1]
        assert [tuple(c) for c in ds._crops[s:e].tolist()] == [items[r].crop for r in g]
        assert all(type(v) is type(w) for r, c in zip(g, ds._crops[s:e].tolist()) for v, w in zip(c, items[r].crop))


def test_gpu_mode_serves_the_items_crops_and_a_worker_freezes_what_it_inherits(photo):
    import gc
    from fashion_json_encoder.decode import PhotoDataset, collate_photos, freeze_inherited
    crops = [(0, 0, 400, 520), (100, 200, 500, 700), (7, 9, 799, 1039)]
    items = [_Unpicklable(f"k{j}", str(photo), "상의", c, c, {}, "l") for j, c in enumerate(crops)]
    ds = PhotoDataset(items, [[0, 2], [1]], None, 224, mode="gpu")
    out = [ds[0], ds[1]]
    assert [o["gpu_rows"] for o in out] == [[0, 2], [1]] and [o["crops"] for o in out] == [[crops[0], crops[2]], [crops[1]]]
    assert out[0]["scales"] == draft_scales(photo.read_bytes(), [crops[0], crops[2]], 224)

    class Frozen(torch.utils.data.Dataset):
        def __len__(self): return 2
        def __getitem__(self, i): return gc.get_freeze_count()
    plain = list(torch.utils.data.DataLoader(Frozen(), batch_size=None, num_workers=1))   # what the parent froze itself, if anything
    frozen = list(torch.utils.data.DataLoader(Frozen(), batch_size=None, num_workers=1, worker_init_fn=freeze_inherited))
    assert all(n > p + 1000 for n, p in zip(frozen, plain))   # the worker's inherited objects: frozen, never walked by its collector


def test_photo_dataset_takes_what_items_held_before(photo):
    "Review: a Path as image_path, any lone surrogate, a negative index, an empty group, a load_fn with bare items."
    from fashion_json_encoder.decode import PhotoDataset
    odd = "/nowhere/a\ud800b\udcc3.jpg"
    items = [Item("a", photo, "상의", (0, 0, 5, 5), (0, 0, 5, 5), {}, "l"), Item("b", odd, "상의", (0, 0, 5, 5), (0, 0, 5, 5), {}, "l")]
    ds = PhotoDataset(items, [[0], [1], []], None, 224)
    assert ds.path(0) == str(photo) and ds.path(1) == odd and len(ds) == 3
    assert ds[0]["rows"] == [0] and ds[-3]["rows"] == [0] and [b[:2] for b in ds[-2]["bad"]] == [(1, "bad_image")]
    assert ds[2]["rows"] == [] and ds[2]["bad"] == []
    with pytest.raises(IndexError): ds[3]
    bare = PhotoDataset([object(), object()], [[0, 1]], None, load_fn=lambda it, side: Image.new("RGB", (4, 4)))
    assert bare[0]["rows"] == [0, 1] and bare[0]["decodes"] == 2
    def broken(it, side): raise OSError("cannot identify image file")
    failed = PhotoDataset(items, [[1]], None, load_fn=broken)[0]["bad"]   # a load_fn's failure still names the photo
    assert [b[:2] for b in failed] == [(1, "bad_image")] and odd in failed[0][2]
