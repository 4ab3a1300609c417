"Any open_clip tower: tags, hf-hub ids and local files, loaded from an offline HF cache; the TorchScript gate."
import hashlib, importlib.util, io, json, logging, time
import pytest
import torch
from torch import nn
from safetensors.torch import save_file
import open_clip

from fashion_json_encoder.config import UserError
from fashion_json_encoder.models import tower_weights as tw
from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, tiny_clip_config, weights_fingerprint
from fashion_json_encoder.models.tower_weights import tower_spec, resolve_tower, read_clip_checkpoint, quiet_open_clip

REV = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as refs/main holds one


@pytest.fixture
def hub(tmp_path, monkeypatch):
    "An empty Hugging Face cache under tmp_path, offline; `hub(repo, name, data)` files a blob the way huggingface_hub does."
    import huggingface_hub.constants
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # read when the lookup runs, not at import
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # open_clip's own lookup, used as reference
    def put(repo: str, name: str, data: bytes, refs: bool = True):
        root = cache / f"models--{repo.replace('/', '--')}"
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True); blob.write_bytes(data)
        snap = root / "snapshots" / REV / name
        snap.parent.mkdir(parents=True, exist_ok=True); snap.symlink_to(blob)
        if refs: (root / "refs").mkdir(exist_ok=True); (root / "refs" / "main").write_text(REV)
        return snap
    put.cache = cache
    return put


def _safetensors(visual: nn.Module) -> bytes:  # a CLIP state dict as open_clip's hub repos hold it (visual.* keys)
    import safetensors.torch
    return safetensors.torch.save({f"visual.{k}": v.contiguous() for k, v in visual.state_dict().items()})


def test_openai_vit_b32_loads_from_offline_cache(hub):
    "The real ViT-B-32 'openai' weights file, in the repo and under the name open_clip asks for, loads offline."
    t0 = time.perf_counter()
    src = CLIPImageEncoder("ViT-B-32", pretrained="none", seed=3)
    path = hub("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors", _safetensors(src.visual))
    assert open_clip.pretrained.download_pretrained(open_clip.get_pretrained_cfg("ViT-B-32", "openai"),
                                                    cache_dir=str(hub.cache)) == str(path)  # open_clip's own pick
    tower = CLIPImageEncoder("ViT-B-32", pretrained="openai")
    assert tower.cfg["quick_gelu"] is True and tower.pretrained == "openai"
    assert tower.fingerprint == weights_fingerprint(src.visual, tower.cfg)
    assert (tower.output_dim, tower.image_size) == (512, 224)
    assert time.perf_counter() - t0 < 60


