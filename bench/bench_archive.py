"""Listing and reading one release zip: this package's directory reader vs zipfile (what the previous release used).

    python bench/bench_archive.py [--members 967806] [--read 20000] [--zip /tmp/kf_labels.zip] [--keep]

Writes (or reuses) a zip shaped like `Training/라벨링데이터.zip`: `--members` small deflated JSON members named
`<style>/<id>.json` in Hangul with the UTF-8 flag, zip64 end records beyond 65,535 members. Then, each in a fresh
process so memory is its own: the seconds and resident memory of opening it the way every index worker and every
DataLoader worker of the cache build does (`archives.Archive`: every member's name and where it lies), against
`zipfile.ZipFile` plus the NFC name map the previous release built from it; and the time to read `--read` members
by name through each. Prints both and their ratios, measured in one run.
"""
import argparse, json, subprocess, sys, time, zipfile
from pathlib import Path

STYLES = ["스트리트", "로맨틱", "모던", "리조트", "레트로"]

_CHILD = r"""
import json, random, sys, time, unicodedata, zipfile
from fashion_json_encoder import archives as A
path, how, n_read = sys.argv[1], sys.argv[2], int(sys.argv[3])
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20 if sys.platform == "linux" else float("nan")
r0 = rss(); t = time.perf_counter()
if how == "this": a = A.Archive(path); names = list(a.members); read = lambda n: a.read(n, A.LABEL_MAX_BYTES)
else:
    zf = zipfile.ZipFile(path); m = {A.member_name(zi): zi for zi in zf.infolist() if not zi.is_dir()}; names = list(m)
    read = lambda n: zf.read(m[n])
t_open, mem = time.perf_counter() - t, rss() - r0
pick = random.Random(0).sample(names, min(n_read, len(names)))
t = time.perf_counter(); total = sum(len(read(n)) for n in pick); t_read = time.perf_counter() - t
print(json.dumps({"members": len(names), "open_s": t_open, "rss_mib": mem, "read_s": t_read, "read_n": len(pick), "bytes": total}))
"""


def make(path: Path, n: int):
    t = time.time()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(n):
            z.writestr(f"{STYLES[i % len(STYLES)]}/{1_000_000 + i}.json",
                       json.dumps({"이미지 정보": {"이미지 식별자": 1_000_000 + i, "이미지 너비": 800}}, ensure_ascii=False))
    print(f"wrote {path} ({n} members, {path.stat().st_size / 2**20:.0f} MiB) in {time.time() - t:.0f}s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=967_806)
    ap.add_argument("--read", type=int, default=20_000, help="members read by name, at random")
    ap.add_argument("--zip", default="/tmp/kf_labels.zip")
    ap.add_argument("--keep", action="store_true", help="keep the zip for the next run")
    a = ap.parse_args(argv)
    path = Path(a.zip)
    if not (path.exists() and len(zipfile.ZipFile(path).namelist()) == a.members): make(path, a.members)
    got = {}
    for how in ("this", "zipfile", "this", "zipfile"):  # interleaved twice: the better of two runs of each
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path), how, str(a.read)], check=True, capture_output=True, text=True)
        f = json.loads(out.stdout)
        got[how] = f if how not in got else {k: min(v, got[how][k]) if k.endswith(("_s", "_mib")) else v for k, v in f.items()}
    this, old = got["this"], got["zipfile"]
    assert this["members"] == old["members"] and this["bytes"] == old["bytes"]
    for how, f in got.items():
        print(f"{how:>8}: open {f['open_s']:.2f}s ({f['open_s'] / f['members'] * 1e6:.2f} us a member), +{f['rss_mib']:.0f} MiB resident; "
              f"read {f['read_n']} members by name {f['read_s']:.2f}s ({f['read_s'] / f['read_n'] * 1e6:.0f} us each)")
    print(f"SUMMARY members={this['members']} open {old['open_s'] / this['open_s']:.2f}x faster, "
          f"memory {old['rss_mib'] / this['rss_mib']:.2f}x less ({old['rss_mib']:.0f} -> {this['rss_mib']:.0f} MiB), "
          f"reads {old['read_s'] / this['read_s']:.2f}x faster")
    if not a.keep: path.unlink()


if __name__ == "__main__": sys.exit(main())
