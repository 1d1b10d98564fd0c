"""The batch driver's launcher: started with the agents, it runs the user's command on the head node
the moment every Ray node is alive.

    python -m raybridge.agent driver AGENTS_PID -- COMMAND...

Where the time goes otherwise: a driver started once the cluster is *ready* waits for the dashboard and
the Ray Client server, which it does not use, then spends a second or more starting Python and importing
Ray. Here both happen while the cluster forms:

- COMMAND `python [-u] SCRIPT ARGS` or `python [-u] -m MODULE ARGS`, with the interpreter this launcher runs
  in, is run in this process exactly as `python` would run it (`sys.argv`, `sys.path[0]`, `__main__`,
  exit code, uncaught exceptions, signals), after the program's leading imports (Ray, torch, ...) were
  done while waiting: only the imports before its first other statement, and none of a name its own
  folder holds, so a program that sets Ray's environment variables before `import ray` gets the import
  at its own time. After a lost head this is what keeps the driver's restart short.
- Any other command runs as a child process, with the same environment, when the nodes are alive
  (signals are passed on; its exit code or death by a signal is the launcher's).

When the Ray head is lost and another node takes over (agent/node.py), the cluster record says
`recovering`: the launcher stops the program at once, leaves the driver-restart flag and exits, and the
program runs again on the new head once its nodes are alive (a program written with raybridge.train
resumes from its newest complete checkpoint). By a standby launcher where there is one:

    python -m raybridge.agent driver --standby GENERATION -- COMMAND...

runs on the next node in line for the head, does the program's leading imports once the cluster is
ready, and waits. When a head after GENERATION runs on its node, it runs the program there as soon as
the nodes are alive: no srun step, interpreter start or imports after the loss, and no wait for Slurm
to notice that the old head's node (and the driver's step on it) is gone. It ends without running
anything when the run ends first or another node takes over.

The driver sees RAY_ADDRESS, RAYBRIDGE_JOB_DIR and the auth settings: `ray.init()` with no arguments
joins the cluster. Its stdout and stderr are line-buffered (a Python program in process; PYTHONUNBUFFERED
for other commands) so each line reaches the job log, and `raybridge run`'s terminal, when printed.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raybridge import jobdir as jd
from raybridge.agent import netinfo
from raybridge.settings import AgentSettings

POLL = 0.05  # the cluster record is one small file; the driver waits a few seconds at most
WATCH = 0.5  # seconds between looks at the cluster record while the program runs
RESTART = 75  # exit code with the driver-restart flag (EX_TEMPFAIL)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


@dataclass(frozen=True)
class Program:
    """A Python program this interpreter can run in process."""

    kind: str  # "script" | "module"
    target: str  # the script's path or the module's name
    args: list[str]  # sys.argv[1:]
    unbuffered: bool = False


def in_process(command: list[str], executable: str = sys.executable) -> Program | None:
    """The program, if COMMAND is this very interpreter running a script or a module with no other
    interpreter options; None for anything else (exec'd as it is)."""
    if not command or not same_interpreter(command[0], executable):
        return None
    args, unbuffered = command[1:], False
    while args and args[0] == "-u":
        args, unbuffered = args[1:], True
    if not args:
        return None
    if args[0] == "-m":
        if len(args) < 2 or args[1].startswith("-"):
            return None
        return Program("module", args[1], args[2:], unbuffered)
    if args[0].startswith("-"):
        return None  # other interpreter options (-c, -W, -X, -O, ...): let Python handle them
    return Program("script", args[0], args[1:], unbuffered)


def same_interpreter(name: str, executable: str) -> bool:
    """`name` (as the shell would find it) is the interpreter at `executable`: same folder (a venv's
    python and python3 are links in its bin/, the system's python3 is another environment) and same
    file."""
    if os.sep not in name and not Path(name).name.startswith("python"):
        return False
    found = shutil.which(name)
    if not found or not executable:
        return False
    a, b = Path(os.path.abspath(found)), Path(os.path.abspath(executable))
    return a.parent == b.parent and os.path.realpath(a) == os.path.realpath(b)


def program_folder(program: Program) -> str:
    """What `python` puts first on sys.path for the program (set_path0)."""
    return os.path.dirname(os.path.realpath(program.target)) if program.kind == "script" else os.getcwd()


def source_of(program: Program) -> str | None:
    """The program's source without running any of it (None when it cannot be found cheaply)."""
    try:
        if program.kind == "script":
            return Path(program.target).read_text()
        if "." in program.target:
            return None  # finding a submodule imports its package: leave that to the program
        spec = importlib.util.find_spec(program.target)
        if spec and spec.submodule_search_locations:  # a package: `-m pkg` runs pkg.__main__
            return None
        return Path(spec.origin).read_text() if spec and spec.origin else None
    except (OSError, ValueError, ImportError, UnicodeDecodeError):
        return None


def early_imports(source: str | None, folder: str) -> list[str]:
    """The modules the program imports before it runs anything else (its leading imports, after a
    docstring), in order: importing them while the nodes join cannot change what they see, and a
    program that sets Ray's environment variables before `import ray` gets its import at its own time.
    Left out: relative imports, __future__, and any name the program's own folder holds (the launcher
    does not have that folder on its path; an installed module of the same name must not take its place)."""
    if not source:
        return []
    try:
        body = ast.parse(source).body
        here = {p.name.partition(".")[0] for p in Path(folder).iterdir()}
    except (SyntaxError, ValueError, OSError):
        return []  # Python reports a syntax error when the program runs
    names: list[str] = []
    for i, node in enumerate(body):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if not node.level and node.module and node.module != "__future__":
                names.append(node.module)
        elif not (i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            break
    return [n for n in dict.fromkeys(names) if n.partition(".")[0] not in here]


def import_early(names: list[str]) -> list[str]:
    """Import what can be imported now; the rest is the program's own business at its own time."""
    done = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  (the program meets the same error, with its folder on the path)
            continue
        done.append(name)
    return done


# ---------------------------------------------------------------------- waiting for the cluster


class ClusterGone(RuntimeError):
    pass


def wait_alive(
    folder: jd.JobDir, timeout: float, agents_alive: Callable[[], bool], poll: float = POLL
) -> jd.ClusterRecord:
    """The cluster record once every node is alive (the head writes nodes_alive_at); ClusterGone when
    the cluster failed, stopped or its agents ended first."""
    deadline = time.monotonic() + timeout
    while True:
        info = jd.read(folder.cluster, jd.ClusterRecord)
        if info and info.address and (info.nodes_alive_at or info.state == "ready"):
            return info
        if info and info.state in ("failed", "stopped"):
            raise ClusterGone(f"cluster {info.state}: {info.error or 'stopped before the driver ran'}")
        if not agents_alive():
            raise ClusterGone("the agents' srun step ended before the nodes were alive")
        if time.monotonic() > deadline:
            raise ClusterGone(f"timed out after {timeout:.0f}s waiting for the nodes")
        time.sleep(poll)


def stand_by(
    folder: jd.JobDir, generation: int, program: Program | None, host: str
) -> tuple[jd.ClusterRecord, list[str]] | None:
    """A standby launcher's wait: the program's leading imports once the cluster is ready (not while it
    starts: they would compete with it), then, when a head after `generation` runs on this host and
    its nodes are alive, the cluster record and what was imported. None when the run ends first
    (stopped, failed, the driver's program ended) or another node took over as head."""
    imported: list[str] | None = None
    said = False
    while True:
        try:
            info = jd.read(folder.cluster, jd.ClusterRecord)
            head = jd.read(folder.head, jd.HeadRecord)
        except jd.RecordError:
            info = head = None  # being replaced, or not ours to read: the next look
        if info is None:
            time.sleep(WATCH)
            continue
        if info.state in ("failed", "stopped") or any(map(os.path.exists, (folder.stop, folder.driver_exit))):
            return None
        lost = info.generation > generation
        if imported is None and (info.state == "ready" or lost):
            imported = (
                import_early(early_imports(source_of(program), program_folder(program))) if program else []
            )
        if imported is not None and not said:
            said = True
            what = f"; imported early: {', '.join(imported)}" if imported else ""
            say(f"standing by on {host} to run the command if the head is lost{what}")
        if lost and head is not None and head.generation == info.generation:
            if head.hostname != host:
                say(f"the new head is {head.hostname}, not this node: the driver starts there")
                return None
            if info.nodes_alive_at and info.address:
                assert imported is not None
                return info, imported
        time.sleep(POLL if lost else WATCH)


# Ray Train's own settings (environment variables Ray Train reads in the driver and passes on to its
# controller and workers), where its defaults cost a failed or preempted run seconds: the controller
# looks at its workers every 2 s and at Ray's drain notices every 5 s. Checked every 0.5 s, a lost worker
# is acted on ~1 s sooner on average; a drain notice (Slurm's USR1) reaches the training within 1 s.
# Both are one small RPC per worker or one GCS read. A user's own values win.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}


def driver_env(settings: AgentSettings, folder: jd.JobDir) -> dict[str, str]:
    """What the driver needs besides the address (known before the head is up)."""
    env = {"RAYBRIDGE_JOB_DIR": folder.path}
    env |= {k: v for k, v in TRAIN_ENV.items() if k not in os.environ}
    if settings.auth:
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": folder.token}
    return env


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------- running it


def set_path0(folder: str) -> None:
    """What `python` puts first on sys.path for the program. The launcher itself runs with -P (nothing
    from the job's working directory shadows raybridge), so there is no such entry to replace yet."""
    if sys.flags.safe_path:
        sys.path.insert(0, folder)
    else:
        sys.path[0] = folder


def run_in_process(program: Program) -> int:
    """Run the program as `python` would; returns its exit code (or re-raises SystemExit)."""
    import runpy

    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True, write_through=program.unbuffered)
    if program.kind == "script":
        sys.argv = [program.target, *program.args]
        set_path0(program_folder(program))
        run = lambda: runpy.run_path(program.target, run_name="__main__")  # noqa: E731
    else:
        sys.argv = [program.target, *program.args]  # runpy sets argv[0] to the module's file
        set_path0(program_folder(program))
        run = lambda: runpy.run_module(program.target, run_name="__main__", alter_sys=True)  # noqa: E731
    try:
        run()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        report(*sys.exc_info())
        # As Python does: die of SIGINT, so the parent sees the signal.
        record_exit(128 + signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BaseException:
        report(*sys.exc_info())
        return 1
    return 0


def report(kind, value, tb) -> None:  # type: ignore[no-untyped-def]
    """The traceback Python would print: without the launcher's and runpy's frames."""
    here = {__file__, __import__("runpy").__file__, "<frozen runpy>"}  # frozen since 3.11
    while tb is not None and tb.tb_frame.f_code.co_filename in here:
        tb = tb.tb_next
    if value is not None:
        value.__traceback__ = tb  # Python's hook prints the exception's own traceback
    sys.excepthook(kind, value, tb)


def head_lost(folder: jd.JobDir, generation: int) -> jd.ClusterRecord | None:
    """The cluster record when the head this driver started with has been lost, else None."""
    try:
        info = jd.read(folder.cluster, jd.ClusterRecord)
    except jd.RecordError:
        return None
    if info and info.generation > generation:  # bumped, with state `recovering`, by the new head
        return info
    return None


def flag_restart(folder: jd.JobDir, info: jd.ClusterRecord) -> None:
    """The program stops for a lost head: the flag says so, and no exit code is left (the program did
    not end; it runs again on the new head)."""
    global _restarting
    _restarting = True
    lost = next((e for e in reversed(info.events) if e.get("event") == "head_lost"), {})
    say(
        f"the Ray head {lost.get('node', '')} was lost; stopping the driver to start it again on the new head"
    )
    with open(folder.driver_restart, "w"):
        pass


def watch_in_process(folder: jd.JobDir, generation: int) -> None:
    """A thread beside the program: on a lost head, end the whole process (its Ray connection is
    to a cluster that is gone) with the restart flag set."""

    def loop() -> None:
        # Signals for the program go to the main thread: one delivered here would leave the program's
        # sleep or wait uninterrupted (Python runs handlers only in the main thread, when it wakes).
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        while (info := head_lost(folder, generation)) is None:
            time.sleep(WATCH)
        flag_restart(folder, info)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(RESTART)

    threading.Thread(target=loop, name="raybridge-head-watch", daemon=True).start()


def run_child(command: list[str], folder: jd.JobDir, generation: int) -> int:
    """COMMAND as a child: signals passed on, its exit status returned as the launcher's own."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        child = subprocess.Popen(command)
    except OSError as e:
        print(f"raybridge: cannot run {command[0]!r}: {e.strerror}", file=sys.stderr)
        return 127
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, _f: child.send_signal(signum))
    while True:
        try:
            code = child.wait(timeout=WATCH)
            break
        except subprocess.TimeoutExpired:
            info = head_lost(folder, generation)
            if info is None:
                continue
            flag_restart(folder, info)
            child.terminate()
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            return RESTART
    if code < 0:  # died of a signal: so does the launcher, for whoever waits on it
        record_exit(128 - code)
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def say(message: str) -> None:
    stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
    print(f"raybridge[driver] {stamp} {message}", file=sys.stderr, flush=True)


def record_exit(code: int) -> None:
    """The driver ended on its own, with this code (no file: it was killed, e.g. with its node, or it
    stopped for a lost head)."""
    if _exit_record and not _restarting:
        with contextlib.suppress(OSError), open(_exit_record, "w") as f:
            f.write(f"{code}\n")
        folder = jd.JobDir(os.path.dirname(_exit_record))
        jd.add_event(folder, "driver_ended", socket.gethostname().split(".")[0], f"exit code {code}")


_exit_record: str | None = None
_restarting = False


def main(settings: AgentSettings, argv: list[str]) -> int:
    """argv: [AGENTS_PID | --standby GENERATION] -- COMMAND...; leaves the exit code in the job folder
    (driver-exit) when the program ran and ended (a standby: only once it took over)."""
    global _exit_record
    _exit_record = None if argv[:1] == ["--standby"] else jd.JobDir(settings.job_dir).driver_exit
    try:
        code = launch(settings, argv)
    except SystemExit as e:
        record_exit(e.code if isinstance(e.code, int) else (0 if e.code is None else 1))
        raise
    record_exit(code)
    return code


def launch(settings: AgentSettings, argv: list[str]) -> int:
    global _exit_record
    cut = argv.index("--") if "--" in argv else len(argv)
    head, command = argv[:cut], argv[cut + 1 :]
    standby = int(head[1]) if len(head) == 2 and head[0] == "--standby" and head[1].isdigit() else None
    if not command or (head[:1] == ["--standby"] and standby is None):
        print(
            "raybridge driver: usage: driver [AGENTS_PID | --standby GENERATION] -- COMMAND...",
            file=sys.stderr,
        )
        return 2
    agents = int(head[0]) if head and head[0].isdigit() else None
    folder = jd.JobDir(settings.job_dir)
    os.environ.update(driver_env(settings, folder))  # before Ray is imported: it reads them then
    program = in_process(command)
    started = time.monotonic()
    if standby is not None:
        took = stand_by(folder, standby, program, netinfo.short_hostname())
        if took is None:
            return 0
        info, preloaded = took
        _exit_record = folder.driver_exit  # the job's driver from now on
    else:
        # The program's leading imports (Ray, torch: a second or more each) done while the nodes join.
        preloaded = (
            import_early(early_imports(source_of(program), program_folder(program))) if program else []
        )
        try:
            info = wait_alive(folder, settings.ready_timeout + 60, lambda: pid_alive(agents))
        except ClusterGone as e:
            print(f"raybridge: {e}; the driver did not run", file=sys.stderr)
            return 1
    os.environ["RAY_ADDRESS"] = info.address or ""
    how = (
        "child process"
        if not program
        else "in process" + (f", imported early: {', '.join(preloaded)}" if preloaded else "")
    )
    head = f" on head {info.head.hostname}" if info.head else ""
    waited = f"waited {time.monotonic() - started:.1f}s" if standby is None else "the standby takes over"
    say(
        f"all {len(info.nodes) or info.expected_nodes} nodes alive{head} ({waited}); "
        f"running ({how}): {' '.join(command)}"
    )
    jd.add_event(folder, "driver_started", socket.gethostname().split(".")[0], " ".join(command))
    if program:
        watch_in_process(folder, info.generation)
        return run_in_process(program)
    return run_child(command, folder, info.generation)
