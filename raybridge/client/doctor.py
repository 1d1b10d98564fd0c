"""Preflight checks: what would stop or slow a Ray cluster on this site, found before it starts.

    login_checks(spec, runner)        on the login node (cheap; `up` refuses on their failures)
    node_checks(spec, runner, nodes)  on compute nodes, through a short Slurm step (agent/doctor.py)

Each check is pass / warn / fail / skip, names the node (or the pair of nodes) and, when it fails,
the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import posixpath
import re
import secrets
import shlex
import time
from collections import Counter
from dataclasses import asdict, dataclass
from itertools import combinations

from raybridge import container, envcheck, trust
from raybridge.agent.doctor import MARK
from raybridge.client.profile import ClusterSpec
from raybridge.client.render import container_launch, exports, resources
from raybridge.errors import RaybridgeError
from raybridge.transport.runner import Runner

SOCKET_LIMIT = 107  # AF_UNIX path limit (108 bytes with the NUL)
# Below node_tmp: /rb-<job id, up to 10 digits>/session_<YYYY-mm-dd_HH-MM-SS_ffffff>_<pid, up to 7>
# /sockets/plasma_store, Ray's longest socket path.
SOCKET_SUFFIX = (
    len("/rb-") + 10 + len("/session_2026-01-01_00-00-00_000000_") + 7 + len("/sockets/plasma_store")
)
TOKEN_AUTH_RAY = (2, 52)
LABEL = re.compile(r"^\s*(\d+): ?(.*)$")


@dataclass(frozen=True)
class Check:
    check: str
    node: str
    status: str  # pass | warn | fail | skip
    detail: str
    fix: str = ""

    def message(self) -> str:
        """The one line a refusing `up` prints (the doctor's table shows the same words)."""
        return f"{self.check} on {self.node}: {self.detail}" + (f"; fix: {self.fix}" if self.fix else "")


# ------------------------------------------------------------------ on the login node


def temp_path(spec: ClusterSpec) -> Check:
    longest = len(spec.node_tmp.rstrip("/")) + SOCKET_SUFFIX
    if longest > SOCKET_LIMIT:
        room = SOCKET_LIMIT - SOCKET_SUFFIX
        return Check(
            "temp dir",
            "login",
            "fail",
            f"node_tmp {spec.node_tmp!r} makes Ray's socket paths up to {longest} characters (the limit is "
            f"{SOCKET_LIMIT}): Ray would fail to start",
            f"set node_tmp to a path of at most {room} characters (e.g. /tmp)",
        )
    return Check(
        "temp dir", "login", "pass", f"Ray's socket paths at most {longest} of {SOCKET_LIMIT} characters"
    )


def shared_dir(spec: ClusterSpec, runner: Runner) -> Check:
    folder = spec.shared_dir
    probe = posixpath.join(folder, f".raybridge-probe-{secrets.token_hex(4)}")
    try:
        runner.makedirs(folder)
        runner.write_text(probe, "probe")
        runner.run(["rm", "-f", probe], check=False)
    except (OSError, RaybridgeError) as e:
        return Check(
            "shared storage",
            "login",
            "fail",
            f"cannot write to shared_dir {folder} ({getattr(e, 'strerror', None) or e})",
            "set shared_dir to a folder on shared storage that you can write",
        )
    return Check("shared storage", "login", "pass", f"{folder} writable")


def shared_trust(spec: ClusterSpec, runner: Runner) -> Check:
    """The trust rule (trust.py) for the shared folder and every folder above it, on the login node: a
    colleague who can write one of them could swap what raybridge reads and runs there."""
    folder = spec.shared_dir
    try:
        why = trust.chain_problem(lambda argv: runner.run(argv).stdout, folder)
    except (RaybridgeError, ValueError) as e:
        return Check("shared folder", "login", "fail", f"cannot check {folder}: {e}", "")
    if why:
        text, _, fix = why.partition(" (fix: ")
        return Check("shared folder", "login", "fail", text, fix.removesuffix(")"))
    return Check(
        "shared folder", "login", "pass", f"{folder} and the folders above it: nobody else can write them"
    )


def container_image(spec: ClusterSpec, runner: Runner) -> Check:
    """The container's image, where it is a path on shared storage: there; trusted as anything raybridge
    runs from shared storage (the runtime executes what is in it as the user); and, for Charliecloud,
    with a folder for each mount (ch-run mounts only onto folders that exist in the image: made here
    when the image is the user's own)."""
    c = spec.container
    assert c is not None
    path = c.image_path
    if path is None:
        return Check("container", "login", "pass", f"{c.runtime} image {c.image} (fetched by the runtime)")
    fix = "stage the image there (docs/containers.md), or set container.image / --container-image"
    r = runner.run(["stat", "-L", "-c", "%u %F", "--", path], check=False)
    if r.returncode != 0:
        return Check("container", "login", "fail", f"the {c.runtime} image {path} is not there", fix)
    owner, kind = int(r.stdout.split()[0]), r.stdout.split(" ", 1)[1].strip()
    try:
        why = trust.chain_problem(lambda argv: runner.run(argv).stdout, path, own=False)
    except (RaybridgeError, ValueError) as e:
        return Check("container", "login", "fail", f"cannot check {path}: {e}", "")
    if why:
        text, _, how = why.partition(" (fix: ")
        return Check("container", "login", "fail", f"image: {text}", how.removesuffix(")"))
    if c.runtime == "charliecloud" and kind == "directory":
        mounts = container.binds(c, spec.shared_dir, spec.workdir, spec.node_tmp)
        targets = [d for _, d in mounts]
        missing = runner.run(
            ["sh", "-c", 'i=$1; shift; for d; do [ -d "$i$d" ] || echo "$d"; done', "sh", path, *targets]
        ).stdout.split("\n")
        missing = [m for m in missing if m]
        if missing and owner == int(runner.run(["id", "-u"]).stdout.strip()):
            for d in missing:  # mount points in the user's own image
                runner.makedirs(path.rstrip("/") + d)
        elif missing:
            return Check(
                "container",
                "login",
                "fail",
                f"the image {path} has no folder {missing[0]} to mount onto (ch-run mounts only onto "
                "folders that exist in the image)",
                f"mkdir -p {shlex.quote(path.rstrip('/') + missing[0])} as the image's owner, or stage a "
                "copy of your own: raybridge image stage",
            )
    return Check("container", "login", "pass", f"{c.runtime} image {path}: nobody else can write it")


def token_auth(spec: ClusterSpec, local: bool) -> Check:
    if not spec.auth:
        return Check(
            "token auth", "login", "warn", "auth: false: anyone who reaches the ports can run code", ""
        )
    if not local:
        return Check("token auth", "login", "skip", "Ray's version is checked on the nodes")
    version = envcheck.dist_version("ray") or "none"
    if version == "none" or tuple(int(x) for x in version.split(".")[:2]) < TOKEN_AUTH_RAY:
        return Check(
            "token auth",
            "login",
            "fail",
            f"Ray {version} has no token authentication",
            "install ray[default,train]>=2.52 in raybridge's environment",
        )
    return Check("token auth", "login", "pass", f"Ray {version} supports token authentication")


def login_checks(spec: ClusterSpec, runner: Runner) -> list[Check]:
    """What `up` checks itself before submitting (fast: no Slurm job)."""
    # The trust rule first where the folder exists: nothing is written into a folder someone else could
    # have made or swapped (and the refusal names the real cause, not a failed write).
    trusted = shared_trust(spec, runner)
    if trusted.status == "fail" and not trusted.detail.startswith("cannot check"):
        checks = [trusted]
    else:
        checks = [shared_dir(spec, runner)]
        if checks[0].status == "pass":
            checks.append(trusted if trusted.status == "pass" else shared_trust(spec, runner))
    if spec.container and checks[-1].status == "pass":
        checks.append(container_image(spec, runner))
    return [*checks, temp_path(spec), token_auth(spec, local=not runner.host)]


def refuse(spec: ClusterSpec, runner: Runner) -> None:
    """`up`'s preflight: the first failed login check, as a one-line error."""
    for c in login_checks(spec, runner):
        if c.status == "fail":
            raise RaybridgeError(c.message())


# ------------------------------------------------------------------ on the compute nodes


def node_script(spec: ClusterSpec, folder: str, nodes: int, mark: str) -> str:
    """What each task of the doctor's step runs: the cluster's own environment, then the checks."""
    q = shlex.quote
    launch = container_launch(spec)
    # Inside the container when there is one: a Pyxis step is in it already (srun_command), the other
    # runtimes start each command in it, as the batch script does.
    prefix = launch.step if launch and not launch.srun_options else ""
    python = prefix + q(spec.python or "python3")
    lines = [*spec.setup, *exports(spec)]
    if prefix:
        lines.append(launch.definition())
    if mib := mebibytes(spec.memory_per_node):  # a batch job gets it from sbatch; this step does not
        lines.append(f'export SLURM_MEM_PER_NODE="${{SLURM_MEM_PER_NODE:-{mib}}}"')
    lines.append(
        f"{python} -P -m raybridge.envcheck >/dev/null || {{ {python} -P -m raybridge.envcheck; exit 3; }}"
    )
    lines.append(f"exec {python} -P -m raybridge.agent doctor {q(folder)} {nodes} {q(mark)}")
    return "\n".join(lines)


def mebibytes(memory: str | None) -> int | None:
    """A Slurm memory size ("3G", "4000M", "4000") in MiB."""
    if not memory:
        return None
    unit = memory[-1].upper() if memory[-1].isalpha() else "M"
    number = memory[:-1] if memory[-1].isalpha() else memory
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}.get(unit)
    return int(float(number) * scale) if scale and number.replace(".", "", 1).isdigit() else None


