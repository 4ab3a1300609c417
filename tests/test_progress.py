"Progress: log lines every ~10 % or ~30 s with a closing line when stderr is no terminal, a bar or widget otherwise."
import io, logging, sys, types, warnings
import pytest
from hypothesis import given, settings, strategies as st
from fashion_json_encoder.progress import LogProgress, progress, progress_logging, progress_mode

class Clock:
    def __init__(self): self.t = 0.
    def __call__(self): return self.t

@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger="test_progress")
    return logging.getLogger("test_progress")

def _msgs(caplog): return [r.getMessage() for r in caplog.records if r.name == "test_progress"]

def test_log_mode_ten_lines_for_1000_steps(log, caplog):
    clock = Clock()
    items = []
    for i in progress(range(1000), desc="cache", unit="img", logger=log, mode="log", clock=clock):
        items.append(i); clock.t += 0.001  # 1 s in all: the 30 s rule never fires
    assert items == list(range(1000))
    lines = _msgs(caplog)
    assert len(lines) == 10
    assert [l.split(" (")[1].split("%")[0] for l in lines[:-1]] == [str(p) for p in range(10, 100, 10)]
    assert lines[0].startswith("cache: 100/1000 imgs (10%), 0.1 s elapsed, 1,000 img/s, about 0.9 s left")
    assert lines[-1] == "cache: done, 1000 imgs in 1.0 s (1,000 img/s)"   # counts in the plural ("300 label in 0.0 s" before)

def test_log_mode_time_rule_without_total(log, caplog):
    clock = Clock()
    def gen():  # no len(): only the time rule applies
        for i in range(30): yield i
    for _ in progress(gen(), desc="scan", logger=log, mode="log", clock=clock, every_s=30): clock.t += 10
    lines = _msgs(caplog)
    assert len(lines) == 10 + 1 and lines[0] == "scan: 3 it, 30.0 s elapsed, 10.0 s/it"
    assert lines[-1] == "scan: done, 30 it in 5 min 00 s (10.0 s/it)"

def test_log_mode_whichever_first(log, caplog):
    clock = Clock()
    with progress(total=100, desc="eval", logger=log, mode="log", clock=clock) as bar:
        for i in range(100):
            clock.t += 20 if i < 5 else 0.01  # slow start: time lines first, then percent lines
            bar.update()
    lines = _msgs(caplog)
    assert sum("elapsed" in l for l in lines) == 2 + 9  # at 40 s and 80 s, then 10 %, ..., 90 %
    assert lines[-1].startswith("eval: done, 100 it in"), lines[-1]

def test_log_mode_stopped_early_and_postfix(log, caplog):
    clock = Clock()
    for i in (bar := progress(range(10), desc="epoch 1", logger=log, mode="log", clock=clock)):
        bar.set_postfix(loss=0.123456)
        if i == 4: break
    del bar
    assert _msgs(caplog)[-1].startswith("epoch 1: stopped at 4/10 it") and _msgs(caplog)[-1].endswith("[loss=0.1235]")
    caplog.clear()
    with pytest.raises(KeyError):
        with progress(total=5, logger=log, mode="log", clock=clock) as bar: bar.update(2); raise KeyError
    assert _msgs(caplog)[-1] == "progress: stopped at 2/5 it in 0.0 s (? it/s)"

@settings(max_examples=30, deadline=None)
@given(st.integers(0, 3000), st.floats(0.0, 5.0))
def test_log_mode_line_count_bounded(n, dt):
    lg = logging.getLogger("test_progress.prop"); lines = []
    h = logging.Handler(); h.emit = lambda r: lines.append(r.getMessage()); lg.addHandler(h); lg.setLevel(logging.INFO)
    clock = Clock()
    try:
        out = []
        for i in progress(range(n), logger=lg, mode="log", clock=clock):
            out.append(i); clock.t += dt
    finally: lg.removeHandler(h)
    assert out == list(range(n))
    assert lines[-1].startswith(f"progress: done, {n} it")
    assert len(lines) <= 10 + n * dt / 30 + 1  # <= 9 percent lines + the time lines + the closing one

def test_disabled_is_silent(log, caplog, capsys):
    assert list(progress(range(7), enable=False, logger=log, mode="log")) == list(range(7))
    with progress(total=3, enable=False, logger=log) as bar: bar.update(3); bar.set_postfix(a=1)
    assert _msgs(caplog) == [] and capsys.readouterr() == ("", "")
    assert progress_mode(enable=False) == "off"

