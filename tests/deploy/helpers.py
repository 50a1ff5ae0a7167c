"""A real Flower deployment on 127.0.0.1 for tests: SuperLink, SuperNodes and the ``flwr`` CLI.

Every process runs in its own session with its own ``FLWR_HOME`` under the test's
temporary directory (the real ``~/.flwr`` is never touched), with runtime
dependency installation, telemetry and update checks disabled (no network).
Ports are chosen at run time; every wait polls a condition with a deadline.
:meth:`Deployment.close` ends every process it started, with its descendants,
even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulation.superlink import alive, config_arg, free_port, process_tree

from .pki import NodeKeys, TlsFiles

__all__ = [
    "REPO",
    "Deployment",
    "Process",
    "alive",
    "free_port",
    "make_app_dir",
    "process_tree",
    "wait_for",
]

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
CONNECTION = "test"  # name of the SuperLink connection in the CLI's config.toml
_BIN = Path(sys.executable).parent
#: What a log shows when a Python process crashed or an exception escaped.
_CRASH_MARKERS = ("Traceback (most recent call last)",)


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); ``TimeoutError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Process:
    """One started process (in its own session) and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    descendants: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def running(self) -> bool:
        return self.popen.poll() is None

    def remember_descendants(self) -> None:
        """Note the current process tree, so that orphans can be found after the process ends."""
        self.descendants |= process_tree([self.pid]) - {self.pid}

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM, then wait up to ``timeout`` s; the exit code, or None if it is still running."""
        self.remember_descendants()
        if self.running():
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_everything(self) -> None:
        """SIGKILL the process and every descendant it ever had (by pid, never by name)."""
        self.remember_descendants()
        for pid in [self.pid, *sorted(self.descendants | process_tree(self.descendants))]:
            if pid == self.pid and not self.running():
                continue
            if pid != self.pid and not alive(pid):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)

    def tail(self, lines: int = 40) -> str:
        return f"--- {self.name} ({self.log_path}) ---\n" + "\n".join(self.log().splitlines()[-lines:])


class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1, plus a ``flwr`` CLI configured to reach the SuperLink.

    ``tls``: serve every SuperLink API over TLS with these files (else ``--insecure``).
    ``node_auth``: ``--enable-supernode-auth`` (needs ``tls``).
    """

    def __init__(self, root: Path, tls: TlsFiles | None = None, node_auth: bool = False) -> None:
        if node_auth and tls is None:
            raise ValueError("SuperNode authentication needs TLS")
        self.root = root
        self.tls = tls
        self.node_auth = node_auth
        self.port = free_port()
        self.processes: list[Process] = []
        self.superlink: Process | None = None
        self.cli_home = root / "cli-home"
        self.cli_home.mkdir(parents=True, exist_ok=True)
        connection = [f'address = "{HOST}:{self.port}"']
        if tls is None:
            connection.append("insecure = true")
        else:
            connection.append(f"root-certificates = {json.dumps(str(tls.ca_cert))}")
        # "plain": the same address without TLS, to check that a TLS SuperLink refuses it.
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            + "\n".join(connection)
            + f'\n\n[superlink.plain]\naddress = "{HOST}:{self.port}"\ninsecure = true\n'
        )

    # -- environment ---------------------------------------------------------------------------------

    def env(self, home: Path) -> dict[str, str]:
        """Environment of a Flower process: own ``FLWR_HOME``, no network side trips, venv first on PATH."""
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update(
            FLWR_HOME=str(home),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
            PYTHONUNBUFFERED="1",
            PATH=f"{_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        return env

    def _start(self, name: str, args: list[str], home: str | None = None) -> Process:
        """Start ``args`` as ``name`` (log ``<name>.log``) with ``FLWR_HOME`` ``<home or name>-home``."""
        log_path = self.root / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(  # noqa: S603 - fixed executables from the venv
                [str(_BIN / args[0]), *args[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=self.env(self.root / f"{home or name}-home"),
                start_new_session=True,
            )
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    # -- processes -----------------------------------------------------------------------------------

    def start_superlink(
        self, timeout: float = 60.0, name: str = "superlink", extra: Iterable[str] = ()
    ) -> Process:
        """Start ``flower-superlink`` and wait until its HTTP port accepts connections.

        ``name``: of its log file; another name starts it again (same port and ``FLWR_HOME``)
        next to the log of an earlier one. ``extra``: more arguments, e.g. ``--database``.
        """
        args = ["flower-superlink", "--host", HOST, "--port", str(self.port)]
        args += ["--isolation", "subprocess", "--disable-runtime-dependency-installation"]
        if self.tls is None:
            args.append("--insecure")
        else:
            args += ["--ssl-ca-certfile", str(self.tls.ca_cert)]
            args += ["--ssl-certfile", str(self.tls.server_cert), "--ssl-keyfile", str(self.tls.server_key)]
        if self.node_auth:
            args.append("--enable-supernode-auth")
        self.superlink = self._start(name, [*args, *extra], home="superlink")

        def ready() -> bool:
            if not self.superlink.running():  # type: ignore[union-attr]
                raise RuntimeError(f"flower-superlink exited early\n{self.superlink.tail()}")  # type: ignore[union-attr]
            return port_open(self.port) and "Application startup complete" in self.superlink.log()  # type: ignore[union-attr]

        wait_for(ready, timeout, "the SuperLink to accept connections")
        return self.superlink

    def start_supernode(
        self,
        name: str,
        node_config: Mapping[str, Any],
        keys: NodeKeys | None = None,
        extra: Iterable[str] = (),
    ) -> Process:
        """Start ``flower-supernode`` connected to the SuperLink; ``--node-config`` from ``node_config``."""
        args = ["flower-supernode", "--superlink", f"{HOST}:{self.port}", "--port", str(free_port())]
        args += ["--node-config", config_arg(node_config)]
        if self.tls is None:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(self.tls.ca_cert)]
        if keys is not None:
            args += ["--auth-supernode-private-key", str(keys.private)]
        args += list(extra)
        return self._start(name, args)

    @staticmethod
    def node_id(process: Process) -> int | None:
        """The node id a SuperNode logged after the SuperLink accepted it (None before that)."""
        match = re.search(r"SuperNode ID: (\d+)", process.log())
        return int(match.group(1)) if match else None

    def wait_node_id(self, process: Process, timeout: float = 60.0) -> int:
        """Wait until ``process`` (a SuperNode) is connected; its node id."""

        def connected() -> int | None:
            if not process.running():
                raise RuntimeError(f"{process.name} exited early\n{process.tail()}")
            return self.node_id(process)

        return int(wait_for(connected, timeout, f"{process.name} to connect"))

    # -- CLI -------------------------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 60.0, name: str = "flwr") -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this SuperLink; output goes to ``<root>/<name>.log`` too."""
        command = [str(_BIN / "flwr"), *args]
        try:
            done = subprocess.run(  # noqa: S603
                command,
                capture_output=True,
                text=True,
                cwd=self.root,
                env=self.env(self.cli_home),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise TimeoutError(f"`{shlex.join(command)}` ran past {timeout:.0f} s\n{self.tails()}") from err
        with (self.root / f"{name}.log").open("a") as log:
            log.write(f"$ {shlex.join(command)}\n{done.stdout}\n{done.stderr}\n")
        return done

    def flwr_json(self, *args: str, timeout: float = 60.0) -> dict[str, Any]:
        """``flwr <args> --format json``, parsed; raises with the output when it fails."""
        done = self.flwr(*args, "--format", "json", timeout=timeout)
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError as err:
            raise RuntimeError(
                f"`flwr {' '.join(args)}` gave no JSON:\n{done.stdout}\n{done.stderr}"
            ) from err

    def nodes(self) -> dict[int, str]:
        """Node id -> status (``registered``, ``online``, ``offline``, ...) from ``flwr supernode ls``."""
        listing = self.flwr_json("supernode", "ls", CONNECTION)
        return {int(node["node-id"]): node["status"] for node in listing.get("nodes", [])}

    def run_app(
        self, app: Path, run_config: Mapping[str, Any], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """``flwr run <app> <connection> --run-config ... --stream``: submits and follows the run."""
        return self.flwr(
            "run",
            str(app),
            CONNECTION,
            "--run-config",
            config_arg(run_config),
            "--stream",
            timeout=timeout,
            name="flwr-run",
        )

    def runs(self) -> list[dict[str, Any]]:
        """The SuperLink's runs (``flwr ls``)."""
        return list(self.flwr_json("ls", CONNECTION).get("runs", []))

    # -- shutdown --------------------------------------------------------------------------------------

    def tails(self, lines: int = 40) -> str:
        """Last lines of every log, for failure messages."""
        logs = [process.tail(lines) for process in self.processes]
        for extra in sorted(self.root.glob("flwr*.log")):
            logs.append(f"--- {extra.name} ---\n" + "\n".join(extra.read_text().splitlines()[-lines:]))
        return "\n".join(logs)

    def shutdown(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM SuperNodes, then the SuperLink; name -> exit code (None: still running after timeout)."""
        codes: dict[str, int | None] = {}
        nodes = [p for p in self.processes if p is not self.superlink]
        stages = [nodes, [self.superlink] if self.superlink is not None else []]
        for process in self.processes:
            process.remember_descendants()
        for stage in stages:
            for process in stage:  # signal the whole stage first, then wait: they stop in parallel
                if process.running():
                    process.popen.send_signal(signal.SIGTERM)
            for process in stage:
                try:
                    codes[process.name] = process.popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    codes[process.name] = None
        return codes

    def leftovers(self, timeout: float = 60.0, pids: Iterable[int] | None = None) -> set[int]:
        """Descendants of the started processes still alive ``timeout`` s after they ended (ideally none).

        ``pids``: check these instead of every started process's descendants. Returns as soon as
        none is left; the long timeout is for busy cores, where a child of a stopped SuperLink
        took over 15 s to exit (a nice-19 simulation running beside)."""
        if pids is None:
            pids = set().union(*(p.descendants for p in self.processes)) if self.processes else set()
        pids = set(pids)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not any(alive(pid) for pid in pids), timeout, "child processes to exit")
        return {pid for pid in pids if alive(pid)}

    def describe(self, pids: Iterable[int]) -> str:
        """One line per pid: the started process it descends from and its command line (for failures)."""
        lines = []
        for pid in sorted(pids):
            owners = [p.name for p in self.processes if pid in p.descendants]
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                command = raw.replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                command = "(gone)"
            lines.append(f"{pid} (from {', '.join(owners) or '?'}): {command.strip()}")
        return "\n".join(lines)

    def close(self) -> None:
        """Kill whatever is still running, descendants included (safe to call more than once)."""
        for process in self.processes:
            process.kill_everything()


def make_app_dir(destination: Path, clientapp: str | None = None, extra_modules: Iterable[Path] = ()) -> Path:
    """A copy of this repository's Flower App (its packages and ``pyproject.toml``) in ``destination``.

    ``clientapp``: a different ``[tool.flwr.app.components] clientapp`` (e.g. a
    module from ``extra_modules``, which are copied to the app's top level).
    ``flwr run`` builds the FAB from this directory, so the SuperNodes run the
    working tree's code, not an installed copy.
    """
    destination.mkdir(parents=True, exist_ok=True)
    for package in ("flwr_invariant", "simulation", "baselines"):
        for source in (REPO / package).rglob("*.py"):
            if "__pycache__" in source.parts:
                continue
            target = destination / source.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    pyproject = (REPO / "pyproject.toml").read_text()
    if clientapp is not None:
        pattern = r'(?m)^clientapp = "[^"]*"$'
        if len(re.findall(pattern, pyproject)) != 1:
            raise RuntimeError(
                "pyproject.toml: expected one `clientapp = ...` line under [tool.flwr.app.components]"
            )
        pyproject = re.sub(pattern, f'clientapp = "{clientapp}"', pyproject)
    # the copy has no docs/ nor .gitignore, and Flower refuses a fab-exclude pattern that matches nothing
    pyproject = re.sub(r"(?m)^fab-exclude = .*\n", "", pyproject)
    (destination / "pyproject.toml").write_text(pyproject)
    for module in extra_modules:
        (destination / module.name).write_bytes(module.read_bytes())
    return destination


def read_metrics(path: Path) -> dict[str, Any]:
    """The ServerApp's results-file (``{"config": ..., "rounds": [...]}``)."""
    return json.loads(path.read_text())


def crash_lines(text: str) -> list[str]:
    """Lines of a log that show a crash (a Python traceback)."""
    return [line for line in text.splitlines() if any(marker in line for marker in _CRASH_MARKERS)]
