"""A fleet of hosts on one machine: Linux network namespaces joined by veth links to a bridge.

    with Fleet(work) as f:                        # needs root and iproute2 (`ip netns`)
        f.start_broker()                          # redis-server on 10.231.<net>.1, password, append-only file
        a, b = f.add_worker_host(), f.add_worker_host()     # each: `fbas-pipeline serve` + `fbas-pipeline worker`
        p = f.run_producer(corpus, out)           # `fbas-pipeline ingest --broker` from its own host
        f.kill_host(a); f.cut(b); f.heal(b); f.restart_broker()

Every host is a namespace with its own loopback (Triton listens there) and one address on a private /24
that exists only inside these namespaces: the bridge lives in a namespace of its own, so no packet leaves
them and nothing here is reachable from outside or reaches out. The hosts share the machine's filesystem,
as fleet hosts share an output folder. Everything is torn down on exit, also after a failure. Used by
tests/integration/test_fleet_netns.py and benchmarks/bench_fleet.py; by hand: ``python -m tests.fleet``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def available() -> str | None:
    """None when this machine can build the fleet, else why not (for a test's skip)."""
    if os.geteuid() != 0:
        return "building network namespaces needs root"
    if not shutil.which("ip"):
        return "iproute2 (`ip`) is not installed"
    probe = f"fbas-probe-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "this machine does not allow new network namespaces"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if not shutil.which("redis-server"):
        return "redis-server is not on PATH"
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


@dataclass
class Host:
    name: str  # the namespace
    addr: str
    link: str  # its veth end in the switch namespace
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)


