"""The job timeline is assembled from records, in time order, whatever order they were found in."""

import json

from raybridge import jobdir as jd
from raybridge.client import timeline
from raybridge.transport.runner import LocalRunner


def test_phases_nodes_events_and_side_events_in_time_order(tmp_path):
    folder = jd.JobDir(str(tmp_path))
    (tmp_path / "events").mkdir()
    jd.add_event(folder, "driver_started", "n2", "python train.py")
    (tmp_path / "events" / "junk.json").write_text("{not json")
    (tmp_path / "events" / "list.json").write_text(json.dumps([1, 2]))
    side = timeline.side_events(LocalRunner(), folder)
    assert [e["event"] for e in side] == ["driver_started"]
    info = jd.ClusterRecord(
        job_id="7",
        state="ready",
        expected_nodes=2,
        job_dir=str(tmp_path),
        submitted_at=100.0,
        started_at=101.0,
        head_up_at=102.0,
        nodes_alive_at=104.0,
        ready_at=105.0,
        nodes=(jd.NodeRecord(ip="10.0.0.2", hostname="n2", joined_at=103.5), jd.NodeRecord(ip="10.0.0.1")),
        events=({"at": 110.0, "event": "node_dead", "node": "n3", "detail": ""},),
    )
    side[0]["at"] = 104.5
    got = timeline.build(info, side)
    assert [e["event"] for e in got] == [
        "queued",
        "started",
        "head_up",
        "node_joined",
        "all_alive",
        "driver_started",
        "ready",
        "node_dead",
    ]
    text = timeline.lines(got)
    assert text[0].split()[1:3] == ["+0.0s", "queued"] and text[-1].split()[1:4] == [
        "+10.0s",
        "node_dead",
        "n3",
    ]
    assert timeline.lines([]) == ["(no timeline: the job has not written its records yet)"]
