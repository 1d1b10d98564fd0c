"""Warm workers (agent/warm.py): what the head records from Ray's actor table, and what one node's
keeper asks its raylet for. Ray's processes and the raylet are stand-ins here; the real stack is in
tests/cluster/test_training.py (a spare takes over with processes started before the loss) and
tests/cluster/test_compat.py (every supported Ray)."""

import json
import sys

import pytest

from raybridge import jobdir as jd
from raybridge.agent import warm
from raybridge.agent.ray_internals import ActorView
from raybridge.preload import command as preload_command

TRAIN = '{"env_vars":{"A":"1"}}'
CTRL = '{"env_vars": {"A": "1"}}'  # the same variables, serialized by another side of Ray
IPS = {"n1": "10.0.0.1", "n2": "10.0.0.2"}


def actor(job, cls, node="n1", env=TRAIN):
    return ActorView(job, cls, node, env)


def test_choose_takes_the_newest_jobs_training_workers_and_the_controllers_node():
    actors = [
        actor("01000000", "RayTrainWorker", env='{"env_vars":{"OLD":"1"}}'),
        actor("02000000", "RayTrainWorker", "n2"),
        actor("02000000", "TrainController", "n1", CTRL),
        actor("02000000", "SomethingElse", "n2", "{}"),
    ]
    rec = warm.choose(actors, IPS, None)
    assert rec == warm.WarmRecord(TRAIN, CTRL, ["10.0.0.1"])
    # Nothing alive (a lost head: a new, empty cluster): the last record stays.
    assert warm.choose([], IPS, rec) == rec
    assert warm.choose([], IPS, None) is None
    # Workers alive but no controller (another driver's actors ended): the controller's part is kept.
    assert warm.choose([actor("03000000", "RayTrainWorker")], IPS, rec) == rec
    assert warm.job_number("02000000") == 2 and warm.job_number("zz") == -1


PRELOAD = preload_command(sys.executable, ("ray.train.torch", "torch._dynamo"))


@pytest.mark.parametrize(
    "env, expected",
    [
        ("", True),
        ("{}", True),
        (TRAIN, True),
        (json.dumps({"env_vars": {"A": "1"}, "py_executable": PRELOAD}), True),
        (json.dumps({"py_executable": "/bin/sh -c 'rm -rf ~'"}), False),  # only raybridge.preload
        (json.dumps({"py_executable": preload_command("/usr/bin/other-python", ("torch",))}), False),
        (json.dumps({"py_executable": preload_command(sys.executable, ("torch; id",))}), False),
        ('{"env_vars": {"A": "1"}, "pip": ["torch"]}', False),  # Ray would install it on every node
        ('{"working_dir": "/x"}', False),
        ('{"env_vars": {"A": 1}}', False),
        ("not json", False),
        ("[1]", False),
    ],
)
def test_only_variables_and_raybridges_own_start_are_kept_warm(env, expected):
    assert warm.warmable(env) is expected


def test_a_workers_state_from_its_title():
    assert warm.state("ray::IDLE", ["ray::IDLE"]) == "idle"
    assert warm.state("ray::RayTrainWorker.run", []) == "busy"
    assert warm.state(
        "/v/bin/python", ["/v/bin/python", "-u", "/v/ray/_private/workers/default_worker.py"]
    ) == ("starting")
    assert warm.state("/usr/sbin/sshd", ["/usr/sbin/sshd"]) == "other"


def test_the_controllers_node_keeps_controller_processes_first():
    rec = warm.WarmRecord(TRAIN, CTRL, ["10.0.0.1"])
    assert warm.wanted(rec, 1, "10.0.0.1") == [(CTRL, warm.CONTROLLER_WARM), (TRAIN, 1)]
    assert warm.wanted(rec, 2, "10.0.0.2") == [(TRAIN, 2)]
    assert warm.wanted(warm.WarmRecord(TRAIN, TRAIN, ["10.0.0.1"]), 1, "10.0.0.1") == [(TRAIN, 1)]