def test_bar_mode_yields_all_and_draws(monkeypatch):
    buf = io.StringIO()
    assert list(progress(range(50), desc="umap", mode="bar", file=buf, mininterval=0)) == list(range(50))
    assert "umap" in buf.getvalue() and "50/50" in buf.getvalue()

def test_mode_follows_stderr(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", None); monkeypatch.delitem(sys.modules, "ipykernel.zmqshell")
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: True, write=lambda s: None, flush=lambda: None))
    assert progress_mode() == "bar"
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_mode() == "log"
    assert isinstance(progress(range(3)), LogProgress)

def test_notebook_mode_without_warnings(monkeypatch):
    pytest.importorskip("ipywidgets")
    import tqdm.notebook  # imported before IPython is faked below
    class ZMQInteractiveShell: pass
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: ZMQInteractiveShell()))
    assert progress_mode() == "notebook"
    monkeypatch.setattr(tqdm.notebook, "display", lambda *a, **k: None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        bar = progress(range(3), desc="index")
        assert list(bar) == [0, 1, 2] and isinstance(bar, tqdm.notebook.tqdm)
    assert not [x for x in w if "IProgress" in str(x.message)]
    monkeypatch.setattr(tqdm.notebook, "IProgress", None)  # no ipywidgets: fall back, never warn
    assert progress_mode() != "notebook"

def test_progress_logging_keeps_level_and_restores(capsys):
    lg = logging.getLogger("test_progress.console"); lg.propagate = False; lg.setLevel(logging.INFO)
    h = logging.StreamHandler(sys.stderr); h.setLevel(logging.WARNING); h.setFormatter(logging.Formatter("LOG %(message)s"))
    lg.addHandler(h)
    try:
        with progress_logging([lg, logging.getLogger("test_progress.no_handlers")]):
            assert len(lg.handlers) == 1 and lg.handlers[0] is not h and lg.handlers[0].level == logging.WARNING
            assert logging.getLogger("test_progress.no_handlers").handlers == []
            bar = progress(range(3), mode="bar", file=sys.stderr, mininterval=0)
            for i in bar:
                lg.info("hidden"); lg.warning("shown %d", i)
        assert lg.handlers == [h]
    finally: lg.removeHandler(h)
    err = capsys.readouterr().err
    assert "hidden" not in err and all(f"LOG shown {i}\n" in err for i in range(3))

def test_epoch_style_progress_logs_only_long_stretches(log, caplog):
    "Epochs: no 10 % lines and no closing line (the trainer logs its own epoch line); a line per 30 s of a long epoch."
    clock = Clock()
    for _ in progress(range(100), desc="epoch 1", logger=log, mode="log", clock=clock, every_pct=None, closing=False): clock.t += 0.1
    assert _msgs(caplog) == []
    for _ in progress(range(100), desc="epoch 2", logger=log, mode="log", clock=clock, every_pct=None, closing=False): clock.t += 1.0
    assert [m.split(":")[0] for m in _msgs(caplog)] == ["epoch 2"] * 3


_KILLED_MANY = """
import multiprocessing as mp, os, signal, sys
from fashion_json_encoder.progress import process_map, WorkerDied
def work(x):
    if x == int(sys.argv[1]): os.kill(os.getpid(), signal.SIGKILL)
    return x
if __name__ == "__main__":
    for _ in range(5):
        try: list(process_map(work, list(range(2000)), 2, "step")); print("no error")
        except WorkerDied as e: print(e)
        assert not mp.active_children(), "a worker outlived the pool"
        left = iter(process_map(abs, list(range(-500, 500)), 2, "early")); next(left); left.close()  # a consumer that leaves early
        assert not mp.active_children(), "a worker outlived an early stop"
"""


@pytest.mark.parametrize("at", [5, 1500])  # while tasks are still submitted; long after
def test_a_worker_killed_among_many_tasks_ends_the_step_and_the_process(tmp_path, at):
    "With hundreds of pending tasks, Python 3.11's pool raced its own clean-up: the process hung at exit with a worker alive."
    import subprocess, sys
    script = tmp_path / "killed.py"; script.write_text(_KILLED_MANY)
    r = subprocess.run([sys.executable, str(script), str(at)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["step: a worker process died (SIGKILL, most often the out-of-memory killer); nothing of this step "
                                     "was kept: rerun with fewer workers (num_workers, 2 now) or more memory"] * 5, r.stdout
