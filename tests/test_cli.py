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
    # another split does not replace the run's evaluation (what the app shows): it gets its own file
    before = (out / "results/evaluation_results.json").read_bytes()
    r = run("main.py", "evaluate", "--checkpoint_path", str(out / "checkpoints/best_model.pt"), "--dataset_path", str(dataset),
            "--clip_pretrained", "none", "--split", "train", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "results/evaluation_results.json").read_bytes() == before
    assert json.loads((out / "results/evaluation_results_best_model_train.json").read_text(encoding="utf-8"))["split"] == "train"

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
                 "--sanity_check", "--create_config", "--quiet", "--overwrite", "--warmup_steps", "--clip_model",
                 "--tower_batch_size", "--trust_torchscript", "--decode"):
        assert flag in r.stdout, flag

def test_resume_from_cli_keeps_run_config_and_folder(trained, capsys, monkeypatch):
    import torch
    out, _ = trained
    last, reads, load = (out / "checkpoints/last.pt").resolve(), [], torch.load
    def counting_load(f, *a, **k):
        if isinstance(f, (str, os.PathLike)) and Path(f).resolve() == last: reads.append(f)
        return load(f, *a, **k)
    monkeypatch.setattr(torch, "load", counting_load)
    # only --resume: the run's own config (3 epochs, batch 8), dataset and folder are reused; nothing left to train
    assert train_main(["--resume", str(out / "checkpoints/last.pt"), "--quiet", "--epochs", "4"]) == 0
    assert len(reads) == 1, f"the resumed checkpoint was read {len(reads)} times"   # issue 13: once per command (was 3)
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
    ex = [r.pop("skip_examples") for r in reps]   # the same files, named in an archive or in a folder
    assert {k: [p.split("/")[-1] for p in v] for k, v in ex[0].items()} == {k: [p.split("/")[-1] for p in v] for k, v in ex[1].items()}
    assert reps[0] == reps[1] and reps[0]["records"]["train"] > 0
    a = add_train_args(argparse.ArgumentParser()).parse_args(["--decode", "cpu"])
    assert config_from_args(a).decode == "cpu"
    with pytest.raises(SystemExit): add_train_args(argparse.ArgumentParser()).parse_args(["--decode", "nvjpeg"])


# -- issue 12/15: no silent traps in the commands ----------------------------------------------------------------------
def test_epochs_0_is_refused_before_any_work(capsys, tmp_path, dataset):
    rc, lines, err = _rc_err(capsys, main, ["train", "--dataset_path", str(dataset), "--epochs", "0", "--output_dir", str(tmp_path)])
    assert rc == 2 and len(lines) == 1 and "nothing to train" in lines[0], err
    assert not (tmp_path / "cache").exists() and "done:" not in capsys.readouterr().out

def test_a_folder_holding_a_run_is_refused_then_resume_latest_says_finished(trained, capsys):
    out, _ = trained
    before = (out / "checkpoints/best_model.pt").read_bytes()
    rc, lines, err = _rc_err(capsys, train_main, ["--dataset_path", "x", "--output_dir", str(out), "--quiet"])
    assert rc == 2 and "already holds a training run" in lines[0] and "--overwrite" in lines[0], err
    assert (out / "checkpoints/best_model.pt").read_bytes() == before
    done = torch_load(out / "checkpoints/last.pt")["epoch"]
    assert train_main(["--resume", "latest", "--output_dir", str(out), "--epochs", str(done), "--quiet"]) == 0
    assert f"already finished (epoch {done} of {done})" in capsys.readouterr().out
    rc, lines, err = _rc_err(capsys, train_main, ["--resume", "latest", "--output_dir", str(out / "nowhere"), "--quiet"])
    assert rc == 2 and "--resume latest" in lines[0], err

def torch_load(p):
    import torch
    return torch.load(p, weights_only=True)

