"Figures: the UMAP of both modalities, the retrieval gallery and the tagging figure render and save as PNG."
import matplotlib
matplotlib.use("Agg")
import torch
import torch.nn.functional as F
from PIL import Image
from fashion_json_encoder.visualise import plot_search, plot_tags, plot_umap, umap_2d

JSONS = [{"category": c, "style": [s]} for c, s in [("블라우스", "로맨틱"), ("팬츠", "모던"), ("스커트", "로맨틱")] * 10]

def test_umap_puts_both_modalities_in_one_map(tmp_path):
    g = torch.Generator().manual_seed(0)
    txt = F.normalize(torch.randn(30, 16, generator=g), dim=1); img = F.normalize(txt + 0.3 * torch.randn(30, 16, generator=g), dim=1)
    assert umap_2d(img, txt).shape == (60, 2)
    p = plot_umap(img, txt, JSONS, path=tmp_path / "results/umap.png")
    assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size < 300_000
    fig = plot_umap(img, txt, JSONS, fields=("category",))
    assert len(fig.axes) == 1 and any(t.get_text() == "beulrauseu" for t in fig.axes[0].get_legend().get_texts())

def test_search_and_tag_figures(tmp_path):
    p = tmp_path / "a.jpg"; Image.new("RGB", (64, 80), (200, 50, 50)).save(p)
    hits = [{"rank": i + 1, "score": 1 - i / 10, "image_path": str(p), "box": [5, 5, 40, 60], "json": JSONS[i]} for i in range(3)]
    fig = plot_search({"category": "블라우스"}, hits, cols=3)
    assert "beulrauseu" in fig._suptitle.get_text() and len(fig.axes) == 3
    fig = plot_tags(Image.open(p), {"category": [("블라우스", .5), ("팬츠", .2)], "style": [("로맨틱", .4)]})
    assert len(fig.axes) == 3
    fig.savefig(tmp_path / "t.png", dpi=60); assert (tmp_path / "t.png").stat().st_size > 0
