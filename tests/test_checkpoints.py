"Checkpoints: any damaged byte of a stored tensor or value is a one-line error, never silently different weights."
import io, zipfile
import pytest
import torch
from hypothesis import given, strategies as st
from fashion_json_encoder.config import UserError
from fashion_json_encoder.checkpoints import CKPT_FORMAT, load_checkpoint, save_checkpoint, state_digest

def _state():
    g = torch.Generator().manual_seed(0)
    return {"format": CKPT_FORMAT, "epoch": 3, "encoder": {"w": torch.randn(64, 8, generator=g), "b": torch.randn(8, generator=g)},
            "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.randn(8, generator=g)}}, "param_groups": [{"lr": 1e-3}]},
            "history": [{"epoch": 1, "val": {"mrr": 0.25}}], "rng": torch.arange(16, dtype=torch.uint8)}

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    p = save_checkpoint(_state(), tmp_path_factory.mktemp("ck") / "last.pt")
    raw = p.read_bytes()
    with zipfile.ZipFile(p) as z:  # where each stored tensor's bytes lie in the file
        regions = []
        for info in (i for i in z.infolist() if "/data/" in i.filename):
            off = info.header_offset  # local header: 30 bytes, then the name (length at 26) and the extra field (length at 28)
            start = off + 30 + int.from_bytes(raw[off + 26: off + 28], "little") + int.from_bytes(raw[off + 28: off + 30], "little")
            regions.append((start, start + info.file_size))
    return p, raw, regions

@given(st.data())
def test_any_flipped_tensor_byte_is_a_one_line_error(saved, tmp_path_factory, data):
    p, raw, regions = saved
    lo, hi = data.draw(st.sampled_from(regions))
    at = data.draw(st.integers(lo, hi - 1)); bit = data.draw(st.integers(0, 7))
    bad = bytearray(raw); bad[at] ^= 1 << bit
    q = tmp_path_factory.mktemp("flip") / "last.pt"; q.write_bytes(bytes(bad))
    with pytest.raises(UserError, match="damaged checkpoint") as e: load_checkpoint(q)
    assert str(q) in str(e.value) and "\n" not in str(e.value)

def test_truncated_checkpoint_is_a_one_line_error(saved, tmp_path):
    p, raw, _ = saved
    q = tmp_path / "cut.pt"; q.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="not a loadable") as e: load_checkpoint(q)
    assert "\n" not in str(e.value)

def test_round_trip_and_undigested_checkpoints(saved, tmp_path, caplog):
    p, _, _ = saved
    st_ = load_checkpoint(p)
    assert st_["digest"] == state_digest(_state()) and torch.equal(st_["encoder"]["w"], _state()["encoder"]["w"])
    old = tmp_path / "old.pt"; torch.save(_state(), old)   # written by an older version: loads, with one warning
    load_checkpoint(old); load_checkpoint(old)
    assert caplog.text.count("without an integrity digest") == 1

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    s = _state(); s["encoder"]["b"][2] = bad
    p = save_checkpoint(s, tmp_path / "best_model.pt")
    with pytest.raises(UserError, match="NaN or infinity.*diverged"): load_checkpoint(p)
