"""A search on a Ray cluster simulated on this machine (three nodes of one CPU, joined with --address): its trials
spread over the nodes, and a node lost mid-search still ends with one best configuration per method and its
final cells."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.search_studies import SEARCH_STUDY

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cluster():
    assert os.environ["RAY_AUTH_MODE"] == "token"
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def search_records(run_dir: Path) -> list[dict]:
    out = []
    for path in (run_dir / "trials").glob("*/result.json"):
        try:
            record = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
        if record.get("kind") == "search":
            out.append(record)
    return out


def test_a_node_lost_mid_search_still_ends_with_one_best_configuration_per_method(cluster, tmp_path):
    study = tmp_path / "tuned.yaml"
    study.write_text(SEARCH_STUDY.replace("budget: {trials: 3}", "budget: {trials: 4}")
                     .replace("epochs: 3", "epochs: 5").replace("grace_period: 1", "grace_period: 2"))
    run_dir = tmp_path / "runs" / "tuned" / "default"
    cmd = [sys.executable, "-m", "harness.run", str(study), "--address", cluster.address, "--runs-dir",
           str(tmp_path / "runs"), "--reports-dir", str(tmp_path / "reports"), "--max-retries", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    # Mid-search: some search trials ended, others running with a checkpoint on the storage.
    while time.time() < deadline and proc.poll() is None and not (
            len(search_records(run_dir)) >= 2 and list((run_dir / "ray" / "tune").glob("search-*/*/checkpoint_*"))):
        time.sleep(0.3)
    assert proc.poll() is None and len(search_records(run_dir)) < 8, "the search ended before a node could be lost"
    cluster.remove_node(sorted(cluster.worker_nodes, key=id)[0], allow_graceful=False)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]

    rows = pd.read_parquet(run_dir / "results.parquet")
    search, final = rows[rows["kind"] == "search"], rows[rows["kind"] == "final"]
    assert search["node_id"].nunique() >= 2  # spread over the nodes
    assert search.groupby("search_unit")["trial_id"].nunique().tolist() == [4, 4]
    assert set(search["status"]) <= {"finished", "stopped"}
    assert len(final) == 2 and (final["status"] == "finished").all()
    for unit_id in search["search_unit"].unique():  # one chosen configuration per method, and its cell retrained
        ended = json.loads((run_dir / "search" / f"{unit_id}.json").read_text())
        assert ended["best"] is not None
        assert final[final["search_unit"] == unit_id]["search_best_trial"].tolist() == [ended["best"]["trial_id"]]
