"""The job timeline is assembled from records, in time order, whatever order they were found in."""

import json

from raybridge import jobdir as jd
from raybridge.client import timeline
from raybridge.transport.runner import LocalRunner

T0 = 1_765_000_000.0  # a time in this century (events from any other are refused)


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
        submitted_at=T0 + 100.0,
        started_at=T0 + 101.0,
        head_up_at=T0 + 102.0,
        nodes_alive_at=T0 + 104.0,
        ready_at=T0 + 105.0,
        nodes=(
            jd.NodeRecord(ip="10.0.0.2", hostname="n2", joined_at=T0 + 103.5),
            jd.NodeRecord(ip="10.0.0.1"),
        ),
        events=({"at": T0 + 110.0, "event": "node_dead", "node": "n3", "detail": ""},),
    )
    side[0]["at"] = T0 + 104.5
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


def test_planted_events_are_bounded_and_cleaned(tmp_path):
    """The job folder is shared storage: an event file may be huge, carry terminal escapes, or a time
    that breaks formatting (1e300 crashed `status`)."""
    folder = jd.JobDir(str(tmp_path))
    (tmp_path / "events").mkdir()
    events = tmp_path / "events"
    (events / "a.json").write_text(json.dumps({"at": 1e300, "event": "x"}))
    (events / "b.json").write_text(json.dumps({"at": True, "event": "x"}))
    (events / "c.json").write_text(json.dumps({"at": T0, "event": "evil\x1b]0;owned\x07", "detail": "a\nb"}))
    (events / "d.json").write_text(json.dumps({"at": T0, "event": "big", "detail": "x" * 10_000}))
    side = timeline.side_events(LocalRunner(), folder)
    assert [e["event"] for e in side] == ["evil ]0;owned "]  # d.json is cut short: no longer JSON
    assert side[0]["detail"] == "a b"
    info = jd.ClusterRecord(
        job_id="7",
        state="ready",
        expected_nodes=1,
        job_dir=str(tmp_path),
        events=({"at": 1e300, "event": "x"},),
    )
    assert timeline.build(info) == [] and timeline.lines(timeline.build(info, side))
