"""ClusterSpec → sbatch script text. Pure: no I/O besides reading the packaged template."""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path

from raybridge import container
from raybridge.client.profile import ClusterSpec, time_to_seconds
from raybridge.jobdir import CHAIN_NEXT, DRIVER_EXIT, DRIVER_RESTART, MAX_HEAD_LOSSES, PREEMPT

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "raybridge.sbatch.in"
MEMBER_TEMPLATE = TEMPLATE.with_name("raybridge-member.sbatch.in")
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")

UP_BODY = """
# Slurm signals USR1 before the time limit (--signal): training jobs see raybridge.train.preempted().
trap 'echo "raybridge: USR1 received: asking the training to checkpoint"; touch "$RAYBRIDGE_JOB_DIR/{preempt}"' USR1
# Keep the cluster until `raybridge down`, the time limit or scancel.
set +e
while :; do  # `wait` returns early when a trap runs; keep waiting for the agents
  wait "$agents"
  rc=$?
  kill -0 "$agents" 2>/dev/null || break
done
exit "$rc"
"""

RUN_BODY = """
# Slurm signals USR1 before the time limit or on preemption (--signal): the training saves at once
# (raybridge.train.preempted()), then the job is requeued and the same run resumes.
trap 'echo "raybridge: USR1 received: asking the training to checkpoint"; touch "$RAYBRIDGE_JOB_DIR/{preempt}"' USR1
# The driver runs on the head's node (the second node; the first when alone), as Ray expects: it starts
# now, imports Ray while the nodes join, and runs the command once every node is alive, with RAY_ADDRESS
# and the auth settings set. If the head's node is lost, another agent takes over as head and the driver
# runs again there (it resumes from its newest checkpoint), up to {max_restarts} times: a standby driver
# waits on the next node in line for the head with its imports done, and runs the command the moment
# the new head's nodes are alive, without waiting for Slurm to notice that the old node is gone.
{chain_start}hosts=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
driver_host=${{hosts[1]:-${{hosts[0]}}}}
lost=
generation=0
restarts=0
standby=
set +e
while :; do
  if [ -n "$standby" ] && [ "$standby_host" = "$driver_host" ] && kill -0 "$standby" 2>/dev/null; then
    driver=$standby  # the standby on the new head runs the command
  else
    rm -f "$RAYBRIDGE_JOB_DIR/{restart}" "$RAYBRIDGE_JOB_DIR/{exited}"
    srun --overlap --nodes=1 --ntasks=1 -w "$driver_host" {step}{python} -P -m raybridge.agent driver -- {command} &
    driver=$!
  fi
  # The next in line for the head (the agents' order: the second node, the third, ..., the first last).
  standby= standby_host=
  for h in "${{hosts[@]:1}}" "${{hosts[0]}}"; do
    case " $lost $driver_host " in *" $h "*) ;; *) standby_host=$h; break ;; esac
  done
  if [ -n "$standby_host" ] && [ "$restarts" -lt {max_restarts} ]; then
    srun --overlap --nodes=1 --ntasks=1 -w "$standby_host" {step}{python} -P -m raybridge.agent driver --standby "$generation" -- {command} &
    standby=$!
  fi
  while :; do  # `wait` returns early when a trap runs; keep waiting for the driver itself
    wait "$driver"
    rc=$?
    kill -0 "$driver" 2>/dev/null || break
  done
  # The driver leaves its exit code when its command ended (srun says 0 when the node failed). Without
  # it the command was stopped or killed with its node: it starts again if another node took over as head.
  if [ -e "$RAYBRIDGE_JOB_DIR/{exited}" ]; then
    rc=$(cat "$RAYBRIDGE_JOB_DIR/{exited}")
    break
  fi
  [ "$rc" = 0 ] && rc=1  # killed: not a success, whatever srun says
  [ "$restarts" -lt {max_restarts} ] || break
  next=$({here}{python} -P -m raybridge.agent new-head "$generation") || break
  lost="$lost $driver_host"
  read -r driver_host generation <<<"$next"
  restarts=$((restarts + 1))
  echo "raybridge: the driver runs again on the new head $driver_host ($restarts of {max_restarts})"
done
set -e
echo "raybridge: driver exited with code $rc"
{here}{python} -P -m raybridge.agent stop  # a standby that is still waiting ends with the cluster
wait "$agents" || true
{chain_end}{requeue}exit "$rc"
"""

