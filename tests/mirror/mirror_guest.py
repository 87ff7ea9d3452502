#!/usr/bin/env python3
"""A real guest writes with fio verify while a mirror copies its disk and pivots, driven over QMP.

    python3 tests/mirror/mirror_guest.py --daemon PATH [--runs N] [--json OUT]
        [--image-dir DIR] [--direct] [--copy-mode background|write-blocking] [--target-enospc]

PATH is target/release/ringblk or qemu-storage-daemon: the same QMP script drives either, so its
numbers compare the two. Each run: the daemon exports a raw image in --image-dir (default
/dev/shm; CI passes a directory of its own disk, where O_DIRECT is real), opened with
cache.direct=on with --direct (libvirt's cache=none); a guest boots (tests/guest) and runs fio
writing random 4k blocks with crc32c verify; one second into the writes, blockdev-add (same cache
mode) + blockdev-mirror (sync=full, --copy-mode) start the copy to a second image, and at
BLOCK_JOB_READY job-complete pivots while the guest keeps writing. The run passes when the job
completed without error, the export's node is the target afterwards, and fio's verify of every
block the guest wrote (read back through the device, i.e. from the target) passed in the guest.

With --target-enospc the target lives on a 32 MiB tmpfs this script mounts (root only), smaller
than what the guest writes: the copy runs out of space and the job fails (on-target-error
report). That run passes when the job reported the error, the export stayed on the source, and
the guest's fio ran to its end with its verify passing: a failed job never hurts the guest.

Prints one line per run (time to READY, pivot latency = job-complete sent to BLOCK_JOB_COMPLETED
received) and exits 0 only if every run passed; 77 with one SKIP line if a tool is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "guest"))
import guest  # noqa: E402

IMAGE_BYTES = 512 << 20
JOB = """\
[mirror-under-guest-writes]
filename=/dev/vda
ioengine=libaio
direct=1
rw=randwrite
bs=4k
iodepth=16
size=96m
verify=crc32c
verify_fatal=1
do_verify=1
"""


def skip(why: str) -> int:
    print(f"SKIP: mirror-in-guest test: {why}")
    return 77


async def wait_event(listener, name: str, timeout: float) -> dict:
    async def next_named() -> dict:
        while True:
            event = await listener.get()
            if event["event"] == name:
                return event

    return await asyncio.wait_for(next_named(), timeout)


def start_daemon(daemon: str, image: Path, sock: Path, qmp_sock: Path, taskset: str, direct: bool) -> subprocess.Popen:
    cache = ",cache.direct=on" if direct else ""
    argv = [
        "taskset", "-c", taskset, daemon,
        "--blockdev", f"driver=file,node-name=src,filename={image}{cache}",
        "--export", f"type=vhost-user-blk,id=e0,node-name=src,addr.type=unix,addr.path={sock},writable=on",
        "--chardev", f"socket,id=m,path={qmp_sock},server=on,wait=off",
        "--monitor", "chardev=m",
    ]
    proc = subprocess.Popen(argv)
    deadline = time.monotonic() + 10
    while not (sock.exists() and qmp_sock.exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{daemon} did not start: exit {proc.poll()}")
        time.sleep(0.02)
    return proc


async def one_run(daemon: str, tmp: Path, args: argparse.Namespace, target_dir: Path) -> dict:
    from qemu.qmp import EventListener, QMPClient

    src = Path(tempfile.mktemp(dir=args.image_dir, prefix="mirror-src-"))
    dst = Path(tempfile.mktemp(dir=target_dir, prefix="mirror-dst-"))
    for image in (src, dst):
        with open(image, "wb") as f:
            f.truncate(IMAGE_BYTES)
    sock, qmp_sock, job = tmp / "vblk.sock", tmp / "qmp.sock", tmp / "job.fio"
    job.write_text(JOB)
    proc = start_daemon(daemon, src, sock, qmp_sock, "1", args.direct)
    qmp = QMPClient("mirror-guest")
    try:
        await qmp.connect(str(qmp_sock))
        events = EventListener()
        qmp.register_listener(events)
        box: dict = {}
        fio_started = threading.Event()

        def on_console(line: str) -> None:
            if line.startswith(guest.READY_MARK):
                fio_started.set()

        vm = threading.Thread(
            target=lambda: box.update(result=guest.boot(str(sock), str(job), timeout=300, taskset="0", on_console=on_console))
        )
        vm.start()
        # Start the mirror once fio is writing (the guest prints READY just before fio starts).
        while not fio_started.is_set() and vm.is_alive():
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        await qmp.execute(
            "blockdev-add",
            {"driver": "file", "node-name": "dst", "filename": str(dst), "cache": {"direct": args.direct}},
        )
        started = time.monotonic()
        await qmp.execute(
            "blockdev-mirror",
            {"job-id": "m0", "device": "src", "target": "dst", "sync": "full", "copy-mode": args.copy_mode},
        )
        ready_s = pivot_ms = None
        if args.target_enospc:
            completed = await wait_event(events, "BLOCK_JOB_COMPLETED", 120)
        else:
            await wait_event(events, "BLOCK_JOB_READY", 120)
            ready_s = time.monotonic() - started
            complete_sent = time.monotonic()
            await qmp.execute("job-complete", {"id": "m0"})
            completed = await wait_event(events, "BLOCK_JOB_COMPLETED", 60)
            pivot_ms = (time.monotonic() - complete_sent) * 1000
        exports = await qmp.execute("query-block-exports")
        vm.join()
        result: guest.GuestResult = box["result"]
        problem = result.problem()
        still_writing = result.fio_json is not None
        return {
            "ready_s": ready_s,
            "pivot_ms": pivot_ms,
            "job_error": completed["data"].get("error"),
            "export_node": exports[0]["node-name"] if exports else None,
            "fio_problem": problem,
            "fio_write_iops": sum(j["write"]["iops"] for j in result.fio_json["jobs"]) if still_writing else 0,
        }
    finally:
        await qmp.disconnect()
        proc.terminate()
        proc.wait(timeout=30)
        for image in (src, dst):
            image.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--daemon", required=True, help="ringblk or qemu-storage-daemon")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", help="write the runs as JSON here")
    ap.add_argument("--image-dir", default="/dev/shm", help="where the images live (default /dev/shm)")
    ap.add_argument("--direct", action="store_true", help="open both images with cache.direct=on")
    ap.add_argument("--copy-mode", default="background", choices=["background", "write-blocking"])
    ap.add_argument("--target-enospc", action="store_true", help="target on a 32 MiB tmpfs: the job must fail, the guest must not")
    args = ap.parse_args()
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        return skip("python package qemu.qmp not installed (pip install qemu.qmp)")
    gone = guest.missing()
    if gone or not shutil.which(args.daemon) and not os.path.exists(args.daemon):
        return skip("missing " + "; ".join(gone or [args.daemon]))
    runs, ok = [], True
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="ringblk-mirror-") as tmp:
            target_dir = Path(args.image_dir)
            if args.target_enospc:
                target_dir = Path(tmp) / "small"
                target_dir.mkdir()
                mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(target_dir)], capture_output=True, text=True)
                if mounted.returncode != 0:
                    return skip(f"cannot mount a small tmpfs for the target: {mounted.stderr.strip()}")
            try:
                run = asyncio.run(one_run(args.daemon, Path(tmp), args, target_dir))
            finally:
                if args.target_enospc:
                    subprocess.run(["umount", "-l", str(target_dir)], check=False)
        if args.target_enospc:
            passed = bool(run["job_error"]) and run["export_node"] == "src" and run["fio_problem"] is None
            timing = f"job failed as it must ({run['job_error']})" if run["job_error"] else "job did NOT fail"
        else:
            passed = not run["job_error"] and run["export_node"] == "dst" and run["fio_problem"] is None
            timing = f"READY after {run['ready_s']:.2f} s, pivot {run['pivot_ms']:.2f} ms"
        ok &= passed
        runs.append(run)
        print(
            f"{'OK' if passed else 'FAIL'}: run {i + 1}: {timing}, "
            f"export on {run['export_node']}, guest writes {run['fio_write_iops']:.0f} IOPS, fio: {run['fio_problem'] or 'verify passed'}"
            + (f", job error: {run['job_error']}" if run["job_error"] and not args.target_enospc else "")
        )
    if len(runs) > 1 and not args.target_enospc:
        print(f"median: READY {statistics.median(r['ready_s'] for r in runs):.2f} s, pivot {statistics.median(r['pivot_ms'] for r in runs):.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
