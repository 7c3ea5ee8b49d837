"""A study on a Ray cluster simulated on this machine (ray.cluster_utils.Cluster: three nodes of one CPU,
loopback only), joined with `--address` as on a real cluster: trials spread over the nodes, a node removed
mid-study, the driver killed with SIGKILL, a hung trial, and storage that one node cannot see."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cluster():
    assert os.environ["RAY_AUTH_MODE"] == "token"  # the harness's setting (conftest): every node and driver shares it
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def command(study: Path, tmp_path: Path, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness.run", str(study), "--address", address, "--runs-dir", str(tmp_path / "runs"),
            "--reports-dir", str(tmp_path / "reports"), *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(condition, timeout: float = 240, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def checkpointed(run_dir: Path, epoch_index: int = 1) -> set[str]:
    """Trials with a Tune checkpoint of at least epoch `epoch_index + 1` on storage."""
    return {p.parent.name for p in (run_dir / "ray" / "tune").glob(f"*/*/checkpoint_{epoch_index:06d}")}


def finished(run_dir: Path) -> dict[str, int]:
    out = {}
    for path in (run_dir / "trials").glob("*/result.json"):
        try:
            if json.loads(path.read_text())["status"] == "finished":
                out[path.parent.name] = path.stat().st_mtime_ns
        except (ValueError, OSError):
            pass
    return out


STUDY_ARGS = ("--set", "seeds=[0, 1]", "--set", "train.epochs=6")  # 8 trials of ~10 s on one CPU each


def test_node_removed_mid_study_trials_resume_elsewhere_and_rerun_trains_nothing(cluster, tiny_study, tmp_path):
    run_dir = tmp_path / "runs" / "tiny" / "default"
    proc = start(command(tiny_study, tmp_path, cluster.address, *STUDY_ARGS))
    wait_for(lambda: len(checkpointed(run_dir)) >= 3, what="three trials past their second epoch")
    before = finished(run_dir)
    cluster.remove_node(sorted(cluster.worker_nodes, key=id)[0], allow_graceful=False)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]

    results = pd.read_parquet(run_dir / "results.parquet")
    assert len(results) == 8 and (results["status"] == "finished").all()
    assert results["node_id"].nunique() >= 2  # spread over the nodes, and each row names its node
    assert (results["resumed_from_epoch"] > 0).any(), results[["node_id", "resumed_from_epoch"]]
    assert all(len(json.loads((run_dir / "trials" / t / "curves.json").read_text())) == 6 for t in results["trial_id"])
    assert all(out.count(f"finished {label}") == 1 for label in re.findall(r"finished (\S+):", out))  # none twice
    assert {t: m for t, m in finished(run_dir).items() if t in before} == before  # finished ones untouched

    again = subprocess.run(command(tiny_study, tmp_path, cluster.address, *STUDY_ARGS), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "0 trials trained, 8 skipped" in again.stdout, again.stdout + again.stderr


def test_driver_killed_with_sigkill_the_same_command_resumes(cluster, tiny_study, tmp_path):
    run_dir = tmp_path / "runs" / "tiny" / "default"
    cmd = command(tiny_study, tmp_path, cluster.address, *STUDY_ARGS)
    proc = start(cmd)
    wait_for(lambda: finished(run_dir) and checkpointed(run_dir) - set(finished(run_dir)),
             what="a finished trial and an unfinished one with a checkpoint")
    proc.kill()  # SIGKILL: no handler runs, nothing is flushed
    proc.communicate(timeout=60)
    kept = finished(run_dir)

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert f"skipping {len(kept)} of 8 trials already finished" in again.stdout
    assert {t: m for t, m in finished(run_dir).items() if t in kept} == kept  # no finished trial lost or rerun
    results = pd.read_parquet(run_dir / "results.parquet")
    assert len(results) == 8 and (results["status"] == "finished").all()
    assert (results[~results["trial_id"].isin(kept)]["resumed_from_epoch"] > 0).any()


def test_a_hung_trial_becomes_a_failed_row_with_the_reason(cluster, tiny_study, tmp_path):
    run_dir = tmp_path / "runs" / "tiny" / "default"
    proc = start(command(tiny_study, tmp_path, cluster.address, "--set", "train.timeout_s=40", "--set",
                         "train.epochs=3"))

    def training_processes() -> list[int]:
        """This test's trial processes only: descendants of this process (the cluster's raylets are its
        children), never another run's on the same machine."""
        out = subprocess.run(["pgrep", "-f", r"ray::ImplicitFunc\.train"], capture_output=True, text=True).stdout
        return [int(p) for p in out.split() if descends_from(int(p), os.getpid())]

    wait_for(lambda: checkpointed(run_dir, 0) and training_processes(), what="a trial in training")
    frozen = training_processes()[0]
    os.kill(frozen, signal.SIGSTOP)  # hung for good: no progress, no exception, no exit
    try:
        out, _ = proc.communicate(timeout=400)
    finally:
        try:
            os.kill(frozen, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the harness killed it
    assert proc.returncode == 3, out[-4000:]  # finished, with a failed trial
    results = pd.read_parquet(run_dir / "results.parquet")
    failed = results[results["status"] == "failed"]
    assert len(failed) == 1 and failed["error"].iloc[0].startswith("TrialTimeout: still running after "
                                                                    "train.timeout_s=40 s")
    assert (results["status"] == "finished").sum() == 3


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # field 4: the parent
        except (OSError, IndexError, ValueError):
            return False
    return False


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs mount namespaces (unshare -m) to hide a path from one node")
def test_storage_a_node_cannot_see_is_refused_before_any_trial(cluster, tiny_study, tmp_path):
    """A fourth node runs in its own mount namespace where the storage folder is an empty directory, as a
    node of a real cluster sees a path that only exists on the head."""
    storage, hidden = tmp_path / "storage", tmp_path / "empty"
    storage.mkdir()
    hidden.mkdir()
    tag = f"isolated_{uuid.uuid4().hex[:8]}"
    ray_cli = Path(sys.executable).with_name("ray")
    node = subprocess.Popen(["unshare", "-m", "sh", "-c", f"mount --bind {hidden} {storage} && exec {ray_cli} start "
                             f"--address={cluster.address} --num-cpus=1 --resources='{{\"{tag}\": 1}}' --block"],
                            env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def four_nodes() -> bool:
            out = subprocess.run([sys.executable, "-c", "import ray; ray.init(address=%r, logging_level='ERROR'); "
                                  "print(sum(n['Alive'] for n in ray.nodes()))" % cluster.address],
                                 capture_output=True, text=True, env=os.environ)
            return out.stdout.strip().endswith("4")

        wait_for(four_nodes, timeout=120, what="the isolated node to join")
        done = subprocess.run(command(tiny_study, tmp_path, cluster.address, "--storage", str(storage)), cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
    finally:
        node.terminate()
        subprocess.run(["pkill", "-f", tag])
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"--storage {storage} is not reachable from 1 of the 4 nodes" in done.stderr
    assert "shared file system mounted at the same path on every node" in done.stderr
    assert not (tmp_path / "runs" / "tiny" / "default" / "trials").exists()  # nothing was trained
