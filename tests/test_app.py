"The web app on a tiny trained model: its handlers, its safety rules, and the real thing driven in headless Chromium."
import logging, os, shutil, socket, urllib.error, urllib.request, uuid, zipfile
from pathlib import Path
from urllib.parse import quote
import pytest
from fashion_json_encoder.config import UserError
from fashion_json_encoder.search import Searcher
from fashion_json_encoder import app as app_mod
from fashion_json_encoder.app import Explorer, parse_box, read_upload, serve
from fashion_json_encoder.data import item_thumbnail
from conftest import train_tiny_run

DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    _, ckpt, _, tower = train_tiny_run(tmp_path_factory.mktemp("app"))
    return Explorer(Searcher(ckpt, tower=tower)), ckpt, tower

def _found_category(ex) -> str:
    "A category whose top hit carries it (a tiny model finds some, not all)."
    cats = [c for c in ex.searcher.vocab.fields["category"] if ex.searcher.search({"category": [c]}, 1)[0]["json"].get("category") == c]
    assert cats, "the tiny model's top hit matches no category query"
    return cats[0]

def test_search_handler_returns_k_crops_and_the_hit_json(run):
    ex = run[0]
    cat = _found_category(ex)
    gallery, hits, msg = ex.search({"category": [cat]}, k=5)
    assert len(gallery) == len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0]["json"]["category"] == cat and "5 of" in msg
    for (im, cap), h in zip(gallery, hits):
        assert im.mode == "RGB" and 0 < max(im.size) <= 256 and cap.startswith(f"#{h['rank']} ")
    # the crop is the item's box grown by the training padding, not the whole photo
    from PIL import Image
    from fashion_json_encoder.data import crop_box
    with Image.open(hits[0]["image_path"]) as photo: x0, y0, x1, y1 = crop_box(hits[0]["box"], photo.size, 0.1)
    assert item_thumbnail(hits[0]["image_path"], hits[0]["box"], 0.1, size=10_000).size == (x1 - x0, y1 - y0)

def test_more_like_this_uses_the_hit_json_and_drops_unknown_values(run):
    ex = run[0]
    _, hits, _ = ex.search({"category": [ex.searcher.vocab.fields["category"][0]]}, k=2)
    q = ex.like(hits, 1)
    assert q and all(v in ex.searcher.vocab.fields[f] for f, vs in q.items() for v in vs)
    assert ex.search(q, 3)[1][0]["score"] >= ex.search(q, 3)[1][-1]["score"]
    hits = [{**hits[0], "json": {"category": "없는값", "colour": "red", **{k: v for k, v in hits[0]["json"].items() if k != "category"}}}]
    assert "category" not in ex.like(hits, 0) and "colour" not in ex.like(hits, 0)

def test_tag_handler_lists_every_field_and_reports_a_bad_box(run):
    ex = run[0]
    key = ex.index.keys[0]
    im, box = ex.photo(key)
    rows, msg = ex.tag(("item", key), box, top=3)
    assert {r[0] for r in rows} == set(ex.searcher.vocab.fields) and len(rows) == 3 * len(ex.searcher.vocab.fields)
    assert all(isinstance(r[2], float) for r in rows) and "box" in msg
    assert ex.tag(("item", key), "1, 2, 3", 3) == ([], "**error:** box '1, 2, 3' must be four numbers x, y, w, h (pixels), e.g. 10, 20, 200, 300")
    rows, msg = ex.tag(("item", key), f"{im.width + 10}, 0, 5, 5", 3)
    assert rows == [] and "outside" in msg and str(ex.index.image_paths[0]) not in msg
    assert ex.tag(None, "", 3)[0] == []

