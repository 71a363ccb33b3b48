"""Soak test: a fleet ingest while a seeded random schedule kills workers, restarts Redis, kills Triton and
fills the output disk; then the oracle (every input row exactly once, checksums verify).

    .venv/bin/python -m tests.soak --rows 20000 --faults 20 --seed 7      # by hand, longer
    (tests/integration/test_soak.py runs it small in CI)

Everything runs on this machine as separate processes, as an operator runs a fleet: a password-protected
redis-server with its append-only file, `fbas-pipeline serve` (which starts a killed tritonserver again),
two `fbas-pipeline worker`s (restarted by this script after a kill, as systemd would), and the producer,
`fbas-pipeline ingest --broker`. A producer that stops (the disk filled up under its workers) is run again
once the space is back, as an operator would. The output folder sits on its own small filesystem (tmpfs)
when this runs as root, so filling the disk hurts only this test; elsewhere that fault is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.triton import free_port
from tests.pipeline_support import check_oracle, wait_for  # noqa: E402

FAULTS = ("kill_worker", "restart_redis", "kill_triton", "fill_disk")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 a process and the process groups of its children (a worker's Celery pool, a server's stubs)."""
    for child in _children(proc.pid):
        try:
            os.killpg(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.kill()
    proc.wait()


@dataclass
class Fleet:
    work: Path
    out_root: Path
    model_dir: Path
    redis_port: int = field(default_factory=free_port)
    grpc: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_hex(12))
    task_key: str = field(default_factory=lambda: secrets.token_hex(32))
    redis: subprocess.Popen | None = None
    serve: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def broker(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.redis_port}/0"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FBAS_")}
        env.update(
            PYTHONPATH=str(ROOT),
            FBAS_BROKER=self.broker,
            FBAS_TASK_KEY=self.task_key,
            FBAS_TRITON=f"127.0.0.1:{self.grpc}",
            FBAS_OUT_ROOT=str(self.out_root),
            FBAS_BROKER_WAIT="90",
            FBAS_BATCH_ROWS="32",
        )
        return env

    def _log(self, name: str):
        return open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child

    def start_redis(self) -> None:
        (self.work / "redis").mkdir(exist_ok=True)
        args = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--requirepass", self.password]
        args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--dir", str(self.work / "redis")]
        self.redis = subprocess.Popen(args, stdout=self._log("redis"), stderr=subprocess.STDOUT)
        from workers.jobstate import connect

        wait_for(lambda: _answers(connect, self.broker), 30, "redis-server")

    def start_serve(self) -> None:
        cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--model-dir", str(self.model_dir)]
        cmd += ["--model-repository", str(self.work / "repo"), "--grpc-port", str(self.grpc)]
        cmd += ["--http-port", str(free_port()), "--metrics-port", str(free_port())]
        self.serve = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env(), stdout=self._log("serve"), stderr=subprocess.STDOUT
        )
        wait_for(lambda: b"Triton serving" in (self.work / "serve.log").read_bytes(), 180, "tritonserver")

    def start_worker(self, i: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "pipeline.cli", "worker", "--concurrency", "1"]
        return subprocess.Popen(
            cmd, cwd=self.out_root, env=self.env(), stdout=self._log(f"worker{i}"), stderr=subprocess.STDOUT
        )

    def stop(self) -> None:
        for p in self.workers + [self.serve]:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.workers + [self.serve]:
            if p is not None:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    _kill_tree(p)
        if self.redis is not None and self.redis.poll() is None:
            self.redis.kill()
            self.redis.wait()


def _answers(connect, url: str) -> bool:
    from core.errors import ServerUnavailableError

    try:
        connect(url, timeout=1.0).close()
        return True
    except ServerUnavailableError:
        return False