SERVE_BODY = """
# ---- serving across allocations (raybridge serve {name}) ----
# This allocation is one generation of the service: the driver runs the app on this cluster, checks
# it, and takes the traffic over from the generation before (<shared_dir>/serve/{name}/current.json,
# which `raybridge endpoint {name}` follows). The next generation is queued now; it becomes eligible
# {start_after} minutes after this job started ({overlap} before its time limit), takes over when
# healthy, and this one then drains and ends. A generation that fails leaves this one serving.
generation=${{RAYBRIDGE_SERVE_GENERATION:-1}}
chain_next=
{until_check}if chain_next=$(scontrol write batch_script "$SLURM_JOB_ID" - | sbatch --parsable \\
  --dependency=after:"$SLURM_JOB_ID"+{start_after} --output={output} \\
  --export=ALL,RAYBRIDGE_SERVE_GENERATION=$((generation + 1)) 2>"$RAYBRIDGE_JOB_DIR/{refused}"); then
  chain_next=${{chain_next%%;*}}
  echo "$chain_next" >"$RAYBRIDGE_JOB_DIR/{chain_file}"
  echo "raybridge: serve {name}: generation $generation; the next one is queued as job $chain_next"
else
  chain_next=  # the driver records Slurm's reason as an event of the service
  echo "raybridge: serve {name}: Slurm refused the next generation; this one serves until its time limit"
fi
hosts=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
driver_host=${{hosts[1]:-${{hosts[0]}}}}
set +e
srun --overlap --nodes=1 --ntasks=1 -w "$driver_host" {step}{python} -P -m raybridge.agent serve {qname} "$generation" -- {command} &
driver=$!
while :; do  # `wait` returns early when a trap runs; keep waiting for the driver
  wait "$driver"
  rc=$?
  kill -0 "$driver" 2>/dev/null || break
done
set -e
if [ "$rc" != 0 ] && [ -n "$chain_next" ]; then
  scancel "$chain_next" 2>/dev/null || true  # a generation that failed queues none after it
  rm -f "$RAYBRIDGE_JOB_DIR/{chain_file}"
fi
echo "raybridge: serve {name}: generation $generation ended with code $rc"
{here}{python} -P -m raybridge.agent stop
wait "$agents" || true
exit "$rc"
"""

CHAIN_START = """# ---- chain (--chain {k}): the next allocation is queued now, behind this one ----
# It runs this same script (Slurm's own copy of it) once this job ends, and the training continues from
# its newest checkpoint under the same run name; the last allocation of the chain queues no more.
export RAYBRIDGE_RUN_NAME="${{RAYBRIDGE_RUN_NAME:-$SLURM_JOB_NAME-$SLURM_JOB_ID}}"
chain_index=${{RAYBRIDGE_CHAIN_INDEX:-1}}
chain_next=
if [ "$chain_index" -lt {k} ]; then
  if chain_next=$(scontrol write batch_script "$SLURM_JOB_ID" - | sbatch --parsable \\
    --dependency=afterany:"$SLURM_JOB_ID" --output={output} \\
    --export=ALL,RAYBRIDGE_CHAIN_INDEX=$((chain_index + 1)),RAYBRIDGE_RUN_NAME="$RAYBRIDGE_RUN_NAME"); then
    chain_next=${{chain_next%%;*}}
    echo "$chain_next" >"$RAYBRIDGE_JOB_DIR/{chain_file}"
    echo "raybridge: allocation $chain_index of {k}; the next one is queued as job $chain_next"
  else
    chain_next=
    echo "raybridge: could not queue the next allocation; the training goes on in this one only"
  fi
fi
"""

CHAIN_END = """# The next allocation goes on only where this one stopped for its time limit (the checkpoint above).
if [ -n "$chain_next" ] && [ ! -e "$RAYBRIDGE_JOB_DIR/{preempt}" ]; then
  scancel "$chain_next" 2>/dev/null || true
  rm -f "$RAYBRIDGE_JOB_DIR/{chain_file}"
  echo "raybridge: the chain ends here (exit code $rc): cancelled the queued job $chain_next"
elif [ -n "$chain_next" ]; then
  echo "raybridge: the training continues in job $chain_next (allocation $((chain_index + 1)) of {k})"
fi
"""

REQUEUE = """if [ -e "$RAYBRIDGE_JOB_DIR/{preempt}" ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {max_requeues} ]; then
  echo "raybridge: requeueing job $SLURM_JOB_ID (restart $((${{SLURM_RESTART_COUNT:-0}} + 1)) of {max_requeues})"
  scontrol requeue "$SLURM_JOB_ID"
fi
"""


@cache
def _template(path: Path = TEMPLATE) -> str:
    return path.read_text()