def test_tag_reads_a_gallery_photo_inside_a_zip(run, tmp_path):
    ex = run[0]
    p = Path(ex.index.image_paths[0]); z = tmp_path / "photos.zip"
    with zipfile.ZipFile(z, "w") as zf: zf.write(p, "a/" + p.name)
    member = f"{z}::a/{p.name}"
    assert item_thumbnail(member, ex.index.boxes[0], 0.1).size == item_thumbnail(p, ex.index.boxes[0], 0.1).size
    ix = ex.index; old = ix.image_paths[0]; ix.image_paths[0] = member
    try: rows, _ = ex.tag(("item", ix.keys[0]), None, 2)
    finally: ix.image_paths[0] = old
    assert len(rows) == 2 * len(ex.searcher.vocab.fields)

def test_tagging_an_items_own_box_reads_its_indexed_feature(run, monkeypatch):
    "Picking a gallery photo fills in its box: tagging it reran the tower on a crop the index holds; now the index's feature."
    ex = run[0]
    every = max(map(len, ex.searcher.vocab.fields.values()))   # every value of every field: both rankings hold the same values
    for row in range(3):
        key = ex.index.keys[row]; _, box = ex.photo(key)
        want = ex.searcher.tag(ex.index.image_paths[row], parse_box(box), top=every)                # the tower path
        def no_tower(self): raise AssertionError("the tower ran")
        with monkeypatch.context() as m:
            m.setattr(Searcher, "tower", property(no_tower))
            rows, msg = ex.tag(("item", key), box, every)
            assert "the box" in msg and len(rows) == sum(map(len, ex.searcher.vocab.fields.values()))
            with pytest.raises(AssertionError, match="the tower ran"): ex.tag(("item", key), "1, 1, 20, 20", 4)   # another box: the tower
        for f, vs in want.items():
            got = [(label, c) for g, label, c in rows if g == f]
            assert [l for l, _ in got] == [app_mod.value_label(v, f) for v, _ in vs] or all(   # the same order, or swaps only
                (a[1] - b[1]) * (pos[a[0]] - pos[b[0]]) <= 0 or abs(a[1] - b[1]) < 5e-3      # between cosines within fp16 rounding
                for pos in [{app_mod.value_label(v, f): i for i, (v, _) in enumerate(vs)}] for a in got for b in got), f
            cos = dict(got)
            assert [cos[app_mod.value_label(v, f)] for v, _ in vs] == pytest.approx([c for _, c in vs], abs=5e-3), f
    assert ex.tag(("item", "no/such/key"), None, 3) == ([], "**error:** 'no/such/key' is not an item of the index")

@pytest.mark.parametrize("content", [b"not an image at all", b"\xff\xd8\xff\xe0 truncated jpeg", b""])
def test_bad_upload_gets_a_message_not_a_traceback(tmp_path, content):
    f = tmp_path / "holiday.jpg"; f.write_bytes(content)
    im, msg = read_upload(f)
    assert im is None and msg.startswith("**error:** holiday.jpg: ") and str(tmp_path) not in msg and "\n" not in msg

@pytest.mark.parametrize("key", ["/etc/passwd", "../../etc/passwd", "", "로맨틱/100002/../../x"])
def test_only_indexed_photos_are_read(run, key):
    with pytest.raises(UserError, match="not an item of the index"): run[0].photo(key)

class _FakeBlocks:
    def __init__(self): self.kw, self.fje_css = None, ""
    def launch(self, **kw): self.kw = kw

@pytest.mark.parametrize("host,warned", [("127.0.0.1", False), ("localhost", False), ("0.0.0.0", True), ("192.168.1.5", True)])
def test_serve_is_local_and_limited_by_default(monkeypatch, caplog, host, warned):
    fake = _FakeBlocks()
    monkeypatch.setattr(app_mod, "make_app", lambda *a, **k: fake)
    with caplog.at_level(logging.WARNING, logger="fashion_json_encoder.app"): serve("ckpt.pt", host=host, port=1234)
    assert any("anyone who can reach" in r.getMessage() for r in caplog.records) == warned
    assert fake.kw["server_name"] == host and fake.kw["allowed_paths"] == [] and fake.kw["share"] is False
    assert fake.kw["max_file_size"] == "20mb" and fake.kw["prevent_thread_lock"] is False

