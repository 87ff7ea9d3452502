#!/usr/bin/env python3
"""QMP block-job tests: blockdev-mirror and the job verbs, ringblk beside qemu-storage-daemon.

Each test starts a daemon (see test_qmp.py), adds `file` nodes over raw images on /dev/shm, puts
a vhost-user-blk export on the source (a device above it, idle unless a test runs
`ringblk-bench` on it) and drives a `sync=full` mirror with the real `qemu.qmp` client. What
both daemons should do alike runs against both; the few answers where ringblk differs on
purpose are in `RingblkOnly`, each saying why.

The on-target-error tests need a small tmpfs (`mount -t tmpfs -o size=8M`) to run out of space
mid-copy; where mounting is not permitted they are skipped with one SKIP line.

Environment: RINGBLK, QSD as in test_qmp.py; BENCH, the ringblk-bench binary (default: next to
RINGBLK; the write-load test is skipped without it).

Run: python3 tests/qmp/test_jobs.py [-v]
"""

import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
import unittest

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.events import EventListener

from test_qmp import QSD, RINGBLK, Daemon, connect

BENCH = os.environ.get("BENCH") or os.path.join(os.path.dirname(RINGBLK), "ringblk-bench")

MiB = 1 << 20
SIZE = 64 * MiB
WAIT_S = 30  # for a whole copy: debug builds on a loaded machine
QUIET_S = 0.3  # how long "nothing happens" is watched for

# The bytes every source image starts with: pseudo-random, with zero stretches (which a full
# copy must reproduce on a target that holds other bytes there).
_pattern = None


def pattern():
    global _pattern
    if _pattern is None:
        data = bytearray(random.Random(20250702).randbytes(SIZE))
        for start, end in [(8 * MiB, 12 * MiB), (SIZE - MiB, SIZE)]:
            data[start:end] = bytes(end - start)
        _pattern = bytes(data)
    return _pattern


def read(path):
    with open(path, "rb") as f:
        return f.read()


# Keys of one `query-block-jobs` entry for a mirror, in both daemons.
BLOCK_JOB_INFO_KEYS = {
    "type", "device", "len", "offset", "busy", "paused", "speed", "io-status", "ready",
    "status", "auto-finalize", "auto-dismiss", "actively-synced",
}


