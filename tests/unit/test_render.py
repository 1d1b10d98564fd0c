"""Rendering is pure: golden files pin the output (RAYBRIDGE_REGEN_GOLDEN=1 rewrites them)."""

import os
import subprocess
from pathlib import Path

import pytest

from raybridge.client.profile import build_spec
from raybridge.client.render import directives, fill, render

GOLDEN = Path(__file__).resolve().parent.parent / "golden"

CASES = {
    "minimal": {"nodes": 2, "shared_dir": "/shared/rb"},
    "full-site": {
        "nodes": 8,
        "job_name": "llm-pretrain",
        "partition": "gpu",
        "account": "proj42",
        "qos": "high",
        "time": "2-00:00:00",
        "cpus_per_node": 64,
        "gpus_per_node": 4,
        "memory_per_node": "480G",
        "interface": ["ib0", "ib1"],
        "nccl_ib_hca": "mlx5_0,mlx5_1",
        "shared_dir": "/lustre/proj42/rb",
        "setup": ["module load cuda/12.4", "source /lustre/proj42/venv/bin/activate"],
        "env": {"OMP_NUM_THREADS": "8"},
        "sbatch_args": ["--constraint=ib"],
        "ray_args": ["--log-style=record"],
        "preload": ["ray.train.torch", "torch._dynamo"],
    },
    "fault-tolerant": {
        "nodes": 4,
        "spare_nodes": 1,
        "time": "4:00:00",
        "signal_seconds": 300,
        "requeue": True,
        "max_requeues": 5,
        "failure_detection_s": 5,
        "shared_dir": "/shared/rb",
        "command": ["python", "train.py"],
    },
    "chained": {
        "nodes": 2,
        "time": "12:00:00",
        "signal_seconds": 600,
        "chain": 4,
        "shared_dir": "/shared/my dir",
        "command": ["python", "train.py"],
    },
    "batch-hostile": {
        "nodes": 2,
        "shared_dir": "/shared/my dir/it's",
        "python": "/opt/py 3/bin/python",
        "env": {"NASTY": "a'b\"c; echo pwned $(id) `id` \\"},
        "ray_args": ['--resources={"x": 1}'],
        "command": ["python", "train.py", "--name", "it's a; $(rm -rf /)", "--lr=1e-3"],
    },
}


MEMBER = {
    "partition": "shared",
    "gpus_per_node": 2,
    "time": "0:42:00",
    "shared_dir": "/shared/my dir/it's",
    "setup": ["source /shared/venv/bin/activate"],
    "labels": ["raybridge.io/partition=shared", "raybridge.io/cluster=12"],
}


def test_member_golden_and_its_agent_joins_the_clusters_folder():
    import dataclasses

    from raybridge.client.render import render_member
    from raybridge.settings import AgentSettings
    from tests.unit.test_contract import exported_env

    spec = dataclasses.replace(build_spec(dict(MEMBER)), member_of="12")
    text = render_member(spec, version="TEST")
    path = GOLDEN / "member.sbatch"
    if os.environ.get("RAYBRIDGE_REGEN_GOLDEN") == "1":
        assert not os.environ.get("CI"), "RAYBRIDGE_REGEN_GOLDEN=1 is refused under CI"
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; RAYBRIDGE_REGEN_GOLDEN=1 regenerates on purpose"
    assert "raybridge.agent prepare" not in text  # never resets the cluster's folder
    assert "#SBATCH --nodes=1" in text and "#SBATCH --comment=raybridge-member" in text
    env = exported_env(text, job_id="20", rank="0")
    got = AgentSettings.from_env(env)
    assert got.cluster_job == "12" and got.job_id == "20"
    assert got.job_dir == "/shared/my dir/it's/jobs/12" == env["RAYBRIDGE_JOB_DIR"]
    assert got.labels == ("raybridge.io/partition=shared", "raybridge.io/cluster=12")
    assert got.temp_dir.endswith("/rb-20")  # its own node folder and port block: its own job id
    r = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name):
    text = render(build_spec(dict(CASES[name])), version="TEST")
    path = GOLDEN / f"{name}.sbatch"
    if os.environ.get("RAYBRIDGE_REGEN_GOLDEN") == "1":
        # Regenerating is a deliberate local act; under CI it would turn the test into a no-op.
        assert not os.environ.get("CI"), "RAYBRIDGE_REGEN_GOLDEN=1 is refused under CI"
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; RAYBRIDGE_REGEN_GOLDEN=1 regenerates on purpose"


def test_script_is_valid_bash_and_hostile_values_survive_quoting(tmp_path):
    spec = build_spec(dict(CASES["batch-hostile"]))
    text = render(spec, version="TEST")
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # Evaluate only the exports block and read the values back: they must be byte-identical.
    exports = "\n".join(line for line in text.splitlines() if line.startswith("export "))
    probe = f'SLURM_JOB_ID=7\n{exports}\nprintf \'%s\\0\' "$NASTY" "$RAYBRIDGE_JOB_DIR" "$RAYBRIDGE_RAY_ARGS"'
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout
    # Exactly the three values and nothing else: a payload that ran (`echo pwned`, `$(id)`) would
    # have printed to stdout around them.
    assert out.split("\0") == [
        dict(spec.env)["NASTY"],
        "/shared/my dir/it's/jobs/7",
        "'--resources={\"x\": 1}'",
        "",
    ]


