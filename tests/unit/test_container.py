"""Containers: the profile's `container:` key, the words each runtime gets, and the scripts (golden files).

The recording stand-ins run the rendered script's own lines in bash with a fake runtime first on PATH
that writes down its arguments: what each node would run, exactly, hostile values included."""

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from raybridge import container, envcheck
from raybridge.client.profile import build_spec, load_spec
from raybridge.client.render import render, render_member
from raybridge.errors import ConfigError, RaybridgeError

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
HOSTILE_DIR = "/home/al ice/it's; $(id)"

CASES = {
    "charliecloud": {"image": "/lustre/images/torch-2.5", "mounts": ["/lustre/data", "/scratch/x:/data"]},
    "apptainer": {"image": "/lustre/images/torch.sif", "mounts": ["/lustre/data"], "options": ["--cleanenv"]},
    "podman": {"image": "oci-archive:/lustre/images/torch.tar", "mounts": ["/lustre/data"]},
    "pyxis": {"image": "nvcr.io#nvidia/pytorch:24.10-py3", "mounts": ["/lustre/data"]},
}


def spec_for(runtime: str, **extra):
    values = {
        "nodes": 4,
        "shared_dir": "/lustre/proj42/rb",
        "gpus_per_node": 4,
        "interface": ["ib0"],
        "command": ["python", "train.py", "--lr=1e-3"],
        "container": {"runtime": runtime, **CASES[runtime]},
        **extra,
    }
    return dataclasses.replace(build_spec(values), workdir="/home/alice/work")


@pytest.mark.parametrize("runtime", container.RUNTIMES)
def test_golden(runtime):
    text = render(spec_for(runtime), version="TEST")
    path = GOLDEN / f"container-{runtime}.sbatch"
    if os.environ.get("RAYBRIDGE_REGEN_GOLDEN") == "1":
        assert not os.environ.get("CI"), "RAYBRIDGE_REGEN_GOLDEN=1 is refused under CI"
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; RAYBRIDGE_REGEN_GOLDEN=1 regenerates on purpose"
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_without_a_container_the_script_has_no_container_lines():
    text = render(build_spec({"nodes": 2, "shared_dir": "/s"}), version="TEST")
    assert "container" not in text and "${container" not in text


STAND_IN = """#!/bin/bash
{{ printf '%s\\0' "$(basename "$0")" "$@"; printf '\\n'; }} >>{record}
"""


