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


# --- finite floats, new keys, open_clip names (issues 12 and 15) -------------------------------------------------
import errno, logging, math, os, signal, stat, subprocess, sys, time
from pathlib import Path
from dataclasses import fields
from typing import get_type_hints
import torch
from safetensors.torch import save_file
from fashion_json_encoder.config import (atomic_path, atomic_write_text, check_writable, config_diff, log_config,
                                         remove_stale_temps, run_lock, user_io)

FLOAT_KEYS = [k for k, t in get_type_hints(Config).items() if t is float]

def test_float_keys_known():
    assert {"learning_rate", "weight_decay", "temperature", "crop_padding", "val_fraction", "dropout_rate"} <= set(FLOAT_KEYS)

@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 10**400], ids=["inf", "-inf", "nan", "int1e400"])
def test_every_float_key_must_be_finite(key, value):
    with pytest.raises(ConfigError, match=f"'{key}' = .*must be a finite number"): config_from_dict({key: value})

@pytest.mark.parametrize("text", ['{"learning_rate": 1e999}', '{"weight_decay": Infinity}', '{"temperature": NaN}',
                                  '{"crop_padding": Infinity}'])
def test_json_non_finite_rejected(tmp_path, text):
    p = tmp_path / "c.json"; p.write_text(text, encoding="utf-8")
    key = text.split('"')[1]
    with pytest.raises(ConfigError, match=f"'{key}'.*finite") as e: load_config(p)
    assert str(p) in str(e.value)

def test_cli_style_override_inf_rejected():
    with pytest.raises(ConfigError, match="'learning_rate' = inf"): update_config(Config(), learning_rate=float("inf"))

def test_new_keys_defaults_and_validation():
    cfg = Config()
    assert (cfg.warmup_steps, cfg.log_every_n_steps) == (0, 50)
    assert Config(warmup_steps=500, log_every_n_steps=0).warmup_steps == 500
    for k in ("warmup_steps", "log_every_n_steps"):
        with pytest.raises(ConfigError, match=f"'{k}' = -1: must be >= 0"): config_from_dict({k: -1})
        with pytest.raises(ConfigError, match="expected int"): config_from_dict({k: 1.5})

@pytest.mark.parametrize("model,dim,size", [("hf-hub:Marqo/marqo-fashionSigLIP", 768, 224), ("ViT-B-16-SigLIP", 768, 224),
                                            ("ViT-L-14-336", 768, 336), ("RN50", 1024, 224)])
def test_unknown_open_clip_names_accepted(model, dim, size):
    assert Config(clip_model=model, output_dim=dim, image_size=size).clip_model == model

def test_known_tower_table_still_checked():
    with pytest.raises(ConfigError, match="ViT-L-14"): Config(clip_model="ViT-L-14", output_dim=512)
    assert Config(clip_model="ViT-L-14", output_dim=768).output_dim == 768

# --- log_config: diff against the defaults at INFO, every key at DEBUG -------------------------------------------
def test_log_config_diff(caplog):
    log = logging.getLogger("test_config.log")
    with caplog.at_level(logging.INFO, logger=log.name):
        log_config(Config(learning_rate=2e-3, target_categories=["상의"]), log)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["config: 2 key(s) differ from the defaults", "  learning_rate = 0.002 (default 0.0001)",
                     '  target_categories = ["상의"] (default ["상의", "하의", "아우터"])']
    assert all(r.levelno == logging.INFO for r in caplog.records)

def test_log_config_defaults_and_debug(caplog):
    log = logging.getLogger("test_config.log2")
    with caplog.at_level(logging.INFO, logger=log.name): log_config(Config(), log)
    assert [r.getMessage() for r in caplog.records] == ["config: all defaults"]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=log.name): log_config(Config(batch_size=8), log)
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 1 + len(fields(Config)) and "  batch_size = 8" in debug and "  seed = 42" in debug

def test_config_diff_roundtrip():
    cfg = Config(batch_size=8, warmup_steps=10)
    assert config_diff(cfg) == {"batch_size": (8, 64), "warmup_steps": (10, 0)}
    assert config_diff(cfg, cfg) == {}

# --- atomic writer: umask, stale temp files -----------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_write_applies_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        (tmp_path / "plain.json").write_text("{}")
        with atomic_path(tmp_path / "w.pt") as tmp: torch.save({"w": torch.zeros(2)}, tmp)
        with atomic_path(tmp_path / "c.safetensors") as tmp:  # safetensors writes its own temp file and renames it
            save_file({"f": torch.zeros(2)}, str(tmp))
    finally: os.umask(old)
    for name in ("a.json", "w.pt", "c.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)

def test_atomic_temp_name_is_ours(tmp_path):
    with atomic_path(tmp_path / "best_model.pt") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".best_model.pt.") and tmp.name.endswith(".fje-tmp")
        tmp.write_bytes(b"x")

_KILLED_WRITER = """
import os, sys, time
from fashion_json_encoder.config import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"x" * 1000); print(tmp, flush=True); time.sleep(60)
"""

def test_remove_stale_temps_after_kill(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    p = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "checkpoints" / "last.pt")],
                         stdout=subprocess.PIPE, text=True)
    try:
        tmp = Path(p.stdout.readline().strip())
        assert tmp.exists()
        assert remove_stale_temps(tmp_path, min_age=0) == 0    # the writer is alive and holds its lock
        p.send_signal(signal.SIGKILL); p.wait(10)
    finally:
        if p.poll() is None: p.kill(); p.wait(10)
    assert tmp.exists()                                      # the killed writer left its temp file behind
    assert remove_stale_temps(tmp_path, min_age=3600) == 0   # too recent to count as stale
    assert remove_stale_temps(tmp_path, min_age=0) == 1
    assert not tmp.exists() and not (tmp_path / "checkpoints" / "last.pt").exists()

