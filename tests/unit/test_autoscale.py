"""The autoscaler's config (complete as Ray reads it) and the Slurm node provider's bookkeeping, with
Slurm's commands faked (the real autoscaler on the real test bed: tests/cluster/test_elastic.py)."""

import dataclasses
import json
import os
from pathlib import Path

import pytest

from raybridge import jobdir as jd
from raybridge.autoscaler import config as autoscale
from raybridge.client.profile import build_spec
from raybridge.errors import ClusterError, ConfigError
from raybridge.settings import AgentSettings
from raybridge.slurm import JobInfo, Submitted


def settings(tmp_path, **kw):
    return AgentSettings(shared_dir=str(tmp_path), nodes=1, max_nodes=3, job_id="7", **kw)


def test_config_is_complete_as_rays_autoscaler_reads_it(tmp_path):
    from ray.autoscaler._private.providers import _get_node_provider_cls
    from ray.autoscaler._private.util import prepare_config, validate_config

    from raybridge.autoscaler.provider import SlurmNodeProvider

    cfg = autoscale.autoscaling_config(settings(tmp_path, idle_timeout=20), 2, 1, 1 << 30)
    validate_config(cfg)
    # The monitor reads the file as it is: it must already be what `ray up` would prepare.
    assert prepare_config(json.loads(json.dumps(cfg))) == cfg
    assert _get_node_provider_cls(cfg["provider"]) is SlurmNodeProvider
    worker = cfg["available_node_types"][autoscale.WORKER_TYPE]
    assert worker["resources"] == {"CPU": 2, "GPU": 1, "memory": 1 << 30}
    assert (cfg["max_workers"], worker["min_workers"], worker["max_workers"]) == (2, 0, 2)
    assert cfg["idle_timeout_minutes"] == pytest.approx(20 / 60, abs=1e-3)
    assert cfg["provider"]["disable_node_updaters"] is True


def test_limits_count_the_allocation(tmp_path):
    s = dataclasses.replace(settings(tmp_path), nodes=3, min_nodes=4, max_nodes=6)
    cfg = autoscale.autoscaling_config(s, 2, 0, 1 << 30)
    shown = {"min_nodes": 4, "max_nodes": 6, "idle_timeout": 60, "join_timeout": 600}
    assert autoscale.limits(json.dumps(cfg)) == shown  # what `status` shows
    assert autoscale.limits(None) is None and autoscale.limits("{not json") is None
    assert autoscale.limits('{"provider": {"limits": {"min_nodes": "1; rm"}}}') is None
    worker = cfg["available_node_types"][autoscale.WORKER_TYPE]
    assert (cfg["max_workers"], worker["min_workers"], worker["max_workers"]) == (3, 1, 3)
    assert "GPU" not in worker["resources"]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"min_nodes": 2}, "min_nodes needs max_nodes"),
        ({"nodes": 3, "max_nodes": 2}, "max_nodes is 2, below the allocation's 3 nodes"),
        ({"nodes": 2, "spare_nodes": 1, "max_nodes": 2}, "below the allocation's 3 nodes"),
        ({"nodes": 2, "max_nodes": 4, "min_nodes": 1}, "min_nodes must be between the allocation's 2"),
        ({"max_nodes": 3, "min_nodes": 4}, "min_nodes must be between"),
        ({"max_nodes": 3, "idle_timeout": 1}, "idle_timeout must be between 5"),
        ({"max_nodes": 3, "join_timeout": "soon"}, "join_timeout must be a whole number"),
    ],
)
def test_bad_limits_are_one_clear_error(values, message):
    with pytest.raises(ConfigError, match=message):
        build_spec({"shared_dir": "/s", **values})


def test_only_the_cluster_autoscales():
    spec = build_spec({"shared_dir": "/s", "nodes": 1, "min_nodes": 2, "max_nodes": 3})
    assert spec.autoscaling and spec.agent_settings().max_nodes == 3
    member = dataclasses.replace(spec, member_of="5")
    assert member.agent_settings().max_nodes is None
    assert build_spec({"shared_dir": "/s"}).agent_settings().max_nodes is None


class FakeSlurm:
    """slurm.SlurmClient's answers, from a dict."""

    def __init__(self):
        self.queue: dict[str, tuple[str, str]] = {}
        self.cancelled: list[str] = []
        self.next = 100
        self.asked = 0

    def submit_text(self, script, output, time=None):
        self.next += 1
        self.queue[str(self.next)] = ("PENDING", "Priority")
        self.time = time
        return Submitted(str(self.next), jd.now())

    def time_left(self, job):
        return "1:00:00"

    def cancel(self, job):
        self.cancelled.append(job)
        self.queue[job] = ("CANCELLED", "None")

    def job(self, job):
        if job not in self.queue:
            return None
        state, reason = self.queue[job]
        return JobInfo(job, "m", state, reason, "n3", "", None, "raybridge-member")

    def states(self, ids):
        self.asked += 1
        return {j: self.queue[j] for j in ids if j in self.queue}


