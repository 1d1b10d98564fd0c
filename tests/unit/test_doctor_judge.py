"""The doctor's pure parts: srun's split and interleaved output, the judging of node results."""

import json

from raybridge.agent.doctor import MARK
from raybridge.client import doctor


def test_long_lines_split_and_interleaved_by_srun_are_put_back_together():
    a = MARK + json.dumps({"host": "n1", "pad": "x" * 2500})
    b = MARK + json.dumps({"host": "n2", "pad": "y" * 2500})
    pieces = [
        (0, a[:1024]),
        (1, b[:1024]),
        (1, b[1024:2048]),
        (0, a[1024:2048]),
        (0, a[2048:]),
        (1, b[2048:]),
    ]
    out = "\n".join(f"{t}: {text}" for t, text in pieces) + "\nsrun: job 5 queued\n"
    texts = doctor.by_task(out)
    assert json.loads(texts["0"][len(MARK) :])["host"] == "n1"
    assert json.loads(texts["1"][len(MARK) :])["host"] == "n2"


def node(host, iface="ib0", reach=None, versions=None, published=True):
    return {
        "host": host,
        "iface": iface,
        "published": published,
        "reach": reach or {},
        "versions": versions or {"ray": "2.60.0"},
        "checks": [{"check": "interface", "status": "pass", "detail": f"{iface} 10.0.0.1"}],
    }


def test_judging_names_the_odd_interface_the_broken_pair_and_other_versions():
    ref = {"ray": "2.60.0"}
    results = [
        node("n1", reach={"n2": "ok", "n3": "refused"}),
        node("n2", reach={"n1": "ok", "n3": "ok"}),
        node("n3", reach={"n1": "ok", "n2": "ok"}, versions={"ray": "2.52.0"}),
        node("n4", iface="eth0"),
    ]
    rows = doctor.judge(results, ref)
    fails = {(c.check, c.node) for c in rows if c.status == "fail"}
    assert fails == {("interface", "n4"), ("fabric", "n1↔n3"), ("versions", "n3")}
    assert [c.detail for c in rows if c.check == "fabric" and c.status == "fail"] == ["n1→n3: refused"]
    assert not [c for c in rows if c.check == "fabric" and "n4" in c.node]  # its interface failed


def test_temp_path_limit_and_memory_sizes():
    from raybridge.client.profile import ClusterSpec

    assert doctor.temp_path(ClusterSpec(node_tmp="/tmp")).status == "pass"
    room = doctor.SOCKET_LIMIT - doctor.SOCKET_SUFFIX
    assert doctor.temp_path(ClusterSpec(node_tmp="/" + "x" * (room - 1))).status == "pass"
    bad = doctor.temp_path(ClusterSpec(node_tmp="/" + "x" * room))
    assert bad.status == "fail" and f"at most {room} characters" in bad.fix
    assert [doctor.mebibytes(m) for m in ("3G", "4000M", "4000", "1T", None)] == [
        3072,
        4000,
        4000,
        1 << 20,
        None,
    ]
