"Command lines: the issue's end-to-end command on the real ViT-B/32 architecture, and one-line errors with exit code 2."
import json, os, subprocess, sys
from pathlib import Path
import pytest
from fashion_json_encoder.synthetic import make_synthetic_kfashion
from fashion_json_encoder.cli import main, train_main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}

def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_kfashion(tmp_path_factory.mktemp("cli") / "kfashion", n_photos=24, seed=2, bad_cases=True)

@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    r = run("train.py", "--dataset_path", str(dataset), "--epochs", "3", "--batch_size", "8", "--output_dir", str(out),
            "--clip_pretrained", "none", "--standalone_epochs", "1", "--num_workers", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r

def test_train_writes_the_full_layout(trained):
    out, r = trained
    assert "done: best epoch" in r.stdout and "RANDOM weights" in r.stderr
    for f in ("checkpoints/best_model.pt", "checkpoints/last.pt", "results/training_results.json"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results/training_results.json").read_text(encoding="utf-8"))
    assert [h["stage"] for h in res["history"]] == ["standalone", "contrastive", "contrastive"]
    assert res["data"]["skipped"] and res["tower"]["pretrained"] == "none" and res["warnings"]
    assert res["vocab_sizes"] and res["best_epoch"] in (2, 3)

def test_tensorboard_reader_finds_val_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(trained[0] / "logs")); ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"val/loss", "val/top1", "val/top5", "val/mrr", "val/pos_cosine", "train/lr", "train/temperature"} <= tags
    assert [e.step for e in ea.Scalars("val/mrr")] == [1, 2, 3]

def test_evaluate_prints_metrics(trained, dataset):
    out, _ = trained
    r = run("main.py", "evaluate", "--checkpoint_path", str(out / "checkpoints/best_model.pt"), "--dataset_path", str(dataset),
            "--clip_pretrained", "none")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "image->json" in r.stdout and "json->image" in r.stdout and "mrr" in r.stdout
    ev = json.loads((out / "results/evaluation_results.json").read_text(encoding="utf-8"))
    best = json.loads((out / "results/training_results.json").read_text(encoding="utf-8"))["best_metrics"]
    assert ev["metrics"]["mrr"] == pytest.approx(best["mrr"], abs=1e-4)  # the tower was rebuilt identically from its seed

@pytest.mark.parametrize("args,needle", [
    (["train.py", "--dataset_path", "/no/such/kfashion"], "/no/such/kfashion"),
    (["main.py", "evaluate", "--checkpoint_path", "README.md", "--dataset_path", "."], "README.md"),
])
def test_user_errors_are_one_line_without_traceback(args, needle):
    r = run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = [l for l in r.stderr.splitlines() if not l[:2].isdigit()]  # drop timestamped log lines
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], r.stderr
    assert "Traceback" not in r.stderr

def _rc_err(capsys, fn, argv):
    rc = fn(argv); err = capsys.readouterr().err
    return rc, [l for l in err.splitlines() if l.startswith("error: ")], err

@pytest.mark.parametrize("argv,needle", [
    (["train", "--dataset_path", "{empty}"], "no K-Fashion label"),
    (["train", "--dataset_path", "{data}", "--config", "{badcfg}"], "learnig_rate"),
    (["train", "--dataset_path", "{data}", "--config", "{notjson}"], "not valid JSON"),
    (["train", "--dataset_path", "{data}", "--clip_pretrained", "/no/such/weights.pt"], "/no/such/weights.pt"),
    (["evaluate", "--checkpoint_path", "{missing}"], "checkpoint file not found"),
    (["inspect_data", "--dataset_path", "{missing}"], "does not exist"),
])
def test_cli_error_paths(capsys, tmp_path, dataset, argv, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text('{"learnig_rate": 0.1}', encoding="utf-8")
    (tmp_path / "notjson.json").write_text("{", encoding="utf-8")
    subs = {"{empty}": str(tmp_path / "empty"), "{data}": str(dataset), "{badcfg}": str(tmp_path / "bad.json"),
            "{notjson}": str(tmp_path / "notjson.json"), "{missing}": str(tmp_path / "missing")}
    argv = [subs.get(a, a) for a in argv] + (["--output_dir", str(tmp_path / "o")] if argv[0] in ("train", "inspect_data") else [])
    rc, lines, err = _rc_err(capsys, main, argv)
    assert rc == 2 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err

def test_create_config_roundtrip(tmp_path, capsys):
    assert train_main(["--create_config", str(tmp_path / "c.json"), "--batch_size", "32"]) == 0
    assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["batch_size"] == 32
    assert main(["create_config", "--output", str(tmp_path / "d.json")]) == 0
    assert "상의" in (tmp_path / "d.json").read_text(encoding="utf-8")

def test_help_lists_every_flag():
    r = run("train.py", "--help")
    assert r.returncode == 0
    for flag in ("--dataset_path", "--epochs", "--batch_size", "--lr", "--output_dir", "--config", "--no_standalone",
                 "--standalone_epochs", "--clip_pretrained", "--num_workers", "--device", "--seed", "--resume", "--no_cache",
                 "--sanity_check", "--create_config", "--quiet"):
        assert flag in r.stdout, flag

def test_resume_from_cli_keeps_run_config_and_folder(trained, capsys):
    out, _ = trained
    # only --resume: the run's own config (3 epochs, batch 8), dataset and folder are reused; nothing left to train
    assert train_main(["--resume", str(out / "checkpoints/last.pt"), "--quiet", "--epochs", "4"]) == 0
    assert "done: best epoch" in capsys.readouterr().out
    res = json.loads((out / "results/training_results.json").read_text(encoding="utf-8"))
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3, 4] and res["config"]["batch_size"] == 8


def test_inspect_data_and_decode_flag_on_release_zips(dataset, tmp_path, capsys):
    "Issue 10: the release zips report what the unzipped tree reports; --decode reaches the config."
    from fashion_json_encoder.cli import add_train_args, config_from_args
    import argparse
    zips = make_synthetic_kfashion(tmp_path / "zips", n_photos=24, seed=2, bad_cases=True, layout="zips", names="cp949")
    reps = []
    for d in (zips, dataset):
        assert main(["inspect_data", "--dataset_path", str(d), "--output_dir", str(tmp_path / "o"), "--json", "--quiet"]) == 0
        reps.append({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "dataset"})
    assert reps[0] == reps[1] and reps[0]["records"]["train"] > 0
    a = add_train_args(argparse.ArgumentParser()).parse_args(["--decode", "cpu"])
    assert config_from_args(a).decode == "cpu"
    with pytest.raises(SystemExit): add_train_args(argparse.ArgumentParser()).parse_args(["--decode", "nvjpeg"])