@pytest.fixture
def provider(tmp_path, monkeypatch):
    from raybridge import members
    from raybridge.autoscaler import provider as slurmprovider

    slurm = FakeSlurm()
    monkeypatch.setattr(members, "RELEASE_WAIT_S", 0.0)
    folder = jd.JobDir.of(str(tmp_path), "7")
    for d in ("nodes", "members", "events"):
        (tmp_path / "jobs" / "7" / d).mkdir(parents=True)
    head = jd.HeadRecord(ip="10.0.0.1", hostname="n1", interface="ib0", ports={"gcs": 1}, gcs_up_at=1.0)
    jd.write(
        folder.cluster,
        jd.ClusterRecord(job_id="7", state="ready", expected_nodes=2, job_dir=folder.path, head=head),
    )
    jd.write(folder.node("0"), jd.NodeRecord(ip="10.0.0.1", rank=0, hostname="n1"))
    jd.write(folder.node("1"), jd.NodeRecord(ip="10.0.0.2", rank=1, hostname="n2"))
    Path(folder.member_script).write_text("#!/bin/bash\n")
    cfg = autoscale.autoscaling_config(settings(tmp_path, join_timeout=60), 2, 0, 1 << 30)
    p = slurmprovider.SlurmNodeProvider(cfg["provider"], cfg["cluster_name"])
    p.members.slurm = slurm
    return p, slurm, folder


def test_provider_submits_tracks_and_releases_member_jobs(provider):
    from ray.autoscaler.tags import (
        NODE_KIND_WORKER,
        STATUS_UNINITIALIZED,
        STATUS_UP_TO_DATE,
        TAG_RAY_NODE_KIND,
        TAG_RAY_NODE_STATUS,
        TAG_RAY_USER_NODE_TYPE,
    )

    p, slurm, folder = provider
    nodes = p.non_terminated_nodes({})
    kinds = {n: p.node_tags(n)[TAG_RAY_NODE_KIND] for n in nodes}
    assert kinds == {
        "7-head": "head",
        "7-1": "unmanaged",
    }  # the allocation's other node is not the autoscaler's
    assert p.internal_ip("7-head") == "10.0.0.1"
    tags = {
        TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
        TAG_RAY_USER_NODE_TYPE: autoscale.WORKER_TYPE,
        TAG_RAY_NODE_STATUS: STATUS_UNINITIALIZED,
    }
    created = p.create_node({}, tags, 2)
    assert list(created) == ["101", "102"] and slurm.time == "1:00:00"
    rec = jd.read(folder.member("101"), jd.MemberRecord)
    assert rec.tags == tags and rec.cluster_job == "7"
    asked = slurm.asked
    workers = p.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_WORKER})
    p.non_terminated_nodes({})
    assert slurm.asked == asked + 1  # the autoscaler's second look within QUEUE_CACHE_S: no new query
    assert sorted(workers) == ["101", "102"] and p.internal_ip("101") is None
    # 101 starts and its Ray joins: up to date, with its address.
    slurm.queue["101"] = ("RUNNING", "None")  # (Slurm's state is not what says it joined)
    jd.write(folder.node("m101-0"), jd.NodeRecord(ip="10.0.0.3", hostname="n3", member_job="101"))
    p.non_terminated_nodes({})
    assert p.node_tags("101")[TAG_RAY_NODE_STATUS] == STATUS_UP_TO_DATE and p.internal_ip("101") == "10.0.0.3"
    p.set_node_tags("101", {"extra": "1"})
    assert jd.read(folder.member("101"), jd.MemberRecord).tags["extra"] == "1"
    # Released: a joined node gets the release flag (its agent drains), a pending one is cancelled.
    p.terminate_nodes(["101", "102"])
    assert os.path.exists(folder.release("101")) and not os.path.exists(folder.release("102"))
    assert jd.read(folder.member("101"), jd.MemberRecord).released_at
    assert "102" in slurm.cancelled
    assert p.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_WORKER}) == []
    names = [json.loads(open(f).read())["event"] for f in sorted(Path(folder.events).glob("*.json"))]
    assert names.count("autoscale_submitted") == 2 and names.count("autoscale_released") == 2


def test_provider_cancels_a_member_that_did_not_join_in_time_and_says_why(provider):
    p, slurm, folder = provider
    (job,) = p.create_node({}, {"ray-node-type": "worker"}, 1)
    rec = jd.read(folder.member(job), jd.MemberRecord)
    jd.write(folder.member(job), dataclasses.replace(rec, submitted_at=rec.submitted_at - 61))
    slurm.queue[job] = ("PENDING", "Resources")
    assert job not in p.non_terminated_nodes({})
    assert slurm.cancelled == [job]
    (event,) = [json.loads(f.read_text()) for f in Path(folder.events).glob("*not_joined.json")]
    assert event["detail"] == f"member job {job}: did not join within 60s: Slurm PENDING (Resources)"


