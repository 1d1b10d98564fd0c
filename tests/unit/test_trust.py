"""The trust rule (trust.py): a file is used only if this user owns it and nobody else can write it or
a folder on its way, as OpenSSH's StrictModes has it."""

import os

import pytest

from raybridge import jobdir as jd
from raybridge import trust
from raybridge.errors import ClusterError, RaybridgeError
from raybridge.members import Members
from raybridge.transport.runner import LocalRunner


def private_file(folder, name="f", text="ok\n", mode=0o600):
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / name
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_an_own_private_file_is_read(tmp_path):
    assert trust.read_private(str(private_file(tmp_path / "d"))) == "ok\n"


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_a_file_others_can_write_is_refused(tmp_path, mode):
    path = private_file(tmp_path / "d", mode=mode)
    with pytest.raises(trust.TrustError, match=f"{path} is writable by others .*chmod go-w"):
        trust.read_private(str(path))


def test_a_link_is_not_followed(tmp_path):
    target = private_file(tmp_path / "d")
    link = tmp_path / "d" / "link"
    link.symlink_to(target)
    with pytest.raises(trust.TrustError, match="is a symbolic link"):
        trust.read_private(str(link))


def test_a_folder_others_can_write_is_refused_unless_sticky(tmp_path):
    path = private_file(tmp_path / "d")
    os.chmod(tmp_path / "d", 0o777)
    with pytest.raises(trust.TrustError, match=r"/d is writable by others \(mode 777\)"):
        trust.read_private(str(path))
    os.chmod(tmp_path / "d", 0o1777)  # like /tmp: others may add files, not replace ours
    assert trust.read_private(str(path)) == "ok\n"


@pytest.mark.skipif(os.getuid() != 0, reason="making a file of another owner needs root")
def test_a_file_or_folder_of_another_user_is_refused(tmp_path):
    path = private_file(tmp_path / "d")
    os.chown(path, 65534, 65534)
    with pytest.raises(trust.TrustError, match="belongs to .*not to you"):
        trust.read_private(str(path))
    os.chown(path, 0, 0)
    os.chown(tmp_path / "d", 65534, 65534)
    with pytest.raises(trust.TrustError, match="/d belongs to"):
        trust.read_private(str(path))


def test_missing_and_oversized_files(tmp_path):
    with pytest.raises(trust.TrustError, match="does not exist"):
        trust.read_private(str(tmp_path / "nope"))
    big = private_file(tmp_path / "d", text="x" * (trust.MAX_READ + 1))
    with pytest.raises(trust.TrustError, match="larger than"):
        trust.read_private(str(big))


def test_the_head_submits_a_member_script_only_if_it_passes(tmp_path):
    folder = jd.JobDir(str(tmp_path / "jobs" / "7"))
    members = Members(LocalRunner(), folder, "7")
    with pytest.raises(ClusterError, match="no member script .*not a plain sbatch"):
        members.script()
    (tmp_path / "jobs").mkdir(mode=0o700)
    script = private_file(tmp_path / "jobs" / "7", "member.sbatch", "#!/bin/bash\n")
    assert members.script() == "#!/bin/bash\n"
    os.chmod(script, 0o664)
    with pytest.raises(ClusterError, match="member script refused: .*member.sbatch is writable by others"):
        members.script()


def test_up_refuses_a_shared_folder_others_could_swap(tmp_path):
    """The login node's check (doctor and `up`): the shared folder is yours alone and no folder above it
    lets others rename it away, unless sticky (a setgid project folder must be sticky, as /tmp is)."""
    from raybridge.client import doctor
    from raybridge.client.profile import build_spec

    project = tmp_path / "proj42"
    project.mkdir(mode=0o755)
    spec = build_spec({"shared_dir": str(project / "raybridge")})
    assert [c.status for c in doctor.login_checks(spec, LocalRunner())][:2] == ["pass", "pass"]
    os.chmod(project, 0o2775)  # a group-writable project folder: a colleague could rename ours away
    check = doctor.shared_trust(spec, LocalRunner())
    assert check.status == "fail" and f"{project} is writable by others (mode 2775)" in check.detail
    assert "chmod +t" in check.fix
    with pytest.raises(RaybridgeError, match="shared folder on login: .*proj42 is writable by others"):
        doctor.refuse(spec, LocalRunner())
    os.chmod(project, 0o3775)  # sticky: others may add, not rename ours
    assert doctor.shared_trust(spec, LocalRunner()).status == "pass"
    os.chmod(project / "raybridge", 0o770)
    assert "raybridge is writable by others (mode 770)" in doctor.shared_trust(spec, LocalRunner()).detail
    if os.getuid() == 0:
        os.chmod(project / "raybridge", 0o700)
        os.chown(project / "raybridge", 65534, 65534)  # another user's folder: never
        assert "belongs to" in doctor.shared_trust(spec, LocalRunner()).detail


def test_a_cluster_record_is_read_only_from_a_folder_nobody_else_can_write(tmp_path):
    """A planted cluster.json would send the token to another address: the client reads the job folder's
    records only once the folder passed the rule."""
    from raybridge.client.cluster import Cluster

    shared = tmp_path / "shared"
    folder = jd.JobDir.of(str(shared), "7")
    os.makedirs(folder.path, mode=0o700)
    jd.write(
        folder.cluster, jd.ClusterRecord(job_id="7", state="ready", expected_nodes=1, job_dir=folder.path)
    )
    assert Cluster(LocalRunner(), "7", folder.path).info().state == "ready"
    os.chmod(shared / "jobs", 0o777)  # anyone could have renamed the job's folder and planted this one
    with pytest.raises(ClusterError, match=r"job 7: not using its folder: .*/jobs is writable by others"):
        Cluster(LocalRunner(), "7", folder.path).info()
    assert Cluster(LocalRunner(), "8", str(shared / "jobs" / "8")).info() is None  # not there yet
