"""Start the real tritonserver (2.51, shipped in the nvidia-pytriton wheel) on a repository.

The wheel carries the server, the Python backend and its stubs; this module lays out a
backend folder under build/, starts the server with the project's packages importable
from the Python-backend models, waits until every model is ready and stops it cleanly.
Used by `make serve` and by the end-to-end tests.
"""

from __future__ import annotations

import compileall
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002
    front_metrics: int = 0  # the gRPC front's battery_front_* metrics (0: not served)


def free_ports(n: int) -> list[int]:
    """n ports nothing listens on now (the kernel's choice), e.g. for a server of a test or a benchmark."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def busy_ports(ports: Ports) -> list[str]:
    """'8001 (gRPC)' for each port something already listens on."""
    busy = []
    named = [("HTTP", ports.http), ("gRPC", ports.grpc), ("metrics", ports.metrics)]
    if ports.front_metrics:
        named.append(("front metrics", ports.front_metrics))
    for name, port in named:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                busy.append(f"{port} ({name})")
    return busy


def _pytriton_dir() -> Path:
    try:
        import pytriton  # noqa: PLC0415 - a clear message when it is missing
    except ImportError:
        raise SystemExit(
            "error: nvidia-pytriton is not installed (it carries tritonserver); run 'make setup'"
        ) from None
    return Path(pytriton.__file__).resolve().parent


def backend_dir(build: Path = BUILD) -> Path:
    """build/triton_backends/python: the Python backend with the stub for this interpreter."""
    sp = _pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = sp / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise SystemExit(f"error: nvidia-pytriton has no Python-backend stub for Python {version}")
    target = build / "triton_backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for src in [*(sp / "tritonserver" / "backends" / "python").iterdir(), stub]:
        if src.is_file():
            dst = target / src.name
            if not dst.exists() or dst.stat().st_size != src.stat().st_size:
                shutil.copy2(src, dst)
    return target.parent


def compile_adapters(repository: str | Path) -> None:
    """Compile the Python-backend adapters (model.py) with this Python, the one the backend runs.

    Otherwise the first load writes a __pycache__ into each model's version folder; Triton then
    takes the folder as changed, and the next load of an ensemble (a promotion, a rollback)
    reloads every model in it (15 s with the tiny test models) instead of swapping the ensemble
    (10 ms). docker/entrypoint.sh does the same with the container's Python."""
    compileall.compile_dir(str(repository), quiet=1)


ADMIN_KEY_ENV = "TRITON_ADMIN_KEY"
# Triton's administrative endpoint groups: loading/unloading models and listing the repository,
# registering shared memory, and changing trace and log settings. Inference, health, metadata,
# model config and statistics stay open (the client and the benchmarks read them).
RESTRICTED = "model-repository,shared-memory,trace,logging"


@dataclass(frozen=True)
class Access:
    """Who may do what on the ports: the administrative APIs need a key, gRPC may use TLS.

    `admin_key` comes from the environment (TRITON_ADMIN_KEY); without it a random key that
    is never shown locks those APIs for everyone. gRPC clients send it as the header
    `triton-grpc-protocol-admin-key`, HTTP clients as `admin-key`. The key reaches tritonserver
    on its command line (Triton has no other way), so it is visible to local users of the host
    in the process list, never in logs or output.
    """

    admin_key: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def from_environment(cls, tls_cert=None, tls_key=None) -> Access:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        for f in (tls_cert, tls_key):
            if f is not None and not Path(f).is_file():
                raise FileNotFoundError(f"TLS file {f} does not exist")
        return cls(
            os.environ.get(ADMIN_KEY_ENV) or None,
            Path(tls_cert) if tls_cert else None,
            Path(tls_key) if tls_key else None,
        )

    def arguments(self) -> list[str]:

        key = self.admin_key or secrets.token_urlsafe(32)
        # the repository's models load at start; later loads (a new release staged into the repository) only
        # through the restricted model-repository API, i.e. with the key; no polling, nothing from the network
        args = [
            "--model-control-mode=explicit",  # TritonServer loads the repository's models by name at start
            f"--grpc-restricted-protocol={RESTRICTED}:admin-key={key}",
            f"--http-restricted-api={RESTRICTED}:admin-key={key}",
        ]
        if self.tls_cert:  # Triton's HTTP has no TLS: it then listens on loopback only (health checks, local tools)
            args += [
                "--grpc-use-ssl=true",
                f"--grpc-server-cert={self.tls_cert}",
                f"--grpc-server-key={self.tls_key}",
                "--http-address=127.0.0.1",
            ]
        return args

    def describe(self) -> str:
        admin = (
            f"administrative APIs ({RESTRICTED}) need the key in ${ADMIN_KEY_ENV}"
            if self.admin_key
            else f"administrative APIs ({RESTRICTED}) locked (set ${ADMIN_KEY_ENV} to use them)"
        )
        return admin + (
            "; gRPC over TLS, HTTP on loopback only"
            if self.tls_cert
            else "; gRPC without TLS (--tls-cert/--tls-key to enable)"
        )


