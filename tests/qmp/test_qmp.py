#!/usr/bin/env python3
"""QMP tests: ringblk driven by the real `qemu.qmp` client and by raw sockets.

Behaviour both daemons should share runs against ringblk and against qemu-storage-daemon
(QSD), each started the same way: `--chardev socket,...,server=on,wait=off --monitor
chardev=m`. Passing against both is what shows ringblk is a drop-in for this part of QSD.

Environment:
  RINGBLK  the ringblk binary (default: target/debug/ringblk)
  QSD      the qemu-storage-daemon binary (default: qemu-storage-daemon on PATH); the QSD
           half is skipped, saying so, when it is missing.

Run: python3 tests/qmp/test_qmp.py [-v]
"""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from qemu.qmp import ConnectError, ExecuteError, QMPClient
from qemu.qmp.events import EventListener

RINGBLK = os.environ.get("RINGBLK", "target/debug/ringblk")
QSD = os.environ.get("QSD") or shutil.which("qemu-storage-daemon")

QEMU_VERSION = {"major": 10, "minor": 0, "micro": 2}
TIMEOUT_S = 10


class Daemon:
    """A storage daemon with one QMP monitor on a UNIX socket in a fresh directory."""

    def __init__(self, binary, monitor="chardev=m"):
        self.dir = tempfile.TemporaryDirectory(prefix="ringblk-qmp-")
        self.socket_path = os.path.join(self.dir.name, "qmp.sock")
        args = [
            binary,
            "--chardev", f"socket,id=m,path={self.socket_path},server=on,wait=off",
            "--monitor", monitor,
        ]
        self.stderr_path = os.path.join(self.dir.name, "stderr")
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + TIMEOUT_S
        while not os.path.exists(self.socket_path):
            if self.process.poll() is not None:
                raise RuntimeError(f"{binary} exited at startup: {self.stderr()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{binary} did not create {self.socket_path}")
            time.sleep(0.01)

    def stderr(self):
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def path(self, name):
        return os.path.join(self.dir.name, name)

    def wait(self):
        """Waits for the daemon to exit on its own; returns its exit status."""
        return self.process.wait(timeout=TIMEOUT_S)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.dir.cleanup()


