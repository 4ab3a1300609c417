#!/usr/bin/env python
"""Execute every notebook top to bottom in a fresh Jupyter kernel (nbclient, the engine of `jupyter nbconvert --execute`).

Cells flagged with one of settings.ini's `tst_flags` (notest, slow, gpu) or `#| eval: false` are left out, as `nbdev_test` leaves them out; nothing is written
back to the notebooks. Usage: python .ci/run_notebooks.py [NB ...]   (default: nbs/*.ipynb)"""
import os, re, sys, time
from pathlib import Path
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

def _skip_flags() -> str:
    "nbdev's `tst_flags` from settings.ini (cells flagged with one are left out of a plain `nbdev_test`)."
    from nbdev.config import get_config
    return "|".join(map(re.escape, str(get_config().tst_flags or "").split()))

SKIP = re.compile(rf"^\s*#\|\s*({_skip_flags() or '(?!)'}|eval:\s*false)\b", re.M)

def run(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if not (c.cell_type == "code" and SKIP.search(c.source))]
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    return time.perf_counter() - t0

def run_one(p: Path):
    "(path, None) when the notebook ran, else (path, the error's tail)."
    try: print(f"jupyter: {p} ok ({run(p):.0f} s)", flush=True); return p, None
    except CellExecutionError as e: return p, str(e)[-3000:]
    except Exception as e: return p, f"{type(e).__name__}: {e}"[-3000:]   # a timeout or a dead kernel fails this notebook only

if __name__ == "__main__":
    from concurrent.futures import ThreadPoolExecutor
    paths = [Path(p) for p in sys.argv[1:]] or sorted(Path("nbs").glob("*.ipynb"))
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:  # one kernel process per notebook
        failed = [(p, err) for p, err in pool.map(run_one, paths) if err]
    for p, err in failed: print(f"jupyter: {p} FAILED\n{err}", flush=True)
    if failed: sys.exit(f"jupyter: {len(failed)} notebook(s) failed under Jupyter: {', '.join(str(p) for p, _ in failed)}")