def test_remove_stale_temps_keeps_other_files(tmp_path):
    keep = [".notes.txt.abcdefgh.tmp", "last.pt.abcdefgh.fje-tmp", ".a.abc.fje-tmp", ".a.ABCDEFGH.fje-tmp",
            ".a.abcdefgh.fje-tmp.bak", "model.pt", ".lock"]
    for n in keep: (tmp_path / n).write_text("user data")
    (tmp_path / ".a.abcd_f9h.fje-tmp").write_text("ours")
    assert remove_stale_temps(tmp_path, min_age=0) == 1
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(keep)
    assert remove_stale_temps(tmp_path / "missing") == 0

# --- run lock -----------------------------------------------------------------------------------------------------
_HOLDER = """
import sys, time
from fashion_json_encoder.config import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True); time.sleep(60)
"""

def _hold(folder):
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p

def test_run_lock_second_process_refused_then_freed_by_kill9(tmp_path):
    run = tmp_path / "run"
    p = _hold(run)
    try:
        with pytest.raises(UserError, match=f"is in use by another run \\(PID {p.pid}\\)") as e:
            with run_lock(run): pass
        assert str(run) in str(e.value) and "\n" not in str(e.value)
        p.send_signal(signal.SIGKILL); p.wait(10)
    finally:
        if p.poll() is None: p.kill(); p.wait(10)
    with run_lock(run): assert (run / ".lock").read_text().strip() == str(os.getpid())  # kill -9 left no lock behind

def test_run_lock_released_on_exception(tmp_path):
    with pytest.raises(KeyError):
        with run_lock(tmp_path): raise KeyError("boom")
    with run_lock(tmp_path): pass

# --- output folders that cannot be written ------------------------------------------------------------------------
def test_user_io_real_enospc(tmp_path):
    with pytest.raises(UserError, match=f"cannot write to {tmp_path}: no space left on device"):
        with user_io(tmp_path), open("/dev/full", "w") as f: f.write("x" * 10); f.flush()

def test_user_io_torch_zip_writer(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=f"cannot write to {tmp_path}: the write failed"):
        with user_io(tmp_path): torch.save({"w": torch.zeros(1000)}, "/dev/full")  # torch: 'enforce fail at inline_container'
    real = os.statvfs
    class _Full:
        def __init__(self, st): self.f_flag, self.f_bavail = st.f_flag, 0
    monkeypatch.setattr(os, "statvfs", lambda p: _Full(real(p)))
    with pytest.raises(UserError, match="no space left on device"):
        with user_io(tmp_path): raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed")

@pytest.mark.parametrize("code,cause", [(errno.ENOSPC, "no space left on device"), (errno.EROFS, "read-only file system"),
                                        (errno.EACCES, "permission denied"), (errno.EDQUOT, "disk quota exceeded")])
def test_check_writable_errors(tmp_path, monkeypatch, code, cause):
    import tempfile
    def _fail(*a, **k): raise OSError(code, os.strerror(code), str(tmp_path / "run" / "x"))
    monkeypatch.setattr(tempfile, "TemporaryFile", _fail)
    with pytest.raises(UserError) as e: check_writable(tmp_path / "run")
    assert str(e.value) == f"cannot write to {tmp_path / 'run'}: {cause}"

def test_user_io_passes_other_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        with user_io(tmp_path): open(tmp_path / "missing")
    with pytest.raises(PermissionError):
        with user_io(tmp_path / "out"): raise PermissionError(errno.EACCES, "Permission denied", "/data/photo.jpg")
    with pytest.raises(RuntimeError, match="CUDA"):
        with user_io(tmp_path): raise RuntimeError("CUDA out of memory")

@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes")
def test_check_writable_read_only_dir(tmp_path):
    ro = tmp_path / "ro"; ro.mkdir(); ro.chmod(0o500)
    try:
        with pytest.raises(UserError, match=f"cannot write to {ro / 'run'}: permission denied"): check_writable(ro / "run")
        with pytest.raises(UserError, match="permission denied"):
            with user_io(ro): atomic_write_text(ro / "config.json", "{}")
    finally: ro.chmod(0o700)
    assert check_writable(ro / "run") == ro / "run"


@given(st.one_of(st.text(max_size=12), st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:7", "cuda:", "cuda:-1", "cpu:0", "mps", "gpu"])))
def test_device_names_resolve_or_are_one_line_user_errors(name):
    "Any --device string resolves to the device it names, or is a one-line UserError: never torch's error for a malformed name."
    import torch
    from fashion_json_encoder.config import resolve_device
    try: dev = resolve_device(name)
    except UserError as e:
        assert "\n" not in str(e) and (repr(name) in str(e) or f"'{name}'" in str(e)), str(e)
        return
    assert name in ("auto", "cpu") or name.startswith("cuda") and torch.cuda.is_available()
    assert str(dev) == name or name == "auto"


@pytest.mark.parametrize("device,ok", [("cuda:0", True), ("cuda:12", True), ("cuda:", False), ("cuda:x", False), ("gpu", False),
                                       ("cpu:0", False), ("mps", False)])
def test_device_key_is_checked_like_the_flag(device, ok):
    if ok: assert update_config(Config(), device=device).device == device
    else:
        with pytest.raises(ConfigError, match=f"'device' = '{device}'"): update_config(Config(), device=device)
