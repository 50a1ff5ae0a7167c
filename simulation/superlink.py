"""A local Flower SuperLink in simulation mode, driven with the ``flwr`` CLI.

This is what ``flwr run`` does for a local simulation federation
(``flwr.cli.local_superlink``): ``flower-superlink --simulation`` runs each
submitted run in a ``flwr-simulation`` process on Ray. Unlike Flower's managed
local SuperLink (fixed port 39093, ``~/.flwr``), this one gets a free port on
127.0.0.1 and its own ``FLWR_HOME``, so several launchers can run side by side,
and :meth:`LocalSuperLink.close` stops it with everything it started.

Runs are submitted with ``flwr run APP local --run-config ... --federation-config
... --stream``: the run config and the federation's simulation settings
(``num-supernodes``, ``client-resources-num-cpus``/``-num-gpus``,
``init-args-*``, see ``flwr federation simulation-config --help``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = [
    "CONNECTION",
    "LocalSuperLink",
    "alive",
    "config_arg",
    "end_sessions",
    "executable",
    "exit_on_sigterm",
    "free_port",
    "process_tree",
    "sessions_of",
    "toml_value",
]

#: Name of the SuperLink connection in this SuperLink's ``FLWR_HOME/config.toml``.
CONNECTION = "local"
HOST = "127.0.0.1"


def executable(name: str) -> str:
    """``name`` next to this Python (the venv's ``bin``), else on ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name!r} not found (is flwr installed in this environment?)")
    return found


def toml_value(value: Any) -> str:
    """``value`` as TOML text: booleans lower-case, strings quoted, numbers as Python writes them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return repr(value)


def config_arg(config: Mapping[str, Any]) -> str:
    """``KEY=VALUE ...`` text for ``--run-config`` / ``--federation-config`` (values as TOML)."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def exit_on_sigterm() -> None:
    """Make SIGTERM (``kill``, a job scheduler, the end of a session) unwind like Ctrl-C, so
    a CLI stops its runs and the local SuperLink it started instead of leaving them running."""

    def unwind(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, session id) of ``pid`` from /proc, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name in brackets may hold spaces
    return fields[0], int(fields[1]), int(fields[3])


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (from /proc)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def _live_processes() -> dict[int, tuple[str, int, int]]:
    """``{pid: (state, parent pid, session id)}`` of every live (not zombie) process; empty without /proc."""
    stats = {}
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) and stat[0] != "Z":
                stats[int(entry.name)] = stat
    return stats


def process_tree(roots: Iterable[int]) -> set[int]:
    """``roots`` and their live descendants, plus every live process in the sessions of any of them.

    Flower starts some children in new sessions (the SuperLink's SuperExec, which starts
    ``flwr-simulation``), and their children may outlive them; the session ids catch those
    orphans. Reads /proc: on a system without it, the empty set.
    """
    stats = _live_processes()
    tree = {pid for pid in roots if pid in stats}
    while True:
        grown = {pid for pid, (_, ppid, sid) in stats.items() if ppid in tree or sid in tree} - tree
        if not grown:
            return tree
        tree |= grown


def sessions_of(pids: Iterable[int]) -> set[int]:
    """The session ids of those of ``pids`` that are alive (from /proc)."""
    return {stat[2] for pid in pids if (stat := _proc_stat(pid))}


