import socket

import pytest

from raybridge.agent import netinfo, ports, resources

IFS = [
    netinfo.Iface("eth0", "10.211.0.11", "255.255.255.0"),
    netinfo.Iface("ib0", "10.212.0.11", "255.255.255.0"),
    netinfo.Iface("ib1", "10.214.0.11", "255.255.255.0"),
]


def test_interface_policy():
    assert netinfo.choose(["auto"], IFS).name == "ib0"
    assert netinfo.choose(["auto"], IFS, head_ip="10.214.0.2").name == "ib1"
    assert netinfo.choose(["auto"], IFS[:1], head_ip="10.9.9.9").name == "eth0"
    assert netinfo.choose(["eth0"], IFS).name == "eth0"
    assert netinfo.choose(["ib7", "ib1"], IFS).name == "ib1"
    with pytest.raises(LookupError, match="no interface matches ib7 .*ib0=10.212.0.11"):
        netinfo.choose(["ib7"], IFS)


def test_port_plans_differ_between_jobs_and_stay_in_range():
    a, b = ports.plan_for_block(ports.first_block("1000")), ports.plan_for_block(ports.first_block("1001"))
    assert set(a.all_ports()).isdisjoint(b.all_ports())
    for plan in (a, b):
        assert min(plan.all_ports()) >= ports.FIRST_PORT and max(plan.all_ports()) < ports.LAST_PORT
        assert len(set(plan.all_ports())) == len(plan.all_ports())


def test_busy_port_moves_to_next_block():
    first = ports.plan_for_block(ports.first_block("4242"))
    with socket.socket() as s:
        s.bind(("", first.node_manager))
        s.listen()
        plan = ports.choose_plan("4242")
    assert plan == ports.plan_for_block(ports.first_block("4242") + 1)  # the next block, whole
    assert first.node_manager not in plan.all_ports()


@pytest.mark.parametrize(
    ("env", "ids"),
    [
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, ()),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, ("0", "1")),
        ({"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}, ("GPU-aa", "GPU-bb")),
        ({"SLURM_JOB_GPUS": "2,3"}, ("2", "3")),
        ({"SLURM_GPUS_ON_NODE": "4"}, ("0", "1", "2", "3")),
        ({}, ()),
    ],
)
def test_gpu_ids(env, ids):
    assert resources.gpu_ids(env) == ids


def test_cpus_and_memory_come_from_slurm():
    env = {"SLURM_CPUS_ON_NODE": "6", "SLURM_MEM_PER_NODE": "2048"}
    r = resources.detect(env, 0.3)
    assert r.cpus == 6
    assert r.memory_bytes == 2048 * 1024**2
    assert resources.MIN_OBJECT_STORE <= r.object_store_bytes <= int(r.memory_bytes * 0.3)
    assert resources.cpus({"SLURM_JOB_CPUS_PER_NODE": "4(x2),2"}) == 4


def test_the_node_temp_folder_is_created_private_or_refused(tmp_path):
    import os

    from raybridge.agent.node import private_dir

    fresh = tmp_path / "rb-1"
    private_dir(str(fresh))
    assert fresh.is_dir() and oct(fresh.stat().st_mode)[-3:] == "700"
    private_dir(str(fresh))  # our own, from a requeued start: fine
    planted = tmp_path / "rb-2"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    with pytest.raises(RuntimeError, match="rb-2 already exists and is open to others .mode 777"):
        private_dir(str(planted))
    (tmp_path / "rb-3").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RuntimeError, match="rb-3 already exists and is a symbolic link"):
        private_dir(str(tmp_path / "rb-3"))
    if os.getuid() == 0:
        other = tmp_path / "rb-4"
        other.mkdir(mode=0o700)
        os.chown(other, 65534, 65534)
        with pytest.raises(RuntimeError, match="rb-4 already exists and belongs to uid 65534"):
            private_dir(str(other))


