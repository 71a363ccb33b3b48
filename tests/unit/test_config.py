"""The config object, env vars and CLI flags: precedence, validation, clear errors."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from core.config import EngineSpec, FbasConfig, apply_env, fingerprint
from core.envs import env_name, read_env
from core.errors import ConfigError
from pipeline.cli import _config_from_args, build_parser


def test_env_var_sets_field_and_flag_wins(monkeypatch):
    monkeypatch.setenv("FBAS_MAX_SEQ_LEN", "128")
    monkeypatch.setenv("FBAS_PRECISION", "int8")
    ns = build_parser().parse_args(["build", "--out", "x"])
    cfg = _config_from_args(ns)
    assert cfg.engine.max_seq_len == 128 and cfg.engine.precision == "int8"
    ns = build_parser().parse_args(["build", "--out", "x", "--max-seq-len", "64"])
    assert _config_from_args(ns).engine.max_seq_len == 64


def test_bad_env_value_names_the_field():
    with pytest.raises(ConfigError, match="max_seq_len"):
        apply_env(FbasConfig(), {"max_seq_len": "lots"})
    with pytest.raises(ConfigError, match="not one of"):
        apply_env(FbasConfig(), {"pooling": "average"})


def test_cross_field_validation_says_the_fix():
    cfg = FbasConfig()
    cfg.queue.visibility_timeout = 10
    cfg.queue.task_time_limit = 60
    with pytest.raises(ConfigError, match="increase --visibility-timeout"):
        cfg.validate()
    cfg = FbasConfig(engine=EngineSpec(precision="fp16"))
    with pytest.raises(ConfigError, match="--target gpu"):
        cfg.validate()
    cfg = FbasConfig()
    cfg.output.keep_missing = True
    with pytest.raises(ConfigError, match="add --update, or drop --keep-missing"):
        cfg.validate()
    cfg.output.update = True
    cfg.validate()


def test_env_names_and_reader():
    assert env_name("max_seq_len") == "FBAS_MAX_SEQ_LEN"
    assert read_env({"FBAS_POOLING": "cls", "OTHER": "1", "FBAS_EMPTY": ""}) == {"pooling": "cls"}


def test_fingerprint_is_stable_and_sensitive():
    a = fingerprint({"x": 1, "y": [1, 2]})
    assert a == fingerprint({"y": [1, 2], "x": 1})
    assert a != fingerprint({"x": 2, "y": [1, 2]})


def test_help_is_fast_and_documents_defaults():
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "build", "--help"], capture_output=True, text=True, check=True
    ).stdout
    elapsed = time.perf_counter() - t0
    assert "--precision" in out and "default: fp32" in out and "FBAS_PRECISION" in out
    # --help must not import the heavy runtimes (onnxruntime, torch); a generous bound, not a benchmark
    assert elapsed < 10
    mods = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pipeline.cli as c; c.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('onnxruntime','torch','onnx','tritonclient','celery')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert mods.strip() == "[]"


def test_local_worker_count_follows_the_engine_target(monkeypatch):
    """CPU engine: 2 to 4 workers (the engine needs the cores); GPU engine: the cores + 4, at most 32."""
    from services import worker as local

    for cores, cpu_engine, gpu_engine in ((2, 2, 6), (8, 4, 12), (16, 4, 20), (64, 4, 32)):
        monkeypatch.setattr(local, "cpu_count", lambda c=cores: c)
        assert (local.default_concurrency(), local.default_concurrency(gpu=True)) == (cpu_engine, gpu_engine)


def test_a_fleet_worker_is_told_the_engine_target_to_size_its_pool(monkeypatch):
    """`fbas-pipeline worker --target gpu` sizes its pool as local mode does for a GPU (--concurrency 0)."""
    from services import worker as local

    monkeypatch.setattr(local, "cpu_count", lambda: 16)
    worker = ["worker", "--broker", "redis://q:6379/0"]
    for argv, want in (
        (worker, 4),
        (worker + ["--target", "gpu"], 20),
        (worker + ["--target", "gpu", "--concurrency", "3"], 3),
    ):
        assert local.pool_size(_config_from_args(build_parser().parse_args(argv))) == want
