"""Prometheus service discovery and the metrics summary, from records and real exposition text."""

import json

from raybridge import jobdir as jd
from raybridge import metrics

PAGE = """# HELP ray_node_cpu_utilization cpu
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{ip="10.0.0.2",SessionName="s"} 37.5
# TYPE ray_node_mem_used gauge
ray_node_mem_used{ip="10.0.0.2"} 2147483648
# TYPE ray_node_mem_total gauge
ray_node_mem_total{ip="10.0.0.2"} 8589934592
# TYPE ray_tasks gauge
ray_tasks{State="RUNNING",Name="f"} 3
ray_tasks{State="FINISHED",Name="f"} 9
# TYPE ray_node_gpus_utilization gauge
ray_node_gpus_utilization{GpuIndex="0"} 50
ray_node_gpus_utilization{GpuIndex="1"} 100
"""


def record(tmp_path):
    head = jd.HeadRecord(ip="10.0.0.2", hostname="n2", interface="ib0", ports={"gcs": 1}, gcs_up_at=1.0)
    nodes = (
        jd.NodeRecord(ip="10.0.0.2", hostname="n2", alive=True, ports={"metrics": 9001}),
        jd.NodeRecord(ip="10.0.0.3", hostname="n3", alive=True, ports={"metrics": 9001}),
        jd.NodeRecord(ip="10.0.0.4", hostname="n4", alive=False, ports={"metrics": 9001}),
    )
    return jd.ClusterRecord(
        job_id="5", state="ready", expected_nodes=3, job_dir=str(tmp_path), head=head, nodes=nodes
    )


def test_one_target_group_per_alive_node_written_only_when_changed(tmp_path):
    info = record(tmp_path)
    metrics.write_sd(str(tmp_path), info)
    path = tmp_path / "prometheus" / "5.json"
    groups = json.loads(path.read_text())
    assert [g["targets"] for g in groups] == [["10.0.0.2:9001"], ["10.0.0.3:9001"]]
    assert groups[0]["labels"] == {
        "raybridge_job": "5",
        "raybridge_job_name": "",
        "raybridge_node": "n2",
        "ray_role": "head",
    }
    assert path.stat().st_mode & 0o777 == 0o644
    before = path.stat().st_ino
    metrics.write_sd(str(tmp_path), info)
    assert path.stat().st_ino == before  # unchanged targets: not rewritten
    metrics.remove_sd(str(tmp_path), "5")
    assert not path.exists()


def test_targets_are_not_written_into_a_prometheus_folder_someone_else_made(tmp_path):
    import os

    import pytest

    from raybridge.trust import TrustError

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "prometheus").symlink_to(elsewhere)  # a link planted where the folder goes
    with pytest.raises(TrustError, match="writable by others"):
        metrics.write_sd(str(tmp_path), record(tmp_path))
    (tmp_path / "prometheus").unlink()
    (tmp_path / "prometheus").mkdir(mode=0o777)
    os.chmod(tmp_path / "prometheus", 0o777)
    with pytest.raises(TrustError, match="writable by others"):
        metrics.write_sd(str(tmp_path), record(tmp_path))
    assert list(elsewhere.iterdir()) == [] and list((tmp_path / "prometheus").iterdir()) == []


def test_a_page_is_summarized():
    m = metrics.summarize("n2", "10.0.0.2:9001", PAGE)
    assert (m.cpu_percent, m.mem_used, m.mem_total, m.tasks_running) == (37.5, 2 << 30, 8 << 30, 3)
    assert (m.gpus, m.gpu_percent) == (2, 75)
    (header, line) = metrics.lines([m])
    assert line.split()[:4] == ["n2", "10.0.0.2:9001", "38", "2.0/8.0"]