def srun_command(spec: ClusterSpec, nodes: int, script: str) -> list[str]:
    cmd = ["srun", "--label", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1"]
    cmd += ["--job-name=raybridge-doctor", "--comment=raybridge-doctor", "--time=5", "--kill-on-bad-exit=0"]
    launch = container_launch(spec)
    if launch and launch.srun_options:  # Pyxis: the whole step runs in the image
        cmd += [shlex.split(w)[0] for w in launch.words]
    return [*cmd, *resources(spec, time=False), "bash", "-c", script]


def node_checks(spec: ClusterSpec, runner: Runner, nodes: int, timeout: float = 300) -> list[Check]:
    """Run the node checks in one Slurm step on `nodes` nodes and judge the results together."""
    folder = posixpath.join(spec.layout.doctor, f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}")
    mark = "login-mark"
    runner.makedirs(folder)
    runner.write_text(posixpath.join(folder, mark), "")
    spec = dataclasses.replace(spec, nodes=nodes, spare_nodes=0)
    try:
        r = runner.run(
            srun_command(spec, nodes, node_script(spec, folder, nodes, mark)), check=False, timeout=timeout
        )
    finally:
        runner.run(["rm", "-rf", folder], check=False)
    results, rows = [], []
    for text in by_task(r.stdout).values():
        if MARK in text:
            with contextlib.suppress(ValueError):
                results.append(json.JSONDecoder().raw_decode(text, text.index(MARK) + len(MARK))[0])
        elif envcheck.ERROR_MARK in text:
            why = text[text.index(envcheck.ERROR_MARK) + len(envcheck.ERROR_MARK) :]
            host, _, rest = why.partition(": ")
            rows.append(Check("environment", host, "fail", rest.split("; ")[0], envcheck.FIX))
    if not results and not rows:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise RaybridgeError(
            f"the doctor's Slurm step gave no results (exit {r.returncode}): {' / '.join(tail)}"
        )
    missing = nodes - len(results) - len(rows)
    if missing > 0:
        said = " / ".join((r.stderr or "").strip().splitlines()[-3:])
        rows.append(
            Check("report", "?", "fail", f"{missing} node(s) did not report (srun: {said or 'nothing'})", "")
        )
    return rows + judge(results, reference(not runner.host))


def by_task(output: str) -> dict[str, str]:
    """srun --label output, each task's text put back together: srun forwards a long line in pieces
    and may interleave the pieces of several tasks."""
    out: dict[str, str] = {}
    for line in output.splitlines():
        m = LABEL.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), "") + m.group(2)
    return out