def run_script_lines(tmp_path: Path, text: str, program: str, lines: list[str]) -> list[list[str]]:
    """Run the script's container array and the given lines of it with a stand-in `program` first on
    PATH; each call's argv as the stand-in saw it."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / program).write_text(STAND_IN.format(record=record))
    (bin_dir / program).chmod(0o755)
    definition = text[text.index("container=(") :].split("\n)\n", 1)[0] + "\n)"
    body = "\n".join([definition, *lines])
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SLURMD_NODENAME": "n1",
        "SLURM_JOB_ID": "7",
        "generation": "0",
    }
    subprocess.run(["bash", "-euc", body], env=env, check=True)
    return [entry.split("\0")[:-1] for entry in record.read_text().splitlines()]


def test_each_runtime_runs_exactly_these_words_hostile_paths_intact(tmp_path):
    shared, image = "/lustre/it's a; $(id)/rb", "/images/x y;`id`.sif"
    for runtime in container.RUNTIMES:
        extra = {"shared_dir": shared, "container": {"runtime": runtime, "image": image, "mounts": ["/d a"]}}
        spec = dataclasses.replace(spec_for(runtime, **extra), workdir=HOSTILE_DIR)
        text = render(spec, version="TEST")
        agent = next(line for line in text.splitlines() if "raybridge.agent node" in line).strip()
        assert agent.startswith("--overlap") and agent.endswith("&")
        line = "srun --nodes=4 " + agent.removesuffix("&") if runtime == "pyxis" else agent.removesuffix("&")
        if runtime != "pyxis":
            line = line.split(" ", 3)[3]  # the words after srun's own options
        calls = run_script_lines(tmp_path / runtime, text, container.PROGRAM[runtime], [line])
        tail = ["python3", "-P", "-m", "raybridge.agent", "node"]
        expected = {
            "charliecloud": ["ch-run", "--bind=/d a", f"--bind={HOSTILE_DIR}", f"--bind={shared}",
                             f"--cd={HOSTILE_DIR}", image, "--", *tail],
            "apptainer": ["apptainer", "exec", "--bind=/d a", f"--bind={HOSTILE_DIR}", f"--bind={shared}",
                          f"--pwd={HOSTILE_DIR}", "--nv", image, *tail],
            "podman": ["podman", "run", "--rm", "--network=host", "--pid=host", "--ipc=host",
                       "--userns=keep-id", "--env-host", "--security-opt=label=disable", "--volume=/d a:/d a",
                       "--volume=/tmp:/tmp", f"--volume={HOSTILE_DIR}:{HOSTILE_DIR}", f"--volume={shared}:{shared}",
                       f"--workdir={HOSTILE_DIR}", "--device=nvidia.com/gpu=all", "--device=/dev/infiniband",
                       image, *tail],
            "pyxis": ["srun", "--nodes=4", "--overlap", "--no-kill", "--kill-on-bad-exit=0",
                      f"--container-image={image}", f"--container-mounts=/d a:/d a,/tmp:/tmp,{HOSTILE_DIR}:{HOSTILE_DIR},{shared}:{shared}",
                      f"--container-workdir={HOSTILE_DIR}", "--container-name=raybridge", *tail],
        }[runtime]  # fmt: skip
        assert calls == [expected], runtime


def test_commands_on_the_batch_host_run_in_the_container_too(tmp_path):
    """The environment check, prepare, new-head and stop: for Pyxis an srun step on this node."""
    for runtime in ("charliecloud", "pyxis"):
        text = render(spec_for(runtime), version="TEST")
        lines = [line for line in text.splitlines() if "raybridge.envcheck" in line and "python3" in line]
        lines += [
            line.strip().removeprefix("next=$(").split(")")[0]
            for line in text.splitlines()
            if ("agent stop" in line or "agent new-head" in line) and not line.startswith("#")
        ]
        assert len(lines) == 3, lines
        calls = run_script_lines(tmp_path / runtime, text, container.PROGRAM[runtime], lines)
        assert len(calls) == 3
        for call in calls:
            if runtime == "pyxis":
                assert call[:6] == ["srun", "--overlap", "--nodes=1", "--ntasks=1", "-w", "n1"]
                assert "--container-image=nvcr.io#nvidia/pytorch:24.10-py3" in call
            else:
                assert call[0] == "ch-run" and "/lustre/images/torch-2.5" in call
            assert "python3" in call and "-P" in call


def test_member_jobs_run_in_the_same_container():
    spec = dataclasses.replace(spec_for("charliecloud"), member_of="12", command=())
    text = render_member(spec, version="TEST")
    assert "container=(\n  ch-run\n" in text
    assert '"${container[@]}" python3 -P -m raybridge.envcheck' in text
    assert '"${container[@]}" python3 -P -m raybridge.agent node &' in text


def test_mounts_at_the_same_paths_parents_first_and_covered_ones_left_out():
    spec = container.ContainerSpec("charliecloud", "/i", ((("/lustre", "/lustre")), ("/x", "/data")))
    got = container.binds(spec, "/lustre/proj42/rb", "/lustre/proj42/alice", "/tmp")
    assert got == [("/x", "/data"), ("/lustre", "/lustre")]  # the shared folder is under /lustre
    got = container.binds(spec, "/home/a/rb", None, "/local/scratch")
    assert got == [("/x", "/data"), ("/lustre", "/lustre"), ("/local/scratch", "/local/scratch"),
                   ("/home/a/rb", "/home/a/rb")]  # fmt: skip
    # ch-run and Apptainer share the host's /tmp; podman and Pyxis get Ray's folder explicitly.
    podman = dataclasses.replace(spec, runtime="podman")
    assert ("/tmp", "/tmp") in container.binds(podman, "/s", None, "/tmp")
    assert ("/tmp", "/tmp") not in container.binds(spec, "/s", None, "/tmp")


@pytest.mark.parametrize(
    "value, message",
    [
        ({"runtime": "docker", "image": "/x"}, "container.runtime must be one of charliecloud"),
        ({"image": "/x"}, "container needs runtime"),
        ({"runtime": "podman"}, "container needs image"),
        ({"runtime": "charliecloud", "image": "images/x"}, "must be an absolute path on shared storage"),
        ({"runtime": "apptainer", "image": "/x\n;id"}, "must not contain newlines"),
        ({"runtime": "pyxis", "image": "a,b"}, "must not contain ','"),
        ({"runtime": "podman", "image": "x", "mounts": ["/a,/b"]}, "no ',' or ':' inside a path"),
        ({"runtime": "podman", "image": "x", "mounts": ["rel"]}, "must be /host/path"),
        ({"runtime": "podman", "image": "x", "mounts": ["/"]}, "not /"),
        ({"runtime": "podman", "image": "x", "mounts": ["/a:/b:/c"]}, "no ',' or ':' inside a path"),
        ({"runtime": "podman", "image": "x", "network": "bridge"}, "unknown key 'network'"),
        ("podman", "must be a mapping with runtime and image"),
    ],
)
def test_bad_container_values_are_one_line_errors(value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        build_spec({"container": value})
    assert "\n" not in str(e.value)


def test_flags_override_the_profile_key_by_key(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("container:\n  runtime: charliecloud\n  image: /a\n  mounts: [/data]\n")
    spec = load_spec(str(profile), container_image="/b")
    assert spec.container == container.ContainerSpec("charliecloud", "/b", (("/data", "/data"),))
    spec = load_spec(None, container_image="docker.io/x:1", container_runtime="podman")
    assert spec.container == container.ContainerSpec("podman", "docker.io/x:1")
    with pytest.raises(ConfigError, match="container needs runtime"):
        load_spec(None, container_image="/x")


def test_the_python_in_a_container_is_the_images_not_the_login_nodes():
    from raybridge.client.submission import complete

    spec = complete(build_spec({"container": {"runtime": "charliecloud", "image": "/i"}}), local=True)
    assert spec.python is None and spec.setup == ()  # python3 inside the image
    assert "python3 -P -m raybridge.envcheck" in render(spec, version="TEST")


def test_a_node_without_the_runtime_or_the_image_is_one_line(tmp_path):
    text = render(spec_for("charliecloud"), version="TEST")
    checks = [line for line in text.splitlines() if "raybridge-error" in line]
    assert len(checks) == 2
    (tmp_path / "hostname").symlink_to("/bin/hostname")  # a PATH with no ch-run on it
    env = {"PATH": str(tmp_path)}
    r = subprocess.run(["/bin/bash", "-c", checks[0]], env=env, capture_output=True, text=True)
    assert r.returncode == 3
    assert envcheck.find_error(r.stdout).endswith(
        "ch-run (Charliecloud) is not installed here; fix: install it on every node, or load its module in setup"
    )
    r = subprocess.run(["/bin/bash", "-c", checks[1]], env=env, capture_output=True, text=True)
    assert "the charliecloud image /lustre/images/torch-2.5 is not there" in envcheck.find_error(r.stdout)
    # A node other than the batch host: srun's own line names the missing program.
    line = "slurmstepd: error: execve(): ch-run: No such file or directory"
    assert envcheck.find_error(line).startswith("ch-run is not installed on every node of the job")


def test_the_environment_check_names_the_image(monkeypatch):
    monkeypatch.setenv(envcheck.CONTAINER_VAR, "charliecloud:/images/x")
    why = envcheck.problem("raybridge=0.0.0-other")
    assert "in the container /images/x runs raybridge" in why and envcheck.CONTAINER_FIX in why


STAGE_STAND_IN = """#!/bin/bash
printf '%s\\0' "$(basename "$0")" "$@" >>{record}; printf '\\n' >>{record}
case "$(basename "$0") $1" in
  "apptainer build") echo sif >"$3" ;;
  "podman save") echo oci >"$5" ;;
  "enroot import") echo sqsh >"$3" ;;
