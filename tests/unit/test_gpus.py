"""services.gpus: the GPUs a server would see, from nvidia-smi's list and CUDA_VISIBLE_DEVICES (a stand-in
nvidia-smi on PATH plays a 2-GPU host; the real one is absent on CPU machines)."""

from __future__ import annotations

import pytest

from core.errors import ConfigError
from services.gpus import require_gpus, visible_gpus


def test_every_listed_gpu_unless_cuda_visible_devices_narrows_them(two_gpu_host, monkeypatch):
    assert visible_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert visible_gpus() == ["1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")  # CUDA stops at the first invalid index
    assert visible_gpus() == ["0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES='' hides them"):
        require_gpus("--target gpu")


def test_a_host_without_a_driver_says_so_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ConfigError) as e:
        require_gpus("--target gpu in local mode")
    assert "no nvidia-smi" in str(e.value) and "--target onnx" in str(e.value) and "\n" not in str(e.value)
