#!/usr/bin/env python3
"""Real fio in a guest against ringblk and qemu-storage-daemon, side by side, alternating A B A B.

    python3 tests/guest/guest_compare.py [--ringblk target/release/ringblk] [--runs 3]
                                         [--job fio-profiles/randread-4k-qd32.fio]
                                         [--baseline OTHER/ringblk]

With --baseline, B is that other ringblk build instead of qemu-storage-daemon (an A/B of a change).

Each daemon exports the same raw image on /dev/shm from an iothread and is pinned to CPU 1,
QEMU (TCG here) to CPU 0. Reports the guest's IOPS and the daemon's CPU time per I/O (utime + stime of all its
threads, divided by the I/Os fio completed) over the guest's whole run (boot included: memory
table, queue setup) and over fio's run alone, the daemon's CPU seconds until fio starts (boot) and
in all, and its peak resident memory (VmHWM, which counts the guest RAM it touched or pinned),
medians and ratios.
Under TCG the emulated vCPU bounds the IOPS: what compares the backends is the CPU per I/O.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import guest  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one(name: str, argv: list[str], sock: Path, job: str) -> dict:
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(["taskset", "-c", "1", *argv])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.02)
        before = cpu_s(proc.pid)
        at_fio: list[float] = []

        def on_console(line: str) -> None:
            if line.startswith(guest.READY_MARK):  # fio starts now: boot-time work is done
                at_fio.append(cpu_s(proc.pid))

        result = guest.boot(str(sock), job, timeout=300, taskset="0", on_console=on_console)
        after = cpu_s(proc.pid)
        hwm = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    problem = result.problem()
    if problem:
        raise RuntimeError(f"{name}: {problem}")
    jobs = result.fio_json["jobs"]
    ios = sum(j[d]["total_ios"] for j in jobs for d in ("read", "write"))
    iops = sum(j[d]["iops"] for j in jobs for d in ("read", "write"))
    fio_start = at_fio[0] if at_fio else before
    return {
        "iops": iops,
        "cpu_us_per_io": (after - before) / ios * 1e6,
        "fio_cpu_us_per_io": (after - fio_start) / ios * 1e6,
        "boot_cpu_s": fio_start - before,
        "cpu_s": after - before,
        "peak_rss_mib": hwm,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ringblk", default="target/release/ringblk")
    ap.add_argument("--qsd", default="qemu-storage-daemon")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--job", default="fio-profiles/randread-4k-qd32.fio")
    ap.add_argument("--baseline", help="another ringblk binary to compare against, instead of QSD")
    args = ap.parse_args()
    gone = guest.missing()
    if gone:
        print("SKIP: guest comparison: missing " + "; ".join(gone))
        return 77
    with tempfile.TemporaryDirectory(prefix="guest-compare-") as tmp, tempfile.NamedTemporaryFile(dir="/dev/shm") as image:
        image.truncate(1 << 30)
        sock = Path(tmp) / "vblk.sock"
        # Both serve the export from an iothread (both poll only there, with poll-max-ns 32768).
        export = f"type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={sock},writable=on,iothread=io0"
        common = ["--object", "iothread,id=io0", "--export", export]
        daemons = {
            "ringblk": [args.ringblk, "--blockdev", f"driver=file,node-name=d,filename={image.name}", *common],
        }
        if args.baseline:
            daemons["baseline"] = [args.baseline, "--blockdev", f"driver=file,node-name=d,filename={image.name}", *common]
        else:
            daemons["qsd"] = [args.qsd, "--blockdev", f"driver=file,node-name=d,filename={image.name},aio=io_uring", *common]
        a_name, b_name = daemons
        runs: dict[str, list[dict]] = {name: [] for name in daemons}
        for i in range(args.runs):
            for name, argv in daemons.items():
                r = one(name, argv, sock, str(Path(args.job).resolve()))
                runs[name].append(r)
                print(
                    f"run {i + 1} {name:8} {r['iops']:8.0f} IOPS in the guest  daemon {r['cpu_us_per_io']:6.2f} us CPU/IO "
                    f"over the whole run, {r['fio_cpu_us_per_io']:6.2f} during fio; {r['boot_cpu_s']:6.3f} s CPU until fio, "
                    f"{r['cpu_s']:6.3f} s in all, peak RSS {r['peak_rss_mib']:6.0f} MiB",
                    flush=True,
                )
    keys = ("iops", "cpu_us_per_io", "fio_cpu_us_per_io", "boot_cpu_s", "cpu_s", "peak_rss_mib")
    med = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in runs.items()}
    print(f"\n{args.job}: medians of {args.runs} runs each, QEMU (TCG) on CPU 0, daemon on CPU 1")
    print(f"{'':26}{a_name:>10}{b_name:>10}{'ratio':>8}")
    rows = (
        ("iops", "guest IOPS"),
        ("cpu_us_per_io", "daemon CPU/IO, whole run"),
        ("fio_cpu_us_per_io", "daemon CPU/IO, fio only"),
        ("boot_cpu_s", "daemon CPU s until fio"),
        ("cpu_s", "daemon CPU s in all"),
        ("peak_rss_mib", "daemon peak RSS MiB"),
    )
    for key, label in rows:
        a, b = med[a_name][key], med[b_name][key]
        ratio = f"{a / b:8.2f}" if b else f"{'-':>8}"
        print(f"{label:26}{a:10.2f}{b:10.2f}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