MALLOC_ENV = "BATTERY_MALLOC"  # "system": leave glibc's malloc; a path: that allocator library
JEMALLOC = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


def malloc_library() -> Path | None:
    """The allocator tritonserver and its backend processes run with (LD_PRELOAD), or None for glibc's.

    glibc keeps what a rush of requests allocated long after it is freed, which reads as a
    leak: in a burst at 3x saturation tritonserver's own memory rose 23 -> 168 MiB and stayed
    near 160 MiB; with jemalloc it went back to 30 MiB. Triton's release notes recommend
    jemalloc or tcmalloc for this. jemalloc is used where installed (Debian: libjemalloc2);
    `BATTERY_MALLOC=system` turns it off, `BATTERY_MALLOC=/path/lib.so` picks another.
    """
    choice = os.environ.get(MALLOC_ENV, "").strip()
    if choice == "system":
        return None
    if choice:
        if not Path(choice).is_file():
            raise FileNotFoundError(
                f"${MALLOC_ENV}={choice}: no such allocator library (or 'system' for glibc's malloc)"
            )
        return Path(choice)
    return next((Path(p) for p in JEMALLOC if Path(p).is_file()), None)


def repository_models(repository: str | Path) -> list[str]:
    """The folders of a repository that are models (they hold a config.pbtxt), by name.

    tritonserver is told to load exactly these (explicit model control): with `--load-model=*`,
    or without explicit control, it takes every folder for a model and does not start when one
    is not (a folder of comparisons, a backup a person made)."""
    return sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt") if not p.parent.name.startswith("."))


def load_arguments(repository: str | Path) -> list[str]:
    return ["--model-control-mode=explicit", *(f"--load-model={m}" for m in repository_models(repository))]


def server_command(repository: Path, ports: Ports, extra: list[str] = ()) -> tuple[list[str], dict]:
    sp = _pytriton_dir()
    binary = sp / "tritonserver" / "bin" / "tritonserver"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [str(sp.parent / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH")])
    )
    # the Python-backend stubs import the project's packages and the venv's site-packages
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
    env.setdefault("VIRTUAL_ENV", str(Path(sys.executable).parent.parent))
    malloc = malloc_library()
    if malloc:
        env["LD_PRELOAD"] = os.pathsep.join(filter(None, [str(malloc), env.get("LD_PRELOAD")]))
    cmd = [
        str(binary),
        f"--model-repository={Path(repository).resolve()}",
        f"--backend-directory={backend_dir()}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        "--allow-metrics=true",
        "--strict-readiness=true",
        "--exit-timeout-secs=10",
        *(a for a in load_arguments(repository) if a not in extra),
        *extra,
    ]
    return cmd, env


GRPC_TLS = ("--grpc-use-ssl=", "--grpc-server-cert=", "--grpc-server-key=")


def split_grpc_tls(extra: list[str]) -> tuple[list[str], tuple[str, str] | None]:
    """(tritonserver's arguments without its gRPC TLS ones, (certificate, key) or None): with a front,
    the front speaks TLS to clients and tritonserver plain gRPC on loopback."""
    rest = [a for a in extra if not a.startswith(GRPC_TLS)]
    found = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in extra if a.startswith(GRPC_TLS)}
    if found.get("--grpc-use-ssl") != "true":
        return rest, None
    return rest, (found["--grpc-server-cert"], found["--grpc-server-key"])


