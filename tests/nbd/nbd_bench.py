#!/usr/bin/env python3
"""NBD side by side: ringblk's export vs qemu-nbd and qemu-storage-daemon's, and a mirror onto an
NBD target by ringblk vs by QSD. Prints a Markdown table (the one in BENCHMARKS.md).

    python3 tests/nbd/nbd_bench.py --ringblk target/release/ringblk [--seconds 5] [--repeat 2]

Exports: a 1 GiB raw image on /dev/shm, fully written, exported writable by each server in
turn, the server pinned to CPU 1 and the client (fio's nbd engine, i.e. libnbd) to CPU 0. Each
row runs the servers alternately (A B C A B C with --repeat 2) and reports medians: MB/s or
IOPS, and the server's CPU time per I/O (utime+stime from /proc over the run). Transports: a
UNIX socket, and TCP over a veth pair between two network namespaces (server in one, fio in the
other). QEMU's servers use aio=io_uring, as ringblk always does.

Mirror: the source daemon (ringblk, then QSD, alternately) pinned to CPU 0 mirrors a fully
written 1 GiB image (sync=full) onto qemu-nbd's export of an image on /dev/shm, qemu-nbd pinned
to CPU 1, over a UNIX socket and over the veth pair; reported: seconds from blockdev-mirror to
BLOCK_JOB_READY and the throughput that makes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from migrate import Hosts  # noqa: E402

GiB = 1 << 30
PORT = "10809"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_listening(check) -> None:
    deadline = time.monotonic() + 20
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("server did not listen")
        time.sleep(0.05)


class Server:
    """One NBD server process serving `image` as export `disk`."""

    def __init__(self, kind: str, args, image: str, where: tuple[str | None, str]) -> None:
        ns, address = where  # address: a socket path, or an IP in namespace `ns`
        if address.startswith("/"):
            if os.path.exists(address):
                os.unlink(address)  # a socket file the previous server left behind
            flat = f"addr.type=unix,addr.path={address}"
            self.uri = f"nbd+unix:///disk?socket={address}"
        else:
            flat = f"addr.type=inet,addr.host={address},addr.port={PORT}"
            self.uri = f"nbd://{address}:{PORT}/disk"
        if kind == "ringblk":
            argv = [args.ringblk, "--blockdev", f"file,node-name=disk,filename={image}",
                    "--nbd-server", flat, "--export", "nbd,id=e,node-name=disk,writable=on"]
        elif kind == "qsd":
            argv = ["qemu-storage-daemon", "--blockdev",
                    f"file,node-name=disk,filename={image},aio=io_uring",
                    "--nbd-server", flat, "--export", "nbd,id=e,node-name=disk,writable=on"]
        else:
            bind = (["-k", address] if address.startswith("/")
                    else ["-b", address, "-p", PORT])
            argv = ["qemu-nbd", "-f", "raw", "-x", "disk", "--aio=io_uring", "--shared=8",
                    "--persistent", *bind, image]
        prefix = ["ip", "netns", "exec", ns] if ns else []
        self.process = subprocess.Popen([*prefix, "taskset", "-c", "1", *argv],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = [*(prefix[:0]), "nbdinfo", "--size", self.uri]
        client_ns = args.client_ns if ns else None
        if client_ns:
            probe = ["ip", "netns", "exec", client_ns, *probe]
        wait_listening(lambda: subprocess.run(probe, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL).returncode == 0)

    def pid(self) -> int:
        # `ip netns exec` and taskset exec the server: the pid is the server's.
        return self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


WORKLOADS = [
    ("seq read 1M QD4", "read", "1M", 4, "MB/s"),
    ("seq write 1M QD4", "write", "1M", 4, "MB/s"),
    ("rand read 4k QD32", "randread", "4k", 32, "IOPS"),
    ("rand write 4k QD32", "randwrite", "4k", 32, "IOPS"),
]


def fio(uri: str, rw: str, bs: str, depth: int, seconds: int, client_ns: str | None) -> dict:
    argv = ["taskset", "-c", "0", "fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", "--size=1G", "--time_based",
            f"--runtime={seconds}", "--output-format=json"]
    if client_ns:
        argv = ["ip", "netns", "exec", client_ns, *argv]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {"ios": side["total_ios"], "bw_bytes": side["bw_bytes"], "iops": side["iops"]}


def export_rows(args, image: str, transport: str, where, client_ns) -> list[str]:
    rows = []
    for title, rw, bs, depth, unit in WORKLOADS:
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in ("ringblk", "qemu-nbd", "qsd")}
        for _ in range(args.repeat):
            for kind in results:
                server = Server(kind, args, image, where)
                cpu0 = cpu_seconds(server.pid())
                r = fio(server.uri, rw, bs, depth, args.seconds, client_ns)
                cpu_us = (cpu_seconds(server.pid()) - cpu0) * 1e6 / max(r["ios"], 1)
                server.stop()
                value = r["bw_bytes"] / 1e6 if unit == "MB/s" else r["iops"]
                results[kind].append((value, cpu_us))
        med = {k: (statistics.median(v[0] for v in vs), statistics.median(v[1] for v in vs))
               for k, vs in results.items()}
        r = med["ringblk"]
        cells = [f"{med[k][0]:,.0f} {unit}, {med[k][1]:.1f} µs" for k in ("ringblk", "qemu-nbd", "qsd")]
        ratios = f"{r[0] / med['qemu-nbd'][0]:.2f}x / {r[0] / med['qsd'][0]:.2f}x"
        rows.append(f"| {transport} | {title} | " + " | ".join(cells) + f" | {ratios} |")
        print(rows[-1], flush=True)
    return rows


async def mirror_seconds(args, daemon: str, source: str, uri_server: dict, ns: str | None,
                         workdir: str) -> float:
    from qemu.qmp import QMPClient
    from qemu.qmp.events import EventListener
    qmp_path = os.path.join(workdir, f"mirror-{daemon}.sock")
    binary = args.ringblk if daemon == "ringblk" else "qemu-storage-daemon"
    extra = "" if daemon == "ringblk" else ",aio=io_uring"
    argv = ["taskset", "-c", "0", binary, "--blockdev",
            f"file,node-name=src,filename={source}{extra}",
            "--chardev", f"socket,id=m,path={qmp_path},server=on,wait=off",
            "--monitor", "chardev=m"]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    qmp = QMPClient("bench")
    for _ in range(500):
        try:
            await qmp.connect(qmp_path)
            break
        except Exception:
            await asyncio.sleep(0.02)
    listener = EventListener()
    qmp.register_listener(listener)
    await qmp.execute("blockdev-add", {"driver": "nbd", "node-name": "tgt", "export": "disk",
                                       "server": uri_server})
    start = time.monotonic()
    await qmp.execute("blockdev-mirror", {"job-id": "j", "device": "src", "target": "tgt",
                                          "sync": "full"})
    while (await listener.get())["event"] != "BLOCK_JOB_READY":
        pass
    seconds = time.monotonic() - start
    await qmp.execute("block-job-cancel", {"device": "j"})
    while (await listener.get())["event"] != "BLOCK_JOB_COMPLETED":
        pass
    await qmp.disconnect()
    proc.terminate()
    proc.wait()
    return seconds


async def mirror_rows(args, hosts: Hosts | None, workdir: str) -> list[str]:
    source = os.path.join(workdir, "mirror-src.img")
    with open(source, "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(GiB >> 20):
            f.write(chunk)
    rows = []
    for transport in ["unix", "veth"]:
        times: dict[str, list[float]] = {"ringblk": [], "qsd": []}
        for _ in range(args.repeat):
            for daemon in times:
                target = os.path.join(workdir, "mirror-dst.img")
                with open(target, "wb") as f:
                    f.truncate(GiB)
                if transport == "unix":
                    sock = os.path.join(workdir, "mirror-target.sock")
                    where, server_addr, ns = ((None, sock), {"type": "unix", "path": sock}, None)
                else:
                    where = (hosts.dst, hosts.dst_ip)
                    server_addr = {"type": "inet", "host": hosts.dst_ip, "port": PORT}
                    ns = hosts.src
                args.client_ns = hosts.src if hosts else None
                server = Server("qemu-nbd", args, target, where)
                times[daemon].append(await mirror_seconds(args, daemon, source, server_addr, ns,
                                                          workdir))
                server.stop()
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = [f"{med[k]:.2f} s ({GiB / med[k] / 1e6:,.0f} MB/s)" for k in ("ringblk", "qsd")]
        rows.append(f"| {transport} | " + " | ".join(cells) + f" | {med['qsd'] / med['ringblk']:.2f}x |")
        print(rows[-1], flush=True)
    return rows


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ringblk", required=True)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    hosts = Hosts()
    try:
        with tempfile.TemporaryDirectory(prefix="ringblk-nbd-bench-", dir="/dev/shm") as workdir:
            image = os.path.join(workdir, "disk.img")
            with open(image, "wb") as f:
                chunk = os.urandom(1 << 20)
                for _ in range(GiB >> 20):
                    f.write(chunk)
            print("| transport | workload | ringblk | qemu-nbd | QSD | ringblk vs qemu-nbd / QSD |")
            print("|---|---|---|---|---|---|")
            args.client_ns = None
            export_rows(args, image, "unix", (None, os.path.join(workdir, "nbd.sock")), None)
            args.client_ns = hosts.src
            export_rows(args, image, "veth", (hosts.dst, hosts.dst_ip), hosts.src)
            print()
            print("| transport | ringblk mirror | QSD mirror | ringblk speed-up |")
            print("|---|---|---|---|")
            await mirror_rows(args, hosts, workdir)
    finally:
        hosts.remove()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