def _tiny_hub_config(timm: bool = False) -> dict:  # open_clip_config.json as Marqo's repos lay it out
    vision = ({"image_size": 224, "timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": True,
               "timm_pool": "map", "timm_proj": "none"} if timm else
              {"image_size": 96, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32})
    return {"model_cfg": {"embed_dim": 192 if timm else 256, "quick_gelu": False, "vision_cfg": vision,
                          "text_cfg": {"context_length": 64, "vocab_size": 32000, "width": 64, "heads": 2, "layers": 1}},
            "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "squash"}}


@pytest.mark.parametrize("timm", [False, True], ids=["vit", "timm-siglip-like"])
def test_hf_hub_id_loads_from_offline_cache(hub, timm):
    "An hf-hub id: architecture, output_dim, image_size and transform from its open_clip_config.json, weights from the repo."
    repo, j = "TestOrg/tiny-fashion-clip", _tiny_hub_config(timm)
    hub(repo, "open_clip_config.json", json.dumps(j).encode())
    src = CLIPImageEncoder("src", pretrained="none", model_cfg=j["model_cfg"], seed=5)
    path = hub(repo, "open_clip_model.safetensors", _safetensors(src.visual))
    assert open_clip.pretrained.download_pretrained_from_hf(repo, cache_dir=str(hub.cache)) == str(path)  # open_clip's pick
    tower = CLIPImageEncoder(f"hf-hub:{repo}")  # clip_pretrained left at its default: the repo's own weights
    assert tower.pretrained == "hf-hub" and tower.fingerprint == src.fingerprint
    dim, size = (192, 224) if timm else (256, 96)
    assert (tower.output_dim, tower.image_size) == (dim, size)
    assert tower.preprocess_cfg == {"size": size, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"}
    spec = tower_spec(f"hf-hub:{repo}", "openai")
    assert {k: spec[k] for k in ("output_dim", "image_size", "mean", "resize_mode", "quick_gelu")} == \
           {"output_dim": dim, "image_size": size, "mean": [0.5] * 3, "resize_mode": "squash", "quick_gelu": False}
    x = torch.randn(2, 3, size, size)
    out = tower(x)
    assert out.shape == (2, dim) and torch.equal(out, src(x))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    from PIL import Image
    assert tower.preprocess(Image.new("RGB", (50, 90))).shape == (3, size, size)  # squash: no crop needed


def test_hf_hub_none_and_file(hub, tmp_path):
    "With an hf-hub id, 'none' is its architecture at random and a local file replaces the repo's weights."
    repo, j = "TestOrg/tiny-fashion-clip", _tiny_hub_config()
    hub(repo, "open_clip_config.json", json.dumps(j).encode())
    rnd = CLIPImageEncoder(f"hf-hub:{repo}", pretrained="none", seed=7)
    assert rnd.output_dim == 256 and rnd.pretrained == "none"
    save_file({f"visual.{k}": v.contiguous() for k, v in rnd.visual.state_dict().items()}, tmp_path / "w.safetensors")
    assert CLIPImageEncoder(f"hf-hub:{repo}", pretrained=str(tmp_path / "w.safetensors")).fingerprint == rnd.fingerprint
    with pytest.raises(UserError, match="use 'none', a local file"): CLIPImageEncoder(f"hf-hub:{repo}", pretrained="laion2b_s34b_b79k")


def test_cache_copied_without_refs_still_loads(hub):
    "A snapshot folder copied without refs/main (rsync of one snapshot) is still found."
    repo, j = "TestOrg/tiny-fashion-clip", _tiny_hub_config()
    hub(repo, "open_clip_config.json", json.dumps(j).encode(), refs=False)
    src = CLIPImageEncoder("src", pretrained="none", model_cfg=j["model_cfg"])
    buf = io.BytesIO(); torch.save({f"visual.{k}": v for k, v in src.visual.state_dict().items()}, buf)
    hub(repo, "open_clip_pytorch_model.bin", buf.getvalue(), refs=False)  # the .bin name only
    assert CLIPImageEncoder(f"hf-hub:{repo}").fingerprint == src.fingerprint


def test_tag_weights_come_from_the_tags_repo(hub):
    "A non-OpenAI tag (laion2b_s34b_b79k) reads its own hub repo; GELU, as it was trained."
    src = CLIPImageEncoder("src", pretrained="none", model_cfg={**tiny_clip_config(), "quick_gelu": False})
    hub("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_model.safetensors", _safetensors(src.visual))
    t = CLIPImageEncoder("ViT-B-32", pretrained="laion2b_s34b_b79k", model_cfg={**tiny_clip_config(), "quick_gelu": False})
    assert t.cfg["quick_gelu"] is False and t.fingerprint == src.fingerprint


@pytest.mark.parametrize("model,pretrained,what", [
    ("ViT-B-32", "openai", "timm/vit_base_patch32_clip_224.openai"),
    ("hf-hub:Marqo/marqo-fashionSigLIP", "openai", "open_clip_config.json"),
])
def test_absent_offline_fails_fast_in_one_line(hub, model, pretrained, what):
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e: CLIPImageEncoder(model, pretrained=pretrained)
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg and what in msg and "HF_HUB_OFFLINE" in msg and str(hub.cache) in msg


def test_hf_hub_weights_absent_offline(hub):
    "The config is cached but the weights are not: one line naming the repo and the cache."
    hub("TestOrg/tiny-fashion-clip", "open_clip_config.json", json.dumps(_tiny_hub_config()).encode())
    with pytest.raises(UserError, match=r"hf-hub:TestOrg/tiny-fashion-clip: its weights .* are not in the Hugging Face cache"):
        CLIPImageEncoder("hf-hub:TestOrg/tiny-fashion-clip")


def test_tower_spec_follows_open_clip_pretrained_cfgs():
    "For every (model, tag) open_clip lists: output_dim from its config, transform from the tag, QuickGELU if either says so."
    checked = 0
    for name, tag in open_clip.list_pretrained():
        mcfg = open_clip.get_model_config(name)
        if mcfg is None: continue
        pcfg = open_clip.get_pretrained_cfg(name, tag)
        spec = tower_spec(name, tag)
        assert spec["output_dim"] == mcfg["embed_dim"], (name, tag)
        assert spec["mean"] == list(pcfg["mean"]) and spec["std"] == list(pcfg["std"]), (name, tag)
        assert spec["resize_mode"] == pcfg.get("resize_mode", "shortest"), (name, tag)
        assert spec["quick_gelu"] == bool(mcfg.get("quick_gelu") or pcfg.get("quick_gelu")), (name, tag)
        checked += 1
    assert checked > 100
    assert tower_spec("ViT-B-32", "openai")["quick_gelu"] and not tower_spec("ViT-B-32", "laion2b_s34b_b79k")["quick_gelu"]
    assert tower_spec("ViT-B-32", "/some/ViT-B-32.pt")["quick_gelu"]  # a local file is taken as OpenAI's, as before


def test_bad_tower_names_are_one_line_user_errors():
    with pytest.raises(UserError, match="unknown CLIP model 'ViT-Q-9'"): tower_spec("ViT-Q-9", "openai")
    with pytest.raises(UserError, match="not a file and not an open_clip tag of ViT-B-32"): tower_spec("ViT-B-32", "laion9b")
    with pytest.raises(UserError, match="pass it as --clip_model hf-hub:Marqo/x"): tower_spec("ViT-B-32", "hf-hub:Marqo/x")


# --- The TorchScript gate: an archive runs code when loaded -------------------------------------------------------

EVIL = '''
import torch
from torch import nn
from typing import Tuple
class Evil(nn.Module):
    def __init__(self):
        super().__init__()
    def forward(self, x): return x
    @torch.jit.export
    def __getstate__(self) -> Tuple[int, bool]: return (1, self.training)
    @torch.jit.export
    def __setstate__(self, state: Tuple[int, bool]) -> None:
        self.training = state[1]
        print("EVIL-SETSTATE-RAN")
'''


@pytest.fixture
def evil_archive(tmp_path):
    "A TorchScript archive whose loading runs its own `__setstate__` (a print here; a file write in the wild)."
    (tmp_path / "evil_mod.py").write_text(EVIL)
    spec = importlib.util.spec_from_file_location("evil_mod", tmp_path / "evil_mod.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    p = tmp_path / "ViT-B-32.pt"
    with pytest.warns(FutureWarning): torch.jit.save(torch.jit.script(mod.Evil()), str(p))
    return p


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_torchscript_refused_before_jit_load(evil_archive, monkeypatch, capfd, suffix):
    p = evil_archive.rename(evil_archive.with_suffix(suffix))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load ran on an untrusted archive"))
    with pytest.raises(UserError) as e: CLIPImageEncoder(pretrained=str(p), model_cfg=tiny_clip_config())
    msg = str(e.value)
    assert "\n" not in msg and "not one of OpenAI's published CLIP files" in msg
    assert "torch.jit.load(" in msg and "--trust_torchscript" in msg  # says how to convert it once
    assert "EVIL-SETSTATE-RAN" not in capfd.readouterr().out


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_trust_torchscript_lets_it_through(evil_archive, capfd, tmp_path):
    "trust_torchscript=True is what stands between the archive and its code: with it, the code runs."
    assert read_clip_checkpoint(evil_archive, trust_torchscript=True)[1] == {}  # loaded (it holds no tensors)
    assert "EVIL-SETSTATE-RAN" in capfd.readouterr().out
    tower = CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config())
    class Holder(nn.Module):
        def __init__(self, visual): super().__init__(); self.visual = visual
        def forward(self, x): return self.visual.conv1(x)
    p = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(Holder(tower.visual), torch.randn(1, 3, 64, 64)), str(p))
    with pytest.raises(UserError, match="not one of OpenAI's"): CLIPImageEncoder(pretrained=str(p), model_cfg=tiny_clip_config())
    trusted = CLIPImageEncoder(pretrained=str(p), model_cfg=tiny_clip_config(), trust_torchscript=True)
    assert trusted.fingerprint == tower.fingerprint


def test_openai_hashes_are_open_clips():
    urls = {open_clip.get_pretrained_cfg(m, t)["url"] for m, t in open_clip.list_pretrained()
            if "openaipublic" in open_clip.get_pretrained_cfg(m, t).get("url", "")}
    assert {u.split("/")[-2] for u in urls} == tw.OPENAI_SHA256 and len(tw.OPENAI_SHA256) == 9


class _Payload:  # unpickling it would create a file
    def __init__(self, target): self.target = target
    def __reduce__(self): return (open, (self.target, "w"))


@pytest.mark.parametrize("name", ["open_clip_pytorch_model.bin", "ViT-B-32.pt"])
def test_pickle_payload_in_weights_is_refused(tmp_path, name):
    marker = tmp_path / "pwned"
    p = tmp_path / name
    torch.save({"visual.conv1.weight": torch.zeros(1), "x": _Payload(str(marker))}, p)
    with pytest.raises(UserError, match="not a readable CLIP checkpoint"): CLIPImageEncoder(pretrained=str(p), model_cfg=tiny_clip_config())
    assert not marker.exists()


# --- Logs -----------------------------------------------------------------------------------------------------------

def test_open_clip_root_chatter_is_silenced(tmp_path, caplog):
    "open_clip logs INFO on the root logger; inside quiet_open_clip those records are dropped, its warnings are not."
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    with caplog.at_level(logging.INFO):
        open_clip.factory._find_checkpoint_in_dir(tmp_path)
        assert any("Found preferred checkpoint" in r.getMessage() for r in caplog.records)  # the chatter exists
        caplog.clear()
        with quiet_open_clip():
            open_clip.factory._find_checkpoint_in_dir(tmp_path)
            logging.getLogger("fashion_json_encoder.x").info("ours")
            (tmp_path / "b.bin").write_bytes(b""); (tmp_path / "open_clip_model.safetensors").unlink()
            open_clip.factory._find_checkpoint_in_dir(tmp_path)  # no preferred name: open_clip warns
    msgs = [r.getMessage() for r in caplog.records]
    assert "ours" in msgs and not any("Found preferred checkpoint" in m for m in msgs)
    assert any("Multiple checkpoints found" in m for m in msgs)