def fill(template: str, values: dict[str, str]) -> str:
    """Replace {{name}} placeholders; a missing or unused value is an error, never empty text."""
    names = set(PLACEHOLDER.findall(template))
    missing, unused = names - values.keys(), values.keys() - names
    if missing or unused:
        raise ValueError(
            f"template placeholders do not match: missing={sorted(missing)} unused={sorted(unused)}"
        )
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def resources(spec: ClusterSpec, time: bool = True) -> list[str]:
    """What each node gets and where, as sbatch/srun options (the same for both)."""
    d = []
    if spec.cpus_per_node:
        d.append(f"--cpus-per-task={spec.cpus_per_node}")
    if spec.gpus_per_node:
        d.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.memory_per_node:
        d.append(f"--mem={spec.memory_per_node}")
    if time and spec.time:
        d.append(f"--time={spec.time}")
    for opt in ("partition", "account", "qos"):
        if getattr(spec, opt):
            d.append(f"--{opt}={getattr(spec, opt)}")
    if spec.exclusive:
        d.append("--exclusive")
    return d


def directives(spec: ClusterSpec) -> list[str]:
    """#SBATCH lines. Values were validated to a safe character set by the profile layer."""
    d = [
        f"--job-name={spec.job_name}",
        f"--nodes={spec.total_nodes}",
        "--ntasks-per-node=1",
        *resources(spec),
    ]
    if spec.total_nodes > 1:
        # A failed node must not end the allocation: Ray Train replaces a lost worker (from the
        # spares, if any) and another agent takes over a lost head.
        d.append("--no-kill")
    if spec.signal_seconds:
        d.append(f"--signal=B:USR1@{spec.signal_seconds}")  # time to checkpoint before the end
    if spec.requeue:
        d += ["--requeue", "--open-mode=append"]  # one log across restarts
    else:
        d.append("--no-requeue")  # whatever the site's default: a lost batch host ends the job
    d.append("--comment=raybridge")
    d.extend(spec.sbatch_args)
    return [f"#SBATCH {x}" for x in d]


def exports(spec: ClusterSpec) -> list[str]:
    """The agents' settings (one typed record, settings.py), then what Ray and NCCL read, then the
    profile's own variables. Every value is shell-quoted."""
    q = shlex.quote
    lines = spec.agent_settings().exports()
    if spec.nccl_ib_hca:
        lines.append(f"export NCCL_IB_HCA={q(spec.nccl_ib_hca)}")
    lines += [
        f"# Node failure detection: dead after {spec.failure_detection_s} failed 1-s health checks "
        "(Ray's default 5 x 3 s idles training 15 s).",
        "export RAY_health_check_period_ms=1000",
        f"export RAY_health_check_failure_threshold={spec.failure_detection_s}",
        "# The driver's ray.init() returns at once: Ray otherwise holds the first driver on a node until it",
        "# has started one idle worker per CPU there (0.7 s on 2 cores, more on a large node); workers start",
        "# when tasks and actors need them.",
        "export RAY_prestart_worker_first_driver=0",
    ]
    return lines + [f"export {name}={q(value)}" for name, value in spec.env]


def container_lines(spec: ClusterSpec) -> list[str]:
    """The script's `container` array (none without a container): what every command on a node runs in."""
    launch = container_launch(spec)
    if launch is None:
        return []
    c = spec.container
    assert c is not None
    how = (
        "srun options: each step below runs in the image"
        if launch.srun_options
        else "a prefix for each command"
    )
    return [
        "",
        f"# ---- container (profile: container): {container.NAMES[c.runtime]}, {how} ----",
        "# The environment check, the agents (and Ray) and the driver run inside the image on every node, as",
        "# you, on the node's own network, with the shared folder and the working directory at the same",
        "# paths; this script stays on the host, where Slurm's signals reach it.",
        f"export RAYBRIDGE_CONTAINER={shlex.quote(c.runtime + ':' + c.image)}  # named in the nodes' error lines",
        launch.definition(),
        *runtime_checks(c),
    ]


def runtime_checks(c: container.ContainerSpec) -> list[str]:
    """The runtime and a path image, checked on the batch host before their first use: one line
    (which `up` shows as the reason) instead of the shell's or the runtime's own error."""
    q = shlex.quote
    program = container.PROGRAM[c.runtime]
    fail = "{{ printf 'raybridge-error: %s: %s\\n' \"$(hostname -s)\" {}; exit 3; }}"
    lines = []
    if c.runtime != "pyxis":
        name = container.NAMES[c.runtime]
        what = program if name == program else f"{program} ({name})"
        why = f"{what} is not installed here; fix: install it on every node, or load its module in setup"
        lines.append(f"command -v {program} >/dev/null || " + fail.format(q(why)))
    if path := c.image_path:
        why = (
            f"the {c.runtime} image {path} is not there; fix: stage it on shared storage "
            "(raybridge image stage), or set container.image"
        )
        lines.append(f"[ -e {q(path)} ] || " + fail.format(q(why)))
    return lines


