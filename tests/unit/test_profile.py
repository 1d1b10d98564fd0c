import textwrap

import pytest

from raybridge.client.profile import build_spec, load_spec, time_to_seconds
from raybridge.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_profile_values_and_cli_overrides(tmp_path):
    path = write(
        tmp_path,
        """
        partition: gpu
        time: "01:00:00"
        shared_dir: /scratch/me/rb
        interface: [ib0, eth0]
        env: {OMP_NUM_THREADS: "4"}
        sbatch_args: ["--constraint=ib"]
    """,
    )
    spec = load_spec(path, nodes=8, time="2:00:00", sbatch_args=["--reservation=x"])
    assert spec.nodes == 8
    assert spec.partition == "gpu"
    assert spec.time == "2:00:00"
    assert spec.interface == ("ib0", "eth0")
    assert spec.env == (("OMP_NUM_THREADS", "4"),)
    assert spec.sbatch_args == ("--constraint=ib", "--reservation=x")
    assert spec.job_dir("12") == "/scratch/me/rb/jobs/12"


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'partiton' \(valid keys: .*partition"):
        load_spec(write(tmp_path, "partiton: gpu\n"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"nodes": 0}, "nodes must be between 1"),
        ({"nodes": "three"}, "nodes must be a whole number"),
        ({"nodes": True}, "nodes must be a whole number"),
        ({"time": "1:2:3:4"}, "not a Slurm time"),
        ({"time": "soon"}, "not a Slurm time"),
        ({"exclusive": "yes"}, "exclusive must be true or false"),
        ({"memory_per_node": "lots"}, "memory_per_node must look like"),
        ({"shared_dir": "relative/dir"}, "must be an absolute path"),
        ({"shared_dir": "/a\nb"}, "must not contain newlines"),
        ({"node_tmp": "/" + "x" * 260}, "at most 200 characters"),
        ({"job_name": "a b"}, "job_name has characters"),
        ({"job_name": "x'; rm -rf /"}, "job_name has characters"),
        ({"job_name": "$(reboot)"}, "job_name has characters"),
        ({"job_name": "a\nb"}, "must not contain newlines"),
        ({"partition": "gpu;ls"}, "partition has characters"),
        ({"sbatch_args": ["--constraint=ib\n#SBATCH --nodes=99"]}, "must not contain newlines"),
        ({"sbatch_args": ["--nodes=99"]}, "may not set '--nodes'"),
        ({"sbatch_args": ["-N2"]}, "may not set '-N'"),
        ({"sbatch_args": ["--output=/tmp/x"]}, "may not set '--output'"),
        ({"sbatch_args": ["constraint=ib"]}, "entries must be options"),
        ({"env": {"BAD NAME": "x"}}, "invalid variable name"),
        ({"env": ["A=1"]}, "env must be a mapping"),
        ({"setup": ["ok", "two\nlines"]}, r"setup\[1\] must not contain newlines"),
        ({"login": {"host": "h", "colour": "red"}}, "unknown key 'colour'"),
        ({"login": "bad host"}, "is not a host name"),
        ({"object_store_fraction": 2}, "between 0.05 and 0.8"),
        ({"failure_detection_s": 0}, "failure_detection_s must be between 1"),
        ({"failure_detection_s": "fast"}, "failure_detection_s must be a whole number"),
        ({"warm_workers": 17}, "warm_workers must be between 0 and 16"),
        ({"preload": ["torch; rm -rf ~"]}, "preload has characters"),
        ({"preload": ["torch\nimport os"]}, "preload must not contain newlines"),
        ({"ray_start": "ray start; rm -rf ~"}, "ray_start must be one of agent, command, got"),
    ],
)
def test_bad_values_give_one_clear_message(values, message):
    with pytest.raises(ConfigError, match=message) as e:
        build_spec(values, "profile x.yaml")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("profile x.yaml: ")


def test_login_forms():
    spec = build_spec({"login": "alice@login.example.org"})
    assert (spec.login.user, spec.login.host) == ("alice", "login.example.org")
    spec = build_spec({"login": {"host": "hpc", "port": 2222, "accept_new_host_key": True}})
    assert spec.login.port == 2222 and spec.login.accept_new_host_key


