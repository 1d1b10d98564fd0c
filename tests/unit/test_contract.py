"""The two process boundaries, tested as round trips: what render exports is what the agent reads,
and what the agents write is what the CLI reads."""

import dataclasses
import json
import subprocess

import pytest

from raybridge import jobdir as jd
from raybridge.client.profile import DEFAULTS, PARAMS, PROFILE_KEYS, build_spec
from raybridge.client.render import render
from raybridge.settings import DEFAULTS as AGENT_DEFAULTS
from raybridge.settings import AgentSettings, SettingsError

# Every profile key set to something other than its default (hostile where a value can be).
EVERYTHING = {
    "nodes": 3,
    "job_name": "all-keys",
    "partition": "gpu",
    "account": "proj42",
    "qos": "high",
    "time": "1:00:00",
    "cpus_per_node": 16,
    "gpus_per_node": 2,
    "memory_per_node": "64G",
    "exclusive": False,
    "interface": ["ib0", "ib1"],
    "nccl_ib_hca": "mlx5_0",
    "shared_dir": "/shared/my dir/it's",
    "node_tmp": "/scratch/t",
    "python": "/opt/py 3/bin/python",
    "setup": ["module load x"],
    "env": {"NASTY": "a'b\"c; echo pwned $(id)"},
    "sbatch_args": ["--constraint=ib"],
    "ray_args": ['--resources={"x": 1}', "--log-style=record"],
    "ray_start": "command",
    "object_store_fraction": 0.5,
    "ready_timeout": 77,
    "auth": False,
    "spare_nodes": 1,
    "signal_seconds": 60,
    "requeue": True,
    "max_requeues": 5,
    "failure_detection_s": 4,
    "warm_workers": 2,
    "preload": ["ray.train.torch", "torch._dynamo"],
    "login": {"host": "hpc", "user": "alice"},
    "labels": ["team=rl", "example.org/gpu=a100"],
    "replace_lost": 2,
    "min_nodes": 5,
    "max_nodes": 6,
    "idle_timeout": 30,
    "join_timeout": 120,
    "container": {
        "runtime": "charliecloud",
        "image": "/images/it's a; $(id)",
        "mounts": ["/data set", "/a:/b"],
        "options": ["--set-env=X=a b"],
    },
}


def exported_env(script: str, job_id: str = "7", rank: str = "1") -> dict[str, str]:
    """Evaluate the script's export lines in bash, as Slurm would run them, and read them back."""
    exports = "\n".join(line for line in script.splitlines() if line.startswith("export "))
    probe = f"SLURM_JOB_ID={job_id}\n{exports}\nenv -0"
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout
    env = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    return env | {"SLURM_JOB_ID": job_id, "SLURM_PROCID": rank}


def test_every_profile_key_is_in_the_test():
    # chain excludes requeue (set here): the chained script is pinned by its own golden file.
    assert set(EVERYTHING) | {"chain"} == PROFILE_KEYS


def test_render_exports_round_trip_to_the_agent_settings():
    spec = build_spec(dict(EVERYTHING))
    env = exported_env(render(spec, version="TEST"))
    got = AgentSettings.from_env(env)
    assert got == dataclasses.replace(spec.agent_settings(), job_id="7", rank=1)
    assert got.job_dir == "/shared/my dir/it's/jobs/7" == env["RAYBRIDGE_JOB_DIR"]
    assert got.ray_args == ('--resources={"x": 1}', "--log-style=record")
    assert got.interface == ("ib0", "ib1") and got.auth is False and got.nodes == 4
    assert (got.min_nodes, got.max_nodes, got.idle_timeout, got.join_timeout) == (5, 6, 30, 120)
    assert got.warm_workers == 2 and got.preload == ("ray.train.torch", "torch._dynamo")
    assert env["NASTY"] == "a'b\"c; echo pwned $(id)"


def test_defaults_round_trip_and_are_stated_once():
    spec = build_spec({"shared_dir": "/s"})
    assert AgentSettings.from_env(exported_env(render(spec))) == dataclasses.replace(
        spec.agent_settings(), job_id="7", rank=1
    )
    # The profile's defaults for the keys the agents read are the agent settings' own.
    for key, value in AGENT_DEFAULTS.items():
        if key in DEFAULTS:
            assert DEFAULTS[key] == value, key


def test_each_parameter_is_declared_once_with_everything_derived_from_it():
    """profile.param: the profile's keys, the CLI's flags and the agents' settings come from one list."""
    from raybridge.cli.common import CLUSTER_ONLY, SPEC_OPTIONS

    agent_fields = {f.name for f in dataclasses.fields(AgentSettings)}
    for f in PARAMS:
        assert f.metadata["help"], f"{f.name}: no help text"
        if f.metadata["agent"]:  # crosses unchanged: the agents' record has it, with the same default
            assert f.name in agent_fields and AGENT_DEFAULTS.get(f.name, f.default) == f.default, f.name
    flagged = [f.name for f in PARAMS if f.metadata["flag"]]
    container_flags = ["container_image", "container_runtime"]  # keys of the `container:` mapping
    assert [name for name, _ in SPEC_OPTIONS] == flagged + container_flags and "nodes" in flagged
    assert (
        set(CLUSTER_ONLY) == {f.name for f in PARAMS if f.metadata["cluster_only"]} >= {"nodes", "max_nodes"}
    )


def test_the_documented_profile_keys_are_the_declared_ones():
    from pathlib import Path

    from raybridge.client.profile import reference

    doc = (Path(__file__).resolve().parents[2] / "docs" / "profile.md").read_text()
    documented = doc.split("<!-- keys:begin -->\n", 1)[1].split("<!-- keys:end -->", 1)[0]
    assert documented == reference(), "docs/profile.md is out of date: paste reference() between the markers"