def _free_port() -> int:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

@pytest.fixture(scope="module")
def server(run):
    ex, ckpt, tower = run
    port = _free_port()
    demo = serve(searcher=ex.searcher, port=port, progress=False, block=False, max_upload_mb=1)
    yield f"http://127.0.0.1:{port}"
    demo.close()

def _status(url, data=None, headers=None) -> int:
    try: return urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {}), timeout=10).status
    except urllib.error.HTTPError as e: return e.code

def test_server_refuses_crafted_paths_and_big_uploads(server, run):
    for path in ("/etc/passwd", str(run[1]), run[0].index.image_paths[0], "../../../../etc/passwd"):
        assert _status(f"{server}/gradio_api/file={quote(path)}") in (403, 404), path
    assert _status(f"{server}/file=/etc/passwd") in (403, 404)
    b = uuid.uuid4().hex   # 1.5 MB against a 1 MB limit
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n".encode()
            + b"\0" * 1_500_000 + f"\r\n--{b}--\r\n".encode())
    assert _status(f"{server}/gradio_api/upload", body, {"Content-Type": f"multipart/form-data; boundary={b}"}) == 413

def test_browser_search_tag_and_model_tabs(server, run, tmp_path_factory):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium: pytest.skip("no chromium on PATH (apt-get install -y chromium): browser test skipped")
    from playwright.sync_api import sync_playwright
    ex = run[0]
    cat, k = _found_category(ex), 6
    shots = Path(os.environ.get("FJE_TEST_ARTIFACTS") or tmp_path_factory.mktemp("screens"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 860})
        page.goto(server); page.wait_for_selector("#search-btn", timeout=30_000)
        page.locator("#q-category input").click()
        page.get_by_role("option", name=app_mod.value_label(cat, "category"), exact=True).click()
        page.keyboard.press("Escape")
        page.locator("#k input[type=number]").fill(str(k)); page.locator("#k input[type=number]").press("Enter")
        page.locator("#search-btn").click()
        page.wait_for_function(f"[...document.querySelectorAll('#hits img')].filter(i => i.complete && i.naturalWidth > 0).length == {k}",
                               timeout=30_000)
        assert page.locator("#hits img").count() == k
        assert f'"category":"{cat}"' in "".join(page.locator("#hit-json").inner_text().split())   # the first hit's JSON
        page.screenshot(path=shots / "app-search.png")
        page.get_by_role("tab", name="Tag").click()
        page.locator("#pick input").click(); page.get_by_role("option").first.click()
        page.wait_for_function("document.querySelector('#photo img') !== null", timeout=30_000)
        page.locator("#tag-btn").click()
        page.wait_for_function("document.querySelector('#tag-msg').innerText.startsWith('top ')", timeout=30_000)
        table = page.locator("#tags").inner_text()
        for f in ex.searcher.vocab.fields: assert f in table, f
        page.screenshot(path=shots / "app-tag.png")
        page.get_by_role("tab", name="Model").click(); page.wait_for_selector("#model-summary")
        assert "RANDOMLY INITIALISED" in page.locator("#model-summary").inner_text()
        page.screenshot(path=shots / "app-model.png")
        browser.close()
    for name in ("app-search.png", "app-tag.png", "app-model.png"):
        assert (shots / name).read_bytes()[:4] == b"\x89PNG" and (shots / name).stat().st_size < 300_000, name
    if os.environ.get("FJE_UPDATE_SCREENSHOTS"):   # refresh the README's pictures
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        for name in ("app-search.png", "app-tag.png"): shutil.copy(shots / name, DOCS_IMG / name)

def test_a_busy_port_is_one_user_error(server, run):
    port = int(server.rsplit(":", 1)[1])
    with pytest.raises(UserError, match=f"cannot serve on 127.0.0.1:{port}.*another --port"):
        serve(searcher=run[0].searcher, port=port, progress=False, block=False)