def test_after_a_lost_head_the_new_head_keeps_the_controllers_processes():
    """The driver ran on the head (10.0.0.1, gone now): its restart, and its controller, are on the new head."""
    actors = [actor("02000000", "RayTrainWorker", "n2"), actor("02000000", "TrainController", "n1", CTRL)]
    rec = warm.choose(actors, IPS, None, head_ip="10.0.0.1")
    assert rec == warm.WarmRecord(TRAIN, CTRL, ["10.0.0.1"], controller_on_head=True)
    kept = warm.choose([], {"n9": "10.0.0.3"}, rec, head_ip="10.0.0.3")  # the new cluster, nothing alive yet
    assert kept == rec
    assert warm.wanted(kept, 1, "10.0.0.3", head=True) == [(CTRL, warm.CONTROLLER_WARM), (TRAIN, 1)]
    assert warm.wanted(kept, 1, "10.0.0.2", head=False) == [(TRAIN, 1)]
    # A driver that ran on another node than the head: its node only, whichever node is head.
    elsewhere = warm.choose(actors, IPS, None, head_ip="10.0.0.2")
    assert not elsewhere.controller_on_head
    assert warm.wanted(elsewhere, 1, "10.0.0.3", head=True) == [(TRAIN, 1)]


class Node:
    """A stand-in for one node: its raylet's PrestartWorkers and the worker processes it starts."""

    def __init__(self, monkeypatch, answer=None):
        self.procs: dict[int, tuple[str, float]] = {}
        self.requests: list[tuple[str, int]] = []
        self.answer = answer
        self.next_pid = 100
        monkeypatch.setattr(warm, "workers", lambda: dict(self.procs))
        monkeypatch.setattr(warm.ray_internals, "prestart_workers", self.prestart)

    def prestart(self, raylet, job_id, runtime_env, count, keep_alive_s, token_path):
        assert raylet == "10.0.0.1:1234" and job_id == "" and keep_alive_s == warm.KEEP_ALIVE_S
        self.requests.append((runtime_env, count))
        return self.answer

    def start(self, n, state="idle"):
        """The raylet starts the requested processes (in request order)."""
        pids = []
        for _ in range(n):
            self.next_pid += 1
            self.procs[self.next_pid] = (state, float(self.next_pid))
            pids.append(self.next_pid)
        return pids


@pytest.fixture
def keeper(tmp_path, monkeypatch):
    folder = jd.JobDir(str(tmp_path))
    jd.write(folder.warm, warm.WarmRecord(TRAIN, CTRL, ["10.0.0.1"]))
    said = []
    k = warm.Keeper(folder, 1, lambda: "10.0.0.1:1234", None, said.append)
    k.said_lines = said
    return k


def test_a_started_node_asks_at_once_and_tells_its_processes_apart_by_start_order(keeper, monkeypatch):
    node = Node(monkeypatch)
    node.procs[7] = ("busy", 1.0)  # the dashboard agent or a worker that was already there
    keeper.step(now=100)
    # Ray just started here: one of each at once (a new head's recovery has the CPU), the rest later.
    assert node.requests == [(CTRL, 1), (TRAIN, 1)]
    assert keeper.said_lines == ["warm workers: keeping 1 idle worker process(es) for Ray Train"]
    (ctrl,) = node.start(1, "starting")
    (train,) = node.start(1, "starting")
    keeper.step(now=101)
    assert keeper.mine == {ctrl: CTRL, train: TRAIN}
    for pid in node.procs:
        node.procs[pid] = ("idle", node.procs[pid][1])
    keeper.step(now=102)
    assert len(node.requests) == 2  # enough for now: nothing more asked for
    keeper.step(now=100 + warm.REFILL_DELAY_S - 1)
    assert len(node.requests) == 2
    keeper.step(now=100 + warm.REFILL_DELAY_S)  # the controller's other three, at once
    assert node.requests[2:] == [(CTRL, warm.CONTROLLER_WARM - 1)]
    more = node.start(warm.CONTROLLER_WARM - 1)
    keeper.step(now=100 + warm.REFILL_DELAY_S + 1)
    assert keeper.mine == dict.fromkeys([ctrl, *more], CTRL) | {train: TRAIN}