def test_missing_and_unknown_profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYBRIDGE_PROFILE_PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="profile file not found"):
        load_spec(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        load_spec("nope")
    (tmp_path / "site.yaml").write_text("partition: a\n")
    assert load_spec("site").partition == "a"


def test_broken_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="line 2 is not valid YAML"):
        load_spec(write(tmp_path, "partition: [a\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_spec(write(tmp_path, "- a\n- b\n"))


def test_home_resolution():
    spec = build_spec({})
    assert spec.with_home("/home/u").shared_dir == "/home/u/raybridge"
    assert build_spec({"shared_dir": "/abs"}).with_home("/home/u").shared_dir == "/abs"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 1800), ("30:15", 1815), ("1:00:00", 3600), ("2-0", 172800), ("1-2:3", 93780), ("1-0:0:5", 86405)],
)
def test_time_to_seconds(text, seconds):
    assert time_to_seconds(text) == seconds
    assert time_to_seconds("UNLIMITED") is None


def test_shipped_profiles_are_valid():
    from raybridge.client.profile import list_profiles

    found = dict(list_profiles())
    assert "example-ib-cluster" in found
    spec = load_spec(str(found["example-ib-cluster"]), nodes=8)
    assert spec.gpus_per_node == 4 and spec.login.host == "hpc-login"


@pytest.mark.parametrize(
    ("arg", "owned"),
    [
        ("--comm=evil", "--comment"),  # sbatch takes unambiguous prefixes of long options
        ("--exp=NONE", "--export"),
        ("-vJevil", "-J"),  # bundled short options
        ("--constraint=ib --comment=evil --output=/x", "--comment"),  # several options in one entry
        ("--nodes 4", "--nodes"),
        ("-k", "-k"),
    ],
)
def test_sbatch_args_cannot_set_owned_options_in_any_spelling(arg, owned):
    with pytest.raises(ConfigError, match=f"may not set '{owned}'"):
        build_spec({"sbatch_args": [arg]})


@pytest.mark.parametrize(
    "arg", ["--constraint=ib", "--constraint ib", "-C ib", "-x n1", "--mail-type=END", "-Hv"]
)
def test_other_sbatch_args_pass(arg):
    assert build_spec({"sbatch_args": [arg]}).sbatch_args == (arg,)


def test_profile_values_are_matched_whole_and_echoed_short(tmp_path):
    with pytest.raises(ConfigError, match="invalid variable name 'FOO\\\\n'"):
        build_spec({"env": {"FOO\n": "x"}})  # `$` in a pattern would have let the newline through
    with pytest.raises(ConfigError, match="may not set RAYBRIDGE_AUTH"):
        build_spec({"env": {"RAYBRIDGE_AUTH": "none"}})
    with pytest.raises(ConfigError, match="may not set RAY_AUTH_MODE"):
        build_spec({"env": {"RAY_AUTH_MODE": "disabled"}})
    bomb = tmp_path / "bomb.yaml"
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefg", "bcdefgh", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb.write_text("\n".join(lines).replace("a: &a", "nodes: &a", 1) + "\n")
    with pytest.raises(ConfigError) as e:
        load_spec(str(bomb))
    assert len(str(e.value)) < 2000
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("job_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_spec(str(latin))


def test_a_profile_others_could_have_written_is_refused(tmp_path):
    """Its `setup` lines run as the user: a group-writable profile, or one in a folder others can write,
    is one clear line (as OpenSSH treats such a config)."""
    import os

    from raybridge.errors import ConfigError

    folder = tmp_path / "profiles"
    folder.mkdir(mode=0o755)
    path = folder / "site.yaml"
    path.write_text("nodes: 2\nsetup: ['module load x']\n")
    os.chmod(path, 0o644)
    assert load_spec(str(path)).nodes == 2
    os.chmod(path, 0o664)
    with pytest.raises(ConfigError, match=r"site.yaml is writable by others \(mode 664\): its setup lines"):
        load_spec(str(path))
    os.chmod(path, 0o644)
    os.chmod(folder, 0o777)
    with pytest.raises(ConfigError, match=r"profiles is writable by others \(mode 777\)"):
        load_spec(str(path))
