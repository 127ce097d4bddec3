"""The real S3 server the shared-tier tests run against: a throwaway Ceph RGW (tools/ceph_s3.sh).

``.ci/run`` starts it and exports ``TIERSTORE_TEST_S3_*``; without those variables the
session fixture starts one itself when it can (root, Ceph's packages installed) and stops
it at the end. Otherwise the shared-tier tests skip, saying why.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "ceph_s3.sh"


@dataclass(frozen=True)
class S3Server:
    """Where the test server listens, and how to stop and start its gateway (if we may)."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    ceph_dir: str | None

    def rgw(self, action: str) -> None:
        """``rgw-stop`` or ``rgw-start`` the gateway (the cluster stays up)."""
        assert self.ceph_dir is not None
        port = self.endpoint.rsplit(":", 1)[1]
        subprocess.run(["bash", str(SCRIPT), action], check=True, timeout=60, capture_output=True,
                       env={**os.environ, "CEPH_DIR": self.ceph_dir, "RGW_PORT": port})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _from_env() -> S3Server | None:
    env = os.environ
    if not env.get("TIERSTORE_TEST_S3_ENDPOINT"):
        return None
    return S3Server(env["TIERSTORE_TEST_S3_ENDPOINT"], env.get("TIERSTORE_TEST_S3_BUCKET", "tierstore-ci"),
                    env.get("TIERSTORE_TEST_S3_ACCESS_KEY", "ciaccesskey"),
                    env.get("TIERSTORE_TEST_S3_SECRET_KEY", "cisecretkey123"),
                    env.get("TIERSTORE_TEST_CEPH_DIR") or None)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A running S3 server (Ceph RGW), from the environment or started for this session."""
    reason = os.environ.get("TIERSTORE_TEST_S3_UNAVAILABLE")
    if reason:
        pytest.skip(f"no S3 server for the shared-tier tests: {reason}")
    found = _from_env()
    if found is not None:
        yield found
        return
    missing = [tool for tool in ("ceph-mon", "ceph-osd", "radosgw", "curl") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no S3 server for the shared-tier tests: TIERSTORE_TEST_S3_ENDPOINT is unset and Ceph is "
                    f"not installed ({', '.join(missing)} missing; apt-get install -y --no-install-recommends "
                    "ceph-mon ceph-osd radosgw ceph-common curl, or run bash .ci/run)")
    if os.geteuid() != 0:
        pytest.skip("no S3 server for the shared-tier tests: TIERSTORE_TEST_S3_ENDPOINT is unset and starting "
                    "Ceph here needs root (bash tools/ceph_s3.sh start, then export its env file)")
    ceph_dir = tempfile.mkdtemp(prefix="tierstore-ceph-")
    port, mon = _free_port(), _free_port()
    env = {**os.environ, "CEPH_DIR": ceph_dir, "RGW_PORT": str(port), "MON_PORT": str(mon)}
    try:
        subprocess.run(["bash", str(SCRIPT), "start"], check=True, timeout=240, capture_output=True, text=True,
                       env=env)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        subprocess.run(["bash", str(SCRIPT), "stop"], timeout=60, capture_output=True, env=env)
        tail = (getattr(exc, "stderr", "") or "")[-800:]
        pytest.skip(f"no S3 server for the shared-tier tests: tools/ceph_s3.sh start failed: {tail}")
    try:
        yield S3Server(f"http://127.0.0.1:{port}", "tierstore-ci", "ciaccesskey", "cisecretkey123", ceph_dir)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], timeout=120, capture_output=True, env=env)
