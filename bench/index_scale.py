"""Opening a RecordIO index at MS1MV2 / WebFace42M scale: time and memory per process.

    python -m bench.index_scale [--records 5822653 42474557] [--record-bytes 1800] [--layout dense|header-last]
                                [--probe-keys 200000] [--tmpdir DIR] [--keep]

For each record count it writes, in a temporary folder, a real ``train.idx`` (``key\\toffset`` lines as MXNet
writes them) and a sparse ``train.rec`` of the matching size (no data blocks on disk), then opens it with
``utils.data.recordio.IndexedRecordReader`` in fresh processes:

* ``parse``: no cache yet (the open parses the ``.idx`` and writes ``train.idx.npcache``);
* ``cached``: a second fresh process that finds the cache.

Each reports the open time (wall ``open_s``, and ``open_cpu_s``: this process's CPU seconds, which a loaded machine
inflates less), the RSS growth over the process's state after imports (``rss_mb``), the peak RSS growth
during the open (``peak_mb``), and ``worker_growth_mb``: the private memory a forked child (a DataLoader worker)
gains while looking up ``--probe-keys`` random keys (copy-on-access would show up here). The last line is JSON.
``--layout header-last`` puts key 0 after the images (the face2rec2 layout), which needs a sorted lookup copy.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a path: import the repo's packages, not this folder's
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from utils.cli import ArgumentParser, run_command

REPO = Path(__file__).resolve().parents[1]
MS1MV2_RECORDS = 5_822_653
WEBFACE42M_RECORDS = 42_474_557

# Runs in a fresh interpreter so imports and earlier opens do not blur the numbers.
_PROBE = r"""
import json, os, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from utils.data.recordio import IndexedRecordReader

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def peak_mb():
    with open("/proc/self/status") as f:  # VmHWM: this process's peak RSS (ru_maxrss survives fork + exec)
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

def private_mb():
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Dirty:", "Private_Clean:")):
                total += int(line.split()[1])
    return total / 1024

base = rss_mb()
t, cpu = time.perf_counter(), time.process_time()
reader = IndexedRecordReader(sys.argv[2], sys.argv[3])
open_s, open_cpu_s = time.perf_counter() - t, time.process_time() - cpu
after = rss_mb()
peak = peak_mb()
keys = np.random.default_rng(0).integers(0, len(reader), int(sys.argv[4]))
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # a forked DataLoader worker: look keys up, report its own private memory growth
    os.close(r)
    before = private_mb()
    for i in range(keys.size):  # no Python list shared with the parent: only the reader's own memory is probed
        reader.offset(keys[i])
    os.write(w, json.dumps(private_mb() - before).encode())
    os._exit(0)
os.close(w)
growth = json.loads(os.read(r, 64))
os.waitpid(pid, 0)
print(json.dumps({"open_s": round(open_s, 3), "open_cpu_s": round(open_cpu_s, 3), "rss_mb": round(after - base, 1),
                  "peak_mb": round(peak - base, 1),
                  "worker_growth_mb": round(growth, 1)}))
"""


def write_index(folder: Path, records: int, record_bytes: int, layout: str) -> tuple[Path, Path]:
    """A real ``train.idx`` of ``records`` lines and a sparse ``train.rec`` the offsets fit in."""
    rec, idx = folder / "train.rec", folder / "train.idx"
    keys = np.arange(records, dtype=np.int64)
    offsets = keys * record_bytes
    if layout == "header-last":  # images 1..n-1 first, then the header record 0 (face2rec2)
        keys = np.roll(keys, -1)
    step = 1_000_000
    with open(idx, "w", encoding="ascii", newline="\n") as f:
        for a in range(0, records, step):
            f.write("".join(f"{k}\t{o}\n" for k, o in zip(keys[a:a + step].tolist(), offsets[a:a + step].tolist())))
    with open(rec, "wb") as f:
        f.truncate(records * record_bytes)  # sparse: no blocks written
    return rec, idx


def probe(rec: Path, idx: Path, probe_keys: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(REPO), str(rec), str(idx), str(probe_keys)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, nargs="+", default=[MS1MV2_RECORDS, WEBFACE42M_RECORDS],
                    help="index sizes to test (default: MS1MV2 and WebFace42M image counts)")
    ap.add_argument("--record-bytes", type=int, default=1800, help="spacing of the offsets (a JPEG face ~1.8 KB)")
    ap.add_argument("--layout", choices=("dense", "header-last"), default="dense",
                    help="key order in the .idx: 0..n-1 (InsightFace), or key 0 last (face2rec2)")
    ap.add_argument("--probe-keys", type=int, default=200_000, help="random lookups done by the forked worker")
    ap.add_argument("--tmpdir", type=Path, default=None, help="where to build the files (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args(argv)
    results = []
    for n in args.records:
        folder = Path(tempfile.mkdtemp(prefix=f"index_scale_{n}_", dir=args.tmpdir))
        try:
            t = time.perf_counter()
            rec, idx = write_index(folder, n, args.record_bytes, args.layout)
            build_s = time.perf_counter() - t
            parse = probe(rec, idx, args.probe_keys)
            cached = probe(rec, idx, args.probe_keys)
            cache = folder / "train.idx.npcache"
            row = {"records": n, "layout": args.layout, "idx_mb": round(idx.stat().st_size / 2**20, 1),
                   "build_s": round(build_s, 1), "parse": parse, "cached": cached,
                   "cache_mb": round(cache.stat().st_size / 2**20, 1) if cache.exists() else None}
            print(f"{n:>10} records: parse {parse['open_s']:.2f} s ({parse['open_cpu_s']:.2f} s CPU) / "
                  f"{parse['rss_mb']:.0f} MB, "
                  f"cached {cached['open_s']:.2f} s / {cached['rss_mb']:.0f} MB, "
                  f"worker growth {cached['worker_growth_mb']:.1f} MB", flush=True)
            results.append(row)
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"bench": "index_scale", "cpu_count": os.cpu_count(), "results": results}))
    return 0


if __name__ == "__main__":
    run_command(main)