class JobTest:
    """A daemon, its QMP client, every event it sends, and images on /dev/shm."""

    binary = None

    async def asyncSetUp(self):
        # The test loop runs in debug mode; reading a 64 MiB image is not a slow callback to log.
        asyncio.get_running_loop().slow_callback_duration = WAIT_S
        self.daemon = Daemon(self.binary)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.images = tempfile.TemporaryDirectory(prefix="ringblk-jobs-", dir=shm)
        self.qmp = QMPClient("jobs")
        await connect(self.qmp, self.daemon.socket_path, WAIT_S)
        self.listener = EventListener()
        self.qmp.register_listener(self.listener)
        self.log = []  # every event taken from the listener, in order

    async def asyncTearDown(self):
        self.qmp.remove_listener(self.listener)
        await self.qmp.disconnect()
        self.daemon.stop()
        self.images.cleanup()

    # -- commands

    async def execute(self, command, arguments=None):
        return await asyncio.wait_for(self.qmp.execute(command, arguments), WAIT_S)

    async def assertError(self, klass, desc, command, arguments=None):
        with self.assertRaises(ExecuteError) as caught:
            await self.execute(command, arguments)
        self.assertEqual((caught.exception.error_class, str(caught.exception)), (klass, desc))

    def image(self, name, data=None, directory=None):
        """A raw image of SIZE bytes: `data`, or sparse (reads as zeroes)."""
        path = os.path.join(directory or self.images.name, name)
        with open(path, "wb") as f:
            if data is None:
                f.truncate(SIZE)
            else:
                f.write(data)
        return path

    def fallocated(self, name):
        """A SIZE-byte image whose blocks are allocated but unwritten: reads as zeroes, and
        block status says so (SEEK_DATA finds no data)."""
        path = os.path.join(self.images.name, name)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.posix_fallocate(fd, 0, SIZE)
        finally:
            os.close(fd)
        return path

    async def ready_time_s(self, **target_options):
        """Mirrors a fallocated source to a sparse target at 1 MiB/s; seconds until READY."""
        await self.add_file("src", self.fallocated("src.img"))
        await self.add_file("tgt", self.image("tgt.img"), **target_options)
        start = time.monotonic()
        await self.mirror(speed=MiB)
        self.assertEqual(await self.next_event("BLOCK_JOB_READY"), self.progress(speed=MiB))
        return time.monotonic() - start

    async def add_file(self, node, path, **options):
        args = {"driver": "file", "node-name": node, "filename": path, **options}
        self.assertEqual(await self.execute("blockdev-add", args), {})

    async def setup_pair(self, source="src", target="tgt", target_directory=None):
        """Source (the pattern, exported as `e`) and target (other bytes) nodes; their paths."""
        source_path = self.image(source + ".img", pattern())
        target_path = self.image(target + ".img", b"\xa5" * SIZE, target_directory)
        await self.add_file(source, source_path)
        await self.add_file(target, target_path)
        await self.execute("block-export-add", {
            "type": "vhost-user-blk", "id": "e", "node-name": source, "writable": True,
            "addr": {"type": "unix", "path": self.daemon.path("vhost.sock")}})
        return source_path, target_path

    async def mirror(self, job="j", device="src", target="tgt", **options):
        args = {"job-id": job, "device": device, "target": target, "sync": "full", **options}
        self.assertEqual(await self.execute("blockdev-mirror", args), {})

    async def export_node(self):
        exports = await self.execute("query-block-exports")
        self.assertEqual(len(exports), 1, exports)
        return exports[0]["node-name"]

    async def block_job(self, job="j"):
        """The `query-block-jobs` entry of `job` (checked to have QSD's keys)."""
        jobs = [j for j in await self.execute("query-block-jobs") if j["device"] == job]
        self.assertEqual(len(jobs), 1, jobs)
        self.assertEqual(set(jobs[0]), BLOCK_JOB_INFO_KEYS)
        return jobs[0]

    # -- events

    async def next_event(self, name, timeout=WAIT_S, **data):
        """Takes events until one named `name` whose data has `data`; returns its data."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                event = await asyncio.wait_for(self.listener.get(), max(left, 0.001))
            except asyncio.TimeoutError:
                self.fail(f"no {name} {data} within {timeout} s; got {self.names()}")
            self.log.append(event)
            if event["event"] == name and all(event["data"].get(k) == v
                                              for k, v in data.items()):
                return event["data"]

    async def status(self, status, job="j", timeout=WAIT_S):
        await self.next_event("JOB_STATUS_CHANGE", timeout, id=job, status=status)

    async def quiet(self):
        """The events that arrive in the next QUIET_S seconds (also logged)."""
        events = []
        deadline = time.monotonic() + QUIET_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                events.append(await asyncio.wait_for(self.listener.get(), left))
            except asyncio.TimeoutError:
                break
        self.log.extend(events)
        return [e["event"] for e in events]

    def statuses(self, job="j"):
        return [e["data"]["status"] for e in self.log
                if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job]

    def names(self, prefix="BLOCK_JOB_"):
        return [e["event"] for e in self.log if e["event"].startswith(prefix)]

    def progress(self, job="j", length=SIZE, offset=SIZE, speed=0):
        return {"device": job, "len": length, "offset": offset, "speed": speed, "type": "mirror"}


class JobBehaviour(JobTest):
    """What ringblk and QSD do alike."""

    async def test_full_mirror_reaches_ready_and_complete_pivots_the_export_to_the_target(self):
        source_path, target_path = await self.setup_pair()
        await self.mirror()
        self.assertEqual(await self.next_event("BLOCK_JOB_READY"), self.progress())
        self.assertEqual(self.statuses(), ["created", "running", "ready"])
        info = await self.block_job()
        self.assertEqual(
            {k: info[k] for k in ("type", "len", "offset", "ready", "status", "paused", "speed",
                                  "io-status", "auto-finalize", "auto-dismiss",
                                  "actively-synced")},
            {"type": "mirror", "len": SIZE, "offset": SIZE, "ready": True, "status": "ready",
             "paused": False, "speed": 0, "io-status": "ok", "auto-finalize": True,
             "auto-dismiss": True, "actively-synced": False})
        self.assertEqual(await self.execute("query-jobs"), [
            {"id": "j", "type": "mirror", "status": "ready", "current-progress": SIZE,
             "total-progress": SIZE}])
        self.assertEqual(await self.execute("block-job-complete", {"device": "j"}), {})
        self.assertEqual(await self.next_event("BLOCK_JOB_COMPLETED"), self.progress())
        await self.status("null")
        self.assertEqual(self.statuses(), ["created", "running", "ready", "waiting", "pending",
                                           "concluded", "null"])
        self.assertEqual(self.names(), ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"])
        self.assertEqual(await self.export_node(), "tgt")
        self.assertEqual(await self.execute("query-block-jobs"), [])
        self.assertEqual(await self.execute("query-jobs"), [])
        self.assertTrue(read(target_path) == read(source_path) == pattern(),
                        "the target holds the source's bytes")

    async def test_speed_does_not_charge_zeroes_written_to_an_unmap_target(self):
        # Copying 64 MiB of data at 1 MiB/s would take 64 s; the source reads as zeroes, and
        # zeroes written to a target with discard=unmap are not counted (QEMU's rate limit
        # counts only copied data; it counts zero writes when it cannot unmap them, see
        # RingblkOnly).
        self.assertLess(await self.ready_time_s(discard="unmap"), 5)

    async def block_graph(self):
        """x-debug-query-block-graph with vertices as (type, name) instead of ids: the sorted
        edges (name, parent, child, perm, shared-perm) and the vertices."""
        graph = await self.execute("x-debug-query-block-graph")
        vertices = {v["id"]: (v["type"], v["name"]) for v in graph["nodes"]}
        edges = sorted((e["name"], vertices[e["parent"]], vertices[e["child"]],
                        tuple(e["perm"]), tuple(e["shared-perm"])) for e in graph["edges"])
        return edges, sorted(vertices.values())

    async def test_block_graph_shows_the_export_then_the_job_and_its_filter(self):
        await self.setup_pair()
        all_perms = ("resize", "write-unchanged", "write", "consistent-read")
        src, tgt = ("block-driver", "src"), ("block-driver", "tgt")
        edges, vertices = await self.block_graph()
        self.assertEqual(vertices, [("block-backend", ""), src, tgt])
        self.assertEqual(edges, [("root", ("block-backend", ""), src,
                                  ("write", "consistent-read"), all_perms)])
        await self.mirror(speed=MiB)
        edges, vertices = await self.block_graph()
        job = ("block-job", "j")
        self.assertIn(job, vertices)
        filters = [e[2] for e in edges if e[:2] == ("main node", job)]
        self.assertEqual(len(filters), 1, edges)
        shared = all_perms[1:]
        for edge in [("main node", job, filters[0], ("consistent-read",), shared),
                     ("source", job, src, (), shared),
                     ("target", job, tgt, (), all_perms),
                     ("backing", filters[0], src, ("write", "consistent-read"), shared),
                     ("root", ("block-backend", ""), filters[0], ("write", "consistent-read"),
                      all_perms)]:
            with self.subTest(edge=edge):
                self.assertIn(edge, edges)

    async def test_cancel_before_ready_is_cancelled_and_leaves_the_export_on_the_source(self):
        await self.setup_pair()
        await self.mirror(speed=MiB)
        await self.status("running")
        info = await self.block_job()
        self.assertEqual((info["status"], info["ready"], info["speed"], info["len"]),
                         ("running", False, MiB, SIZE))
        self.assertEqual(await self.execute("block-job-cancel", {"device": "j"}), {})
        cancelled = await self.next_event("BLOCK_JOB_CANCELLED")
        self.assertLess(cancelled.pop("offset"), SIZE)
        self.assertEqual(cancelled, {"device": "j", "len": SIZE, "speed": MiB, "type": "mirror"})
        await self.status("null")
        self.assertEqual(self.statuses()[-3:], ["aborting", "concluded", "null"])
        self.assertNotIn("ready", self.statuses())
        self.assertEqual(self.names(), ["BLOCK_JOB_CANCELLED"])
        self.assertEqual(await self.export_node(), "src")
        self.assertEqual(await self.execute("query-block-jobs"), [])

    async def test_cancel_after_ready_completes_with_the_target_a_copy_and_no_pivot(self):
        source_path, target_path = await self.setup_pair()
        await self.mirror()
        await self.next_event("BLOCK_JOB_READY")
        self.assertEqual(await self.execute("block-job-cancel", {"device": "j"}), {})
        self.assertEqual(await self.next_event("BLOCK_JOB_COMPLETED"), self.progress())
        await self.status("null")
        self.assertEqual(self.statuses(), ["created", "running", "ready", "waiting", "pending",
                                           "concluded", "null"])
        self.assertEqual(self.names(), ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"])
        self.assertEqual(await self.export_node(), "src")
        self.assertTrue(read(target_path) == read(source_path) == pattern())

    async def test_forced_cancel_after_ready_is_cancelled(self):
        # job-cancel is always forced; block-job-cancel only with force=true.
        await self.setup_pair()
        await self.add_file("tgt2", self.image("tgt2.img"))
        for job, (command, args) in [("j", ("job-cancel", {"id": "j"})),
                                     ("k", ("block-job-cancel", {"device": "k", "force": True}))]:
            with self.subTest(command=command):
                await self.mirror(job, target="tgt" if job == "j" else "tgt2")
                await self.next_event("BLOCK_JOB_READY", device=job)
                self.assertEqual(await self.execute(command, args), {})
                self.assertEqual(await self.next_event("BLOCK_JOB_CANCELLED"),
                                 self.progress(job))
                await self.status("null", job)
                self.assertEqual(self.statuses(job), ["created", "running", "ready", "aborting",
                                                      "concluded", "null"])
                self.assertEqual(await self.export_node(), "src")

    async def test_pause_and_resume_before_and_after_ready(self):
        await self.setup_pair()
        await self.mirror(speed=MiB)
        await self.status("running")
        await self.assertError("GenericError",
                               "Job 'j' in state 'running' cannot accept command verb 'complete'",
                               "job-complete", {"id": "j"})
        self.assertEqual(await self.execute("block-job-pause", {"device": "j"}), {})
        await self.assertError("GenericError", "Job is already paused",
                               "block-job-pause", {"device": "j"})
        await self.assertError("GenericError", "Job is already paused", "job-pause", {"id": "j"})
        # Without force, a paused job is not cancelled.
        await self.assertError("GenericError", "The block job for device 'j' is currently paused",
                               "block-job-cancel", {"device": "j"})
        await self.status("paused")
        info = await self.block_job()
        self.assertEqual((info["status"], info["paused"], info["ready"], info["busy"]),
                         ("paused", True, False, False))
        self.assertEqual(await self.execute("block-job-resume", {"device": "j"}), {})
        await self.status("running")
        await self.assertError("GenericError", "Can't resume a job that was not paused",
                               "block-job-resume", {"device": "j"})
        self.assertEqual(await self.execute("block-job-set-speed", {"device": "j", "speed": 0}),
                         {})
        await self.next_event("BLOCK_JOB_READY")
        self.assertEqual(await self.execute("job-pause", {"id": "j"}), {})
        await self.status("standby")
        info = await self.block_job()
        self.assertEqual((info["status"], info["paused"], info["ready"]), ("standby", True, True))
        self.assertEqual(await self.execute("job-resume", {"id": "j"}), {})
        await self.status("ready")
        info = await self.block_job()
        self.assertEqual((info["status"], info["paused"], info["ready"]), ("ready", False, True))
        self.assertEqual(self.statuses(), ["created", "running", "paused", "running", "ready",
                                           "standby", "ready"])
        self.assertEqual(self.names(), ["BLOCK_JOB_READY"])

    async def test_complete_on_standby_takes_effect_at_resume(self):
        source_path, target_path = await self.setup_pair()
        await self.mirror()
        await self.next_event("BLOCK_JOB_READY")
        self.assertEqual(await self.execute("block-job-pause", {"device": "j"}), {})
        await self.status("standby")
        self.assertEqual(await self.execute("block-job-complete", {"device": "j"}), {})
        self.assertEqual(await self.execute("job-complete", {"id": "j"}), {})
        self.assertEqual(await self.quiet(), [])
        self.assertEqual((await self.block_job())["status"], "standby")
        self.assertNotEqual(await self.export_node(), "tgt")
        self.assertEqual(await self.execute("block-job-resume", {"device": "j"}), {})
        self.assertEqual(await self.next_event("BLOCK_JOB_COMPLETED"), self.progress())
        await self.status("null")
        self.assertEqual(self.statuses()[-6:], ["standby", "ready", "waiting", "pending",
                                                "concluded", "null"])
        self.assertEqual(await self.export_node(), "tgt")
        self.assertEqual(read(target_path), read(source_path))

    async def test_set_speed_and_change_to_write_blocking(self):
        source_path, target_path = await self.setup_pair()
        await self.mirror(speed=MiB)
        self.assertEqual((await self.block_job())["speed"], MiB)
        self.assertEqual(await self.execute("block-job-set-speed",
                                            {"device": "j", "speed": 2 * MiB}), {})
        self.assertEqual((await self.block_job())["speed"], 2 * MiB)
        self.assertEqual(await self.execute("block-job-set-speed", {"device": "j", "speed": 0}),
                         {})
        self.assertEqual(await self.next_event("BLOCK_JOB_READY"), self.progress())
        info = await self.block_job()
        self.assertEqual((info["speed"], info["actively-synced"]), (0, False))
        change = {"id": "j", "type": "mirror", "copy-mode": "write-blocking"}
        self.assertEqual(await self.execute("block-job-change", change), {})
        self.assertEqual(await self.execute("block-job-change", change), {}, "no change is fine")
        await self.assertError("GenericError", "Change to copy mode 'background' is not "
                               "implemented", "block-job-change",
                               {**change, "copy-mode": "background"})
        deadline = time.monotonic() + WAIT_S
        while not (info := await self.block_job())["actively-synced"]:
            self.assertLess(time.monotonic(), deadline, f"never actively synced: {info}")
            await asyncio.sleep(0.05)
        self.assertEqual((info["status"], info["ready"]), ("ready", True))
        self.assertEqual(await self.execute("block-job-cancel", {"device": "j"}), {})
        self.assertEqual(await self.next_event("BLOCK_JOB_COMPLETED"), self.progress())
        self.assertEqual(await self.export_node(), "src")
        self.assertEqual(read(target_path), read(source_path))

    async def test_manual_finalize_waits_in_pending_and_manual_dismiss_in_concluded(self):
        source_path, target_path = await self.setup_pair()
        await self.mirror(**{"auto-finalize": False, "auto-dismiss": False})
        await self.next_event("BLOCK_JOB_READY")
        info = await self.block_job()
        self.assertEqual((info["auto-finalize"], info["auto-dismiss"]), (False, False))
        for verb in ("finalize", "dismiss"):
            await self.assertError(
                "GenericError", f"Job 'j' in state 'ready' cannot accept command verb '{verb}'",
                f"job-{verb}", {"id": "j"})
        self.assertEqual(await self.execute("job-complete", {"id": "j"}), {})
        self.assertEqual(await self.next_event("BLOCK_JOB_PENDING"), {"type": "mirror", "id": "j"})
        self.assertEqual(await self.quiet(), [])
        self.assertEqual(self.statuses(), ["created", "running", "ready", "waiting", "pending"])
        self.assertEqual([j["status"] for j in await self.execute("query-jobs")], ["pending"])
        info = await self.block_job()
        self.assertEqual((info["status"], info["paused"], info["busy"], info["ready"]),
                         ("pending", True, False, False),
                         "a job waiting for its finalize is paused by its own drain")
        self.assertNotEqual(await self.export_node(), "tgt", "no pivot before finalize")
        await self.assertError("GenericError",
                               "Job 'j' in state 'pending' cannot accept command verb 'complete'",
                               "job-complete", {"id": "j"})
        await self.assertError("GenericError",
                               "Job 'j' in state 'pending' cannot accept command verb 'dismiss'",
                               "block-job-dismiss", {"id": "j"})
        self.assertEqual(await self.execute("block-job-finalize", {"id": "j"}), {})
        self.assertEqual(await self.next_event("BLOCK_JOB_COMPLETED"), self.progress())
        await self.status("concluded")
        self.assertEqual(await self.quiet(), [])
        self.assertEqual(await self.execute("query-jobs"), [
            {"id": "j", "type": "mirror", "status": "concluded", "current-progress": SIZE,
             "total-progress": SIZE}])
        info = await self.block_job()
        self.assertEqual((info["status"], info["ready"]), ("concluded", False))
        self.assertEqual(await self.export_node(), "tgt")
        self.assertEqual(read(target_path), read(source_path))
        await self.assertError("GenericError",
                               "Job 'j' in state 'concluded' cannot accept command verb "
                               "'finalize'", "job-finalize", {"id": "j"})
        self.assertEqual(await self.execute("job-dismiss", {"id": "j"}), {})
        await self.status("null")
        self.assertEqual(await self.execute("query-jobs"), [])
        self.assertEqual(await self.execute("query-block-jobs"), [])

    async def test_cancel_while_pending_is_cancelled_without_pivot(self):
        await self.setup_pair()
        await self.mirror(**{"auto-finalize": False})
        await self.next_event("BLOCK_JOB_READY")
        self.assertEqual(await self.execute("job-complete", {"id": "j"}), {})
        await self.next_event("BLOCK_JOB_PENDING")
        self.assertEqual(await self.execute("block-job-cancel", {"device": "j"}), {})
        self.assertEqual(await self.next_event("BLOCK_JOB_CANCELLED"), self.progress())
        await self.status("null")
        self.assertEqual(self.statuses()[-4:], ["pending", "aborting", "concluded", "null"])
        self.assertEqual(await self.export_node(), "src")

    async def test_unknown_jobs_get_qsds_errors(self):
        block_job = ("DeviceNotActive", "Block job 'x' not found")
        cases = [
            ("block-job-cancel", {"device": "x"}, block_job),
            ("block-job-pause", {"device": "x"}, block_job),
            ("block-job-resume", {"device": "x"}, block_job),
            ("block-job-complete", {"device": "x"}, block_job),
            ("block-job-set-speed", {"device": "x", "speed": 1}, block_job),
            ("block-job-finalize", {"id": "x"}, block_job),
            ("block-job-dismiss", {"id": "x"}, block_job),
            ("block-job-change", {"id": "x", "type": "mirror", "copy-mode": "write-blocking"},
             block_job),
        ] + [(f"job-{verb}", {"id": "x"}, ("GenericError", "Job not found"))
             for verb in ("cancel", "pause", "resume", "complete", "finalize", "dismiss")]
        for command, args, (klass, desc) in cases:
            with self.subTest(command=command):
                await self.assertError(klass, desc, command, args)

    async def test_blockdev_mirror_refusals_and_busy_nodes_get_qsds_errors(self):
        await self.setup_pair()
        await self.add_file("ro", self.image("ro.img"), **{"read-only": True})
        await self.add_file("src2", self.image("src2.img"))
        await self.add_file("tgt2", self.image("tgt2.img"))
        cases = [
            ({"target": "src"}, "Can't mirror node into itself"),
            ({"target": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
            ({"device": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
            ({"target": "ro"}, "Block node is read-only"),
        ]
        for change, desc in cases:
            with self.subTest(change=change):
                args = {"job-id": "bad", "device": "src", "target": "tgt", "sync": "full",
                        **change}
                await self.assertError("GenericError", desc, "blockdev-mirror", args)
        # While j mirrors src to tgt, neither node is free, nor the id.
        await self.mirror(speed=MiB)
        cases = [
            ("j", "src2", "tgt2", "Job ID 'j' already in use"),
            ("k", "src", "tgt2", "Need a root block node"),
            ("k", "tgt", "tgt2", "Need a root block node"),
            ("k", "src2", "tgt", "Node 'tgt' is busy: block device is in use by block job: mirror"),
            ("k", "src2", "src", "Node 'src' is busy: block device is in use by block job: mirror"),
        ]
        for job, device, target, desc in cases:
            with self.subTest(job=job, device=device, target=target):
                args = {"job-id": job, "device": device, "target": target, "sync": "full"}
                await self.assertError("GenericError", desc, "blockdev-mirror", args)
        # Nor can they be deleted (QSD's two messages differ in their quoting).
        await self.assertError("GenericError", "Node tgt is in use",
                               "blockdev-del", {"node-name": "tgt"})
        await self.assertError("GenericError",
                               "Node 'src' is busy: block device is in use by block job: mirror",
                               "blockdev-del", {"node-name": "src"})
        for node in ("src", "tgt"):
            await self.assertError(
                "GenericError", f"Node '{node}' is busy: block device is in use by block job: "
                "mirror", "block_resize", {"node-name": node, "size": MiB})
        await self.assertError("GenericError",
                               "Job 'j' in state 'running' cannot accept command verb 'complete'",
                               "block-job-complete", {"device": "j"})
        self.assertEqual([j["device"] for j in await self.execute("query-block-jobs")], ["j"])
        # Once j is over, its nodes are free again.
        self.assertEqual(await self.execute("job-cancel", {"id": "j"}), {})
        await self.status("null")
        await self.mirror("k", "src2", "tgt")
        await self.next_event("BLOCK_JOB_READY", device="k")
        self.assertEqual(await self.execute("job-cancel", {"id": "k"}), {})
        await self.status("null", "k")
        self.assertEqual(await self.execute("blockdev-del", {"node-name": "tgt"}), {})

    async def test_writes_during_the_mirror_are_on_the_target_after_the_pivot(self):
        if not os.path.exists(BENCH):
            self.skipTest(f"ringblk-bench not found at {BENCH} (cargo build -p ringblk-bench)")
        source_path, target_path = await self.setup_pair()
        job_file = self.daemon.path("randwrite.fio")
        with open(job_file, "w") as f:
            f.write("[global]\nfilename=/dev/vda\nioengine=libaio\ndirect=1\nsize=64M\n"
                    "runtime=2\ntime_based=1\n[randwrite]\nrw=randwrite\nbs=4k\niodepth=16\n"
                    "numjobs=1\n")
        load = await asyncio.create_subprocess_exec(
            BENCH, "run", "--no-progress", "--socket", self.daemon.path("vhost.sock"), job_file,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        await self.mirror()
        output, _ = await asyncio.wait_for(load.communicate(), WAIT_S)
        self.assertEqual(load.returncode, 0, output.decode(errors="replace"))
        await self.next_event("BLOCK_JOB_READY")
        self.assertEqual(await self.execute("job-complete", {"id": "j"}), {})
        self.assertEqual((await self.next_event("BLOCK_JOB_COMPLETED")).pop("error", None), None)
        self.assertEqual(await self.export_node(), "tgt")
        source = read(source_path)
        self.assertNotEqual(source, pattern(), "the load wrote")
        self.assertTrue(read(target_path) == source, "every write before the pivot is on the "
                        "target")


    async def test_write_threshold_fires_once_for_the_first_write_past_it(self):
        if not os.path.exists(BENCH):
            self.skipTest(f"ringblk-bench not found at {BENCH} (cargo build -p ringblk-bench)")
        await self.setup_pair()
        await self.assertError("GenericError", "Parameter 'write-threshold' expects uint64",
                               "block-set-write-threshold",
                               {"node-name": "nope", "write-threshold": "x"})
        await self.assertError("GenericError", "Device 'nope' not found",
                               "block-set-write-threshold",
                               {"node-name": "nope", "write-threshold": MiB})
        args = {"node-name": "src", "write-threshold": 32 * MiB}
        self.assertEqual(await self.execute("block-set-write-threshold", args), {})
        nodes = {n["node-name"]: n for n in await self.execute("query-named-block-nodes")}
        self.assertEqual(nodes["src"]["write_threshold"], 32 * MiB)
        # One sequential writer, one request at a time: [32 MiB, 33 MiB) is the first write
        # that ends past the threshold; the later ones find it disarmed.
        code, output = await self.run_bench("[w]\nrw=write\nbs=1m\niodepth=1\nsize=64m\n")
        self.assertEqual(code, 0, output)
        self.assertEqual(await self.next_event("BLOCK_WRITE_THRESHOLD"),
                         {"node-name": "src", "amount-exceeded": MiB,
                          "write-threshold": 32 * MiB})
        self.assertNotIn("BLOCK_WRITE_THRESHOLD", await self.quiet())
        nodes = {n["node-name"]: n for n in await self.execute("query-named-block-nodes")}
        self.assertEqual(nodes["src"]["write_threshold"], 0)

    async def run_bench(self, text, timeout=WAIT_S):
        """Runs ringblk-bench with the job `text` on the export; returns (exit code, output)."""
        job_file = self.daemon.path("job.fio")
        with open(job_file, "w") as f:
            f.write(text)
        proc = await asyncio.create_subprocess_exec(
            BENCH, "run", "--no-progress", "--socket", self.daemon.path("vhost.sock"), job_file,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output, _ = await asyncio.wait_for(proc.communicate(), timeout)
        return proc.returncode, output.decode(errors="replace")

    async def test_frontend_killed_mid_mirror_leaves_job_and_export_working(self):
        if not os.path.exists(BENCH):
            self.skipTest(f"ringblk-bench not found at {BENCH} (cargo build -p ringblk-bench)")
        source_path, target_path = await self.setup_pair()
        job_file = self.daemon.path("writer.fio")
        with open(job_file, "w") as f:
            f.write("[w]\nrw=randwrite\nbs=4k\niodepth=16\nsize=64M\nruntime=30\ntime_based=1\n")
        writer = await asyncio.create_subprocess_exec(
            BENCH, "run", "--no-progress", "--socket", self.daemon.path("vhost.sock"), job_file,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await self.mirror(speed=16 << 20)  # a few seconds of copying: the kill lands mid-copy
        await asyncio.sleep(0.5)
        writer.kill()  # SIGKILL, requests in flight
        await writer.wait()
        self.assertEqual(await self.execute("block-job-set-speed", {"device": "j", "speed": 0}), {})
        await self.next_event("BLOCK_JOB_READY")
        self.assertEqual(await self.execute("job-complete", {"id": "j"}), {})
        self.assertEqual((await self.next_event("BLOCK_JOB_COMPLETED")).pop("error", None), None)
        self.assertEqual(await self.export_node(), "tgt")
        self.assertTrue(read(target_path) == read(source_path), "the target is the source's copy")
        code, output = await self.run_bench("[r]\nrw=randread\nbs=4k\niodepth=8\nsize=8m\n")
        self.assertEqual(code, 0, "a new frontend is served after the kill and the pivot:\n" + output)

    async def slow_null_pair(self, latency_ms):
        """Null source (exported as `e`) and target nodes whose every request takes latency_ms:
        a drain waits that long for the guest's requests in flight."""
        for node in ("src", "tgt"):
            self.assertEqual(await self.execute("blockdev-add", {
                "driver": "null-co", "node-name": node, "size": SIZE,
                "latency-ns": latency_ms * 1_000_000}), {})
        await self.execute("block-export-add", {
            "type": "vhost-user-blk", "id": "e", "node-name": "src", "writable": True,
            "addr": {"type": "unix", "path": self.daemon.path("vhost.sock")}})

    async def start_writer(self):
        job_file = self.daemon.path("writer.fio")
        with open(job_file, "w") as f:
            f.write("[w]\nrw=randwrite\nbs=4k\niodepth=16\nsize=64M\nruntime=30\ntime_based=1\n")
        writer = await asyncio.create_subprocess_exec(
            BENCH, "run", "--no-progress", "--socket", self.daemon.path("vhost.sock"), job_file,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(0.5)  # connected, 16 requests in flight
        return writer

    async def assertAnswersWithin(self, seconds):
        started = time.monotonic()
        await asyncio.wait_for(self.qmp.execute("query-block-jobs"), seconds)
        self.assertLess(time.monotonic() - started, seconds)

    async def assertNewFrontendServed(self):
        code, output = await self.run_bench("[r]\nrw=randread\nbs=4k\niodepth=4\nsize=1m\n")
        self.assertEqual(code, 0, "a new frontend is served:\n" + output)

    async def test_frontend_gone_while_blockdev_mirror_drains_leaves_qmp_answering(self):
        # blockdev-mirror drains the source while the writer's slow requests are in flight; the
        # writer dies meanwhile, so its disconnect arrives during that drain.
        if not os.path.exists(BENCH):
            self.skipTest(f"ringblk-bench not found at {BENCH} (cargo build -p ringblk-bench)")
        await self.slow_null_pair(300)
        writer = await self.start_writer()
        mirror = asyncio.ensure_future(self.mirror(speed=1 << 20))
        await asyncio.sleep(0.05)
        writer.kill()
        await writer.wait()
        await asyncio.wait_for(mirror, 5)
        await self.assertAnswersWithin(1)
        await self.assertNewFrontendServed()
        self.assertEqual(await self.execute("block-job-cancel", {"device": "j", "force": True}), {})
        await self.next_event("BLOCK_JOB_CANCELLED")
        await self.assertAnswersWithin(1)

    async def test_frontend_gone_during_the_final_sync_leaves_qmp_answering(self):
        # The final sync's copies of a slow target hold the drained section for a while; the
        # frontend disconnects then, and reconnects.
        if not os.path.exists(BENCH):
            self.skipTest(f"ringblk-bench not found at {BENCH} (cargo build -p ringblk-bench)")
        await self.slow_null_pair(300)
        await self.mirror()
        await self.next_event("BLOCK_JOB_READY")
        writer = await self.start_writer()
        complete = asyncio.ensure_future(self.execute("job-complete", {"id": "j"}))
        await asyncio.sleep(0.05)
        writer.kill()
        await writer.wait()
        await asyncio.wait_for(complete, 5)
        await self.assertAnswersWithin(1)
        completed = await self.next_event("BLOCK_JOB_COMPLETED")
        self.assertEqual(completed.pop("error", None), None)
        self.assertEqual(await self.export_node(), "tgt")
        await self.assertAnswersWithin(1)
        await self.assertNewFrontendServed()

    async def test_target_file_unlinked_mid_mirror_still_completes(self):
        if not os.path.exists(BENCH):
            self.skipTest(f"ringblk-bench not found at {BENCH} (cargo build -p ringblk-bench)")
        _, target_path = await self.setup_pair()
        await self.mirror(speed=16 << 20)
        await asyncio.sleep(0.3)
        os.unlink(target_path)  # the open file lives on, as an unnamed inode
        self.assertEqual(await self.execute("block-job-set-speed", {"device": "j", "speed": 0}), {})
        await self.next_event("BLOCK_JOB_READY")
        self.assertEqual(await self.execute("job-complete", {"id": "j"}), {})
        self.assertEqual((await self.next_event("BLOCK_JOB_COMPLETED")).pop("error", None), None)
        self.assertEqual(await self.export_node(), "tgt")
        code, output = await self.run_bench("[v]\nrw=randwrite\nbs=4k\niodepth=8\nsize=8m\nverify=crc32c\n")
        self.assertEqual(code, 0, "the export keeps serving from the unlinked target:\n" + output)


class OutOfSpace(JobTest):
    """on-target-error policies, with a target on a tmpfs of 8 MiB: the copy of the 64 MiB
    source (random data) fails with ENOSPC after about 8 MiB."""

    skip_reason = None

    async def asyncSetUp(self):
        if OutOfSpace.skip_reason:
            self.skipTest(OutOfSpace.skip_reason)
        self.mount = tempfile.mkdtemp(prefix="ringblk-jobs-tmpfs-")
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", self.mount],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if mounted.returncode != 0:
            os.rmdir(self.mount)
            reason = f"mount -t tmpfs is not permitted ({mounted.stderr.decode().strip()})"
            OutOfSpace.skip_reason = reason
            print(f"SKIP: on-target-error tests: {reason}", file=sys.stderr)
            self.skipTest(reason)
        # Cleanups run after tearDown, once the daemon (which keeps the file open) has exited.
        self.addCleanup(os.rmdir, self.mount)
        self.addCleanup(subprocess.run, ["umount", "-l", self.mount])
        await super().asyncSetUp()

    async def start(self, policy):
        source_path = self.image("src.img", pattern())
        target_path = self.image("tgt.img", directory=self.mount)
        await self.add_file("src", source_path)
        await self.add_file("tgt", target_path)
        await self.execute("block-export-add", {
            "type": "vhost-user-blk", "id": "e", "node-name": "src", "writable": True,
            "addr": {"type": "unix", "path": self.daemon.path("vhost.sock")}})
        await self.mirror(**{"on-target-error": policy})
        return source_path, target_path

    def errors(self):
        return [e["data"] for e in self.log if e["event"] == "BLOCK_JOB_ERROR"]

    async def test_report_fails_the_job_with_the_error(self):
        await self.start("report")
        completed = await self.next_event("BLOCK_JOB_COMPLETED")
        self.assertLess(completed.pop("offset"), SIZE)
        self.assertEqual(completed, {"device": "j", "len": SIZE, "speed": 0, "type": "mirror",
                                     "error": "No space left on device"})
        await self.status("null")
        errors = self.errors()
        self.assertGreater(len(errors), 0)
        self.assertEqual(errors[0], {"device": "j", "operation": "write", "action": "report"})
        self.assertTrue(all(e == errors[0] for e in errors), errors)
        self.assertEqual(self.statuses(), ["created", "running", "aborting", "concluded", "null"])
        self.assertEqual(await self.export_node(), "src")

    async def test_stop_pauses_with_nospace_and_resume_after_growing_the_target_completes(self):
        source_path, target_path = await self.start("stop")
        await self.status("paused")
        errors = self.errors()
        self.assertGreater(len(errors), 0)
        self.assertTrue(all(e == {"device": "j", "operation": "write", "action": "stop"}
                            for e in errors), errors)
        info = await self.block_job()
        self.assertEqual((info["status"], info["paused"], info["io-status"], info["ready"]),
                         ("paused", True, "nospace", False))
        self.assertLess(info["offset"], SIZE)
        await self.assertError("GenericError", "The block job for device 'j' is currently paused",
                               "block-job-cancel", {"device": "j"})
        subprocess.run(["mount", "-o", "remount,size=80M", self.mount], check=True)
        self.assertEqual(await self.execute("block-job-resume", {"device": "j"}), {})
        await self.next_event("BLOCK_JOB_READY")
        info = await self.block_job()
        self.assertEqual((info["status"], info["io-status"], info["offset"]),
                         ("ready", "ok", SIZE))
        self.assertEqual(await self.execute("job-complete", {"id": "j"}), {})
        self.assertEqual((await self.next_event("BLOCK_JOB_COMPLETED")).pop("error", None), None)
        self.assertEqual(await self.export_node(), "tgt")
        self.assertTrue(read(target_path) == read(source_path) == pattern())

    async def test_enospc_stops_and_a_resume_without_space_stops_again(self):
        await self.start("enospc")
        await self.status("paused")
        before = len(self.errors())
        self.assertEqual(self.errors()[0], {"device": "j", "operation": "write", "action": "stop"})
        self.assertEqual((await self.block_job())["io-status"], "nospace")
        self.assertEqual(await self.execute("job-resume", {"id": "j"}), {})
        await self.status("running")
        await self.status("paused")
        self.assertGreater(len(self.errors()), before)
        self.assertEqual((await self.block_job())["io-status"], "nospace")
        self.assertEqual(await self.execute("job-cancel", {"id": "j"}), {})
        cancelled = await self.next_event("BLOCK_JOB_CANCELLED")
        self.assertLess(cancelled["offset"], SIZE)
        await self.status("null")
        self.assertEqual(self.statuses()[-4:], ["running", "aborting", "concluded", "null"])
        self.assertEqual(await self.export_node(), "src")
        self.assertEqual(await self.execute("query-block-jobs"), [])


class RingblkOnly(JobTest, unittest.IsolatedAsyncioTestCase):
    """Where ringblk answers differently from QSD, on purpose."""

    binary = RINGBLK

    async def test_only_sync_full_is_supported(self):
        await self.setup_pair()
        for sync in ("top", "none", "incremental", "bitmap"):
            with self.subTest(sync=sync):
                await self.assertError(
                    "GenericError", f"sync={sync} is not supported by ringblk (only full)",
                    "blockdev-mirror", {"device": "src", "target": "tgt", "sync": sync})
        self.assertEqual(await self.execute("query-block-jobs"), [])

    async def test_speed_never_charges_zero_writes(self):
        # QSD counts zero writes against the speed limit unless the target was opened with
        # discard=unmap (mirror.c: io_bytes_acct = 0 only when write_zeroes_ok), so there this
        # mirror of a fallocated 64 MiB source at 1 MiB/s is READY after 64 s. ringblk charges
        # only data read from the source and written to the target, whatever the target's
        # discard option: a limit meant to spare the storage is not spent on zeroes.
        self.assertLess(await self.ready_time_s(), 5)

    async def test_a_size_mismatch_is_refused_at_once(self):
        # QSD accepts the command and the job then fails at its start (BLOCK_JOB_COMPLETED with
        # this error); ringblk checks before it creates the job, so no job appears.
        await self.setup_pair()
        small = self.daemon.path("small.img")
        with open(small, "wb") as f:
            f.truncate(SIZE // 2)
        await self.add_file("small", small)
        await self.assertError("GenericError", "Source and target image have different sizes",
                               "blockdev-mirror",
                               {"job-id": "j", "device": "src", "target": "small", "sync": "full"})
        self.assertEqual(await self.quiet(), [])
        self.assertEqual(await self.execute("query-jobs"), [])

    async def test_the_export_names_the_filter_while_the_job_runs(self):
        # QSD's filter node gets a generated name ('#blockNNN'); ringblk names it after the job.
        await self.setup_pair()
        await self.mirror()
        await self.next_event("BLOCK_JOB_READY")
        self.assertEqual(await self.export_node(), "j-mirror-top")
        self.assertEqual(await self.execute("job-complete", {"id": "j"}), {})
        await self.status("null")
        self.assertEqual(await self.export_node(), "tgt")


class RingblkJobs(JobBehaviour, unittest.IsolatedAsyncioTestCase):
    binary = RINGBLK


class RingblkOutOfSpace(OutOfSpace, unittest.IsolatedAsyncioTestCase):
    binary = RINGBLK


@unittest.skipIf(QSD is None, "qemu-storage-daemon not found (set QSD)")
class QsdJobs(JobBehaviour, unittest.IsolatedAsyncioTestCase):
    binary = QSD


@unittest.skipIf(QSD is None, "qemu-storage-daemon not found (set QSD)")
class QsdOutOfSpace(OutOfSpace, unittest.IsolatedAsyncioTestCase):
    binary = QSD


if __name__ == "__main__":
    if not os.path.exists(RINGBLK):
        sys.exit(f"ringblk binary {RINGBLK} not found: build it or set RINGBLK")
    unittest.main()
