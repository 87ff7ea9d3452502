#!/usr/bin/env python3
"""block_resize seen by a real guest, ringblk beside qemu-storage-daemon (QSD).

A 1 MiB image is exported over vhost-user-blk and a guest (tests/guest/guest.py: QEMU, TCG here)
boots on it. Once the guest has its disk, the test grows the node to 2 MiB with `block_resize`;
the daemon tells QEMU (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG), QEMU tells the guest's driver, and
the guest's fio then writes and verifies the new second MiB, which did not exist when it booted.
No reboot, no reconnect.

Skips with one SKIP line when QEMU or the built guest (tests/guest/build.sh) is missing.
Environment and run: as test_qmp.py.
"""

import os
import sys
import threading
import unittest

from test_qmp import QSD, RINGBLK, Daemon, RawClient

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "guest"))
import guest  # noqa: E402

MiB = 1 << 20
BOOT_TIMEOUT_S = 240

# The first job runs on the disk as it booted and, after it, waits (at most 60 s) for the
# capacity to grow past 1 MiB; the second, started only then (stonewall), writes and verifies
# the new MiB: fio opens the disk afresh and fails if the guest still sees 1 MiB.
JOB = f"""[global]
filename=/dev/vda
ioengine=libaio
direct=1
bs=4k

[as-booted]
rw=read
size=64k
exec_postrun=sh -c 'i=0; while [ $(cat /sys/block/vda/size) -le {MiB // 512} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done'

[grown]
stonewall
rw=write
offset={MiB}
size={MiB}
verify=crc32c
do_verify=1
"""

_unavailable = guest.missing()


class ResizeBehaviour:
    binary = None

    def test_guest_sees_a_grown_disk_without_reboot(self):
        if _unavailable:
            print(f"SKIP: guest resize test: missing {'; '.join(_unavailable)}", file=sys.stderr)
            self.skipTest("guest unavailable")
        daemon = Daemon(self.binary)
        self.addCleanup(daemon.stop)
        image = daemon.path("disk.img")
        with open(image, "wb") as f:
            f.truncate(MiB)
        client = RawClient(daemon.socket_path)
        self.addCleanup(client.close)
        client.negotiate()
        vhost = daemon.path("vhost.sock")
        for command, arguments in [
            ("blockdev-add", {"driver": "file", "node-name": "disk", "filename": image}),
            ("block-export-add", {"type": "vhost-user-blk", "id": "e", "node-name": "disk",
                                  "writable": True, "addr": {"type": "unix", "path": vhost}}),
        ]:
            self.assertEqual(client.execute(command, arguments), {"return": {}})
        replies = []
        resized = threading.Event()

        def on_console(line):
            # The guest has its disk (at 1 MiB) and is about to run the job: grow it now.
            if line.startswith(guest.READY_MARK) and not resized.is_set():
                replies.append(client.execute("block_resize",
                                              {"node-name": "disk", "size": 2 * MiB}))
                resized.set()

        job_file = daemon.path("resize.fio")
        with open(job_file, "w") as f:
            f.write(JOB)
        result = guest.boot(vhost, job_file, timeout=BOOT_TIMEOUT_S, on_console=on_console)
        self.assertEqual(replies, [{"return": {}}], "\n".join(result.console[-30:]))
        self.assertIsNone(result.problem(), "\n".join(result.console[-30:]))
        grown = [j for j in result.fio_json["jobs"] if j["jobname"] == "grown"]
        self.assertEqual(grown[0]["write"]["io_bytes"], MiB,
                         "the guest wrote the MiB it gained")
        self.assertEqual(os.path.getsize(image), 2 * MiB)
        nodes = client.execute("query-named-block-nodes")["return"]
        self.assertEqual(nodes[0]["image"]["virtual-size"], 2 * MiB)


class Ringblk(ResizeBehaviour, unittest.TestCase):
    binary = RINGBLK


@unittest.skipIf(QSD is None, "qemu-storage-daemon not found (set QSD)")
class Qsd(ResizeBehaviour, unittest.TestCase):
    binary = QSD


if __name__ == "__main__":
    unittest.main()