async def connect(qmp, path, timeout_s):
    """Connects `qmp` to the daemon's monitor at `path`. The socket file appears at bind(), a
    moment before the daemon listens on it (QSD): a refused connection is retried."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await asyncio.wait_for(qmp.connect(path), timeout_s)
            return
        except ConnectError as e:
            if not isinstance(e.exc, ConnectionRefusedError) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


class RawClient:
    """A QMP client on a plain socket: sends any bytes, reads messages one per line."""

    def __init__(self, path):
        # The socket file appears at bind(), a moment before the daemon listens on it.
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(TIMEOUT_S)
            try:
                self.sock.connect(path)
                break
            except ConnectionRefusedError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.buffer = b""

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else data.encode())

    def receive_line(self):
        """The next line as sent, line end included; None at end of stream."""
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line + b"\n"

    def receive(self):
        """The next (compact) message, parsed; None at end of stream."""
        line = self.receive_line()
        return None if line is None else json.loads(line)

    def receive_pretty(self):
        """The next pretty-printed message as sent: lines up to a closing brace at column 0."""
        lines = []
        while not lines or lines[-1] != b"}\r\n":
            lines.append(self.receive_line())
        return b"".join(lines)

    def execute(self, command, arguments=None):
        message = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self.send(json.dumps(message))
        return self.receive()

    def negotiate(self):
        greeting = self.receive()
        assert "QMP" in greeting, greeting
        assert self.execute("qmp_capabilities") == {"return": {}}

    def close(self):
        self.sock.close()


def error(klass, desc):
    return {"error": {"class": klass, "desc": desc}}


class QmpBehaviour:
    """What ringblk and QSD answer alike. Subclasses name the binary."""

    binary = None

    async def asyncSetUp(self):
        self.daemon = Daemon(self.binary)
        self.qmp = QMPClient("test")
        await connect(self.qmp, self.daemon.socket_path, TIMEOUT_S)

    async def asyncTearDown(self):
        try:
            await self.qmp.disconnect()
        except EOFError:
            pass  # the daemon closed the connection first (quit)
        self.daemon.stop()

    async def execute(self, command, arguments=None):
        return await asyncio.wait_for(self.qmp.execute(command, arguments), TIMEOUT_S)

    async def assertError(self, klass, desc, command, arguments=None):
        with self.assertRaises(ExecuteError) as caught:
            await self.execute(command, arguments)
        self.assertEqual((caught.exception.error_class, str(caught.exception)), (klass, desc))

    async def add_null(self, name, size=4096):
        args = {"driver": "null-co", "node-name": name, "size": size}
        self.assertEqual(await self.execute("blockdev-add", args), {})

    async def add_export(self, export_id, node, path):
        args = {
            "type": "vhost-user-blk",
            "id": export_id,
            "node-name": node,
            "addr": {"type": "unix", "path": path},
        }
        self.assertEqual(await self.execute("block-export-add", args), {})

    async def test_greeting_and_query_version_name_qemu_10_0_2(self):
        greeting = self.qmp.greeting.QMP
        self.assertEqual(greeting.capabilities, ["oob"])
        self.assertEqual(greeting.version["qemu"], QEMU_VERSION)
        version = await self.execute("query-version")
        self.assertEqual(version, greeting.version)

    async def test_blockdev_add_file_and_null_co_show_in_query_named_block_nodes(self):
        image = self.daemon.path("disk.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        args = {"driver": "file", "node-name": "disk", "filename": image}
        self.assertEqual(await self.execute("blockdev-add", args), {})
        await self.add_null("null0", 8192)
        nodes = await self.execute("query-named-block-nodes")
        summary = sorted((n["node-name"], n["drv"], n["ro"], n["image"]["virtual-size"])
                         for n in nodes)
        self.assertEqual(summary, [("disk", "file", False, 1 << 20),
                                   ("null0", "null-co", False, 8192)])

    async def test_duplicate_node_name_is_a_generic_error(self):
        await self.add_null("n")
        await self.assertError("GenericError", "Duplicate nodes with node-name='n'",
                               "blockdev-add", {"driver": "null-co", "node-name": "n"})

    async def test_blockdev_del_of_a_missing_node_is_a_generic_error(self):
        await self.assertError("GenericError", "Failed to find node with node-name='zz'",
                               "blockdev-del", {"node-name": "zz"})

    async def test_blockdev_del_removes_the_node(self):
        await self.add_null("n")
        self.assertEqual(await self.execute("blockdev-del", {"node-name": "n"}), {})
        self.assertEqual(await self.execute("query-named-block-nodes"), [])

    async def test_block_export_lifecycle_ends_with_block_export_deleted(self):
        await self.add_null("n")
        await self.add_export("e", "n", self.daemon.path("vhost.sock"))
        exports = await self.execute("query-block-exports")
        self.assertEqual(exports, [{"id": "e", "node-name": "n", "shutting-down": False,
                                    "type": "vhost-user-blk"}])
        listener = EventListener("BLOCK_EXPORT_DELETED")
        with self.qmp.listen(listener):
            self.assertEqual(await self.execute("block-export-del", {"id": "e"}), {})
            event = await asyncio.wait_for(listener.get(), TIMEOUT_S)
        self.assertEqual(event["data"], {"id": "e"})
        self.assertEqual(set(event["timestamp"]), {"seconds", "microseconds"})
        self.assertEqual(await self.execute("query-block-exports"), [])
        await self.assertError("GenericError", "Export 'e' is not found",
                               "block-export-del", {"id": "e"})

    async def test_block_export_add_checks_the_node(self):
        path = self.daemon.path("vhost.sock")
        await self.assertError(
            "GenericError", "Cannot find device='' nor node-name='zz'", "block-export-add",
            {"type": "vhost-user-blk", "id": "e", "node-name": "zz",
             "addr": {"type": "unix", "path": path}})
        image = self.daemon.path("ro.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        await self.execute("blockdev-add", {"driver": "file", "node-name": "ro",
                                            "filename": image, "read-only": True})
        await self.assertError(
            "GenericError", "Cannot export read-only node as writable", "block-export-add",
            {"type": "vhost-user-blk", "id": "e", "node-name": "ro", "writable": True,
             "addr": {"type": "unix", "path": path}})

    async def test_duplicate_export_id_is_refused(self):
        await self.add_null("n")
        await self.add_export("e", "n", self.daemon.path("a.sock"))
        await self.assertError(
            "GenericError", "Block export id 'e' is already in use", "block-export-add",
            {"type": "vhost-user-blk", "id": "e", "node-name": "n",
             "addr": {"type": "unix", "path": self.daemon.path("b.sock")}})

    async def test_iothread_object_add_and_del(self):
        args = {"qom-type": "iothread", "id": "io0"}
        self.assertEqual(await self.execute("object-add", args), {})
        await self.assertError(
            "GenericError", "attempt to add duplicate property 'io0' to object (type 'container')",
            "object-add", args)
        self.assertEqual(await self.execute("object-del", {"id": "io0"}), {})
        await self.assertError("GenericError", "object 'io0' not found",
                               "object-del", {"id": "io0"})

    async def test_unknown_command_is_command_not_found(self):
        await self.assertError("CommandNotFound", "The command foo has not been found", "foo")

    async def test_qmp_capabilities_twice_is_command_not_found(self):
        await self.assertError("CommandNotFound",
                               "Capabilities negotiation is already complete, command ignored",
                               "qmp_capabilities")

    async def test_bad_arguments_get_qsd_messages(self):
        cases = [
            ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": "1"},
             "Invalid parameter type for 'size', expected: integer"),
            ("blockdev-add", {"driver": "null-co"},
             "'node-name' must be specified for the root node"),
            ("blockdev-add", {}, "Parameter 'driver' is missing"),
            ("blockdev-del", {}, "Parameter 'node-name' is missing"),
            ("blockdev-del", {"node-name": 1},
             "Invalid parameter type for 'node-name', expected: string"),
            ("query-version", {"x": 1}, "Parameter 'x' is unexpected"),
            ("block-export-del", {"id": "e", "mode": "x"},
             "Parameter 'mode' does not accept value 'x'"),
            ("object-del", {}, "Parameter 'id' is missing"),
        ]
        for command, arguments, desc in cases:
            with self.subTest(command=command, arguments=arguments):
                await self.assertError("GenericError", desc, command, arguments)

    async def test_argument_errors_come_before_lookups(self):
        # QSD checks the arguments against the schema before the command runs, so a wrong
        # argument is reported even when the job or node it names does not exist.
        cases = [
            ("block-job-set-speed", {"device": "m0", "speed": "fast"},
             "Invalid parameter type for 'speed', expected: integer"),
            ("block-job-set-speed", {"device": "m0"}, "Parameter 'speed' is missing"),
            ("block-job-cancel", {"device": "m0", "force": "yes"},
             "Invalid parameter type for 'force', expected: boolean"),
            ("block-job-resume", {"device": 1},
             "Invalid parameter type for 'device', expected: string"),
            ("block-job-change", {"id": "m0", "type": "mirror", "copy-mode": "fast"},
             "Parameter 'copy-mode' does not accept value 'fast'"),
            ("block-job-change", {"id": "m0", "type": "mirror"}, "Parameter 'copy-mode' is missing"),
            ("job-cancel", {"id": 2}, "Invalid parameter type for 'id', expected: string"),
            ("blockdev-mirror", {"device": "a", "target": "b", "sync": "full", "speed": "x"},
             "Invalid parameter type for 'speed', expected: integer"),
            ("blockdev-mirror", {"device": "a", "target": "b", "sync": "fast"},
             "Parameter 'sync' does not accept value 'fast'"),
            ("block-export-add", {"type": "vhost-user-blk", "id": "e", "node-name": "a",
                                  "writable": "x", "addr": {"type": "unix", "path": "/x.sock"}},
             "Invalid parameter type for 'writable', expected: boolean"),
            ("blockdev-add", {"driver": "file", "node-name": "n", "filename": "/nonexistent",
                              "read-only": "x"},
             "Invalid parameter type for 'read-only', expected: boolean"),
            ("object-add", {"qom-type": "iothread", "id": "io0", "poll-max-ns": "x"},
             "Invalid parameter type for 'poll-max-ns', expected: integer"),
            ("block-export-del", {"id": "e", "mode": 1},
             "Invalid parameter type for 'mode', expected: string"),
            ("query-named-block-nodes", {"flat": 1},
             "Invalid parameter type for 'flat', expected: boolean"),
        ] + [(command, {member: "m0", "x": 1}, "Parameter 'x' is unexpected")
             for command, member in [
                 ("block-job-pause", "device"), ("block-job-complete", "device"),
                 ("block-job-finalize", "id"), ("block-job-dismiss", "id"),
                 ("job-pause", "id"), ("job-resume", "id"), ("job-complete", "id"),
                 ("job-finalize", "id"), ("job-dismiss", "id"), ("block-export-del", "id")]
        ] + [(command, {"x": 1}, "Parameter 'x' is unexpected")
             for command in ["query-block-jobs", "query-jobs", "query-block-exports",
                             "query-commands", "quit"]]
        for command, arguments, desc in cases:
            with self.subTest(command=command, arguments=arguments):
                await self.assertError("GenericError", desc, command, arguments)

    async def test_query_named_block_nodes_describes_each_node_as_qsd_does(self):
        image = self.daemon.path("disk.img")
        with open(image, "wb") as f:
            f.write(b"x" * 8192)
            f.truncate(1 << 20)
        await self.execute("blockdev-add", {"driver": "file", "node-name": "disk",
                                            "filename": image, "cache": {"direct": True}})
        await self.execute("blockdev-add", {"driver": "file", "node-name": "ro",
                                            "filename": image, "read-only": True})
        await self.execute("blockdev-add", {"driver": "null-co", "node-name": "null0",
                                            "size": 8192, "read-zeroes": True})
        await self.add_null("null1", 4096)
        nodes = {n["node-name"]: n for n in await self.execute("query-named-block-nodes")}
        common = {"active": True, "backing_file_depth": 0, "encrypted": False,
                  "detect_zeroes": "off", "write_threshold": 0, "bps": 0, "bps_rd": 0,
                  "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}

        def file_node(name, ro, direct):
            return {**common, "node-name": name, "drv": "file", "ro": ro, "file": image,
                    "cache": {"writeback": True, "direct": direct, "no-flush": False},
                    "image": {"filename": image, "format": "file", "virtual-size": 1 << 20,
                              "actual-size": os.stat(image).st_blocks * 512,
                              "dirty-flag": False,
                              "format-specific": {"type": "file", "data": {}}}}

        def null_node(name, size, filename):
            return {**common, "node-name": name, "drv": "null-co", "ro": False,
                    "file": filename,
                    "cache": {"writeback": True, "direct": False, "no-flush": False},
                    "image": {"filename": filename, "format": "null-co", "virtual-size": size,
                              "actual-size": 0}}

        self.assertEqual(nodes, {
            "disk": file_node("disk", False, True),
            "ro": file_node("ro", True, False),
            "null0": null_node("null0", 8192,
                               'json:{"read-zeroes": true, "driver": "null-co", "size": 8192}'),
            "null1": null_node("null1", 4096, 'json:{"driver": "null-co", "size": 4096}'),
        })

    async def test_block_resize_grows_and_shrinks_a_file_node(self):
        image = self.daemon.path("disk.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        await self.execute("blockdev-add", {"driver": "file", "node-name": "disk",
                                            "filename": image})
        for size in (3 << 20, (1 << 20) + 100, 4096):
            with self.subTest(size=size):
                self.assertEqual(await self.execute("block_resize",
                                                    {"node-name": "disk", "size": size}), {})
                nodes = await self.execute("query-named-block-nodes")
                # The file takes the size; QEMU counts whole 512-byte sectors.
                self.assertEqual(os.path.getsize(image), size)
                self.assertEqual(nodes[0]["image"]["virtual-size"], (size + 511) // 512 * 512)

    async def test_block_resize_refusals_get_qsd_messages(self):
        image = self.daemon.path("ro.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        await self.execute("blockdev-add", {"driver": "file", "node-name": "ro",
                                            "filename": image, "read-only": True})
        await self.add_null("n")
        cases = [
            ({"node-name": "nope", "size": "x"},
             "Invalid parameter type for 'size', expected: integer"),
            ({"node-name": "n"}, "Parameter 'size' is missing"),
            ({"node-name": "nope", "size": 4096}, "Cannot find device='' nor node-name='nope'"),
            ({"device": "n", "size": 4096}, "Cannot find device='n' nor node-name=''"),
            ({"size": 4096}, "Cannot find device='' nor node-name=''"),
            ({"node-name": "n", "size": -1}, "Parameter 'size' expects a >0 size"),
            ({"node-name": "n", "size": 8192}, "Image format driver does not support resize"),
            ({"node-name": "ro", "size": 8192}, "Image is read-only"),
        ]
        for arguments, desc in cases:
            with self.subTest(arguments=arguments):
                await self.assertError("GenericError", desc, "block_resize", arguments)
        self.assertEqual(os.path.getsize(image), 1 << 20)

    async def test_quit_replies_and_exits_0(self):
        self.assertEqual(await self.execute("quit"), {})
        self.assertEqual(await asyncio.to_thread(self.daemon.wait), 0)


class RawBehaviour:
    """The same on a raw socket: framing, parse errors, negotiation, several clients."""

    binary = None

    def setUp(self):
        self.daemon = Daemon(self.binary)
        self.clients = []

    def tearDown(self):
        for client in self.clients:
            client.close()
        self.daemon.stop()

    def connect(self):
        client = RawClient(self.daemon.socket_path)
        self.clients.append(client)
        return client

    def test_commands_before_qmp_capabilities_are_refused(self):
        client = self.connect()
        greeting = client.receive()
        self.assertEqual(greeting["QMP"]["capabilities"], ["oob"])
        expecting = error("CommandNotFound",
                          "Expecting capabilities negotiation with 'qmp_capabilities'")
        self.assertEqual(client.execute("query-version"), expecting)
        self.assertEqual(client.execute("foo"), expecting)
        self.assertEqual(client.execute("qmp_capabilities", {"enable": ["oob"]}),
                         {"return": {}})
        self.assertIn("return", client.execute("query-version"))

    def test_malformed_json_gets_an_error_and_the_connection_still_answers(self):
        client = self.connect()
        client.negotiate()
        client.send("garbage\n")
        self.assertEqual(client.receive(),
                         error("GenericError", "JSON parse error, invalid keyword 'garbage'"))
        client.send('{"a" 1}')
        self.assertEqual(client.receive(),
                         error("GenericError", "JSON parse error, missing : in object pair"))
        client.send("}")
        self.assertEqual(client.receive(),
                         error("GenericError", "JSON parse error, expecting value"))
        client.send('{"execute": "query-version", "id": 7}')
        reply = client.receive()
        self.assertEqual((reply["id"], reply["return"]["qemu"]), (7, QEMU_VERSION))

    def test_request_envelope_errors(self):
        client = self.connect()
        client.negotiate()
        cases = [
            ("[]", "QMP input must be a JSON object", None),
            ('{"id": 3}', "QMP input lacks member 'execute'", 3),
            ('{"execute": 1}', "QMP input member 'execute' must be a string", None),
            ('{"execute": "query-version", "arguments": []}',
             "QMP input member 'arguments' must be an object", None),
            ('{"execute": "query-version", "foo": 1, "id": "x"}',
             "QMP input member 'foo' is unexpected", "x"),
            ('{"exec-oob": "query-version"}', "QMP input member 'exec-oob' is unexpected", None),
        ]
        for text, desc, request_id in cases:
            with self.subTest(text=text):
                client.send(text)
                expected = error("GenericError", desc)
                if request_id is not None:
                    expected["id"] = request_id
                self.assertEqual(client.receive(), expected)

    def test_parse_errors_get_qsd_messages(self):
        client = self.connect()
        client.negotiate()
        cases = [
            ('{1: 2}', "JSON parse error, key is not a string in object"),
            ('{"a": 1 "b": 2}', "JSON parse error, expected separator in dict"),
            ("[1 2]", "JSON parse error, expected separator in list"),
            ('{"a": 1,}', "JSON parse error, expecting value"),
            ("[1,]", "JSON parse error, expecting value"),
            ('{"a": tru}', "JSON parse error, invalid keyword 'tru'"),
            ('{"a": "\\x"}', "JSON parse error, invalid escape sequence in string"),
            ("{]", "JSON parse error, expecting value"),
            ("true ", "QMP input must be a JSON object"),
            ("null ", "QMP input must be a JSON object"),
            ('"x"', "QMP input must be a JSON object"),
        ]
        for text, desc in cases:
            with self.subTest(text=text):
                client.send(text)
                self.assertEqual(client.receive(), error("GenericError", desc))

    def test_texts_split_across_writes_and_joined_in_one_write(self):
        client = self.connect()
        client.negotiate()
        client.send('{"exec')
        time.sleep(0.05)
        client.send('ute": "query-version", "id": 1}{"execute": "query-version", "id": 2}\n'
                    "{'execute': 'query-version', 'id': 'single \\'quoted\\''}")
        ids = [client.receive()["id"] for _ in range(3)]
        self.assertEqual(ids, [1, 2, "single 'quoted'"])

    def test_ids_of_any_type_are_echoed(self):
        client = self.connect()
        client.negotiate()
        for request_id in [None, [1, {"a": "é"}], "x", 1500]:
            with self.subTest(id=request_id):
                client.send(json.dumps({"execute": "query-version", "id": request_id}))
                self.assertEqual(client.receive()["id"], request_id)

    def test_replies_are_byte_identical(self):
        client = self.connect()
        client.receive_line()
        client.send('{"execute": "qmp_capabilities", "id": "a/\u00e9\\u007f"}')
        self.assertEqual(client.receive_line(),
                         b'{"return": {}, "id": "a/\\u00E9\\u007F"}\r\n')
        client.send('{"execute": "foo", "id": [1, {}, null, true, 1.5e3]}')
        self.assertEqual(
            client.receive_line(),
            b'{"id": [1, {}, null, true, 1500], "error": {"class": "CommandNotFound", '
            b'"desc": "The command foo has not been found"}}\r\n')

    def test_pretty_replies_are_byte_identical(self):
        self.daemon.stop()
        self.daemon = Daemon(self.binary, monitor="chardev=m,pretty=on")
        client = self.connect()
        greeting = client.receive_pretty()
        self.assertTrue(greeting.startswith(b'{\r\n    "QMP": {\r\n        "version": {\r\n'
                                            b'            "qemu": {\r\n                "micro": 2,'
                                            b'\r\n                "minor": 0,\r\n'),
                        greeting)
        self.assertTrue(greeting.endswith(b'        "capabilities": [\r\n            "oob"\r\n'
                                          b'        ]\r\n    }\r\n}\r\n'), greeting)
        client.send('{"execute": "qmp_capabilities"}')
        self.assertEqual(client.receive_pretty(), b'{\r\n    "return": {\r\n    }\r\n}\r\n')
        client.send('{"execute": "foo", "id": [1]}')
        self.assertEqual(
            client.receive_pretty(),
            b'{\r\n    "id": [\r\n        1\r\n    ],\r\n'
            b'    "error": {\r\n        "class": "CommandNotFound",\r\n'
            b'        "desc": "The command foo has not been found"\r\n    }\r\n}\r\n')

    def test_a_client_reading_late_gets_every_reply_in_order(self):
        client = self.connect()
        client.negotiate()
        count = 3000  # about 2 MB of replies: far more than a socket buffer holds
        client.send("".join(json.dumps({"execute": "query-commands", "id": i})
                            for i in range(count)))
        time.sleep(0.5)
        ids = [client.receive()["id"] for _ in range(count)]
        self.assertEqual(ids, list(range(count)))

    def test_quit_deletes_exports_before_it_replies(self):
        client = self.connect()
        client.negotiate()
        client.execute("blockdev-add", {"driver": "null-co", "node-name": "n"})
        client.execute("block-export-add", {
            "type": "vhost-user-blk", "id": "e", "node-name": "n",
            "addr": {"type": "unix", "path": self.daemon.path("vhost.sock")}})
        event = client.execute("quit")
        self.assertEqual((event["event"], event["data"]), ("BLOCK_EXPORT_DELETED", {"id": "e"}))
        self.assertEqual(client.receive(), {"return": {}})
        self.assertIsNone(client.receive())
        self.assertEqual(self.daemon.wait(), 0)
        self.assertFalse(os.path.exists(self.daemon.path("vhost.sock")))

    def test_sigterm_exits_0_and_removes_the_socket(self):
        self.daemon.process.terminate()
        self.assertEqual(self.daemon.wait(), 0)
        self.assertFalse(os.path.exists(self.daemon.socket_path))

    def test_quit_closes_the_connection_and_exits_0(self):
        client = self.connect()
        client.negotiate()
        self.assertEqual(client.execute("quit"), {"return": {}})
        self.assertIsNone(client.receive())
        self.assertEqual(self.daemon.wait(), 0)
        self.assertFalse(os.path.exists(self.daemon.socket_path))


class RingblkOnly(unittest.TestCase):
    """ringblk's own answers: where it differs from QSD on purpose, and its bounds.

    QSD's socket chardev serves one client at a time (a second one waits, unanswered, until
    the first disconnects); ringblk serves several at once, each with its own state.
    """

    def setUp(self):
        self.daemon = Daemon(RINGBLK)
        self.clients = []

    def tearDown(self):
        for client in self.clients:
            client.close()
        self.daemon.stop()

    def connect(self):
        client = RawClient(self.daemon.socket_path)
        self.clients.append(client)
        return client

    def test_two_clients_have_their_own_state_and_both_get_events(self):
        first, second = self.connect(), self.connect()
        first.negotiate()
        second.receive()  # greeting; `second` has not negotiated yet
        self.assertEqual(second.execute("query-version")["error"]["class"], "CommandNotFound")
        self.assertEqual(first.execute("blockdev-add", {"driver": "null-co", "node-name": "n"}),
                         {"return": {}})
        self.assertEqual(second.execute("qmp_capabilities"), {"return": {}})
        args = {"type": "vhost-user-blk", "id": "e", "node-name": "n",
                "addr": {"type": "unix", "path": self.daemon.path("vhost.sock")}}
        self.assertEqual(second.execute("block-export-add", args), {"return": {}})
        first.send('{"execute": "block-export-del", "arguments": {"id": "e"}}')
        for client in (first, second):
            event = client.receive()
            self.assertEqual((event["event"], event["data"]), ("BLOCK_EXPORT_DELETED", {"id": "e"}))
        self.assertEqual(first.receive(), {"return": {}})

    def test_quit_closes_every_connection_and_exits_0(self):
        first, second = self.connect(), self.connect()
        first.negotiate()
        second.negotiate()
        self.assertEqual(first.execute("quit"), {"return": {}})
        self.assertIsNone(first.receive())
        self.assertIsNone(second.receive())
        self.assertEqual(self.daemon.wait(), 0)
        self.assertFalse(os.path.exists(self.daemon.socket_path))


    def test_block_resize_of_an_exported_node_without_a_frontend(self):
        # QSD 10.0.2 dies here, without a message: its vhost-user-blk export tells a frontend
        # that is not connected. ringblk resizes; the next frontend reads the new capacity.
        client = self.connect()
        client.negotiate()
        image = self.daemon.path("disk.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        client.execute("blockdev-add", {"driver": "file", "node-name": "disk", "filename": image})
        client.execute("block-export-add", {"type": "vhost-user-blk", "id": "e",
                                            "node-name": "disk", "writable": True,
                                            "addr": {"type": "unix",
                                                     "path": self.daemon.path("v.sock")}})
        self.assertEqual(client.execute("block_resize", {"node-name": "disk", "size": 2 << 20}),
                         {"return": {}})
        self.assertEqual(os.path.getsize(image), 2 << 20)
        self.assertEqual(client.execute("query-block-exports")["return"][0]["node-name"], "disk")

    def test_greeting_names_ringblk_and_matches_qsd_byte_for_byte_otherwise(self):
        client = RawClient(self.daemon.socket_path)
        raw = client.sock.recv(4096)
        client.close()
        self.assertEqual(
            raw,
            b'{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, '
            b'"package": "ringblk 0.1.0"}, "capabilities": ["oob"]}}\r\n')

    def test_query_commands_lists_exactly_the_implemented_commands(self):
        client = RawClient(self.daemon.socket_path)
        client.negotiate()
        names = {c["name"] for c in client.execute("query-commands")["return"]}
        client.close()
        self.assertEqual(names, {
            "qmp_capabilities", "query-version", "query-commands", "quit",
            "blockdev-add", "blockdev-del", "query-named-block-nodes", "block_resize",
            "block-set-write-threshold",
            "block-export-add", "block-export-del", "query-block-exports",
            "nbd-server-start", "nbd-server-stop",
            "x-debug-query-block-graph",
            "object-add", "object-del",
            "blockdev-mirror", "query-block-jobs", "query-jobs",
            "block-job-complete", "block-job-cancel", "block-job-pause", "block-job-resume",
            "block-job-finalize", "block-job-dismiss", "block-job-set-speed", "block-job-change",
            "job-complete", "job-cancel", "job-pause", "job-resume", "job-finalize", "job-dismiss",
        })

    def test_endless_text_gets_an_error_and_a_disconnect_and_the_daemon_lives_on(self):
        client = RawClient(self.daemon.socket_path)
        client.negotiate()
        client.send('{"execute": "query-version", "id": "')
        chunk = b"x" * 65536
        try:
            for _ in range(64):  # 4 MiB, well past the bound
                client.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # disconnected while sending: the error reply may still be readable
        self.assertEqual(client.receive(),
                         error("GenericError", "JSON text longer than 1048576 bytes"))
        try:
            self.assertIsNone(client.receive())
        except ConnectionResetError:
            pass  # closed with our unread bytes in its queue: Linux reports a reset
        client.close()
        other = RawClient(self.daemon.socket_path)
        other.negotiate()
        self.assertIn("return", other.execute("query-version"))
        other.close()

    def test_a_client_that_never_reads_is_disconnected_and_the_daemon_lives_on(self):
        client = self.connect()
        client.negotiate()
        request = json.dumps({"execute": "query-commands"}).encode()
        # Each reply is about 300 bytes: 60000 of them are twice the 8 MiB bound.
        try:
            client.send(request * 60000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        replies = 0
        try:
            while client.receive() is not None:
                replies += 1
        except ConnectionResetError:
            pass
        self.assertLess(replies, 60000)
        self.assertIn("QMP client does not read its replies", self.daemon.stderr())
        other = self.connect()
        other.negotiate()
        self.assertIn("return", other.execute("query-version"))

    def test_events_wait_for_negotiation(self):
        silent, talker = RawClient(self.daemon.socket_path), RawClient(self.daemon.socket_path)
        silent.receive()
        talker.negotiate()
        talker.execute("blockdev-add", {"driver": "null-co", "node-name": "n"})
        talker.execute("block-export-add", {"type": "vhost-user-blk", "id": "e", "node-name": "n",
                                            "addr": {"type": "unix",
                                                     "path": self.daemon.path("v.sock")}})
        talker.send('{"execute": "block-export-del", "arguments": {"id": "e"}}')
        self.assertEqual(talker.receive()["event"], "BLOCK_EXPORT_DELETED")
        # `silent` got nothing: its next message is the reply to its own request.
        self.assertEqual(silent.execute("qmp_capabilities"), {"return": {}})
        silent.close()
        talker.close()



class RingblkQmp(QmpBehaviour, unittest.IsolatedAsyncioTestCase):
    binary = RINGBLK


class RingblkRaw(RawBehaviour, unittest.TestCase):
    binary = RINGBLK


@unittest.skipIf(QSD is None, "qemu-storage-daemon not found (set QSD)")
class QsdQmp(QmpBehaviour, unittest.IsolatedAsyncioTestCase):
    binary = QSD


@unittest.skipIf(QSD is None, "qemu-storage-daemon not found (set QSD)")
class QsdRaw(RawBehaviour, unittest.TestCase):
    binary = QSD


if __name__ == "__main__":
    if not os.path.exists(RINGBLK):
        sys.exit(f"ringblk binary {RINGBLK} not found: build it or set RINGBLK")
    unittest.main()
