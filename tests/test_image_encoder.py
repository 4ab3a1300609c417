"Tests of the frozen CLIP image tower (fashion_json_encoder.models.image_encoder, weights via models.tower_weights)."
import hashlib, os, time
import pytest
import torch
from torch import nn
from hypothesis import given, strategies as st
from safetensors.torch import save_file

from fashion_json_encoder.config import UserError
from fashion_json_encoder.models import image_encoder as ie, tower_weights as tw
from fashion_json_encoder.models.image_encoder import (CLIPImageEncoder, tiny_clip_config, check_bf16_agreement,
                                                       check_precision, weights_fingerprint, BF16_MIN_COSINE)

TINY = tiny_clip_config()


@pytest.fixture(scope="module")
def tower(): return CLIPImageEncoder(pretrained="none", model_cfg=TINY, seed=0)


def _full_clip_state(tower):  # a full CLIP state dict as open_clip saves it: visual.* next to text/logit keys
    sd = {f"visual.{k}": v.clone() for k, v in tower.visual.state_dict().items()}
    sd.update({"token_embedding.weight": torch.zeros(10, 8), "logit_scale": torch.tensor(4.6)})
    return sd


@given(b=st.integers(1, 6), scale=st.floats(0.01, 100.))
def test_outputs_512_unit_norm(tower, b, scale):
    out = tower(torch.randn(b, 3, 64, 64) * scale)
    assert out.shape == (b, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(b))


def test_frozen_for_real(tower):
    head = nn.Linear(512, 4)
    parent = nn.Sequential(tower, head)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    opt = torch.optim.AdamW(parent.parameters(), lr=1e-1, weight_decay=0.1)  # even if the tower's params were handed in
    for _ in range(3):
        parent.train()
        assert not tower.training and not any(m.training for m in tower.modules())
        loss = head(tower(torch.randn(4, 3, 64, 64))).pow(2).sum()
        opt.zero_grad(); loss.backward(); opt.step()
    assert not any(p.requires_grad for p in tower.parameters())
    assert all(p.grad is None for p in tower.parameters())
    for k, v in tower.state_dict().items(): assert torch.equal(v, before[k]), k
    assert head.weight.grad is not None
    assert not tower(torch.randn(1, 3, 64, 64)).requires_grad


def test_none_seeded_reproducible_and_rng_untouched(tower):
    torch.manual_seed(123); expected = torch.rand(3)
    torch.manual_seed(123)
    again = CLIPImageEncoder(pretrained="none", model_cfg=TINY, seed=0)
    assert torch.equal(torch.rand(3), expected)  # building the tower did not consume the caller's RNG
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(again(x), tower(x)) and again.fingerprint == tower.fingerprint
    other = CLIPImageEncoder(pretrained="none", model_cfg=TINY, seed=1)
    assert other.fingerprint != tower.fingerprint and not torch.allclose(other(x), tower(x))


def test_none_warns_loudly_once_per_process(caplog, monkeypatch):
    monkeypatch.setattr(ie, "_WARNED_RANDOM", set())
    with caplog.at_level("WARNING"):
        CLIPImageEncoder(pretrained="none", model_cfg=TINY)
        CLIPImageEncoder(pretrained="none", model_cfg=TINY, seed=1)  # a command rebuilds its tower: no second warning
    assert sum("RANDOM weights" in r.message for r in caplog.records) == 1


def test_fingerprint_follows_weights(tower, tmp_path):
    sd = _full_clip_state(tower)
    sd["visual.proj"][0, 0] += 1e-4
    torch.save(sd, tmp_path / "changed.pt")
    changed = CLIPImageEncoder(pretrained=str(tmp_path / "changed.pt"), model_cfg=TINY)
    assert changed.fingerprint != tower.fingerprint
    assert weights_fingerprint(tower.visual, tower.cfg) == tower.fingerprint
    assert weights_fingerprint(tower.visual, {**tower.cfg, "quick_gelu": False}) != tower.fingerprint  # arch counts too