def reference(local: bool) -> dict[str, str]:
    """The versions every node must run: the login node's (local), or raybridge's own (remote)."""
    v = envcheck.versions(full=local)
    if local:
        v["torch"] = envcheck.dist_version("torch") or "none"
    return v


def judge(results: list[dict], ref: dict[str, str]) -> list[Check]:
    rows: list[Check] = []
    ifaces = {r["host"]: r.get("iface") for r in results if r.get("iface")}
    usual = Counter(ifaces.values()).most_common(1)[0][0] if ifaces else None
    usable = set()
    for r in sorted(results, key=lambda r: r["host"]):
        host = r["host"]
        for c in r.get("checks", []):
            check = Check(c["check"], host, c["status"], c["detail"], c.get("fix", ""))
            if check.check == "interface" and check.status == "pass" and r.get("iface") != usual:
                check = Check(
                    "interface",
                    host,
                    "fail",
                    f"{check.detail}, but the other nodes use {usual}: Ray's nodes would not share one network",
                    f"bring {usual} up on {host}, or name the interface in `interface:`",
                )
            rows.append(check)
        if r.get("iface") and r.get("iface") == usual:
            usable.add(host)
        diff = [
            f"{k} {r['versions'].get(k, 'none')} (login: {v})"
            for k, v in ref.items()
            if r["versions"].get(k) != v
        ]
        if diff:
            rows.append(Check("versions", host, "fail", ", ".join(diff), envcheck.FIX))
        else:
            rows.append(
                Check("versions", host, "pass", " ".join(f"{k} {v}" for k, v in r["versions"].items()))
            )
    by_host = {r["host"]: r for r in results}
    published = {h for h, r in by_host.items() if r.get("published")}
    for a, b in combinations(sorted(usable & published), 2):
        ab, ba = by_host[a].get("reach", {}).get(b), by_host[b].get("reach", {}).get(a)
        bad = [f"{x}→{y}: {why}" for x, y, why in ((a, b, ab), (b, a, ba)) if why != "ok"]
        if bad:
            rows.append(
                Check(
                    "fabric",
                    f"{a}↔{b}",
                    "fail",
                    "; ".join(bad),
                    f"the nodes cannot reach each other over {usual}: check its routes and firewall",
                )
            )
        else:
            rows.append(Check("fabric", f"{a}↔{b}", "pass", f"TCP connect both ways over {usual}"))
    return rows


def as_json(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]


def table(checks: list[Check]) -> list[str]:
    width = max((len(c.check) for c in checks), default=8)
    nodew = max((len(c.node) for c in checks), default=6)
    out = []
    for c in checks:
        out.append(f"{c.status.upper():5} {c.check:<{width}}  {c.node:<{nodew}}  {c.detail}")
        if c.fix and c.status in ("fail", "warn"):
            out.append(f"{'':5} {'':<{width}}  {'':<{nodew}}  fix: {c.fix}")
    return out