class TritonServer:
    """A tritonserver process: `with TritonServer(repo, ports) as server: ...`."""

    def __init__(
        self,
        repository: str | Path,
        ports: Ports = Ports(),
        log_path: str | Path | None = None,
        extra: list[str] = (),
        cpus: str | None = None,
        front: bool = True,
        takt: float = 0.0,
    ):
        # takt: the front refuses at once what it could not answer within this many seconds (0: never)
        self.takt = takt
        # front: clients reach gRPC through serving.front, which keeps their cancellations from
        # tritonserver 2.51 (one can crash it); tritonserver's own gRPC then listens on loopback only
        self.front = front
        self.front_process: subprocess.Popen | None = None
        self.cpus = cpus  # e.g. "0" or "2-3": the server and its backend processes run only there (taskset)
        self.repository = Path(repository)
        self.ports = ports
        self.log_path = Path(log_path) if log_path else None
        self.extra = list(extra)
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.ports.grpc}"

    def start(self, timeout: float = 180.0, foreground: bool = False) -> TritonServer:
        if not (self.repository / "inspect" / "config.pbtxt").exists():
            raise FileNotFoundError(
                f"{self.repository} is not a built model repository; run 'python -m export repository'"
            )
        if self.front_process is not None and self.front_process.poll() is None:
            # tritonserver alone was stopped or killed (a drain, a crash): a new front comes with the new server
            self.front_process.send_signal(signal.SIGINT)
            self.front_process.wait(30)
        busy = busy_ports(self.ports)
        if busy:
            raise RuntimeError(f"port {', '.join(busy)} already in use: stop what listens there or choose other ports")
        compile_adapters(self.repository)
        extra, tls = split_grpc_tls(self.extra) if self.front else (self.extra, None)
        ports = self.ports
        if self.front:
            backend = free_ports(1)[0]
            ports = Ports(self.ports.http, backend, self.ports.metrics)
            extra = [*extra, "--grpc-address=127.0.0.1"]
        cmd, env = server_command(self.repository, ports, extra)
        if foreground:
            out = None
        else:
            self.log_path = self.log_path or BUILD / "tritonserver.log"
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            # a restart of the same server appends: what ended its last life stays readable
            self._log = open(self.log_path, "ab" if self.process is not None else "wb")
            out = self._log
        self.process = self._spawn(cmd, env, out, foreground)
        self.front_process = None
        self.wait_ready(timeout)
        # the front after tritonserver is ready: the line's port opens when the models answer, as
        # tritonserver's own does, and the front stops with tritonserver (--backend-pid)
        if self.front:
            front = [sys.executable, "-m", "serving.front", "--listen", f"0.0.0.0:{self.ports.grpc}"]
            front += ["--backend", f"127.0.0.1:{backend}", "--backend-pid", str(self.process.pid)]
            if tls:
                front += ["--tls-cert", tls[0], "--tls-key", tls[1]]
            if self.takt > 0:
                front += ["--takt", str(self.takt)]
            if self.ports.front_metrics:
                front += ["--metrics-port", str(self.ports.front_metrics)]
            self.front_process = self._spawn(front, env, out, foreground)
            self.wait_ready(30)
        return self

    def _spawn(self, cmd: list[str], env: dict, out, foreground: bool) -> subprocess.Popen:
        """tritonserver or its front, on this server's CPUs, logging to `out` (None: the terminal)."""
        if self.cpus is not None:
            cmd = ["taskset", "--cpu-list", self.cpus, *cmd]
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=not foreground
        )

    def exited(self) -> str | None:
        """Why the server cannot answer any more (tritonserver or its gRPC front exited), or None."""
        if self.process is not None and self.process.poll() is not None:
            return f"tritonserver exited with code {self.process.returncode}"
        if self.front_process is not None and self.front_process.poll() is not None:
            return f"the gRPC front exited with code {self.front_process.returncode}"
        return None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://localhost:{self.ports.http}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            gone = self.exited()
            if gone:
                self.stop()
                raise RuntimeError(f"{gone} while starting{self._log_hint()}")
            if self.ready() and self._front_ready():
                return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"tritonserver was not ready after {timeout:.0f} s{self._log_hint()}")

    def _front_ready(self) -> bool:
        if self.front_process is None:
            return True
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.ports.grpc)) == 0

    def _log_hint(self) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-25:]
        return f"; last lines of {self.log_path}:\n" + "\n".join(tail)

    def stop(self, timeout: float = 30.0) -> None:
        # the front first: it stops taking calls and lets those under way finish on the server
        for process in (self.front_process, self.process):
            if process and process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.stop()
