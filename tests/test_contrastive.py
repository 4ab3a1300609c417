"""Properties of InfoNCE and the contrastive learner: open_clip agreement, symmetry, a frozen CLIP tower."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fashion_json_encoder.models.contrastive_learner import ContrastiveLearner, InfoNCELoss, LOGIT_SCALE_MAX
from fashion_json_encoder.models.image_encoder import CLIPImageEncoder, tiny_clip_config
from fashion_json_encoder.models.json_encoder import JSONEncoder
from fashion_json_encoder.vocab import PAD, UNK

SIZES = {"category": 10, "style": 20, "silhouette": 8, "material": 30, "detail": 40}
TINY = tiny_clip_config()  # a real open_clip ViT config, tiny
S = TINY["vision_cfg"]["image_size"]


def tiny_tower(seed=0, kind="plain"):
    "A tiny open_clip tower: the package's `CLIPImageEncoder`, or a bare `.visual` the learner must freeze itself."
    if kind == "CLIPImageEncoder": return CLIPImageEncoder(pretrained="none", model_cfg=TINY, seed=seed)
    torch.manual_seed(seed)
    return open_clip.model._build_vision_tower(TINY["embed_dim"], TINY["vision_cfg"], TINY["quick_gelu"])


def json_batch(B, seed=0):
    "{field: (B, 3) ids} with every id kind, and one empty row per field so `missing` gets a gradient."
    g = torch.Generator().manual_seed(seed)
    out = {f: torch.randint(0, n, (B, 3), generator=g) for f, n in SIZES.items()}
    for f in out: out[f][0] = PAD
    return out


def features(B, D, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, D, generator=g), dim=-1), F.normalize(torch.randn(B, D, generator=g), dim=-1)


# --- InfoNCE ---------------------------------------------------------------------------------------------------------
loss_args = dict(B=st.integers(1, 16), D=st.sampled_from([4, 512]), seed=st.integers(0, 2**16),
                 scale=st.floats(0.5, 100.))


@given(**loss_args)
def test_infonce_equals_open_clip(B, D, seed, scale):
    img, js = features(B, D, seed)
    ours = InfoNCELoss()(img, js, scale)["contrastive_loss"]
    ref = open_clip.loss.ClipLoss()(img, js, scale)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


@given(**loss_args)
def test_infonce_symmetric_finite_nonnegative(B, D, seed, scale):
    img, js = features(B, D, seed)
    loss = InfoNCELoss()(img, js, scale)["contrastive_loss"]
    assert torch.isfinite(loss) and loss >= 0
    assert torch.allclose(loss, InfoNCELoss()(js, img, scale)["contrastive_loss"], atol=1e-5, rtol=1e-5)


@given(**loss_args, perm_seed=st.integers(0, 2**16))
def test_infonce_invariant_to_pair_permutation(B, D, seed, scale, perm_seed):
    img, js = features(B, D, seed)
    p = torch.randperm(B, generator=torch.Generator().manual_seed(perm_seed))
    a = InfoNCELoss()(img, js, scale)["contrastive_loss"]
    assert torch.allclose(a, InfoNCELoss()(img[p], js[p], scale)["contrastive_loss"], atol=1e-5, rtol=1e-5)


def test_infonce_sees_mismatched_pairs():  # permuting one side only must change (raise) the loss
    img = torch.eye(6, 512)
    good = InfoNCELoss()(img, img, 1 / 0.07)["contrastive_loss"]
    bad = InfoNCELoss()(img, img.roll(1, 0), 1 / 0.07)["contrastive_loss"]
    assert good < 1e-3 < 10 < bad


# --- the learner -----------------------------------------------------------------------------------------------------
def test_gradients_reach_every_json_encoder_parameter():
    torch.manual_seed(0)
    learner = ContrastiveLearner(JSONEncoder(SIZES), temperature=0.07, learn_temperature=True)
    learner(torch.randn(8, 512), json_batch(8)).backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@settings(max_examples=5)
@given(B=st.integers(2, 6), steps=st.integers(2, 4), learn_temperature=st.booleans(), seed=st.integers(0, 100),
       kind=st.sampled_from(["plain", "CLIPImageEncoder"]))
def test_clip_parameters_frozen_after_optimizer_steps(B, steps, learn_temperature, seed, kind):
    tower = tiny_tower(seed, kind)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    torch.manual_seed(seed)
    learner = ContrastiveLearner(JSONEncoder(SIZES), tower, learn_temperature=learn_temperature).train()
    enc_before = [p.detach().clone() for p in learner.json_encoder.parameters()]
    # hand the optimizer ALL parameters, frozen ones included, with weight decay: still nothing may move
    opt = torch.optim.AdamW(learner.parameters(), lr=1e-2, weight_decay=0.1)
    images = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        opt.zero_grad()
        learner(images, json_batch(B, seed)).backward()
        assert all(p.grad is None for p in tower.parameters())
        opt.step()
    assert not tower.training and all(not p.requires_grad for p in tower.parameters())
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(enc_before, learner.json_encoder.parameters()))  # it did train


def test_real_vit_b32_frozen():
    "The real ViT-B/32 architecture (random init): bit-identical after optimizer steps, no gradient."
    tower = CLIPImageEncoder("ViT-B-32", pretrained="none", seed=0)
    assert tower.image_size == 224 and sum(p.numel() for p in tower.parameters()) > 80_000_000
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    learner = ContrastiveLearner(JSONEncoder(SIZES), tower).train()
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    images = torch.randn(2, 3, 224, 224)
    for _ in range(2):
        opt.zero_grad()
        loss = learner(images, json_batch(2))
        loss.backward()
        opt.step()
    img, js = learner.get_embeddings(images, json_batch(2))
    assert img.shape == js.shape == (2, 512)
    assert all(p.grad is None for p in tower.parameters()) and not tower.training
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())


def test_cached_features_match_pixels():
    tower = tiny_tower()
    learner = ContrastiveLearner(JSONEncoder(SIZES), tower).eval()
    images, batch = torch.randn(4, 3, S, S), json_batch(4)
    cached = tower(images).half()  # (4, 512) as the feature cache stores them
    assert torch.allclose(learner(images, batch), learner(cached, batch), atol=1e-3)
    img, js = learner.get_embeddings(cached, batch)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5) and img.dtype == torch.float32


def test_learner_loss_equals_open_clip_on_its_embeddings():
    learner = ContrastiveLearner(JSONEncoder(SIZES), temperature=0.05).eval()
    feats, batch = torch.randn(5, 512), json_batch(5)
    img, js = learner.get_embeddings(feats, batch)
    assert torch.allclose(learner(feats, batch), open_clip.loss.ClipLoss()(img, js, 1 / 0.05), atol=1e-5)


def test_temperature_buffer_or_clamped_parameter():
    fixed = ContrastiveLearner(JSONEncoder(SIZES), temperature=0.07)
    assert "logit_scale" not in dict(fixed.named_parameters()) and "logit_scale" in fixed.state_dict()
    assert math.isclose(fixed.temperature, 0.07, rel_tol=1e-6)
    learned = ContrastiveLearner(JSONEncoder(SIZES), temperature=0.07, learn_temperature=True)
    assert math.isclose(learned.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    for value, expected in [(9., LOGIT_SCALE_MAX), (-3., 0.)]:
        with torch.no_grad(): learned.logit_scale.fill_(value)
        learned(torch.randn(3, 512), json_batch(3))
        assert math.isclose(learned.logit_scale.item(), expected, abs_tol=1e-6)


def test_pixels_without_tower_rejected():
    with pytest.raises(AssertionError, match="clip_encoder"):
        ContrastiveLearner(JSONEncoder(SIZES))(torch.randn(2, 3, S, S), json_batch(2))


def test_the_frozen_tower_keeps_its_precision_under_the_training_steps_autocast():
    "The pixel path on CUDA trains under bf16 autocast: an fp32 tower gave bf16-rounded features there, unlike validation and search."
    tower = CLIPImageEncoder(pretrained="none", model_cfg=TINY, seed=0)
    learner = ContrastiveLearner(JSONEncoder(SIZES), tower).train()
    x = torch.randn(4, 3, tower.image_size, tower.image_size, generator=torch.Generator().manual_seed(0))
    want = learner.encode_image(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # the CPU's autocast stands in for the step's CUDA one
        got = learner.encode_image(x)
    assert got.dtype == torch.float32 and torch.equal(got, want)