def test_settings_errors_name_the_variable():
    env = exported_env(render(build_spec({"shared_dir": "/s"})))
    with pytest.raises(SettingsError, match="RAYBRIDGE_READY_TIMEOUT has an invalid value 'soon'"):
        AgentSettings.from_env(env | {"RAYBRIDGE_READY_TIMEOUT": "soon"})
    with pytest.raises(SettingsError, match="RAYBRIDGE_SHARED_DIR is not set"):
        AgentSettings.from_env({"SLURM_JOB_ID": "7"})
    with pytest.raises(SettingsError, match="SLURM_JOB_ID is not set"):
        AgentSettings.from_env({k: v for k, v in env.items() if k != "SLURM_JOB_ID"})


def records_written_by_the_agents(tmp_path):
    """A job folder as prepare + a head agent leave it (the agents' own code writes it)."""
    from raybridge.agent.rendezvous import Rendezvous

    settings = AgentSettings(shared_dir=str(tmp_path), nodes=2, job_id="9")
    rz = Rendezvous(settings)
    rz.prepare(job_name="rb", submitted_at="1000.5")
    head = jd.HeadRecord(
        ip="10.0.0.1", hostname="n1", interface="ib0", ports={"gcs": 6379, "dashboard": 8265}, gcs_up_at=1.0
    )
    rz.publish_head(head)
    rz.write_node(jd.NodeRecord(ip="10.0.0.1", rank=0, hostname="n1", cpus=2, ray_started_by="agent"))
    gcs = [
        {
            "node_id": "ab",
            "ip": "10.0.0.1",
            "ray_hostname": "n1",
            "alive": True,
            "ray_cpus": 2.0,
            "ray_gpus": 0,
        }
    ]
    rz.update_cluster(
        state="ready", head=head, address=head.gcs_address, ready_at=2.0, nodes=rz.node_records(gcs)
    )
    return rz.dir


def test_records_written_by_the_agents_parse(tmp_path):
    folder = records_written_by_the_agents(tmp_path)
    rec = jd.read(folder.cluster, jd.ClusterRecord)
    assert rec.state == "ready" and rec.job_id == "9" and rec.expected_nodes == 2
    assert rec.head.gcs_address == "10.0.0.1:6379" == rec.address
    assert (
        rec.token_path == folder.token
        and oct((tmp_path / "jobs" / "9" / "token").stat().st_mode)[-3:] == "600"
    )
    (node,) = rec.nodes
    assert (node.hostname, node.alive, node.ray_started_by, node.rank) == ("n1", True, "agent", 0)
    assert rec.submitted_at == 1000.5 and rec.timestamps["ready_at"] == 2.0
    assert json.loads((tmp_path / "jobs" / "9" / "cluster.json").read_text())["schema"] == jd.SCHEMA
    # The CLI side reads the same file through its runner.
    from raybridge.client.cluster import Cluster
    from raybridge.transport.runner import LocalRunner

    assert Cluster(LocalRunner(), "9", folder.path).info() == rec


def test_a_dead_node_is_on_the_timeline_when_ray_marked_it_dead(tmp_path):
    """Not when the head's next look saw it: a fast recovery can restore a checkpoint in between."""
    from ray.core.generated import gcs_pb2

    from raybridge.agent import ray_internals
    from raybridge.agent.rendezvous import Rendezvous

    folder = records_written_by_the_agents(tmp_path)
    rz = Rendezvous(AgentSettings(shared_dir=str(tmp_path), nodes=2, job_id="9"))
    before = rz.cluster().nodes

    class Client:  # the GCS's answer, in Ray's own message type
        def get_all_node_info(self, timeout):
            dead = gcs_pb2.GcsNodeInfo(
                node_id=b"ab", node_manager_address="10.0.0.1", node_manager_hostname="n1", state=1
            )
            dead.end_time_ms = 1_700_000_000_250
            return {b"ab": dead}

    view = ray_internals.GcsView.__new__(ray_internals.GcsView)
    view.client = Client()
    (gcs,) = view.nodes()
    assert gcs["alive"] is False and gcs["died_at"] == 1_700_000_000.25
    (lost,) = rz.node_changes(before, rz.node_records([gcs]))
    assert lost.hostname == "n1"
    (event,) = jd.read(folder.cluster, jd.ClusterRecord).events
    assert (event["event"], event["node"], event["at"]) == ("node_dead", "n1", 1_700_000_000.25)
    # Alive (or a Ray that does not say when): no time of death, the event is stamped when seen.
    assert ray_internals.died_at(gcs_pb2.GcsNodeInfo(state=0, end_time_ms=5)) is None
    assert ray_internals.died_at(object()) is None


def test_a_record_of_another_schema_is_one_clear_line(tmp_path):
    folder = records_written_by_the_agents(tmp_path)
    data = json.loads(open(folder.cluster).read())
    data["schema"] = 99
    open(folder.cluster, "w").write(json.dumps(data))
    with pytest.raises(jd.RecordError) as e:
        jd.read(folder.cluster, jd.ClusterRecord)
    msg = str(e.value)
    assert "\n" not in msg and "record schema 99, this raybridge reads 1" in msg and folder.cluster in msg


def test_a_previous_job_with_the_same_id_is_not_this_one(tmp_path):
    from raybridge.client.cluster import Cluster
    from raybridge.transport.runner import LocalRunner

    folder = records_written_by_the_agents(tmp_path)  # submitted at 1000.5
    assert Cluster(LocalRunner(), "9", folder.path, submitted_at=1000.5).info() is not None
    assert Cluster(LocalRunner(), "9", folder.path, submitted_at=5000.0).info() is None