@pytest.mark.parametrize("fmt", ["pt_state_dict", "pt_ddp", "bin", "safetensors", "visual_only"])
def test_local_checkpoint_loads_identically(tower, tmp_path, fmt):
    sd = _full_clip_state(tower)
    if fmt == "pt_state_dict": p = tmp_path / "c.pt"; torch.save({"epoch": 3, "state_dict": sd}, p)
    elif fmt == "pt_ddp": p = tmp_path / "c.pt"; torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, p)
    elif fmt == "bin": p = tmp_path / "open_clip_pytorch_model.bin"; torch.save(sd, p)
    elif fmt == "safetensors": p = tmp_path / "c.safetensors"; save_file({k: v.contiguous() for k, v in sd.items()}, p)
    else: p = tmp_path / "v.pt"; torch.save(tower.visual.state_dict(), p)
    loaded = CLIPImageEncoder(pretrained=str(p), model_cfg=TINY)
    x = torch.randn(3, 3, 64, 64)
    assert torch.equal(loaded(x), tower(x))
    assert loaded.fingerprint == tower.fingerprint


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_checkpoint(tower, tmp_path, monkeypatch):
    "OpenAI's original ViT-B-32.pt is a TorchScript archive: read through torch.jit.load when its SHA-256 is OpenAI's."
    class Holder(nn.Module):
        def __init__(self, visual):
            super().__init__(); self.visual = visual
            self.logit_scale = nn.Parameter(torch.tensor(4.6))
        def forward(self, x): return self.visual.conv1(x)
    p = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.trace(Holder(tower.visual), torch.randn(1, 3, 64, 64)), str(p))
    with pytest.raises(UserError, match="not one of OpenAI's published"): CLIPImageEncoder(pretrained=str(p), model_cfg=TINY)
    monkeypatch.setattr(tw, "OPENAI_SHA256", tw.OPENAI_SHA256 | {hashlib.sha256(p.read_bytes()).hexdigest()})
    loaded = CLIPImageEncoder(pretrained=str(p), model_cfg=TINY)  # a published hash needs no trust flag
    assert loaded.fingerprint == tower.fingerprint


def test_bad_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="/no/such/ViT-B-32.pt: CLIP checkpoint not found"):
        CLIPImageEncoder(pretrained="/no/such/ViT-B-32.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable CLIP checkpoint"): CLIPImageEncoder(pretrained=str(tmp_path / "junk.pt"), model_cfg=TINY)
    torch.save({"text.weight": torch.zeros(2)}, tmp_path / "text.pt")
    with pytest.raises(UserError, match="no CLIP visual-tower weights"): CLIPImageEncoder(pretrained=str(tmp_path / "text.pt"), model_cfg=TINY)
    small = CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(width=32))
    torch.save(_full_clip_state(small), tmp_path / "small.pt")
    with pytest.raises(UserError, match="do not fit"): CLIPImageEncoder(pretrained=str(tmp_path / "small.pt"), model_cfg=TINY)
    with pytest.raises(UserError, match="clip_precision"): CLIPImageEncoder(pretrained="none", model_cfg=TINY, precision="fp8")
    with pytest.raises(UserError, match="CUDA"): CLIPImageEncoder(pretrained="none", model_cfg=TINY, precision="fp16", device="cpu")


@pytest.mark.parametrize("offline", ["1", None])
def test_openai_unavailable_fails_fast_in_one_line(monkeypatch, tmp_path, offline):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds
    monkeypatch.setenv("HOME", str(tmp_path))  # and no ~/.cache/clip copy
    if offline: monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        if tw._hub_reachable(timeout=1.0): pytest.skip("huggingface.co is reachable: this would download")
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e: CLIPImageEncoder("ViT-B-32", pretrained="openai")
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg and "--clip_pretrained /path/to/ViT-B-32.pt" in msg
    assert ("HF_HUB_OFFLINE" in msg) == bool(offline)