def test_overwrite_replaces_the_previous_run(trained, dataset, tmp_path, capsys):
    import shutil
    out = tmp_path / "run"; shutil.copytree(trained[0], out)
    assert train_main(["--dataset_path", str(dataset), "--output_dir", str(out), "--overwrite", "--epochs", "1",
                       "--batch_size", "8", "--clip_pretrained", "none", "--num_workers", "0", "--quiet"]) == 0
    res = json.loads((out / "results/training_results.json").read_text(encoding="utf-8"))
    assert [h["stage"] for h in res["history"]] == ["contrastive"]        # --epochs 1: standalone shrunk to 0
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["best_model.pt", "last.pt"]

def test_a_locked_run_folder_is_refused_with_the_holders_pid(tmp_path, dataset, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fashion_json_encoder.config import run_lock\n"
                               "with run_lock(sys.argv[1]): print('locked', flush=True); time.sleep(120)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, lines, err = _rc_err(capsys, main, ["train", "--dataset_path", str(dataset), "--output_dir", str(tmp_path), "--quiet"])
        assert rc == 2 and f"in use by another run (PID {holder.pid})" in lines[0], err
    finally: holder.kill(); holder.wait()

def test_a_write_failure_is_one_line(trained, dataset, tmp_path, capsys, monkeypatch):
    import torch
    def full(*a, **k): raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full)
    rc, lines, err = _rc_err(capsys, train_main, ["--dataset_path", str(dataset), "--output_dir", str(tmp_path), "--epochs", "1",
                                                  "--batch_size", "8", "--clip_pretrained", "none", "--num_workers", "0", "--quiet"])
    assert rc == 2 and lines[0].startswith(f"error: cannot write to {tmp_path}"), err
    assert "Traceback" not in err

def test_evaluate_refuses_non_finite_weights(trained, tmp_path, capsys):
    from fashion_json_encoder.checkpoints import load_checkpoint, save_checkpoint
    st = load_checkpoint(trained[0] / "checkpoints/best_model.pt")
    k = next(iter(st["encoder"])); st["encoder"][k] = st["encoder"][k].float() * float("nan")
    p = save_checkpoint(st, tmp_path / "nan.pt")
    rc, lines, err = _rc_err(capsys, main, ["evaluate", "--checkpoint_path", str(p)])
    assert rc == 2 and "NaN or infinity" in lines[0], err

