"""The repository entry that `fbas-pipeline build` writes, and how the server process fails."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from core.config import FbasConfig
from core.errors import ConfigError
from services.repository import ModelEntryOptions, render_config, write_model_repository
from services.serve import run_serve
from services.triton import ServerExitedError, TritonProcess, find_tritonserver


def test_entry_layout_and_config(built_fp32: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    entry = write_model_repository(
        built_fp32, repo, options=ModelEntryOptions(output_dtype="fp16", max_batch_requests=8)
    )
    assert entry == repo / "fbas_encoder"
    assert sorted(p.name for p in (entry / "1" / "engine").iterdir()) == [
        "fbas_model.json",
        "model.onnx",
        "tokenizer.json",
    ]
    assert (entry / "1" / "model.py").is_file()
    cfg = (entry / "config.pbtxt").read_text()
    for needle in (
        'name: "fbas_encoder"',
        'backend: "python"',
        "max_batch_size: 8",
        "allow_ragged_batch: true",
        "data_type: TYPE_FP16",
        "dims: [ -1, 384 ]",
        "preferred_batch_size: [ 2, 4, 8 ]",
        "kind: KIND_CPU",
        'key: "max_seq_len",            value: { string_value: "256" }',
    ):
        assert needle in cfg, needle
    # rewriting replaces the entry in place and leaves no temporary folder beside the repository
    write_model_repository(built_fp32, repo)
    assert "TYPE_FP32" in (entry / "config.pbtxt").read_text()
    assert sorted(os.listdir(tmp_path)) == ["repo"]


def test_entry_options_come_from_the_config(built_fp32: Path):
    cfg = FbasConfig()
    cfg.serve.model_name = "enc"
    cfg.runtime.threads = 3
    text = render_config(built_fp32, ModelEntryOptions.from_config(cfg))
    assert 'name: "enc"' in text and 'key: "threads",                value: { string_value: "3" }' in text


def test_bad_options_are_refused(built_fp32: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="output_dtype"):
        write_model_repository(built_fp32, tmp_path / "r", options=ModelEntryOptions(output_dtype="bf16"))
    (tmp_path / "r" / "fbas_encoder").mkdir(parents=True)
    with pytest.raises(ConfigError, match="not a Triton model entry"):
        write_model_repository(built_fp32, tmp_path / "r")


def test_explicit_binary_must_exist():
    with pytest.raises(ConfigError, match="FBAS_TRITONSERVER"):
        find_tritonserver("/nonexistent/tritonserver")


def test_server_that_cannot_load_the_model_fails_fast_with_its_log(built_fp32: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    entry = write_model_repository(built_fp32, repo)
    (entry / "1" / "engine" / "model.onnx").unlink()  # a broken entry: the engine file is gone
    proc = TritonProcess(repo, ready_timeout=120)
    with pytest.raises(ServerExitedError, match="Server exited unexpectedly") as info:
        proc.start()
    assert "model.onnx" in str(info.value)  # the log tail says what is wrong
    assert proc.poll() == -1 and not list(Path("/dev/shm").glob(proc.shm_prefix + "*"))


def test_run_serve_refuses_an_empty_repository(tmp_path: Path):
    cfg = FbasConfig()
    cfg.serve.model_repository = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match="fbas-pipeline build"):
        run_serve(cfg)


def test_tritonserver_is_found():
    paths = find_tritonserver()
    assert paths.binary.is_file() and (paths.backend_dir / "python" / "libtriton_python.so").is_file()
    assert shutil.which(str(paths.binary))  # executable


class _Serve:
    """`fbas-pipeline serve` on ``triton_repo`` (ports picked by the server) with its stderr read line by line."""

    def __init__(self, triton_repo: Path) -> None:
        import queue
        import subprocess
        import sys
        import threading

        root = Path(__file__).resolve().parents[2]
        cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--model-repository", str(triton_repo)]
        cmd += ["--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"]
        env = {**os.environ, "PYTHONPATH": str(root)}
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        stderr = self.proc.stderr
        assert stderr is not None
        threading.Thread(target=lambda: [self.lines.put(line) for line in stderr], daemon=True).start()

    def wait_line(self, pattern: str, timeout: float = 120):
        import queue
        import re
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                m = re.search(pattern, self.lines.get(timeout=1))
            except queue.Empty:
                continue
            if m:
                return m
        raise AssertionError(f"serve never printed {pattern!r}")

    def embeds(self, url: str) -> None:
        import numpy as np

        from workers.triton_client import ClientOptions, TritonEncoder

        with TritonEncoder(ClientOptions(url=url, ready_timeout=30)) as enc:
            out = enc.embed(np.array([101, 7592, 102], np.int32), np.array([3], np.int32))
            assert out.shape == (1, 384)

    def stop(self) -> int:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_serve_command_serves_until_sigterm(triton_repo: Path, tmp_path: Path):
    """`fbas-pipeline serve`: serve on loopback, answer requests, stop cleanly on SIGTERM."""
    serve = _Serve(triton_repo)
    try:
        url = serve.wait_line(r"Triton serving .* gRPC (127\.0\.0\.1:\d+)").group(1)
        serve.embeds(url)
        assert serve.stop() == 0
    finally:
        serve.kill()


def test_serve_starts_a_dead_tritonserver_again_on_the_same_ports(triton_repo: Path):
    """kill -9 of the server under `fbas-pipeline serve`: serve says so, starts it again on the same ports,
    and requests to the same address are answered again; SIGTERM still stops everything."""
    import signal

    serve = _Serve(triton_repo)
    try:
        url = serve.wait_line(r"Triton serving .* gRPC (127\.0\.0\.1:\d+)").group(1)
        with open(f"/proc/{serve.proc.pid}/task/{serve.proc.pid}/children") as f:
            server = int(f.read().split()[0])
        os.killpg(server, signal.SIGKILL)
        serve.wait_line(r"tritonserver exited \(exit code -9\): starting it again in 1s on the same ports")
        assert serve.wait_line(r"tritonserver serves again \(gRPC (127\.0\.0\.1:\d+)\)").group(1) == url
        serve.embeds(url)
        assert serve.stop() == 0
    finally:
        serve.kill()


def test_stale_backend_regions_of_dead_owners_are_swept():
    import subprocess

    from services.triton import sweep_stale_shm_regions

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path(f"/dev/shm/fbas_py_{dead.pid}_deadbeef_region")
    live = Path(f"/dev/shm/fbas_py_{os.getpid()}_cafe0000_region")
    for p in (stale, live):
        p.write_bytes(b"\0" * 16)
    try:
        removed = sweep_stale_shm_regions()
        assert stale.name in removed and not stale.exists()
        assert live.exists()  # its owner is alive: never touched
    finally:
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


def test_a_gpu_model_gets_an_instance_group_on_every_visible_gpu(
    built_fp32: Path, tmp_path: Path, two_gpu_host, monkeypatch
):
    """Every GPU of a host (placement read from the generated config, on a stand-in 2-GPU host): by default a
    KIND_GPU group with no gpus list, which Triton places on every GPU it sees; --gpus picks some, checked
    against what CUDA_VISIBLE_DEVICES leaves visible; and the worker pool grows with the GPUs it feeds."""
    import json
    import shutil

    from services import worker
    from services.repository import render_config

    gpu_model = tmp_path / "gpu-model"
    shutil.copytree(built_fp32, gpu_model)
    meta = json.loads((gpu_model / "fbas_model.json").read_text())
    (gpu_model / "fbas_model.json").write_text(json.dumps({**meta, "target": "gpu", "precision": "fp16"}))

    def placed(**opts) -> str:
        text = render_config(gpu_model, ModelEntryOptions(instance_count=2, **opts))
        return text[text.index("instance_group") :].split("]", 1)[0] + "]"

    every = placed()  # no gpus list: Triton puts count instances on every GPU it sees where it serves
    assert "count: 2" in every and "kind: KIND_GPU" in every and "gpus" not in every
    assert "gpus: [ 0, 1 ]" in placed(gpus="0,1") and "gpus: [ 1 ]" in placed(gpus="1")
    with pytest.raises(ConfigError, match="shows 2 GPUs"):
        placed(gpus="2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(ConfigError, match="shows 1 GPUs"):  # one card visible: the server numbers it 0
        placed(gpus="1")
    assert "gpus: [ 0 ]" in placed(gpus="0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert "gpus" not in render_config(built_fp32, ModelEntryOptions())  # a CPU model: no GPU placement
    monkeypatch.setattr(worker, "cpu_count", lambda: 16)
    cfg = FbasConfig()
    cfg.engine.target = "gpu"
    assert worker.pool_size(cfg) == 16 + 4 * 2  # the cores, plus requests in flight for each card
    cfg.serve.gpus = "0"
    assert worker.pool_size(cfg) == 16 + 4
