"""A throwaway single-node Ceph cluster with a RADOS Gateway, on loopback, without systemd.

One monitor, one BlueStore OSD on a sparse file and one radosgw, run in the foreground from
a temporary directory and stopped (gateway first, then OSD, then monitor) at the end. No
ceph-mgr: the gateway creates its pools through the monitor and needs nothing else, and
the cluster stays near 200 MB of memory instead of about 730 MB.

Measured here (Ceph 16.2 from Debian 12): the monitor answers 0.2 s after start, the OSD
is up 1.5 s later, the gateway serves 0.7 s after that.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ACCESS_KEY = "LAMINATESTACCESS"
SECRET_KEY = "lamina-test-secret-key-0123456789"
# Ports are taken from one block below Linux's ephemeral range (32768+), so that no
# client socket of a concurrent test grabs one between our check and the daemon's bind.
_PORT_BLOCK = 40
_PORT_LOW, _PORT_HIGH = 20000, 32000
_PREFIX = "lamina-ceph-"


def _port_block() -> int:
    """The first port of ``_PORT_BLOCK`` consecutive free loopback ports."""
    rng = int.from_bytes(os.urandom(4), "little")
    for attempt in range(200):
        base = _PORT_LOW + (rng + attempt * 7919) % (_PORT_HIGH - _PORT_LOW - _PORT_BLOCK)
        if all(_free(base + i) for i in range(_PORT_BLOCK)):
            return base
    raise RuntimeError("no block of free loopback ports for the Ceph test cluster")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _remove_orphans() -> None:
    """Folders of clusters whose test run was killed outright (its daemons died with it)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        try:
            owner = int((folder / "owner").read_text())
        except (OSError, ValueError):
            continue
        if not Path(f"/proc/{owner}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path.name}: no log)"
    return "\n".join(text[-lines:])


class CephCluster:
    """``start()`` brings it up (RuntimeError with the failing daemon's log tail when it
    does not come up in ``timeout`` seconds); ``stop()`` ends every daemon it started."""

    def __init__(
        self, base: Path | None = None, *, timeout: float = 60.0, attempts: int = 2
    ) -> None:
        if shutil.which("radosgw") is None or shutil.which("ceph-osd") is None:
            raise RuntimeError("Ceph is not installed (make deps installs it)")
        if base is None:
            _remove_orphans()
        self.base = base or Path(tempfile.mkdtemp(prefix=_PREFIX))
        self.timeout = timeout
        self.attempts = attempts
        self.conf = self.base / "ceph.conf"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._ports()

    def _ports(self) -> None:
        """A fresh folder (owned by this process), fsid and port block."""
        shutil.rmtree(self.base, ignore_errors=True)
        self.base.mkdir(parents=True)
        (self.base / "owner").write_text(str(os.getpid()))
        self.fsid = str(uuid.uuid4())
        port = _port_block()
        self.mon_port, self.rgw_port = port, port + 1
        self.ms_ports = (port + 2, port + _PORT_BLOCK - 1)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.rgw_port}"

    def env(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """The environment that points a lamina home at ``s3://bucket/prefix`` here."""
        url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        return {
            "LAMINA_STORE_URL": url,
            "LAMINA_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    def client(self, *, secret: str = SECRET_KEY, endpoint_url: str | None = None) -> Any:
        """A boto3 client for the gateway (``secret``, ``endpoint_url``: to provoke errors)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"},
                max_pool_connections=16,
                retries={"max_attempts": 1 if endpoint_url else 3, "mode": "standard"},
            ),
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> CephCluster:
        """Up, or RuntimeError; a port taken between our check and a daemon's bind (another
        test's client socket, say) costs one more attempt on other ports."""
        for attempt in range(self.attempts):
            try:
                self._start()
                return self
            except RuntimeError as exc:
                self.stop(keep=True)
                if "Address already in use" not in str(exc) or attempt + 1 == self.attempts:
                    self.stop()
                    raise
                self._ports()
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _start(self) -> None:
        for sub in ("run", "log", "mon", "osd/ceph-0", "rgw"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        keyring = self.base / "keyring"
        self._run("ceph-authtool", "--create-keyring", str(keyring), "--gen-key", "-n", "mon.")
        monmap = self.base / "monmap"
        addr = f"[v2:127.0.0.1:{self.mon_port}]"
        self._run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", addr, str(monmap))
        self._run("ceph-mon", "-c", str(self.conf), "-i", "a", "--mkfs", "--monmap", str(monmap))
        self._daemon("mon", "ceph-mon", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        self._wait("mon", lambda: self._ceph("osd", "new", osd_uuid) is not None)
        self._run("ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        self._daemon("osd", "ceph-osd", "-i", "0")
        self._wait("osd", self._osd_up)
        self._run(
            "radosgw-admin", "-c", str(self.conf), "user", "create", "--uid", "lamina",
            "--display-name", "lamina tests", "--access-key", ACCESS_KEY,
            "--secret-key", SECRET_KEY,
        )  # fmt: skip
        self._daemon("rgw", "radosgw", "-n", "client.rgw.a")
        self._wait("rgw", self._rgw_answers)

    def _config(self) -> str:
        b = self.base
        low, high = self.ms_ports
        return f"""[global]
fsid = {self.fsid}
mon host = [v2:127.0.0.1:{self.mon_port}]
public addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
ms bind port min = {low}
ms bind port max = {high}
# a port in use fails the start in 2 s, not 15 (a second attempt takes other ports)
ms bind retry count = 2
ms bind retry delay = 1
auth cluster required = none
auth service required = none
auth client required = none
# without it radosgw keeps retrying authentication with the monitor for 300 s
ms mon client mode = crc
run dir = {b}/run
admin socket = {b}/run/$name.asok
pid file = {b}/run/$name.pid
log file = {b}/log/$name.log
keyring = {b}/keyring
mon data = {b}/mon/$name
osd data = {b}/osd/ceph-$id
mon data avail warn = 1
mon data avail crit = 0
# proposals every 50 ms instead of 1 s: the first start takes 4 s instead of 18 s
paxos propose interval = 0.05
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd objectstore = bluestore
# outside the OSD's directory: Ceph links it there as `block` (a path inside is ELOOP)
bluestore block path = {b}/block-$id
bluestore block size = {32 << 30}
bluestore block create = true
bluestore block db create = false
bluestore block wal create = false
osd memory target = {896 << 20}

[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{self.rgw_port}
rgw data = {b}/rgw
"""

    def _run(self, *cmd: str) -> None:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=self.timeout, check=False
        )
        if proc.returncode != 0:
            detail = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
            raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{detail}")

    def _ceph(self, *args: str) -> Any:
        """The JSON answer of a `ceph` command, or None when the monitor does not answer."""
        try:
            proc = subprocess.run(
                ["ceph", "-c", str(self.conf), "--connect-timeout", "5", *args, "-f", "json"],
                capture_output=True, text=True, timeout=15, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return None
        if proc.returncode != 0:
            return None
        return json.loads(proc.stdout or "null")

    def _daemon(self, name: str, *cmd: str) -> None:
        with open(self.base / "log" / f"{name}.out", "ab") as out:
            self.procs[name] = subprocess.Popen(
                # a test run killed outright takes its daemons with it
                ["setpriv", "--pdeathsig", "KILL", "--",
                 cmd[0], "-c", str(self.conf), "-f", *cmd[1:]],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip

    def _osd_up(self) -> bool:
        stat = self._ceph("osd", "stat")
        return bool(stat) and int(stat.get("num_up_osds", 0)) >= 1

    def _rgw_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer: the gateway is serving
        except OSError:
            return False

    def _wait(self, name: str, ready: Any) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            for daemon, proc in self.procs.items():
                if proc.poll() is not None:
                    self._fail(daemon, f"exited with {proc.returncode}")
            if ready():
                return
            if time.monotonic() > deadline:
                self._fail(name, f"not ready within {self.timeout:.0f} s")
            time.sleep(0.1)

    def _fail(self, daemon: str, why: str) -> None:
        logs = self.base / "log"
        names = {"mon": "mon.a", "osd": "osd.0", "rgw": "client.rgw.a"}
        raise RuntimeError(
            f"Ceph test cluster: {daemon} {why}\n"
            f"--- {daemon}.out\n{_tail(logs / f'{daemon}.out')}\n"
            f"--- {names[daemon]}.log\n{_tail(logs / f'{names[daemon]}.log')}"
        )

    def stop(self, *, keep: bool = False) -> None:
        """End every daemon (and remove the cluster's folder unless ``keep``)."""
        # The gateway first: an OSD stopped under it leaves it retrying for minutes.
        for name in ("rgw", "osd", "mon"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        if not keep:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.base)