def test_ray_logs_are_kept_newest_first_within_a_budget(tmp_path):
    import gzip
    import os

    from raybridge.agent import keeplogs

    logs = tmp_path / "rb-1" / "session_2026_x" / "logs"
    (logs / "events").mkdir(parents=True)
    (logs / "old.log").write_bytes(b"o" * 3000)
    os.utime(logs / "old.log", (1, 1))
    (logs / "raylet.out").write_bytes(b"r" * 1000 + b"THE END\n")
    (logs / "events" / "event_GCS.log").write_text("e\n")
    (logs / "secret").symlink_to("/etc/passwd")
    (tmp_path / "rb-1" / "session_latest").symlink_to(logs.parent)
    dest = tmp_path / "kept"
    assert keeplogs.keep(str(tmp_path / "rb-1"), str(dest), budget=2000) == 2  # old.log is over budget
    assert gzip.decompress((dest / "raylet.out.gz").read_bytes()).endswith(b"THE END\n")
    assert (dest / "events" / "event_GCS.log.gz").exists() and not (dest / "secret.gz").exists()
    assert not (dest / "old.log.gz").exists()
    assert oct((dest / "raylet.out.gz").stat().st_mode)[-3:] == "600"
    keeplogs.TAIL, saved = 100, keeplogs.TAIL
    try:
        keeplogs.keep(str(tmp_path / "rb-1"), str(tmp_path / "tail"), budget=10**6)
    finally:
        keeplogs.TAIL = saved
    text = gzip.decompress((tmp_path / "tail" / "raylet.out.gz").read_bytes())
    assert text.startswith(b"[raybridge: the first 908 bytes were left out]") and text.endswith(b"THE END\n")
    assert keeplogs.keep(str(tmp_path / "missing"), "/proc/no/such/dir") == 0  # never raises


def test_the_head_is_not_the_batch_host_while_another_node_is_there():
    from raybridge.settings import AgentSettings

    assert AgentSettings("/s", nodes=1).head_order == [0]
    assert AgentSettings("/s", nodes=3).head_order == [1, 2, 0]
    assert AgentSettings("/s", nodes=3).head_rank == 1


def test_after_a_lost_head_the_services_wait_for_the_restarted_training(tmp_path, monkeypatch):
    """A new head with a batch driver starts its dashboard once the driver's training restored its
    checkpoint (raybridge.train's event), or SERVICES_DEFER_S after the nodes were in; otherwise at once."""
    import time
    from types import SimpleNamespace

    from raybridge import jobdir as jd
    from raybridge.agent import head
    from raybridge.agent.rendezvous import Rendezvous
    from raybridge.settings import AgentSettings

    rz = Rendezvous(AgentSettings(shared_dir=str(tmp_path), nodes=3, job_id="5"))
    rz.prepare()
    folder = rz.dir
    role = SimpleNamespace(generation=1, rendezvous=rz)
    due = lambda alive_at: head.HeadRole.services_due(role, alive_at)  # noqa: E731
    now = time.time()
    assert due(now)  # no batch driver (the events folder holds none): nothing to wait for
    jd.add_event(folder, "driver_started", "n2", "python train.py")
    jd.add_event(folder, "restored", "n2", "step 40")  # the first head's run: before the nodes were in
    time.sleep(0.01)  # (event times are rounded to the millisecond)
    alive_at = jd.now()
    assert not due(alive_at)
    assert due(alive_at - head.SERVICES_DEFER_S)  # waited long enough
    assert head.HeadRole.services_due(SimpleNamespace(generation=0, rendezvous=rz), alive_at)  # a first head
    time.sleep(0.01)
    jd.add_event(folder, "restored", "n3", "step 40")  # the restarted training is back
    assert due(alive_at)
    (tmp_path / "jobs" / "5" / "events" / "not-an-event").write_text("")  # anything else planted there
    assert set(jd.event_times(folder)) == {"driver_started", "restored"}
