"""Measuring a child process (wall time, CPU, peak RSS) and the I/O floor, for merge_speed.py.

    python benchmarks/_measure.py io-floor OUT MODEL_DIR [MODEL_DIR ...]   # the floor, as a child

Peak RSS is the child's ``VmHWM`` (its own high-water RSS; it counts resident file pages mapped from
the inputs as well as anonymous memory), polled from ``/proc/<pid>/status`` every 50 ms with the
anonymous / file-backed split; CPU time comes from ``wait4``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _family  # noqa: E402

GIB = 1024**3


def warm(paths: list[Path]) -> float:
    """Read every file once (page cache), return bytes read."""
    total = 0
    for d in paths:
        for f in sorted(p for p in d.iterdir() if p.is_file()):
            with open(f, "rb", buffering=0) as fh:
                while chunk := fh.read(64 << 20):
                    total += len(chunk)
    return total


@dataclass
class Run:
    tool: str
    method: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_gib: float = 0.0  # VmHWM: the child's own high-water RSS (anonymous + file pages)
    peak_anon_gib: float = 0.0
    peak_file_gib: float = 0.0
    ru_maxrss_gib: float = 0.0  # wait4's figure: also counts the parent's RSS at spawn (see below)
    rc: int = 0
    output_gib: float = 0.0
    load_1m: float = 0.0  # the machine's 1-minute load average when the run started
    error: str = ""
    cmd: list = field(default_factory=list)


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def measure(cmd: list[str], *, tool: str, method: str, env: dict | None = None) -> Run:
    """Run ``cmd`` to completion; its wall time, CPU time (wait4) and peak memory (/proc polling).

    Peak RSS is the largest ``VmHWM`` seen: the high-water mark of the child's own address space
    since its exec (Popen returns only after the exec, so the parent's pages never show up), read every
    50 ms, so growth in the child's last 50 ms could be missed. wait4's ``ru_maxrss`` is kept for
    reference only: Linux carries the parent's high-water RSS into it across vfork+exec.
    """
    run = Run(tool=tool, method=method, cmd=cmd, load_1m=round(os.getloadavg()[0], 2))
    peaks = {"VmHWM": 0, "VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stderr: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    reader.start()
    done = threading.Event()

    def poll():
        while not done.is_set():
            for k, v in _status_kib(proc.pid).items():
                peaks[k] = max(peaks[k], v)
            done.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    except BaseException:  # interrupted: leave no child behind
        proc.kill()
        proc.wait()
        raise
    run.wall_s = time.perf_counter() - t0
    done.set()
    poller.join()
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    run.rc = proc.returncode
    run.cpu_s = ru.ru_utime + ru.ru_stime
    run.peak_rss_gib = max(peaks["VmHWM"], peaks["VmRSS"]) * 1024 / GIB  # KiB
    run.peak_anon_gib = peaks["RssAnon"] * 1024 / GIB
    run.peak_file_gib = peaks["RssFile"] * 1024 / GIB
    run.ru_maxrss_gib = ru.ru_maxrss * 1024 / GIB
    if run.rc != 0:
        run.error = b"".join(stderr).decode(errors="replace")[-3000:]
    return run


def output_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.glob("*.safetensors")) if out.exists() else 0


def machine() -> dict:
    mem = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {"cpus": os.cpu_count(), "mem_gib": round(mem / GIB, 1), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def _header(file: Path) -> tuple[int, dict]:
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return 8 + n, json.loads(fh.read(n))


def io_floor_worker(out: Path, models: list[Path]) -> None:
    """The least any merge must do: read every input tensor's bytes once, write one output.

    Plain ``readinto`` of each tensor's byte range (no mmap page faults, no dtype work) into one
    reused buffer; the first model's shards are written back out as valid safetensors files of the
    same size, header first, then each tensor's bytes as they are read.
    """
    out.mkdir(parents=True)
    files = [_family.safetensors_files(m) for m in models]
    biggest = max(hi - lo for fs in files for f in fs for k, v in _header(f)[1].items()
                  if k != "__metadata__" for lo, hi in [v["data_offsets"]])
    buf = memoryview(bytearray(biggest))
    for k, base_file in enumerate(files[0]):
        start, header = _header(base_file)
        names = [n for n in header if n != "__metadata__"]
        others = [(open(fs[k], "rb"), *_header(fs[k])) for fs in files[1:]]
        with open(base_file, "rb") as src, open(out / base_file.name, "wb") as dst:
            src.seek(0)
            dst.write(src.read(start))  # same header: same layout
            for name in names:
                lo, hi = header[name]["data_offsets"]
                src.seek(start + lo)
                src.readinto(buf[: hi - lo])
                dst.write(buf[: hi - lo])
                for fh, o_start, o_header in others:
                    o_lo, o_hi = o_header[name]["data_offsets"]
                    fh.seek(o_start + o_lo)
                    fh.readinto(buf[: o_hi - o_lo])
        for fh, *_ in others:
            fh.close()


def io_floor_cmd(models: list[Path], out: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "io-floor", str(out), *map(str, models)]


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "io-floor":
        raise SystemExit("usage: _measure.py io-floor OUT MODEL_DIR [MODEL_DIR ...]")
    io_floor_worker(Path(sys.argv[2]), [Path(m) for m in sys.argv[3:]])
