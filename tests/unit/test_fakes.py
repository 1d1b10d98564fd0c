"""The library's logic against fakes: the head's readiness loop, Cluster.stop, and access.py."""

import json
import os
from pathlib import Path

import pytest

from raybridge import jobdir as jd
from raybridge.settings import AgentSettings


class FakeGcs:
    """A GCS that lists `alive` nodes, or does not answer (GcsUnavailable) while `down`."""

    def __init__(self, script):
        self.script = list(script)  # one entry per poll: an int (alive nodes) or an exception

    def alive_count(self):
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        return step


class FakeStarted:
    def __init__(self, pending):
        self.pending = list(pending)  # what services_pending() answers, poll after poll
        self.services_started = 0

    def start_services(self):
        self.services_started += 1

    def services_pending(self):
        return self.pending.pop(0) if len(self.pending) > 1 else self.pending[0]


def head_agent(tmp_path, nodes=2, ready_timeout=10):
    from raybridge.agent.node import Agent
    from raybridge.agent.rendezvous import Rendezvous

    settings = AgentSettings(shared_dir=str(tmp_path), nodes=nodes, ready_timeout=ready_timeout, job_id="5")
    Rendezvous(settings).prepare()
    agent = Agent(settings, {})
    for rank in range(nodes):
        agent.rendezvous.settings = AgentSettings(
            shared_dir=str(tmp_path), nodes=nodes, job_id="5", rank=rank
        )
        agent.rendezvous.write_node(jd.NodeRecord(ip=f"10.0.0.{rank + 1}", rank=rank))
    agent.rendezvous.settings = settings
    return agent


def test_ready_waits_for_every_node_then_the_services(tmp_path, monkeypatch):
    from raybridge.agent import head as node_mod
    from raybridge.agent.ray_internals import GcsUnavailable

    monkeypatch.setattr(node_mod.time, "sleep", lambda s: None)
    agent = head_agent(tmp_path)
    agent.ray.started = FakeStarted(["the dashboard", "the Ray Client server", ""])
    gcs = FakeGcs([GcsUnavailable("not up yet"), 1, 2])
    agent.wait_until_ready(gcs, lambda: agent.settings.nodes)
    assert agent.ray.started.services_started == 1  # started once, when all nodes were alive
    assert agent.rendezvous.cluster().nodes_alive_at is not None