def test_tag_chooses_quickgelu_as_open_clip_names_do(monkeypatch, tmp_path):
    "'openai' builds the QuickGELU variant its weights need even under a GELU config, as `ViT-B-32-quickgelu` does."
    gelu = {**TINY, "quick_gelu": False}
    src = CLIPImageEncoder(pretrained="none", model_cfg=gelu)
    torch.save(_full_clip_state(src), tmp_path / "w.pt")
    asked = []
    monkeypatch.setattr(tw, "pretrained_weights", lambda name, tag: asked.append((name, tag)) or str(tmp_path / "w.pt"))
    t = CLIPImageEncoder("ViT-B-32", pretrained="openai", model_cfg=gelu)
    assert t.cfg["quick_gelu"] is True and asked == [("ViT-B-32", "openai")]
    assert CLIPImageEncoder("ViT-B-32", pretrained="laion2b_s34b_b79k", model_cfg=gelu).cfg["quick_gelu"] is False
    assert CLIPImageEncoder("ViT-B-32", pretrained="openai", model_cfg=gelu, quick_gelu=False).cfg["quick_gelu"] is False


def test_bf16_agrees_with_fp32(tower):
    lp = CLIPImageEncoder(pretrained="none", model_cfg=TINY, precision="bf16")
    assert lp.fingerprint == tower.fingerprint and lp.dtype == torch.bfloat16
    x = torch.randn(8, 3, 64, 64)
    out = lp(x)
    assert out.dtype == torch.float32 and out.shape == (8, 512)
    assert check_bf16_agreement(tower, lp, x) >= BF16_MIN_COSINE
    assert check_precision(lp, x) >= BF16_MIN_COSINE
    assert check_precision(tower, x) == 1.0
    with pytest.raises(UserError, match="disagree with fp32"): check_precision(lp, x, min_cosine=1.5)


def test_preprocess_is_open_clip_eval_transform(tower):
    from PIL import Image
    import open_clip
    ref = open_clip.image_transform(64, is_train=False)
    im = Image.new("RGB", (50, 90), (10, 200, 30))
    assert torch.equal(tower.preprocess(im), ref(im))


def test_real_vit_b32_random_init():
    "The real ViT-B/32 architecture (random init): 88 M frozen parameters, 224 px in, 512-d unit vectors out."
    vit = CLIPImageEncoder("ViT-B-32", pretrained="none", seed=0)
    assert sum(p.numel() for p in vit.parameters()) == 87_849_216
    assert vit.image_size == 224 and vit.output_dim == 512 and len(vit.fingerprint) == 16
    out = vit(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 512)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    assert not any(p.requires_grad for p in vit.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tower(tower):
    gpu = CLIPImageEncoder(pretrained="none", model_cfg=TINY, device="cuda")
    x = torch.randn(2, 3, 64, 64)
    assert gpu.device.type == "cuda" and gpu(x).device.type == "cuda"
    torch.testing.assert_close(gpu(x).cpu(), tower(x), atol=1e-4, rtol=1e-4)
    lp = CLIPImageEncoder(pretrained="none", model_cfg=TINY, device="cuda", precision="fp16")
    assert check_precision(lp, x.cuda()) >= BF16_MIN_COSINE


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_gpu_is_a_user_error():
    from fashion_json_encoder.config import resolve_device
    from fashion_json_encoder.config import UserError
    with pytest.raises(UserError, match="no CUDA GPU is available"): resolve_device("cuda:0")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_building_a_random_tower_leaves_the_cuda_rng_alone():
    "The seeded init forks the CPU's RNG only; torch.manual_seed inside it reseeded every GPU's generator too."
    torch.cuda.manual_seed(123); torch.rand(1, device="cuda")
    before = torch.cuda.get_rng_state()
    CLIPImageEncoder(pretrained="none", model_cfg=tiny_clip_config(), seed=0, device="cuda")
    assert torch.equal(torch.cuda.get_rng_state(), before)
