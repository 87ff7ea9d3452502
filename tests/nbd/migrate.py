#!/usr/bin/env python3
"""Live storage migration between two "hosts": network namespaces joined by a veth pair.

    python3 tests/nbd/migrate.py --ringblk PATH --bench PATH [--destination ringblk|qsd]

The source host runs ringblk: a raw image on /dev/shm exported over vhost-user-blk, where
ringblk-bench writes random 4k blocks with crc32c verify. The destination host runs ringblk (or
qemu-storage-daemon) with `nbd-server-start` on its veth address and a writable
`block-export-add type=nbd`, the QMP commands libvirt sends. The source adds
`blockdev-add driver=nbd` and `blockdev-mirror`s onto it, in both copy modes, and ends:

- **pivot**: `job-complete` at READY while the writer runs; the writer's final verify pass reads
  every acknowledged block back through the device, which is then the NBD node, i.e. from the
  destination's file;
- **libvirt's ending**: the writer stops (writes paused), `block-job-cancel` after READY; the
  job completes and the destination's file must equal the source's, block by block;
- **destination killed**: SIGKILL of the destination daemon mid-copy (speed-limited); the job
  must end with an error while the writer's requests keep completing and verifying.

Every scenario prints one `OK:` line; the exit status is 0 only if all passed, 77 with one
`SKIP:` line when a tool or permission is missing. The namespaces are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
SIZE = 64 * MiB
WAIT_S = 60
PORT = "10809"


def skip(why: str) -> int:
    print(f"SKIP: NBD migration test: {why}")
    return 77


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Hosts:
    """Two namespaces, `src` at 10.77.<n>.1 and `dst` at 10.77.<n>.2, nothing else routed."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.src, self.dst = f"rbk-src-{tag}", f"rbk-dst-{tag}"
        net = tag % 250 + 1
        self.src_ip, self.dst_ip = f"10.77.{net}.1", f"10.77.{net}.2"
        veth_s, veth_d = f"rbks{tag}", f"rbkd{tag}"
        sh("ip", "netns", "add", self.src)
        sh("ip", "netns", "add", self.dst)
        sh("ip", "link", "add", veth_s, "netns", self.src, "type", "veth",
           "peer", "name", veth_d, "netns", self.dst)
        for ns, veth, ip in [(self.src, veth_s, self.src_ip), (self.dst, veth_d, self.dst_ip)]:
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", veth)
            sh("ip", "-n", ns, "link", "set", veth, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def remove(self) -> None:
        for ns in (self.src, self.dst):
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


class Daemon:
    """A storage daemon in a namespace, with a QMP monitor on a UNIX socket."""

    def __init__(self, ns: str, binary: str, workdir: str, name: str, args: list[str]) -> None:
        self.qmp_path = os.path.join(workdir, f"{name}-qmp.sock")
        self.log_path = os.path.join(workdir, f"{name}.log")
        argv = ["ip", "netns", "exec", ns, binary,
                "--chardev", f"socket,id=m,path={self.qmp_path},server=on,wait=off",
                "--monitor", "chardev=m", *args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.qmp = None

    async def start(self) -> None:
        from qemu.qmp import QMPClient
        from qemu.qmp.events import EventListener
        deadline = time.monotonic() + WAIT_S
        self.qmp = QMPClient(os.path.basename(self.qmp_path))
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited at startup: {self.log()}")
            try:
                await self.qmp.connect(self.qmp_path)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)
        self.events = EventListener()
        self.qmp.register_listener(self.events)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    async def execute(self, command: str, arguments: dict | None = None):
        return await asyncio.wait_for(self.qmp.execute(command, arguments), WAIT_S)

    async def event(self, name: str, timeout: float = WAIT_S) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} within {timeout} s")
            event = await asyncio.wait_for(self.events.get(), left)
            if event["event"] == name:
                return event.get("data", {})

    async def stop(self) -> None:
        if self.qmp is not None:
            try:
                await self.qmp.disconnect()
            except Exception:
                pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Scenario:
    def __init__(self, args, hosts: Hosts, workdir: str) -> None:
        self.args = args
        self.hosts = hosts
        self.workdir = workdir

    def image(self, name: str, fill: bytes) -> str:
        path = os.path.join(self.workdir, name)
        with open(path, "wb") as f:
            f.write(fill * (SIZE // len(fill)))
        return path

    async def destination(self, name: str) -> tuple[Daemon, str]:
        path = self.image(f"{name}.raw", b"\xa5")  # other bytes than the source's
        binary = self.args.ringblk if self.args.destination == "ringblk" else "qemu-storage-daemon"
        dst = Daemon(self.hosts.dst, binary, self.workdir, name,
                     ["--blockdev", f"driver=file,node-name=disk,filename={path}"])
        await dst.start()
        # What libvirt sends on the destination host.
        await dst.execute("nbd-server-start", {
            "addr": {"type": "inet", "data": {"host": self.hosts.dst_ip, "port": PORT}}})
        await dst.execute("block-export-add", {
            "type": "nbd", "id": "migrate", "node-name": "disk", "name": "disk",
            "writable": True})
        exports = await dst.execute("query-block-exports")
        assert [(e["id"], e["type"], e["node-name"]) for e in exports] == [
            ("migrate", "nbd", "disk")], exports
        return dst, path

    async def source(self, name: str) -> tuple[Daemon, str, str]:
        path = self.image(f"{name}.raw", bytes(range(256)))
        vhost = os.path.join(self.workdir, f"{name}-vhost.sock")
        src = Daemon(self.hosts.src, self.args.ringblk, self.workdir, name, [
            "--blockdev", f"driver=file,node-name=src,filename={path}",
            "--export", f"type=vhost-user-blk,id=e0,node-name=src,addr.type=unix,"
                        f"addr.path={vhost},writable=on"])
        await src.start()
        return src, path, vhost

    def writer(self, vhost: str, seconds: float) -> subprocess.Popen:
        job = os.path.join(self.workdir, "writer.fio")
        with open(job, "w") as f:
            f.write(f"[w]\nrw=randwrite\nbs=4k\niodepth=16\nsize={SIZE}\nruntime={seconds}\n"
                    "time_based=1\nverify=crc32c\n")
        return subprocess.Popen([self.args.bench, "run", "--no-progress", "--socket", vhost, job],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    async def writer_done(self, writer: subprocess.Popen) -> None:
        loop = asyncio.get_running_loop()
        output, _ = await loop.run_in_executor(None, writer.communicate)
        if writer.returncode != 0:
            raise AssertionError("the writer failed (a guest write failed or read back wrong):\n"
                                 + output.decode(errors="replace"))

    async def add_target_and_mirror(self, src: Daemon, mode: str, **options) -> None:
        await src.execute("blockdev-add", {
            "driver": "nbd", "node-name": "tgt", "export": "disk",
            "server": {"type": "inet", "host": self.hosts.dst_ip, "port": PORT}})
        await src.execute("blockdev-mirror", {
            "job-id": "j", "device": "src", "target": "tgt", "sync": "full",
            "copy-mode": mode, **options})

    async def pivot(self, mode: str) -> None:
        dst, dst_path = await self.destination(f"pivot-{mode}-dst")
        src, _, vhost = await self.source(f"pivot-{mode}-src")
        try:
            writer = self.writer(vhost, 4)
            await asyncio.sleep(0.5)
            await self.add_target_and_mirror(src, mode)
            await src.event("BLOCK_JOB_READY")
            await src.execute("job-complete", {"id": "j"})
            done = await src.event("BLOCK_JOB_COMPLETED")
            assert "error" not in done, done
            exports = await src.execute("query-block-exports")
            assert exports[0]["node-name"] == "tgt", exports
            await self.writer_done(writer)  # its verify pass reads from the destination
        finally:
            await src.stop()
            await dst.stop()
        print(f"OK: pivot ending, copy-mode={mode}, destination {self.args.destination}: "
              "every acknowledged write read back from the destination")

    async def cancel_after_ready(self, mode: str) -> None:
        dst, dst_path = await self.destination(f"cancel-{mode}-dst")
        src, src_path, vhost = await self.source(f"cancel-{mode}-src")
        try:
            writer = self.writer(vhost, 3)
            await asyncio.sleep(0.5)
            await self.add_target_and_mirror(src, mode)
            await src.event("BLOCK_JOB_READY")
            await self.writer_done(writer)  # libvirt pauses the guest before it cancels
            await src.execute("block-job-cancel", {"device": "j"})
            done = await src.event("BLOCK_JOB_COMPLETED")
            assert "error" not in done, done
            await src.execute("blockdev-del", {"node-name": "tgt"})
            await dst.execute("nbd-server-stop")
            source, target = read(src_path), read(dst_path)
            bad = [i for i in range(0, SIZE, 4096) if source[i:i + 4096] != target[i:i + 4096]]
            assert not bad, f"{len(bad)} blocks differ on the destination, first at {bad[0]}"
        finally:
            await src.stop()
            await dst.stop()
        print(f"OK: libvirt ending (cancel after READY), copy-mode={mode}, destination "
              f"{self.args.destination}: the destination's file equals the source's")

    async def destination_killed(self, mode: str) -> None:
        dst, _ = await self.destination(f"kill-{mode}-dst")
        src, _, vhost = await self.source(f"kill-{mode}-src")
        try:
            writer = self.writer(vhost, 4)
            await self.add_target_and_mirror(src, mode, speed=8 * MiB)
            await asyncio.sleep(1)
            dst.process.kill()
            dst.process.wait()
            done = await src.event("BLOCK_JOB_COMPLETED", 30)
            assert "error" in done, f"the job ended without an error: {done}"
            await self.writer_done(writer)  # the guest never saw an error
            exports = await src.execute("query-block-exports")
            assert exports[0]["node-name"] == "src", exports
            assert await src.execute("query-block-jobs") == []
        finally:
            await src.stop()
            await dst.stop()
        print(f"OK: destination SIGKILLed mid-copy, copy-mode={mode}: the job failed "
              f"({done['error']}), the writer's I/O completed and verified")


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ringblk", required=True)
    parser.add_argument("--bench", required=True)
    parser.add_argument("--destination", choices=["ringblk", "qsd"], default="ringblk")
    args = parser.parse_args()
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        return skip("the Python package qemu.qmp is missing (pip install qemu.qmp)")
    if shutil.which("ip") is None:
        return skip("the ip tool (iproute2) is missing")
    if args.destination == "qsd" and shutil.which("qemu-storage-daemon") is None:
        return skip("qemu-storage-daemon is missing")
    if not os.path.exists(args.bench):
        return skip(f"ringblk-bench not found at {args.bench} (cargo build -p ringblk-bench)")
    try:
        hosts = Hosts()
    except subprocess.CalledProcessError as e:
        return skip(f"cannot create network namespaces: {e.stderr.decode().strip()}")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    try:
        with tempfile.TemporaryDirectory(prefix="ringblk-migrate-", dir=shm) as workdir:
            scenario = Scenario(args, hosts, workdir)
            for mode in ["background", "write-blocking"]:
                await scenario.pivot(mode)
                await scenario.cancel_after_ready(mode)
            await scenario.destination_killed("background")
    finally:
        hosts.remove()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