def test_a_taken_process_is_replaced_after_the_refill_delay_and_at_once_after_a_restart(keeper, monkeypatch):
    node = Node(monkeypatch)
    keeper.started_at = 0.0  # Ray started here long ago
    keeper.step(now=100)
    assert node.requests == [(CTRL, warm.CONTROLLER_WARM), (TRAIN, 1)]
    pids = node.start(warm.CONTROLLER_WARM + 1)
    keeper.step(now=101)
    node.requests.clear()
    node.procs[pids[-1]] = ("busy", node.procs[pids[-1]][1])  # a new worker group took it
    keeper.step(now=102)
    keeper.step(now=102 + warm.REFILL_DELAY_S - 1)
    assert node.requests == []  # the new group's start has the CPU
    keeper.step(now=102 + warm.REFILL_DELAY_S)
    assert node.requests == [(TRAIN, 1)]
    # This node's Ray restarted: its processes are gone, and the keeper asks for one of each at once.
    node.procs.clear()
    node.requests.clear()
    keeper.raylet_restarted()
    keeper.step(now=200)
    assert node.requests == [(CTRL, 1), (TRAIN, 1)]


def test_a_request_the_raylet_dropped_is_made_again(keeper, monkeypatch):
    node = Node(monkeypatch)
    keeper.step(now=100)
    keeper.step(now=101)
    assert len(node.requests) == 2  # waiting for what was asked
    keeper.step(now=100 + warm.PENDING_S + 1)
    assert len(node.requests) == 4


def test_a_raylet_that_is_restarting_is_asked_again_and_a_refusal_ends_it_with_one_line(keeper, monkeypatch):
    node = Node(monkeypatch, answer="UNAVAILABLE: failed to connect to all addresses")
    keeper.step(now=100)
    keeper.step(now=102)
    assert len(node.requests) == 2 and not keeper.stopped
    node.answer = "UNIMPLEMENTED: unknown method"
    keeper.step(now=104)
    assert keeper.stopped
    assert keeper.said_lines == [
        "warm workers: Ray refused to start one (UNIMPLEMENTED: unknown method); none kept on this node"
    ]
    keeper.step(now=110)
    assert len(node.requests) == 3


def test_no_record_no_raylet_or_a_runtime_env_beyond_variables_asks_for_nothing(tmp_path, monkeypatch):
    node = Node(monkeypatch)
    folder = jd.JobDir(str(tmp_path))
    said = []
    k = warm.Keeper(folder, 1, lambda: "10.0.0.1:1234", None, said.append)
    k.step(now=100)  # no warm.json yet: no training ran
    assert warm.Keeper(folder, 1, lambda: None, None, said.append).step(now=100) is None
    jd.write(folder.warm, warm.WarmRecord('{"pip": ["torch"]}'))
    k.step(now=200)
    assert node.requests == [] and k.stopped
    assert said == ["warm workers: none kept (the training's runtime env holds more than variables)"]
    off = warm.Keeper(folder, 0, lambda: "10.0.0.1:1234", None, said.append)
    off.step(now=300)
    assert node.requests == []


def test_publish_writes_the_record_only_when_it_changed(tmp_path):
    folder = jd.JobDir(str(tmp_path))

    class Gcs:
        actors = [actor("01000000", "RayTrainWorker"), actor("01000000", "TrainController", env=CTRL)]

        def nodes(self):
            return [{"node_id": "n1", "ip": "10.0.0.1", "alive": True}]

        def alive_actors(self):
            return self.actors

    gcs = Gcs()
    assert warm.publish(folder, gcs, "10.0.0.1") == warm.WarmRecord(TRAIN, CTRL, ["10.0.0.1"], True)
    assert warm.read(folder) == warm.WarmRecord(TRAIN, CTRL, ["10.0.0.1"], True)
    before = (tmp_path / "warm.json").stat().st_mtime_ns
    gcs.actors = []
    warm.publish(folder, gcs)
    assert (tmp_path / "warm.json").stat().st_mtime_ns == before
    assert (tmp_path / "warm.json").stat().st_mode & 0o777 == 0o600


def test_a_record_others_could_have_written_is_not_used(keeper, monkeypatch, tmp_path):
    node = Node(monkeypatch)
    (tmp_path / "warm.json").chmod(0o620)
    keeper.step(now=100)
    assert node.requests == [] and keeper.stopped
    assert keeper.said_lines[0].startswith("warm workers: none kept (")
    assert "writable by others" in keeper.said_lines[0]