def test_driver_command_is_quoted_word_by_word(tmp_path):
    spec = build_spec(dict(CASES["batch-hostile"]))
    line = next(x for x in render(spec).splitlines() if "-m raybridge.agent driver" in x)
    assert line.strip().startswith("srun ") and line.endswith(" &")
    words = line.strip()[: -len(" &")]
    out = subprocess.run(
        ["bash", "-c", f"driver_host=n2; printf '%s\\n' {words}"], capture_output=True, text=True
    )
    assert out.stdout.splitlines() == [
        *("srun", "--overlap", "--nodes=1", "--ntasks=1", "-w", "n2"),
        *("/opt/py 3/bin/python", "-P", "-m", "raybridge.agent", "driver", "--"),
        *("python", "train.py", "--name", "it's a; $(rm -rf /)", "--lr=1e-3"),
    ]


def test_directives_only_contain_validated_values():
    spec = build_spec(dict(CASES["full-site"]))
    lines = directives(spec)
    assert "#SBATCH --nodes=8" in lines and "#SBATCH --exclusive" in lines
    assert "#SBATCH --gpus-per-node=4" in lines and "#SBATCH --constraint=ib" in lines
    assert all("\n" not in x for x in lines)


def test_spares_signal_and_requeue():
    spec = build_spec(dict(CASES["fault-tolerant"]))
    text = render(spec)
    assert "#SBATCH --nodes=5" in text and "#SBATCH --no-kill" in text
    assert "#SBATCH --signal=B:USR1@300" in text and "#SBATCH --requeue" in text
    assert "export RAYBRIDGE_TRAIN_WORKERS=4" in text and "export RAYBRIDGE_NODES=5" in text
    assert "-lt 5 ]; then" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    plain = render(build_spec({"nodes": 2, "command": ["true"]}))
    assert "#SBATCH --signal" not in plain and "scontrol requeue" not in plain
    assert "#SBATCH --no-kill" in plain  # a lost node (the head's too) must not end the allocation
    alone = render(build_spec({"nodes": 1, "command": ["true"]}))
    assert "#SBATCH --no-kill" not in alone


def test_fill_refuses_missing_or_unused_values():
    with pytest.raises(ValueError, match="missing=\\['b'\\]"):
        fill("{{a}} {{b}}", {"a": "1"})
    with pytest.raises(ValueError, match="unused=\\['c'\\]"):
        fill("{{a}}", {"a": "1", "c": "2"})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"chain": 3, "requeue": True, "signal_seconds": 60}, "chain and requeue are two ways"),
        ({"chain": 3}, "chain needs signal_seconds"),
        ({"chain": 0}, "chain must be between 1 and 100"),
    ],
)
def test_chain_needs_the_signal_and_excludes_requeue(values, message):
    from raybridge.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        build_spec(values)


def test_a_chain_of_one_or_a_cluster_without_a_command_renders_no_chain():
    for values in ({"chain": 1, "command": ["x"]}, {"chain": 3, "signal_seconds": 60}):
        assert "chain" not in render(build_spec(values), version="TEST").replace("chained", "")


def test_serve_golden_and_its_next_generation_is_queued_with_the_overlap():
    import dataclasses

    spec = build_spec(
        {"nodes": 1, "time": "12:00:00", "shared_dir": "/shared/rb", "command": ["python", "app.py"]}
    )
    text = render(dataclasses.replace(spec, serve="classify", serve_overlap=10), version="TEST")
    path = GOLDEN / "serve.sbatch"
    if os.environ.get("RAYBRIDGE_REGEN_GOLDEN") == "1":
        assert not os.environ.get("CI"), "RAYBRIDGE_REGEN_GOLDEN=1 is refused under CI"
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; RAYBRIDGE_REGEN_GOLDEN=1 regenerates on purpose"
    assert '--dependency=after:"$SLURM_JOB_ID"+710' in text  # 12 h minus 10 minutes
    assert "raybridge.agent serve classify" in text and "raybridge.agent driver" not in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


@pytest.mark.parametrize("until, queued", [("+2h", False), ("+3d", True)])
def test_serve_until_queues_no_generation_that_would_start_after_it(tmp_path, until, queued):
    import dataclasses

    from raybridge.cli.serving import until_epoch

    spec = build_spec({"nodes": 1, "time": "1-00:00:00", "shared_dir": "/s", "command": ["python", "a.py"]})
    text = render(dataclasses.replace(spec, serve="x", serve_overlap=10, serve_until=until_epoch(until)), "T")
    block = text[text.index("generation=${") : text.index("hosts=(")]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (
        ("scontrol", "echo '#!/bin/bash'"),
        ("sbatch", f"echo called >>{tmp_path}/sbatch; echo 99"),
    ):
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "RAYBRIDGE_JOB_DIR": str(tmp_path)}
    r = subprocess.run(["bash", "-c", block], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sbatch").exists() == queued, r.stdout
    assert ("ends with this generation (--until)" in r.stdout) != queued


def test_until_is_a_time_or_a_duration_and_never_in_the_past():
    from raybridge.cli.serving import until_epoch
    from raybridge.errors import RaybridgeError

    assert until_epoch("+90m", now=0) == 5400 and until_epoch("+2d", now=0) == 172800
    with pytest.raises(RaybridgeError, match="is in the past"):
        until_epoch("2001-01-01T00:00")
    with pytest.raises(RaybridgeError, match="is not a time"):
        until_epoch("tomorrow; rm -rf ~")