esac
"""


@pytest.mark.parametrize(
    "runtime, source, calls",
    [
        ("apptainer", "docker://nvcr.io/nvidia/pytorch:24.10-py3", [["apptainer", "build", "--force", "T", "S"]]),
        ("podman", "docker.io/library/python:3.11", [["podman", "image", "exists", "S"], ["podman", "save", "--format", "oci-archive", "-o", "T", "S"]]),
        ("pyxis", "docker://nvcr.io#nvidia/pytorch:24.10-py3", [["enroot", "import", "-o", "T", "S"]]),
    ],
)  # fmt: skip
def test_staging_runs_the_runtimes_own_tool_into_a_hidden_name_then_renames(
    tmp_path, monkeypatch, runtime, source, calls
):
    from raybridge.client import images
    from raybridge.transport.runner import LocalRunner

    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    for program in ("apptainer", "podman", "enroot"):
        (bin_dir / program).write_text(STAGE_STAND_IN.format(record=record))
        (bin_dir / program).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    spec = build_spec({"shared_dir": str(tmp_path / "shared")})
    staged = images.stage(spec, LocalRunner(), runtime, source, "torch")
    assert staged.path == str(tmp_path / "shared" / "images" / ("torch" + images.SUFFIX[runtime]))
    assert Path(staged.path).read_text().strip() in ("sif", "oci", "sqsh")
    got = [entry.split("\0")[:-1] for entry in record.read_text().split("\n") if entry]
    for call in got:  # the temporary name: hidden, next to the final one
        for i, word in enumerate(call):
            if word.startswith(str(tmp_path / "shared" / "images" / ".staging-torch-")):
                call[i] = "T"
            elif word == source:
                call[i] = "S"
    assert got == calls
    assert sorted(os.listdir(tmp_path / "shared" / "images")) == [os.path.basename(staged.path)]
    with pytest.raises(RaybridgeError, match="exists already"):
        images.stage(spec, LocalRunner(), runtime, source, "torch")


def test_staging_a_bad_archive_is_one_line_and_leaves_nothing(tmp_path):
    from raybridge.client import images
    from raybridge.transport.runner import LocalRunner

    bad = tmp_path / "bad.tar"
    bad.write_text("not a tar archive")
    spec = build_spec({"shared_dir": str(tmp_path / "shared")})
    with pytest.raises(RaybridgeError, match="failed: tar: This does not look like a tar archive"):
        images.stage(spec, LocalRunner(), "charliecloud", str(bad), "x")
    assert os.listdir(tmp_path / "shared" / "images") == []
    with pytest.raises(ConfigError, match="may hold only"):
        images.stage(spec, LocalRunner(), "charliecloud", str(bad), "x; rm -rf ~")
