"""One driver per storage prefix, and Ray's surface (issue 19): the storage lease, --connect-timeout, authentication,
a local Ray on loopback only with no token file, no credentials in run.json."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_STUDY
from tests.hostile import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_a_storage_prefix_has_one_driver(tmp_path):
    from harness.orchestrate._storage import Storage, StorageLease
    from harness.results.store import RunLocked

    storage = Storage(tmp_path / "shared")
    first = StorageLease(storage, "tiny/default", tmp_path / "runs-a", settle_s=0.01).acquire()
    held = json.loads((tmp_path / "shared" / "tiny" / "default" / ".lease").read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"] <= time.time()
    with pytest.raises(RunLocked, match=r"another driver uses the storage prefix .* pid \d+ on .*runs-a"):
        StorageLease(storage, "tiny/default", tmp_path / "runs-b", settle_s=0.01).acquire()
    StorageLease(storage, "other/default", tmp_path / "runs-b", settle_s=0.01).acquire().release()  # other prefix
    first.release()
    assert not (tmp_path / "shared" / "tiny" / "default" / ".lease").exists()
    StorageLease(storage, "tiny/default", tmp_path / "runs-b", settle_s=0.01).acquire().release()


def test_a_lease_is_refreshed_and_taken_over_only_when_stale(tmp_path):
    from harness.orchestrate._storage import Storage, StorageLease
    from harness.results.store import RunLocked

    storage = Storage(tmp_path)
    lease = StorageLease(storage, "p", refresh_s=0.05, settle_s=0.01).acquire()
    t0 = json.loads((tmp_path / "p" / ".lease").read_text())["refreshed"]
    time.sleep(0.3)
    assert json.loads((tmp_path / "p" / ".lease").read_text())["refreshed"] > t0
    lease._stop.set()  # the driver hangs: no more refreshes
    lease._thread.join()
    time.sleep(0.2)
    with pytest.raises(RunLocked):
        StorageLease(storage, "p", stale_s=60, settle_s=0.01).acquire()
    StorageLease(storage, "p", stale_s=0.1, settle_s=0.01).acquire().release()  # not refreshed for 0.1 s: stale
    # Another host's lease, fresh: refused; a dead driver on this host: taken over at once.
    other = {"token": "x", "host": "elsewhere", "pid": 1, "started": time.time(), "refreshed": time.time()}
    (tmp_path / "p" / ".lease").write_text(json.dumps(other))
    with pytest.raises(RunLocked, match="on elsewhere"):
        StorageLease(storage, "p", settle_s=0.01).acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = {**other, "host": socket.gethostname(), "pid": int(dead.stdout)}
    (tmp_path / "p" / ".lease").write_text(json.dumps(here))
    StorageLease(storage, "p", settle_s=0.01).acquire().release()


def test_two_drivers_with_other_runs_folders_cannot_share_a_storage(tmp_path, monkeypatch, capsys):
    from harness.orchestrate._storage import Storage, StorageLease

    lease = StorageLease(Storage(tmp_path / "shared"), "tiny/default", tmp_path / "elsewhere", settle_s=0.01).acquire()
    try:
        rc, output, outside = run_cli(tmp_path, TINY_STUDY, ["--storage", str(tmp_path / "shared")], monkeypatch,
                                      capsys)
    finally:
        lease.release()
    assert rc == 2 and "another driver uses the storage prefix" in output and "Traceback" not in output


# ----------------------------------------------------------------------------- Ray's surface


def test_address_gives_up_after_the_connect_timeout_naming_it(tmp_path, monkeypatch, capsys):
    t0 = time.perf_counter()
    rc, output, _ = run_cli(tmp_path, TINY_STUDY, ["--address", "127.0.0.1:1", "--connect-timeout", "1"],
                            monkeypatch, capsys)
    assert rc == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in output and "--connect-timeout" in output
    assert time.perf_counter() - t0 < 30


def test_disabled_authentication_is_said_and_a_readable_token_file_is_made_private(tmp_path, monkeypatch, capsys):
    from harness.orchestrate._cluster import _check_authentication

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("secret")
    token.chmod(0o644)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    said = []
    _check_authentication(None, said.append)
    assert "RAY_AUTH_MODE=disabled: Ray's token authentication is OFF" in capsys.readouterr().err
    assert token.stat().st_mode & 0o777 == 0o600 and "made it 0600" in said[0]
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    _check_authentication(None, said.append)
    assert "OFF" not in capsys.readouterr().err


LISTENERS = ("""
import json, os, sys
sys.path.insert(0, {root!r})
from harness import orchestrate
import psutil  # Ray's own copy (ray/thirdparty_files), on the path once Ray is imported
orchestrate.start_ray(None, num_cpus=1, dashboard=True)
import ray
ray.get(ray.remote(lambda: 1).remote())
mine = {{p.pid for p in psutil.Process().children(recursive=True)}} | {{os.getpid()}}
found = sorted({{c.laddr.ip for c in psutil.net_connections("inet") """
             """if c.status == psutil.CONN_LISTEN and c.pid in mine}})
orchestrate.shutdown()
print(json.dumps({{"listen": found, "token_in_env": bool(os.environ.get("RAY_AUTH_TOKEN"))}}))
""")


@pytest.mark.slow
def test_a_local_ray_listens_on_loopback_only_and_writes_no_token_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="token")
    out = subprocess.run([sys.executable, "-c", LISTENERS.format(root=str(ROOT))], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["listen"] and set(seen["listen"]) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, seen
    assert seen["token_in_env"]  # this run's own token, in its processes' environment
    assert not (tmp_path / ".ray" / "auth_token").exists()