class Fleet:
    """The namespaces, their processes and the faults (see the module docstring)."""

    def __init__(self, work: Path, model_dir: Path, grpc_port: int = 8001) -> None:
        self.work, self.model_dir, self.grpc_port = Path(work), Path(model_dir), grpc_port
        self.tag = f"{os.getpid() % 100000}"
        self.net = f"10.231.{os.getpid() % 200 + 20}"
        self.switch = f"fbsw{self.tag}"
        self.hosts: list[Host] = []
        self.password = secrets.token_hex(12)
        self.task_key = secrets.token_hex(32)
        self.broker: Host | None = None
        self.producer: Host | None = None
        self.out_root = self.work / "shared"

    # -- topology
    def __enter__(self) -> Fleet:
        self.work.mkdir(parents=True, exist_ok=True)
        self.out_root.mkdir(exist_ok=True)
        subprocess.run(["ip", "netns", "add", self.switch], check=True)
        _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("link", "set", "br0", "up", ns=self.switch)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_host(self, role: str) -> Host:
        i = len(self.hosts) + 1
        name, link = f"fb{self.tag}{role[0]}{i}", f"fbv{self.tag}x{i}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", ns=self.switch)
        _ip("link", "set", "eth0", "netns", name, ns=self.switch)
        _ip("link", "set", link, "master", "br0", ns=self.switch)
        _ip("link", "set", link, "up", ns=self.switch)
        addr = f"{self.net}.{i}"
        _ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=name)
        _ip("link", "set", "eth0", "up", ns=name)
        _ip("link", "set", "lo", "up", ns=name)
        host = Host(name, addr, link)
        self.hosts.append(host)
        return host

    # -- processes
    def env(self) -> dict[str, str]:
        assert self.broker is not None, "start_broker() first"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FBAS_")}
        env.update(
            PYTHONPATH=str(ROOT),
            FBAS_BROKER=f"redis://:{self.password}@{self.broker.addr}:6379/0",
            FBAS_TASK_KEY=self.task_key,
            FBAS_TRITON=f"127.0.0.1:{self.grpc_port}",
            FBAS_OUT_ROOT=str(self.out_root),
        )
        return env

    def _spawn(self, host: Host, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.work / f"{host.name}-{name}.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", host.name, *cmd], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()
        host.procs[name] = proc
        return proc

    def log(self, host: Host, name: str) -> str:
        p = self.work / f"{host.name}-{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def start_broker(self) -> Host:
        self.broker = self.broker or self.add_host("broker")
        data = self.work / "redis"
        data.mkdir(exist_ok=True)
        cmd = ["redis-server", "--bind", self.broker.addr, "--port", "6379", "--requirepass", self.password]
        cmd += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--dir", str(data)]
        self._spawn(self.broker, "redis", cmd)
        self._wait(lambda: "Ready to accept connections" in self.log(self.broker, "redis"), 30, "redis-server")
        return self.broker

    def add_worker_host(self, concurrency: int = 1) -> Host:
        host = self.add_host("worker")
        serve = [sys.executable, "-m", "pipeline.cli", "serve", "--model-dir", str(self.model_dir)]
        serve += ["--model-repository", str(self.work / f"repo-{host.name}"), "--grpc-port", str(self.grpc_port)]
        self._spawn(host, "serve", serve, self.env())
        self._wait(lambda: "Triton serving" in self.log(host, "serve"), 240, f"tritonserver on {host.name}")
        worker = [sys.executable, "-m", "pipeline.cli", "worker", "--concurrency", str(concurrency)]
        self._spawn(host, "worker", worker, self.env())
        self._wait(lambda: "ready." in self.log(host, "worker"), 120, f"the worker on {host.name}")
        return host

    def run_producer(self, corpus: Path, out: Path, *args: str) -> subprocess.Popen:
        host = self.producer = self.producer or self.add_host("producer")
        cmd = [sys.executable, "-m", "pipeline.cli", "ingest", str(corpus), "--out", str(out), "--no-progress", *args]
        return self._spawn(host, f"producer-{len(host.procs)}", cmd, self.env())

    # -- faults
    def kill_host(self, host: Host) -> list[int]:
        """kill -9 of every process in the host's namespace (as when the machine dies)."""
        pids = [
            int(p)
            for p in subprocess.run(["ip", "netns", "pids", host.name], capture_output=True, text=True).stdout.split()
        ]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in host.procs.values():
            proc.wait(timeout=30)
        return pids

    def cut(self, host: Host) -> None:
        """The host's link goes down: it keeps running, and reaches nobody."""
        _ip("link", "set", host.link, "down", ns=self.switch)

    def heal(self, host: Host) -> None:
        _ip("link", "set", host.link, "up", ns=self.switch)

    def restart_broker(self, down_s: float = 3.0) -> None:
        assert self.broker is not None
        proc = self.broker.procs["redis"]
        proc.kill()
        proc.wait()
        time.sleep(down_s)
        (self.work / f"{self.broker.name}-redis.log").unlink(missing_ok=True)
        self.start_broker()

    # -- tear-down
    def stop(self) -> None:
        for host in reversed(self.hosts):
            for name, proc in host.procs.items():
                if proc.poll() is None and name in ("worker", "serve"):
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            for proc in host.procs.values():
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            self.kill_host(host)
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)
        self.hosts = []

    @staticmethod
    def _wait(pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def main() -> int:
    """Build a fleet (a broker and two worker hosts) for a look around, until Enter is pressed."""
    import tempfile

    from core.config import FbasConfig
    from core.layout import OutputDir
    from pipeline.ingest.model_cache import ensure_model

    why = available()
    if why:
        print(f"cannot build the fleet: {why}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fbas-fleet-"))
    model = ensure_model(FbasConfig(), OutputDir(work / "template"))
    with Fleet(work, model) as f:
        f.start_broker()
        hosts = [f.add_worker_host(), f.add_worker_host()]
        print(f"broker {f.broker.addr if f.broker else '?'}, workers {[h.addr for h in hosts]}; logs in {work}")
        print("FBAS_* for a producer:", {k: v for k, v in f.env().items() if k.startswith("FBAS_")}.keys())
        input("Enter stops the fleet ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