def test_closed_stdout_ends_quietly(dataset, tmp_path):
    p = subprocess.Popen([sys.executable, "main.py", "inspect_data", "--dataset_path", str(dataset), "--json", "--quiet",
                          "--output_dir", str(tmp_path)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                                   # `| head` that has already gone
    err = p.stderr.read().decode(); p.wait(timeout=600)
    assert p.returncode == 141 and "Traceback" not in err and "BrokenPipe" not in err, err

def test_help_names_the_command_that_ran(monkeypatch):
    from fashion_json_encoder.cli import build_parser
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/fashion-encoder", "--help"])
    assert build_parser().format_usage().startswith("usage: fashion-encoder ")

@pytest.mark.parametrize("argv", [["search", "--query", "{}", "--k", "-5"], ["tag", "--image", "x.jpg", "--top", "-3"]])
def test_non_positive_counts_are_refused(capsys, argv):
    with pytest.raises(SystemExit) as e: main([argv[0], "--checkpoint_path", "c.pt", *argv[1:]])
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err

def test_tag_checks_the_image_before_loading_anything(trained, capsys, monkeypatch):
    import fashion_json_encoder.search as search   # where the Searcher builds its tower
    monkeypatch.setattr(search, "make_tower", lambda *a, **k: pytest.fail("the tower was loaded before the image was checked"))
    rc, lines, err = _rc_err(capsys, main, ["tag", "--checkpoint_path", str(trained[0] / "checkpoints/best_model.pt"),
                                            "--image", "/no/such/photo.jpg"])
    assert rc == 2 and "/no/such/photo.jpg" in lines[0] and "no such image file" in lines[0], err

def test_inspect_data_writes_only_where_told(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path); monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert main(["inspect_data", "--dataset_path", str(dataset), "--json", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "outputs").exists() and rep["cache_dir"] == str(tmp_path / "xdg" / "fashion-json-encoder")
    assert any((tmp_path / "xdg" / "fashion-json-encoder").iterdir())
    assert main(["inspect_data", "--dataset_path", str(dataset), "--json", "--quiet", "--cache_dir", str(tmp_path / "c")]) == 0
    assert json.loads(capsys.readouterr().out)["cache_dir"] == str(tmp_path / "c") and any((tmp_path / "c").iterdir())

def test_synthetic_writes_a_dataset_the_loader_reads(tmp_path, capsys):
    assert main(["synthetic", "--output", str(tmp_path / "s"), "--n_photos", "12", "--zip", "--quiet"]) == 0
    assert "inspect_data --dataset_path" in capsys.readouterr().out and list((tmp_path / "s").rglob("*.zip"))
    assert main(["inspect_data", "--dataset_path", str(tmp_path / "s"), "--json", "--quiet", "--cache_dir", str(tmp_path / "c")]) == 0
    assert sum(json.loads(capsys.readouterr().out)["records"].values()) == 12
    rc, lines, err = _rc_err(capsys, main, ["synthetic", "--output", str(tmp_path / "s")])
    assert rc == 2 and "not an empty folder" in lines[0], err

def test_serve_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    rc, lines, err = _rc_err(capsys, main, ["serve", "--checkpoint_path", str(tmp_path / "missing.pt"), "--port", "7999"])
    assert rc == 2 and "checkpoint file not found" in lines[0], err


def test_resume_with_another_encoder_shape_is_one_line(trained, capsys, tmp_path):
    "Issue 13: a checkpoint that cannot load into this run's encoder is a user error, not a RuntimeError traceback."
    out, _ = trained
    (tmp_path / "c.json").write_text(json.dumps({"hidden_dim": 64, "clip_pretrained": "none", "batch_size": 8}), encoding="utf-8")
    rc, lines, err = _rc_err(capsys, train_main, ["--resume", str(out / "checkpoints/last.pt"), "--config", str(tmp_path / "c.json"),
                                                  "--epochs", "9", "--quiet"])
    assert rc == 2 and len(lines) == 1 and "hidden_dim 256 but this run's config says hidden_dim 64" in lines[0], err
    assert "Traceback" not in err


def test_resuming_into_a_folder_that_holds_another_run_is_refused(trained, capsys, tmp_path):
    "--resume A/last.pt --output_dir B, where B holds its own run: refused (B is replaced only with --overwrite)."
    import shutil
    out, _ = trained
    other = tmp_path / "other"; (other / "checkpoints").mkdir(parents=True)
    shutil.copy(out / "checkpoints/best_model.pt", other / "checkpoints/best_model.pt")
    before = (other / "checkpoints/best_model.pt").read_bytes()
    rc, lines, err = _rc_err(capsys, train_main, ["--resume", str(out / "checkpoints/last.pt"), "--output_dir", str(other),
                                                  "--epochs", "9", "--quiet"])
    assert rc == 2 and len(lines) == 1 and "already holds a training run" in lines[0], err
    assert (other / "checkpoints/best_model.pt").read_bytes() == before and not (other / "checkpoints/last.pt").exists()


def test_inspect_data_imports_no_tower_library(dataset, tmp_path):
    "The data report needs no tower: it must not pay open_clip's and torchvision's import (about half of its start-up)."
    code = ("import sys; from fashion_json_encoder.cli import main; "
            f"rc = main(['inspect_data', '--dataset_path', {str(dataset)!r}, '--cache_dir', {str(tmp_path / 'c')!r}, '--json', '--quiet']); "
            "print(rc, sorted(m for m in ('open_clip', 'torchvision') if m in sys.modules), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.stderr.strip().splitlines()[-1] == "0 []", out.stderr[-2000:]
    assert json.loads(out.stdout)["records"]["train"] > 0


def test_resume_latest_after_a_crash_before_the_first_checkpoint_starts_the_run(trained, dataset, tmp_path, capsys):
    "A kill during the feature-cache build (a release's longest step) left no last.pt, and the README's `--resume latest` failed."
    import shutil
    out = tmp_path / "run"
    shutil.copytree(trained[0] / "cache", out / "cache")              # what the crashed run had cached
    (out / "logs").mkdir(); (out / "logs/events.out.tfevents.1.crashed").write_bytes(b"partial")
    rc, lines, err = _rc_err(capsys, train_main, ["--resume", "latest", "--output_dir", str(out), "--quiet"])   # nothing records the data
    assert rc == 2 and len(lines) == 1 and "--dataset_path" in lines[0], err
    assert (out / "logs/events.out.tfevents.1.crashed").exists()   # nothing removed before the error
    args = ["--dataset_path", str(dataset), "--output_dir", str(out), "--epochs", "2", "--standalone_epochs", "1", "--batch_size", "8",
            "--clip_pretrained", "none", "--num_workers", "0", "--quiet", "--resume", "latest"]
    assert train_main(args) == 0
    assert "stopped before its first checkpoint" in capsys.readouterr().err and (out / "checkpoints/last.pt").is_file()
    assert not (out / "logs/events.out.tfevents.1.crashed").exists()
    # a folder where nothing ever ran is still a one-line error (a mistyped --output_dir must not start a run)
    rc, lines, err = _rc_err(capsys, train_main, [*args[:2], "--output_dir", str(tmp_path / "typo"), *args[4:]])
    assert rc == 2 and "not found" in lines[0] and not (tmp_path / "typo").exists(), err


def test_a_failed_start_leaves_no_run_folder(capsys, tmp_path):
    "A mistyped --dataset_path was a clear error that still left OUT/.lock behind; a folder that existed before stays."
    for ds, needle in ((tmp_path / "nope", "does not exist"), (tmp_path, "no K-Fashion label files")):
        rc, lines, err = _rc_err(capsys, train_main, ["--dataset_path", str(ds), "--output_dir", str(tmp_path / "out"),
                                                      "--clip_pretrained", "none", "--quiet"])
        assert rc == 2 and needle in lines[0], err
        assert not (tmp_path / "out").exists()
    (tmp_path / "mine").mkdir(); (tmp_path / "mine/notes.txt").write_text("keep")
    rc, _, err = _rc_err(capsys, train_main, ["--dataset_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "mine"), "--quiet"])
    assert rc == 2 and (tmp_path / "mine/notes.txt").read_text() == "keep", err
    # nested folders made for the run go too, up to the first that existed (which keeps what was there)
    for out, gone in ((tmp_path / "new/a/b", tmp_path / "new"), (tmp_path / "mine/x/y", tmp_path / "mine/x")):
        rc, _, err = _rc_err(capsys, train_main, ["--dataset_path", str(tmp_path / "nope"), "--output_dir", str(out), "--quiet"])
        assert rc == 2 and not gone.exists(), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and (tmp_path / "mine/notes.txt").read_text() == "keep"


def test_a_start_that_loses_the_lock_race_removes_nothing(tmp_path, monkeypatch):
    "The folder did not exist when checked, another run created and locked it first: the loser must not remove the winner's."
    from contextlib import contextmanager
    from fashion_json_encoder import system
    from fashion_json_encoder.config import UserError
    out = tmp_path / "out"
    @contextmanager
    def raced(folder):
        Path(folder).mkdir(); (Path(folder) / ".lock").write_text("123\n")   # the winner's
        raise UserError(f"{folder} is in use by another run (PID 123)")
        yield
    monkeypatch.setattr(system, "run_lock", raced)
    with pytest.raises(UserError):
        with system.claimed_run(out): pass
    assert (out / ".lock").read_text() == "123\n"