def end_sessions(sessions: Iterable[int], timeout: float = 30.0) -> None:
    """SIGTERM every process in the given sessions; SIGKILL what remains after ``timeout`` s.

    Without /proc, the process group of each session's leader (its id) instead.
    """
    sessions = set(sessions) - {os.getsid(0)}  # never this process's own session

    def members() -> set[int]:
        stats = _live_processes()
        if not stats:
            return {-session for session in sessions if _group_alive(session)}  # os.kill(-g): the group
        return {pid for pid, (_, _, sid) in stats.items() if sid in sessions}

    deadline = time.monotonic() + timeout
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in members():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        while members():
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        else:
            return
        deadline = time.monotonic() + 10.0


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class LocalSuperLink:
    """``flower-superlink --simulation`` on a free port of 127.0.0.1 with ``FLWR_HOME`` = ``home``.

    ``env``: variables set (None: removed) in the environment of the SuperLink (and so
    of the ``flwr-simulation`` process and the Ray it starts). A context manager:
    started on entry, stopped on exit.
    """

    def __init__(
        self, home: Path, env: Mapping[str, str | None] | None = None, startup_timeout: float = 120.0
    ) -> None:
        self.home = home
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self.log_path = home / "superlink.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.sessions: set[int] = set()  # of the SuperLink's descendants, seen by remember_sessions
        self.env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.env.update(
            FLWR_HOME=str(home),
            NO_PROXY=f"{HOST},localhost",
            no_proxy=f"{HOST},localhost",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        # No network side trips from the processes we start, unless the user asked for them.
        self.env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        self.env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
        for key, value in (env or {}).items():
            if value is None:
                self.env.pop(key, None)
            else:
                self.env[key] = value

    def __enter__(self) -> LocalSuperLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the SuperLink and wait until its HTTP API answers; ``RuntimeError`` if it does not."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{HOST}:{self.port}"\ninsecure = true\n'
        )
        command = [executable("flower-superlink"), "--insecure", "--simulation"]
        command += ["--isolation", "subprocess", "--disable-runtime-dependency-installation"]
        command += ["--host", HOST, "--port", str(self.port)]
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(  # noqa: S603 - Flower's own executable
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with code {self.process.returncode}:\n{self.tail()}"
                )
            try:
                with opener.open(f"http://{HOST}:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"flower-superlink did not start in {self.startup_timeout:.0f} s")
            time.sleep(0.3)

    def tail(self, lines: int = 30) -> str:
        """The last lines of the SuperLink's log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this SuperLink."""
        return subprocess.run(  # noqa: S603
            [executable("flwr"), *args],
            capture_output=True,
            text=True,
            env=self.env,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )

    def submit(
        self,
        app_dir: Path,
        run_config: Mapping[str, Any],
        federation_config: Mapping[str, Any],
        log: IO[bytes],
    ) -> subprocess.Popen[bytes]:
        """``flwr run APP local --run-config ... --federation-config ... --stream``, writing to ``log``.

        The returned process follows the run's log and exits when the run ends.
        """
        command = [executable("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        command += ["--run-config", config_arg(run_config)]
        command += ["--federation-config", config_arg(federation_config)]
        return subprocess.Popen(  # noqa: S603
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env
        )

    def runs(self) -> list[dict[str, Any]]:
        """The SuperLink's runs as ``flwr ls --format json`` lists them."""
        done = self.flwr("ls", CONNECTION, "--format", "json")
        try:
            return list(json.loads(done.stdout).get("runs", []))
        except json.JSONDecodeError:
            raise RuntimeError(f"`flwr ls` failed:\n{done.stdout}\n{done.stderr}") from None

    def finished_runs(self, timeout: float = 120.0) -> list[dict[str, Any]]:
        """:meth:`runs`, once every run has a ``finished:*`` status (or after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.runs()
            if all(str(run.get("status", "")).startswith("finished") for run in runs):
                return runs
            if time.monotonic() > deadline:
                return runs
            time.sleep(1.0)

    def stop_runs(self, timeout: float = 30.0) -> None:
        """``flwr stop`` every unfinished run, then wait (up to ``timeout``) until they have ended."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            for run in self.runs():
                if not str(run.get("status", "")).startswith("finished"):
                    self.flwr("stop", str(run["run-id"]), CONNECTION)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(
                not str(run.get("status", "")).startswith("finished") for run in self.runs()
            ):
                time.sleep(1.0)

    def remember_sessions(self) -> None:
        """Note the sessions of the SuperLink's descendants now, for :meth:`close` (call while a run goes).

        If the SuperLink dies first, its descendants can no longer be found from it, and the
        ``flwr-simulation`` it started would go on training alone.
        """
        if self.process is not None:
            self.sessions |= sessions_of(process_tree([self.process.pid]))

    def close(self, timeout: float = 30.0) -> None:
        """SIGTERM the SuperLink (it stops its SuperExec); SIGKILL its session after ``timeout``.

        Then whatever is left in the sessions of the SuperLink and its descendants (now, or when
        :meth:`remember_sessions` last looked) gets SIGTERM, and SIGKILL after ``timeout``: the
        SuperExec runs ``flwr-simulation`` in a session of its own, and after a grid was killed
        mid-run that process and its Ray went on training.
        """
        process, self.process = self.process, None
        if process is None:
            return
        sessions = {process.pid} | self.sessions | sessions_of(process_tree([process.pid]))
        self.sessions = set()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        end_sessions(sessions, timeout)