def test_ready_times_out_with_what_it_was_waiting_for(tmp_path, monkeypatch):
    from raybridge.agent import head as node_mod
    from raybridge.agent.ray_internals import GcsUnavailable

    clock = [0.0]
    monkeypatch.setattr(node_mod.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setattr(node_mod.time, "monotonic", lambda: clock[0])
    agent = head_agent(tmp_path, ready_timeout=1)
    gcs = FakeGcs([1, GcsUnavailable("Timed out while waiting for GCS")])
    with pytest.raises(
        RuntimeError, match="only 1 of 2 Ray nodes alive after 1s .*the GCS did not answer: Timed out"
    ):
        agent.wait_until_ready(gcs, lambda: agent.settings.nodes)


def test_a_stop_during_bring_up_ends_the_wait(tmp_path, monkeypatch):
    from raybridge.agent import head as node_mod
    from raybridge.agent.startray import StopRequested

    monkeypatch.setattr(node_mod.time, "sleep", lambda s: None)
    agent = head_agent(tmp_path)
    Path(agent.rendezvous.dir.stop).touch()
    with pytest.raises(StopRequested):
        agent.wait_until_ready(FakeGcs([1]), lambda: agent.settings.nodes)


class FakeSlurm:
    def __init__(self, states):
        self.states = list(states)
        self.cancelled = 0

    def job(self, job_id):
        from raybridge.slurm import JobInfo

        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return JobInfo(job_id, "rb", state, "None", "n1", "", None, "raybridge") if state else None

    def cancel(self, job_id, signal=None, batch_only=False):
        self.cancelled += 1


def test_stop_asks_the_agents_first_and_cancels_only_when_they_do_not_end(tmp_path, monkeypatch):
    from raybridge.client import cluster as cluster_mod
    from raybridge.client.cluster import Cluster
    from raybridge.transport.runner import LocalRunner

    monkeypatch.setattr(cluster_mod, "POLL", 0.0)
    c = Cluster(LocalRunner(), "8", str(tmp_path))
    c.slurm = FakeSlurm(["RUNNING", "RUNNING", "COMPLETED"])
    assert c.stop() == "stopped"
    assert (tmp_path / "stop").exists() and c.slurm.cancelled == 0  # the agents ended it
    c.slurm = FakeSlurm(["PENDING", None])
    assert c.stop() == "stopped" and c.slurm.cancelled == 1  # nothing runs yet: scancel
    c.slurm = FakeSlurm([None])
    assert c.stop() == "already stopped"


def test_access_reads_the_head_and_refuses_a_cluster_that_is_not_ready(tmp_path):
    from raybridge.client import access
    from raybridge.client.cluster import Cluster
    from raybridge.errors import ClusterError
    from raybridge.transport.runner import LocalRunner

    folder = jd.JobDir(str(tmp_path))
    head = jd.HeadRecord("10.0.0.1", "n1", "ib0", {"gcs": 6379, "dashboard": 8265, "client": 10001}, 1.0)
    rec = jd.ClusterRecord(job_id="8", state="starting", expected_nodes=1, job_dir=folder.path)
    jd.write(folder.cluster, rec)
    c = Cluster(LocalRunner(), "8", folder.path)
    c.slurm = FakeSlurm(["RUNNING"])
    with pytest.raises(ClusterError, match="is not ready .state: starting"):
        access.ready_info(c)
    jd.write(
        folder.cluster, rec.with_changes(state="ready", head=head, ports=head.ports, token_path=folder.token)
    )
    Path(folder.token).write_text("tok\n")
    info = access.ready_info(c)
    targets = access.targets_from(info)
    assert {n: (t.host, t.port) for n, t in targets.items()} == {
        "dashboard": ("10.0.0.1", 8265),
        "client": ("10.0.0.1", 10001),
        "gcs": ("10.0.0.1", 6379),
    }
    c.slurm = FakeSlurm(["PENDING"])
    with pytest.raises(ClusterError, match="is not running .PENDING"):
        access.ready_info(c)
    assert json.loads(Path(folder.cluster).read_text())["schema"] == jd.SCHEMA


def test_fetch_token_copies_it_private(tmp_path, monkeypatch):
    from raybridge.client import access
    from raybridge.client.cluster import Cluster
    from raybridge.transport.runner import LocalRunner

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = jd.JobDir(str(tmp_path / "job"))
    Path(folder.path).mkdir()
    Path(folder.token).write_text("s3cret\n")
    rec = jd.ClusterRecord(
        job_id="8", state="ready", expected_nodes=1, job_dir=folder.path, token_path=folder.token
    )
    copy = access.fetch_token(Cluster(LocalRunner(), "8", folder.path), rec)
    assert copy.read_text() == "s3cret" and oct(copy.stat().st_mode)[-3:] == "600"
    assert oct(copy.parent.stat().st_mode)[-3:] == "700"
    assert access.fetch_token(Cluster(LocalRunner(), "8", folder.path), rec.with_changes(auth="none")) is None


def test_a_requeued_job_held_by_slurm_is_started_even_when_the_first_try_is_refused(tmp_path, monkeypatch):
    """`run` follows a requeued job: Slurm holds it (BeginTime) for its credential lifetime; the owner
    may move its start. A refused try (the second of the requeue) is tried again, not given up."""
    from raybridge.client import cluster as cluster_mod
    from raybridge.client.cluster import Cluster
    from raybridge.slurm import JobInfo
    from raybridge.transport.runner import LocalRunner

    monkeypatch.setattr(cluster_mod, "JOB_EVERY", 0.0)
    monkeypatch.setattr(cluster_mod, "REQUEUE_MARGIN", 0.0)
    monkeypatch.setattr(cluster_mod, "FOLLOW_EVERY", {"local": 0.0, "ssh": 0.0})
    log = tmp_path / "job.out"
    log.write_text("step 1\n")

    class Held:
        def __init__(self):
            self.states = [("RUNNING", "None")] + [("PENDING", "BeginTime")] * 4 + [("COMPLETED", "None")]
            self.tries = 0

        def job(self, job_id):
            state, reason = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return JobInfo(job_id, "rb", state, reason, "n1", str(log), 0, "raybridge", eligible_time="x")

        def start_now(self, job_id):
            self.tries += 1
            if self.tries == 2:
                self.states = [("RUNNING", "None"), ("COMPLETED", "None")]
            return self.tries == 2  # the first try is refused

    c = Cluster(LocalRunner(), "9", str(tmp_path))
    c.slurm = Held()
    said, out = [], []
    job = c.follow_output(out.append, on_requeue=said.append)
    assert job.slurm_state == "COMPLETED" and "".join(out) == "step 1\n"
    assert c.slurm.tries == 2 and len(said) == 1 and "was requeued and held" in said[0]


def test_run_shows_the_programs_output_and_keeps_the_agents_lines_in_the_log():
    from raybridge.client.cluster import ProgramOutput

    shown: list[str] = []
    out = ProgramOutput(shown.append)
    out("raybridge: environment ok: /v/bin/python, Python 3.11, Ray 2.60.0\nraybridge[n2/he")
    out("ad] 12:00:00.000 starting Ray on ib0\nepoch 1 loss 0.5\nraybr")
    assert "".join(shown) == "epoch 1 loss 0.5\n"  # "raybr" may still become an agent's line: held
    out("ay is the program's word\n  3%|#  | 3/100\r")
    assert "".join(shown).endswith("raybray is the program's word\n  3%|#  | 3/100\r")  # a bar: at once
    out("raybridge: driver exited with code 0\nraybridge: requeueing job 7 (restart 1 of 3)\ntail")
    out.flush()
    text = "".join(shown)
    assert "raybridge[" not in text and "environment ok" not in text and "driver exited" not in text
    assert text.endswith("raybridge: requeueing job 7 (restart 1 of 3)\ntail")  # progress stays


def test_accounting_counts_the_member_jobs_too(tmp_path):
    """Node-hours of a cluster that grew: its own job's and every member job's."""
    from raybridge import jobdir as jd
    from raybridge.client.cluster import Cluster
    from raybridge.slurm import Accounting
    from raybridge.transport.runner import LocalRunner

    folder = jd.JobDir(str(tmp_path / "jobs" / "7"))
    os.makedirs(folder.members, mode=0o700)
    for member in ("11", "12"):
        jd.write(folder.member(member), jd.MemberRecord(job_id=member, cluster_job="7"))

    class Sacct:
        figures = {"7": (7200, 14400, 3600.0), "11": (3600, 7200, 1800.0), "12": (1800, 3600, 0.0)}

        def accounting(self, job_id):
            node_s, cpu_s, used = self.figures[job_id]
            return Accounting("COMPLETED", 1, 0, node_s // 2, node_s, cpu_s, used)

    c = Cluster(LocalRunner(), "7", folder.path)
    c.slurm = Sacct()
    acct = c.accounting(settle=0)
    assert acct.node_s == 12600 and acct.member_jobs == 2 and acct.cpu_efficiency == 5400 / 25200
    assert acct.line().startswith("3.5000 node-hours (12600 node-seconds, 2 member jobs included)")
