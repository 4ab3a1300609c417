"Figures: Hangul (or English) labels never romanised, 150 dpi PNGs, an 'other' entry, pair lines, sorted tags, the gallery."
import logging
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest, torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from matplotlib import font_manager
from matplotlib.collections import LineCollection
from PIL import Image

from fashion_json_encoder import visualise as V
from fashion_json_encoder.config import Config
from fashion_json_encoder.dataset import build_index
from fashion_json_encoder.synthetic import make_synthetic_kfashion
from fashion_json_encoder.vocab import romanize

CATS = ["블라우스", "팬츠", "스커트", "티셔츠", "니트웨어", "셔츠", "재킷", "코트", "베스트", "청바지", "드레스", "점프수트"]
N = 36
JSONS = [{"category": CATS[i % 12], "style": [["로맨틱", "모던", "스트리트"][i % 3]]} for i in range(N)]
XY = np.random.default_rng(0).normal(size=(2 * N, 2))
Z = torch.zeros(N, 4)  # embeddings are not read when `xy` is given


def texts(fig) -> list:
    "Every text artist of a figure: titles, legends, tick labels, annotations."
    return [t for t in fig.findobj(matplotlib.text.Text) if t.get_text()]


def png_dpi(p) -> tuple:
    with Image.open(p) as im: return im.size, im.info["dpi"]


@pytest.fixture
def no_hangul_font(monkeypatch):
    monkeypatch.setattr(V, "hangul_font", lambda: None)


def test_umap_legend_in_hangul_with_other_entry():
    assert V.hangul_font() == "NanumGothic"   # koreanize-matplotlib's font, registered without importing the package
    fig = V.plot_umap(Z, Z, JSONS, fields=("category",), xy=XY, top=8)
    legend = [t.get_text() for t in fig.axes[2].get_legend().get_texts()]
    assert legend[:1] and set(legend[:8]) <= set(CATS) and legend[-1] == "other (4 values)"
    assert not {romanize(c) for c in CATS} & {t.get_text() for t in texts(fig)}   # no romanised label anywhere
    blouse = next(t for t in fig.axes[2].get_legend().get_texts() if t.get_text() == "블라우스")
    assert font_manager.findfont(blouse.get_fontproperties()).endswith("NanumGothic.ttf")
    plt.close(fig)


def test_figures_leave_global_rcparams_alone():
    before = dict(matplotlib.rcParams)
    plt.close(V.plot_tags({"category": [("팬츠", .1)]}))
    plt.close(V.plot_umap(Z, Z, JSONS, xy=XY))
    after = dict(matplotlib.rcParams)
    assert {k for k in before if before[k] != after[k]} == set()


def test_umap_joins_a_seeded_sample_of_pairs():
    fig = V.plot_umap(Z, Z, JSONS, xy=XY, pairs=10, seed=3)
    assert len(fig.axes) == 6 and "pairs joined" in fig.axes[0].get_title()
    (lc,) = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    segs = [np.asarray(s) for s in lc.get_segments()]
    assert len(segs) == 10
    for s in segs:   # each segment joins image i (first N rows) to JSON i (last N rows)
        i = int(np.flatnonzero((XY[:N] == s[0]).all(1))[0]); np.testing.assert_allclose(s[1], XY[N + i])
    again = V.plot_umap(Z, Z, JSONS, xy=XY, pairs=10, seed=3)
    (lc2,) = [c for c in again.axes[0].collections if isinstance(c, LineCollection)]
    np.testing.assert_allclose(np.asarray(lc2.get_segments()), np.asarray(lc.get_segments()))
    plt.close(fig); plt.close(again)


def test_umap_saved_at_150_dpi(tmp_path):
    g = torch.Generator().manual_seed(0)
    txt = F.normalize(torch.randn(N, 16, generator=g), dim=1); img = F.normalize(txt + .3 * torch.randn(N, 16, generator=g), dim=1)
    assert V.umap_2d(img, txt).shape == (2 * N, 2)
    p = V.plot_umap(img, txt, JSONS, path=tmp_path / "results" / "umap.png")   # as `evaluate --plot` calls it: path= by keyword, default dpi
    (w, h), dpi = png_dpi(p)
    assert dpi[0] >= 149.5 and w >= 1500 and p.read_bytes()[:4] == b"\x89PNG"


def test_english_gloss_without_a_hangul_font(no_hangul_font):
    assert V.figure_rc()["font.family"] == ["DejaVu Sans"]
    assert V.display_label("블라우스", "category") == "blouse" and V.display_label("노멀", "silhouette") == "regular-fit"
    fig = V.plot_umap(Z, Z, JSONS, fields=("category",), xy=XY, top=12)
    legend = {t.get_text() for t in fig.axes[2].get_legend().get_texts()}
    assert {"blouse", "pants", "skirt", "jumpsuit"} <= legend and not legend & set(CATS)
    plt.close(fig)


