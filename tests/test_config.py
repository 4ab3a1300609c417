"Config: JSON round-trip for any valid config, and one clear message naming the key for each invalid one."
import json
from dataclasses import asdict
import pytest
from hypothesis import given, strategies as st
from fashion_json_encoder.config import (Config, ConfigError, UserError, load_config, save_config, update_config,
                                         config_from_dict, KFASHION_GROUPS)

valid_configs = st.builds(
    Config,
    batch_size=st.integers(2, 4096), learning_rate=st.floats(1e-8, 1.0), temperature=st.floats(1e-3, 10.0),
    embedding_dim=st.integers(1, 512), hidden_dim=st.integers(1, 2048), dropout_rate=st.floats(0, 0.99),
    crop_padding=st.floats(0, 2.0), max_epochs=st.integers(5, 1000), standalone_epochs=st.integers(0, 5),
    target_categories=st.lists(st.sampled_from(KFASHION_GROUPS), min_size=1, max_size=4, unique=True),
    seed=st.integers(0, 2**31 - 1), clip_pretrained=st.text(min_size=1, max_size=30))

@given(valid_configs)
def test_roundtrip(tmp_path_factory, cfg):
    p = save_config(cfg, tmp_path_factory.mktemp("cfg") / "c.json")
    assert load_config(p) == cfg
    text = p.read_text(encoding="utf-8")
    assert "\\uc0c1" not in text and all(f'"{g}"' in text for g in cfg.target_categories)  # Hangul unescaped

@pytest.mark.parametrize("key,value,needle", [
    ("learning_rate", 0, "'learning_rate' = 0"), ("learning_rate", -1e-3, "'learning_rate' = -0.001"),
    ("temperature", 0.0, "'temperature' = 0.0"), ("target_categories", [], "'target_categories' = []"),
    ("target_categories", ["원피스", "신발"], "'신발' is not a K-Fashion group"),
    ("crop_padding", -0.1, "'crop_padding' = -0.1"), ("output_dim", 768, "ViT-B-32"),
    ("batch_size", 1, "'batch_size' = 1"), ("batch_size", 64.0, "expected int"), ("dropout_rate", 1.0, "dropout_rate"),
    ("standalone_epochs", 200, "standalone_epochs"), ("clip_precision", "fp8", "clip_precision"),
    ("device", "tpu", "'device' = 'tpu'"), ("fields", {"category": {"key": "실루엣", "multi": False}}, "unknown K-Fashion key"),
    ("fields", {"category": "카테고리"}, "each field must be"), ("learn_temperature", 1, "expected bool"),
])
def test_invalid_value_names_key(key, value, needle):
    with pytest.raises(ConfigError) as e: config_from_dict({key: value})
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, UserError)

@pytest.mark.parametrize("typo,suggestion", [("learnig_rate", "learning_rate"), ("batchsize", "batch_size"),
                                              ("temprature", "temperature"), ("crop_pading", "crop_padding")])
def test_unknown_key_suggests_closest(tmp_path, typo, suggestion):
    p = tmp_path / "c.json"; p.write_text(json.dumps({typo: 1}), encoding="utf-8")
    with pytest.raises(ConfigError, match=f"unknown config key '{typo}'; did you mean '{suggestion}'") as e: load_config(p)
    assert str(p) in str(e.value)

def test_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"): load_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON"): load_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a JSON object"): load_config(tmp_path / "list.json")

def test_bom_and_overrides(tmp_path):
    p = tmp_path / "bom.json"; p.write_bytes('{"target_categories": ["상의"]}'.encode("utf-8-sig"))
    cfg = load_config(p)
    assert cfg.target_categories == ["상의"]
    cfg2 = update_config(cfg, batch_size=8, learning_rate=None)
    assert (cfg2.batch_size, cfg2.learning_rate, cfg2.target_categories) == (8, 1e-4, ["상의"])
    assert asdict(cfg) != asdict(cfg2)