def container_launch(spec: ClusterSpec) -> container.Launch | None:
    c = spec.container
    if c is None:
        return None
    mounts = container.binds(c, spec.shared_dir, spec.workdir, spec.node_tmp)
    infiniband = any(i.startswith("ib") for i in spec.interface) or bool(spec.nccl_ib_hca)
    return container.launch(c, mounts, spec.workdir, spec.gpus_per_node or 0, infiniband)


def _prefixes(spec: ClusterSpec) -> dict[str, str]:
    launch = container_launch(spec)
    return {"here": launch.here if launch else "", "step": launch.step if launch else ""}


def member_directives(spec: ClusterSpec) -> list[str]:
    """A member job: one worker node, the cluster's remaining time, no requeue (a new one is added
    instead), marked so that it is never taken for a cluster of its own."""
    d = [f"--job-name={spec.job_name}-member", "--nodes=1", "--ntasks-per-node=1", *resources(spec)]
    d += ["--no-requeue", "--comment=raybridge-member"]
    d.extend(spec.sbatch_args)
    return [f"#SBATCH {x}" for x in d]


def render_member(spec: ClusterSpec, version: str | None = None) -> str:
    """The sbatch script of a member job (spec.member_of: the cluster it joins)."""
    if version is None:
        from raybridge import __version__ as version
    if not spec.member_of:
        raise ValueError("render_member needs spec.member_of")
    return fill(
        _template(MEMBER_TEMPLATE),
        {
            "version": version,
            "profile": spec.profile.replace("\n", " "),
            "cluster_job": spec.member_of,
            "directives": "\n".join(member_directives(spec)),
            "setup": "\n".join(spec.setup) if spec.setup else "# (none)",
            "exports": "\n".join(exports(spec) + container_lines(spec)),
            "python": shlex.quote(spec.python or "python3"),
            **_prefixes(spec),
        },
    )


def render(spec: ClusterSpec, version: str | None = None) -> str:
    """The complete sbatch script for spec. Runs unchanged under plain `sbatch`."""
    if version is None:
        from raybridge import __version__ as version
    python = shlex.quote(spec.python or "python3")
    requeue = REQUEUE.format(max_requeues=spec.max_requeues, preempt=PREEMPT) if spec.requeue else ""
    chained = spec.chain > 1 and bool(spec.command)
    chain = {"k": spec.chain, "chain_file": CHAIN_NEXT, "preempt": PREEMPT}
    chain_start = CHAIN_START.format(output=shlex.quote(spec.layout.output), **chain) if chained else ""
    chain_end = CHAIN_END.format(**chain) if chained else ""
    body = (
        RUN_BODY.format(
            python=python,
            command=shlex.join(spec.command),
            requeue=requeue,
            preempt=PREEMPT,
            restart=DRIVER_RESTART,
            exited=DRIVER_EXIT,
            max_restarts=MAX_HEAD_LOSSES,
            chain_start=chain_start,
            chain_end=chain_end,
            **_prefixes(spec),
        )
        if spec.command
        else UP_BODY.format(preempt=PREEMPT)
    )
    if spec.serve:
        minutes = (time_to_seconds(spec.time or "") or 0) // 60
        body = SERVE_BODY.format(
            name=spec.serve,
            qname=shlex.quote(spec.serve),
            until_check=(
                f"# --until: the last generation is the one whose successor would start after {spec.serve_until}.\n"
                f'if [ "$(($(date +%s) + {max(minutes - spec.serve_overlap, 1)} * 60))" -ge {spec.serve_until} ]; then\n'
                '  echo "raybridge: serve: the service ends with this generation (--until)"\n'
                "el"  # + the `if` below: elif
                if spec.serve_until
                else ""
            ),
            start_after=max(minutes - spec.serve_overlap, 1),
            overlap=spec.serve_overlap,
            output=shlex.quote(spec.layout.output),
            chain_file=CHAIN_NEXT,
            refused="serve-next-refused",
            python=python,
            command=shlex.join(spec.command),
            **_prefixes(spec),
        )
    return fill(
        _template(),
        {
            "version": version,
            "profile": spec.profile.replace("\n", " "),
            "directives": "\n".join(directives(spec)),
            "setup": "\n".join(spec.setup) if spec.setup else "# (none)",
            "exports": "\n".join(exports(spec) + container_lines(spec)),
            "python": python,
            "body": body.rstrip("\n"),
            **_prefixes(spec),
        },
    )