@given(st.text(alphabet=st.sampled_from(list("블라우스팬츠노멀모던로맨틱가나다 ab")), min_size=1, max_size=6))
def test_fallback_is_a_gloss_or_the_value_never_romanised(s):
    from fashion_json_encoder.clip_text import KO_EN
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(V, "hangul_font", lambda: None)
        out = V.display_label(s)
    assert out == s or out in {e for t in KO_EN.values() for e in t.values()}
    hangul = any("\uac00" <= c <= "\ud7a3" for c in s)
    assert out == (V.english_label(s) if hangul else s)   # Hangul with a gloss is written as the gloss; other text as it is


def test_tags_sorted_with_scores_written_not_bars(tmp_path):
    tags = {"category": [("팬츠", -.05), ("블라우스", .31), ("스커트", .12)],   # `tag` tuples, out of order, one negative
            "style": [{"value": "모던", "score": .2, "cosine": .4}, {"value": "로맨틱", "cosine": -.1}]}
    fig = V.plot_tags(tags)
    cat, sty = fig.axes[:2]
    top_down = lambda ax: [t.get_text() for t in sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])]
    assert top_down(cat) == ["블라우스", "스커트", "팬츠"] and top_down(sty) == ["모던", "로맨틱"]
    assert [t.get_text() for t in cat.texts] == ["0.310", "0.120", "-0.050"] and [t.get_text() for t in sty.texts] == ["0.200", "-0.100"]
    assert not cat.patches and cat.get_xlim()[0] < -.1   # no bars; the axis starts below the lowest score, not at 0
    (w, h), dpi = png_dpi(V.plot_tags(tags, path=tmp_path / "tags.png", image=Image.new("RGB", (20, 30))))
    assert dpi[0] >= 149.5
    plt.close(fig)


@pytest.fixture(scope="module")
def val_items(tmp_path_factory):
    "Items of a tiny generated dataset whose photos sit inside release zips."
    root = make_synthetic_kfashion(tmp_path_factory.mktemp("vis") / "kf", n_photos=12, seed=1, layout="zips")
    items = build_index(root, Config(num_workers=0)).items
    return items["train"] + items["val"]


def test_gallery_rows_of_k_crops_with_the_own_photo_framed(val_items, tmp_path):
    items = val_items[:8]
    assert "::" in items[0].image_path   # crops are cut from zip members
    emb = F.normalize(torch.randn(len(items), 8, generator=torch.Generator().manual_seed(0)), dim=1)
    queries, hits, truth = V.retrieval_examples(emb, emb, items, n=3, k=4, seed=0)
    assert len(queries) == len(hits) == len(truth) == 3
    assert all(h[0]["key"] == t and h[0]["rank"] == 1 and len(h) == 4 for h, t in zip(hits, truth))  # identical embeddings: own photo first
    truth[1] = "not/in/gallery"
    fig = V.plot_retrievals(queries, hits, truth=truth)
    rows = np.array(fig.axes).reshape(3, 5)
    assert [sum(bool(ax.images) for ax in r) for r in rows] == [4, 4, 4]
    assert rows[0][1].spines["top"].get_linewidth() == 3 and rows[1][1].spines["top"].get_linewidth() < 3
    assert any("not in the top 4" in t.get_text() for t in rows[1][0].texts) and "#1" in rows[0][1].get_title()
    assert not any("not in the top" in t.get_text() for t in rows[0][0].texts)
    x0, y0, x1, y1 = hits[0][0]["box"]; cell = np.asarray(rows[0][1].images[0].get_array())
    ys, xs = np.nonzero((cell < 250).any(-1))   # the crop inside its white letterbox
    assert cell.shape[:2] == (192, 192) and abs((np.ptp(xs) + 1) / (np.ptp(ys) + 1) - (x1 - x0) / (y1 - y0)) < .15  # the item's box, not the photo
    (w, h), dpi = png_dpi(V.plot_retrievals(queries, hits, tmp_path / "g.png", truth=truth))
    assert dpi[0] >= 149.5
    plt.close(fig)


def test_an_unreadable_photo_is_one_grey_cell_and_one_warning(val_items, caplog):
    items = val_items[:4]
    emb = F.normalize(torch.randn(len(items), 8, generator=torch.Generator().manual_seed(0)), dim=1)
    queries, hits, truth = V.retrieval_examples(emb, emb, items, n=1, k=3, seed=0)
    hits[0][1] = {**hits[0][1], "image_path": hits[0][1]["image_path"] + ".gone"}
    with caplog.at_level(logging.WARNING, logger="fashion_json_encoder"): fig = V.plot_retrievals(queries, hits, truth=truth)
    assert sum("cannot show the crop" in r.getMessage() for r in caplog.records) == 1
    cells = [np.asarray(ax.images[0].get_array()) for ax in fig.axes[1:4]]
    assert (cells[1] == 200).all() and not (cells[0] == 200).all()   # the grey tile in its cell, the other crops drawn
    plt.close(fig)


def test_gallery_survives_an_unreadable_photo(val_items, tmp_path, caplog):
    bad = {"rank": 1, "score": .5, "key": "x", "image_path": str(tmp_path / "missing.jpg"), "box": (0, 0, 10, 10), "json": JSONS[0]}
    with caplog.at_level(logging.WARNING, logger="fashion_json_encoder.visualise"):
        fig = V.plot_search(JSONS[0], [bad])
    assert len(fig.axes[1].images) == 1 and "missing.jpg" in caplog.text
    plt.close(fig)