def test_provider_waits_when_slurm_does_not_answer(provider, monkeypatch):
    from raybridge.autoscaler import provider as slurmprovider

    p, slurm, folder = provider
    (job,) = p.create_node({}, {"ray-node-type": "worker"}, 1)
    assert p.non_terminated_nodes({}) and p.safe_to_scale()
    monkeypatch.setattr(slurm, "states", lambda ids: None)
    monkeypatch.setattr(slurmprovider, "QUEUE_CACHE_S", 0.0)
    assert job in p.non_terminated_nodes({})  # the last view, not "every node is gone"
    assert not p.safe_to_scale()
    # Slurm answers but does not list the job yet (just submitted): still pending, not gone.
    monkeypatch.setattr(slurm, "states", lambda ids: {})
    assert job in p.non_terminated_nodes({}) and p.safe_to_scale()
    rec = jd.read(folder.member(job), jd.MemberRecord)
    jd.write(folder.member(job), dataclasses.replace(rec, submitted_at=rec.submitted_at - 31))
    assert job not in p.non_terminated_nodes({})  # long gone from Slurm: gone


def test_a_missing_member_script_is_one_event_not_one_per_retry(provider):
    p, slurm, folder = provider
    os.unlink(folder.member_script)
    for _ in range(3):  # the autoscaler retries every second
        with pytest.raises(ClusterError, match="needs a cluster started by `raybridge up`"):
            p.create_node({}, {"ray-node-type": "worker"}, 1)
    assert len(list(Path(folder.events).glob("*autoscale_failed.json"))) == 1
    assert slurm.next == 100  # nothing submitted


def test_scale_add_stays_within_the_autoscaling_limit_and_status_counts_add_up(tmp_path):
    """`up --max-nodes 3`, then `scale --add`: hand-added nodes count against the limit too; status
    says `2/2 nodes alive, 1 member node`, not `3/2`."""
    from raybridge.client import status, submission
    from raybridge.client.cluster import Cluster
    from raybridge.transport.runner import LocalRunner

    s = dataclasses.replace(settings(tmp_path), nodes=2, max_nodes=3)
    folder = jd.JobDir(s.job_dir)
    Path(folder.members).mkdir(parents=True)
    jd.write_json(autoscale.config_path(folder.path), autoscale.autoscaling_config(s, 2, 0, 1 << 30))
    info = jd.ClusterRecord(job_id="7", state="ready", expected_nodes=2, job_dir=folder.path)
    cluster = Cluster(LocalRunner(), "7", folder.path)
    cluster.slurm = FakeSlurm()
    submission.within_limit(cluster, info, 1)  # 2 + 1 = 3: fine
    cluster.slurm.queue["101"] = ("RUNNING", "None")
    jd.write(folder.member("101"), jd.MemberRecord(job_id="101", cluster_job="7"))
    with pytest.raises(
        ClusterError, match=r"autoscales up to 3 nodes and has 3 \(2 in the allocation, 1 member"
    ):
        submission.within_limit(cluster, info, 1)
    nodes = [
        status.NodeStatus(jd.NodeRecord(ip="a", alive=True), left=False),
        status.NodeStatus(jd.NodeRecord(ip="b", alive=True), left=False),
        status.NodeStatus(jd.NodeRecord(ip="c", alive=True, member_job="101"), left=False),
        status.NodeStatus(jd.NodeRecord(ip="d", alive=False, member_job="100"), left=True),
        status.NodeStatus(jd.NodeRecord(ip="e", alive=False), left=False),
    ]
    fields = {f.name: None for f in dataclasses.fields(status.ClusterStatus)}
    st = status.ClusterStatus(**(fields | {"nodes": tuple(nodes), "expected_nodes": 3}))
    assert st.nodes_line() == "2/3 nodes alive, 1 member node, 1 lost"  # the released one left


def test_a_member_rejoining_a_new_head_is_not_taken_for_one_that_never_joined(provider):
    """After a head crash the new head's provider starts with an empty nodes/ folder while the members
    rejoin: one that joined the old head is waited for, not released as `not_joined`."""
    p, slurm, folder = provider
    (job,) = p.create_node({}, {"ray-node-type": "worker"}, 1)
    rec = jd.read(folder.member(job), jd.MemberRecord)
    jd.write(folder.member(job), dataclasses.replace(rec, submitted_at=rec.submitted_at - 61))
    slurm.queue[job] = ("RUNNING", "None")
    old = Path(folder.join("nodes-gen0"))
    old.mkdir()
    jd.write(str(old / f"m{job}-0.json"), jd.NodeRecord(ip="10.0.0.3", member_job=job))
    assert job in p.non_terminated_nodes({}) and slurm.cancelled == []
    old.joinpath(f"m{job}-0.json").unlink()  # it never joined at all: released after join_timeout
    assert job not in p.non_terminated_nodes({}) and slurm.cancelled == [job]
