#!/usr/bin/env python3
"""Boot the test guest (tests/guest/build.sh) under QEMU on a vhost-user-blk socket and run one fio job in it.

CLI:    python3 tests/guest/guest.py --socket PATH --job JOBFILE [--timeout S] [--cpu N] [--mem 1G]
                                     [--taskset CPU] [--json OUT]
Module: run_fio(socket, job_text_or_path, timeout=...) -> fio's JSON output as a dict.

The job must use filename=/dev/vda. The CLI exits 0 only if fio exited 0, its JSON parsed and every
job reports error 0; it exits 77 (after one line starting with "SKIP:") when QEMU or the built guest
is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL = HERE / "out" / "vmlinuz"
INITRAMFS = HERE / "out" / "initramfs.cpio"
QEMU = "qemu-system-x86_64"
FW_CFG_NAME = "opt/ringblk/job"

INIT_MARK = "=====GUEST-INIT====="
READY_MARK = "=====GUEST-READY====="
JSON_BEGIN = "=====FIO-JSON-BEGIN====="
JSON_END = "=====FIO-JSON-END====="
EXIT_PREFIX = "FIO-EXIT="
SKIP_EXIT = 77


class GuestUnavailable(Exception):
    """QEMU or the built guest is missing: callers should skip, not fail."""


class GuestError(Exception):
    """The guest ran but the fio job did not succeed (timeout, no JSON, fio error)."""

    def __init__(self, message: str, result: GuestResult):
        super().__init__(message)
        self.result = result


@dataclass
class GuestResult:
    fio_exit: int | None = None  # None: the guest never reported fio's exit status
    fio_json: dict | None = None
    timed_out: bool = False
    qemu_exit: int | None = None
    init_s: float | None = None  # host seconds from QEMU start until /init ran
    ready_s: float | None = None  # ... until /dev/vda and the job were there
    total_s: float = 0.0
    console: list[str] = field(default_factory=list)

    def problem(self) -> str | None:
        """Why this run does not count as a success, or None."""
        if self.timed_out:
            return "timed out"
        if self.fio_exit is None:
            return f"guest did not report fio's exit status (QEMU exited {self.qemu_exit})"
        if self.fio_exit != 0:
            return f"fio exited {self.fio_exit}"
        if self.fio_json is None:
            return "no parsable fio JSON"
        failed = [j.get("jobname", "?") for j in self.fio_json.get("jobs", []) if j.get("error", 1) != 0]
        if failed or not self.fio_json.get("jobs"):
            return f"fio jobs with errors: {failed or 'no jobs reported'}"
        return None


def missing() -> list[str]:
    """What is missing to run a guest (empty if nothing)."""
    gone = []
    if shutil.which(QEMU) is None:
        gone.append(f"{QEMU} (install qemu-system-x86, see .ci/install-deps)")
    for path in (KERNEL, INITRAMFS):
        if not path.is_file():
            gone.append(f"{path} (run tests/guest/build.sh)")
    return gone


def real_kvm() -> bool:
    # /dev/kvm alone is not enough here: it may be a paravirtual KVM that cannot run this guest.
    return (Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists()) and os.access(
        "/dev/kvm", os.R_OK | os.W_OK
    )


def opt(value: str) -> str:
    """A value inside a QEMU option list, where a literal comma is written twice."""
    return value.replace(",", ",,")


def qemu_command(socket: str, job_file: str, cpus: int, mem: str, taskset: str | None) -> list[str]:
    accel = ["-machine", "q35,accel=kvm", "-cpu", "host"] if real_kvm() else ["-machine", "q35,accel=tcg", "-cpu", "max"]
    cmd = [
        QEMU, *accel,
        "-smp", str(cpus),
        "-m", mem,
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-numa", "node,memdev=mem",
        "-chardev", f"socket,id=vblk,path={opt(socket)}",
        "-device", "vhost-user-blk-pci,chardev=vblk,num-queues=1",
        "-kernel", str(KERNEL),
        "-initrd", str(INITRAMFS),
        "-append", "console=ttyS0 quiet",
        "-fw_cfg", f"name={FW_CFG_NAME},file={opt(job_file)}",
        "-serial", "stdio",
        "-nic", "none",
        "-no-reboot",
        "-display", "none",
    ]
    return ["taskset", "-c", taskset, *cmd] if taskset is not None else cmd


def boot(
    socket: str,
    job_file: str,
    timeout: float = 120.0,
    cpus: int = 1,
    mem: str = "1G",
    taskset: str | None = None,
    on_console=None,
) -> GuestResult:
    """Run the guest once with job_file as its fio job; never raises for what happens in the guest.

    on_console, if given, is called with each console line as it arrives (from another thread).
    """
    gone = missing()
    if gone:
        raise GuestUnavailable("missing " + "; ".join(gone))
    result = GuestResult()
    start = time.monotonic()
    proc = subprocess.Popen(
        qemu_command(socket, job_file, cpus, mem, taskset),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so a timeout can kill QEMU (and taskset) as one group
    )

    def read_console() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
            result.console.append(line)
            if on_console is not None:
                on_console(line)
            if line.startswith(INIT_MARK) and result.init_s is None:
                result.init_s = time.monotonic() - start
            elif line.startswith(READY_MARK) and result.ready_s is None:
                result.ready_s = time.monotonic() - start

    reader = threading.Thread(target=read_console, daemon=True)
    reader.start()
    try:
        result.qemu_exit = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        result.timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=5)
    result.total_s = time.monotonic() - start
    parse_console(result)
    return result


def parse_console(result: GuestResult) -> None:
    lines = result.console
    for line in lines:
        if line.startswith(EXIT_PREFIX) and line[len(EXIT_PREFIX) :].isdigit():
            result.fio_exit = int(line[len(EXIT_PREFIX) :])
    if JSON_BEGIN not in lines:
        return
    begin = lines.index(JSON_BEGIN) + 1
    if JSON_END not in lines[begin:]:
        return
    try:
        result.fio_json = json.loads("\n".join(lines[begin : lines.index(JSON_END, begin)]))
    except json.JSONDecodeError:
        pass  # fio_json stays None: problem() reports it


def _job_file(job_text_or_path: str | os.PathLike, tmpdir: str) -> str:
    """A path to the job: the given file, or a temporary file holding the given job text."""
    if isinstance(job_text_or_path, os.PathLike) or "\n" not in job_text_or_path:
        path = Path(job_text_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"fio job file {path} not found")
        return str(path.resolve())
    path = Path(tmpdir) / "job.fio"
    path.write_text(job_text_or_path)
    return str(path)


def run_fio(
    socket: str,
    job_text_or_path: str | os.PathLike,
    timeout: float = 120.0,
    cpus: int = 1,
    mem: str = "1G",
    taskset: str | None = None,
) -> dict:
    """Run one fio job (text, or a path to a job file) in the guest; return fio's JSON.

    Raises GuestUnavailable if QEMU or the guest build is missing, GuestError if the job did not succeed.
    """
    with tempfile.TemporaryDirectory(prefix="ringblk-guest-") as tmpdir:
        result = boot(socket, _job_file(job_text_or_path, tmpdir), timeout, cpus, mem, taskset)
    problem = result.problem()
    if problem:
        raise GuestError(problem, result)
    assert result.fio_json is not None
    return result.fio_json


def summary(fio_json: dict) -> str:
    """One line: IOPS and completion-latency p50 per direction, summed/maxed over jobs."""
    parts = []
    for direction in ("read", "write"):
        stats = [j[direction] for j in fio_json.get("jobs", []) if j.get(direction, {}).get("total_ios", 0)]
        if not stats:
            continue
        iops = sum(s["iops"] for s in stats)
        p50 = max(s["clat_ns"].get("percentile", {}).get("50.000000", 0) for s in stats) / 1000
        parts.append(f"{direction} {iops:.0f} IOPS p50 {p50:.1f} us")
    return ", ".join(parts) or "no I/O"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True, help="vhost-user-blk unix socket of the backend")
    ap.add_argument("--job", required=True, help="fio job file (filename=/dev/vda)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before QEMU is killed (120)")
    ap.add_argument("--cpu", type=int, default=1, help="guest vCPUs (1)")
    ap.add_argument("--mem", default="1G", help="guest memory, shared with the backend (1G)")
    ap.add_argument("--taskset", help="CPU list to pin QEMU to, as for taskset -c")
    ap.add_argument("--json", help="write fio's parsed JSON here")
    args = ap.parse_args()

    gone = missing()
    if gone:
        print(f"SKIP: guest cannot run, missing {'; '.join(gone)}", flush=True)
        return SKIP_EXIT
    if not Path(args.job).is_file():
        print(f"guest.py: job file {args.job} not found", file=sys.stderr)
        return 2

    result = boot(args.socket, str(Path(args.job).resolve()), args.timeout, args.cpu, args.mem, args.taskset)
    if args.json and result.fio_json is not None:
        Path(args.json).write_text(json.dumps(result.fio_json, indent=2) + "\n")
    problem = result.problem()
    timing = f"boot {result.init_s:.1f}s" if result.init_s is not None else "no boot"
    timing += f", total {result.total_s:.1f}s"
    if problem:
        print("\n".join(result.console[-40:]), file=sys.stderr)
        print(f"FAIL: {Path(args.job).name}: {problem} ({timing})", flush=True)
        return 1
    assert result.fio_json is not None
    print(f"OK: {Path(args.job).name}: {summary(result.fio_json)} ({timing})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