class Faults:
    """The seeded schedule and what each fault does to the fleet."""

    def __init__(self, fleet: Fleet, rng: random.Random, kinds: tuple[str, ...]) -> None:
        self.fleet, self.rng, self.kinds = fleet, rng, kinds
        self.done: dict[str, int] = {k: 0 for k in kinds}
        self.filler: Path | None = None

    def next_kind(self) -> str:
        missing = [k for k in self.kinds if not self.done[k]]  # every kind at least once, then at random
        return self.rng.choice(missing or list(self.kinds))

    def inject(self, kind: str) -> None:
        f, rng = self.fleet, self.rng
        if kind == "kill_worker":
            i = rng.randrange(len(f.workers))
            _kill_tree(f.workers[i])
            time.sleep(rng.uniform(0.5, 3))
            f.workers[i] = f.start_worker(i)
        elif kind == "restart_redis":
            assert f.redis is not None
            f.redis.kill()
            f.redis.wait()
            time.sleep(rng.uniform(1, 5))
            f.start_redis()
        elif kind == "kill_triton":
            assert f.serve is not None
            for child in _children(f.serve.pid):
                os.killpg(child, signal.SIGKILL)
        elif kind == "fill_disk":
            self.filler = f.out_root / "filler.bin"
            with open(self.filler, "wb") as fh:  # until the filesystem is full (workers write meanwhile)
                try:
                    while True:
                        fh.write(b"\0" * (1 << 20))
                        fh.flush()
                except OSError:
                    pass
            time.sleep(rng.uniform(2, 4))
            self.free_disk()
        self.done[kind] += 1

    def free_disk(self) -> None:
        if self.filler is not None:
            self.filler.unlink(missing_ok=True)
            self.filler = None


def run_soak(work: Path, rows: int, faults: int, seed: int, gap: tuple[float, float] = (2.0, 5.0)) -> dict:
    """Run the soak in ``work``; returns the summary (faults injected by kind, attempts, rows checked)."""
    from core.config import FbasConfig
    from core.layout import OutputDir
    from pipeline.ingest.model_cache import ensure_model

    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    out_root = work / "disk"
    out_root.mkdir(exist_ok=True)
    small = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(out_root)], capture_output=True
        ).returncode
        == 0
    )
    kinds = FAULTS if small else tuple(k for k in FAULTS if k != "fill_disk")
    model = Path(ensure_model(FbasConfig(), OutputDir(work / "template")))
    corpus = work / "corpus.parquet"
    ids = [f"d{i}" for i in range(rows)]
    texts = _texts(rows)
    pq.write_table(pa.table({"id": ids, "text": texts}), corpus)
    fleet = Fleet(work, out_root, model)
    out = out_root / "out"
    attempts: list[int] = []
    t0 = time.monotonic()
    try:
        fleet.start_redis()
        fleet.start_serve()
        fleet.workers = [fleet.start_worker(i) for i in range(2)]
        inject = Faults(fleet, rng, kinds)
        left = faults
        while True:
            cmd = [sys.executable, "-m", "pipeline.cli", "ingest", str(corpus), "--out", str(out), "--no-progress"]
            producer = subprocess.Popen(
                cmd, cwd=ROOT, env=fleet.env(), stdout=fleet._log("producer"), stderr=subprocess.STDOUT
            )
            while producer.poll() is None:
                time.sleep(rng.uniform(*gap))
                if left and producer.poll() is None:
                    inject.inject(inject.next_kind())
                    left -= 1
            inject.free_disk()
            attempts.append(producer.returncode)
            if producer.returncode == 0 or len(attempts) >= 6:
                break
        manifest = check_oracle(out, ids) if attempts[-1] == 0 else None
    finally:
        fleet.stop()
        if small:
            subprocess.run(["umount", "-l", str(out_root)], check=False)
    return {
        "seed": seed,
        "rows": rows,
        "rows_checked": manifest["counts"]["input_rows"] if manifest else 0,
        "faults": inject.done,
        "attempts": attempts,
        "redelivered": manifest["counts"]["redelivered"] if manifest else None,
        "seconds": round(time.monotonic() - t0, 1),
        "disk_faults": small,
    }


def _texts(n: int) -> list[str]:
    """Real English sentences (STS-B test), repeated with a row number so every text is its own."""
    import csv

    with open(ROOT / "tests" / "data" / "stsb_multi_mt" / "stsb-en-test.csv", encoding="utf-8", newline="") as f:
        base = [r[0] for r in csv.reader(f)]
    return [f"{base[i % len(base)]} ({i})" for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20000, help="corpus rows (default: 20000)")
    ap.add_argument("--faults", type=int, default=20, help="faults to inject (default: 20)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the fault schedule (default: 7)")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary one)")
    args = ap.parse_args(argv)
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="fbas-soak-"))
    summary = run_soak(work, args.rows, args.faults, args.seed)
    print(json.dumps(summary))
    return 0 if summary["rows_checked"] == args.rows else 1


if __name__ == "__main__":
    sys.exit(main())
