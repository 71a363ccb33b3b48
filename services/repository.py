"""The Triton model repository entry of a built model: ``REPO/<model>/config.pbtxt`` (from
``model_repository/config.pbtxt.template``) and ``REPO/<model>/1/`` (``model.py`` and the engine files)."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from core.errors import ConfigError
from engine.model_dir import META_FILE, read_meta
from services.gpus import visible_gpus

logger = logging.getLogger(__name__)

__all__ = ["ModelEntryOptions", "render_config", "write_model_repository", "preferred_batch_sizes", "REPO_ROOT"]


REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_DIR = REPO_ROOT / "model_repository"


VERSION = "1"


_TRITON_TYPES = {"fp32": "TYPE_FP32", "fp16": "TYPE_FP16"}


@dataclass
class ModelEntryOptions:
    """How Triton serves the engine (config.pbtxt); none of these change the numbers beyond FP16 rounding."""

    model_name: str = "fbas_encoder"
    output_dtype: str = "fp32"  # fp32 | fp16: dtype of the embedding on the wire
    max_batch_requests: int = 16  # Triton max_batch_size: requests merged into one execution
    max_queue_delay_us: int = 2000  # microseconds the batcher waits to grow a batch
    instance_count: int = 1  # model instances (engine copies) per device
    instance_kind: str = ""  # KIND_CPU | KIND_GPU; "" = from the engine's target
    gpus: str = ""  # KIND_GPU: comma-separated visible GPU indices; "" = every GPU visible here (services.gpus)
    threads: int = 0  # engine threads per instance; 0 = all cores
    token_budget: int = 2048  # engine's padded tokens per internal sub-batch
    max_docs_per_request: int = 1024  # documents per request; more is rejected as [fbas:oversize]
    max_tokens_per_request: int = 262144  # tokens per request (1 MiB of int32)

    @classmethod
    def from_config(cls, cfg: Any) -> ModelEntryOptions:
        """From an ``FbasConfig``; ServeConfig fields that do not exist (yet) keep their defaults here."""
        opts = cls()
        if cfg is None:
            return opts
        serve, runtime = cfg.serve, cfg.runtime
        for name in (
            "model_name",
            "output_dtype",
            "max_batch_requests",
            "max_queue_delay_us",
            "instance_count",
            "instance_kind",
            "gpus",
            "max_docs_per_request",
            "max_tokens_per_request",
        ):
            if hasattr(serve, name):
                setattr(opts, name, getattr(serve, name))
        opts.threads, opts.token_budget = runtime.threads, runtime.token_budget
        return opts

    def validate(self) -> ModelEntryOptions:
        if self.output_dtype not in _TRITON_TYPES:
            raise ConfigError(f"output_dtype {self.output_dtype!r} is not fp32 or fp16")
        if self.max_batch_requests < 1 or self.instance_count < 1:
            raise ConfigError("max_batch_requests and instance_count must be >= 1")
        if self.max_docs_per_request < 1 or self.max_tokens_per_request < 16:
            raise ConfigError("max_docs_per_request must be >= 1 and max_tokens_per_request >= 16")
        if self.max_tokens_per_request * 4 > 1 << 30:
            raise ConfigError("max_tokens_per_request above 2**28 would exceed gRPC's message size: lower it")
        if self.instance_kind not in ("", "KIND_CPU", "KIND_GPU"):
            raise ConfigError(f"instance_kind {self.instance_kind!r} is not KIND_CPU or KIND_GPU")
        return self


def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two from 2 up to ``max_batch`` (and ``max_batch`` itself): batches the batcher sends at once."""
    sizes = [s for s in (2**k for k in range(1, 16)) if s < max_batch] + [max_batch]
    return sizes[-4:]


def placement(kind: str, gpus: str) -> list[int]:
    """The GPU ordinals (as the server sees them, after CUDA_VISIBLE_DEVICES) a KIND_GPU model is placed on
    when ``--gpus`` names some: one instance group on each. Empty otherwise: Triton then puts the instances
    on every GPU it sees where it runs (a repository may be written on another host than the one serving it)."""
    if kind != "KIND_GPU" or not gpus.strip():
        return []
    try:
        chosen = [int(g) for g in gpus.split(",") if g.strip()]
    except ValueError:
        raise ConfigError(f"--gpus {gpus!r}: give comma-separated GPU indices, e.g. 0,1") from None
    visible = visible_gpus()
    if visible and any(g < 0 or g >= len(visible) for g in chosen):
        raise ConfigError(f"--gpus {gpus}: this host shows {len(visible)} GPUs (0..{len(visible) - 1})")
    return chosen


def render_config(model_dir: str | Path, options: ModelEntryOptions) -> str:
    """The config.pbtxt text for the built model folder ``model_dir``."""
    meta = read_meta(model_dir)
    opts = options.validate()
    kind = opts.instance_kind or ("KIND_GPU" if meta.target in ("gpu", "tensorrt") else "KIND_CPU")
    template = Template((TEMPLATE_DIR / "config.pbtxt.template").read_text(encoding="utf-8"))
    return template.substitute(
        source_name=meta.name,
        fingerprint=meta.fingerprint,
        model_name=opts.model_name,
        max_batch_requests=opts.max_batch_requests,
        output_type=_TRITON_TYPES[opts.output_dtype],
        dim=meta.dim,
        preferred_batch_sizes=", ".join(map(str, preferred_batch_sizes(opts.max_batch_requests))),
        max_queue_delay_us=opts.max_queue_delay_us,
        instance_count=opts.instance_count,
        instance_kind=kind,
        gpus_line=f"\n    gpus: [ {', '.join(map(str, gpus))} ]" if (gpus := placement(kind, opts.gpus)) else "",
        threads=opts.threads,
        token_budget=opts.token_budget,
        max_docs_per_request=opts.max_docs_per_request,
        max_tokens_per_request=opts.max_tokens_per_request,
        max_seq_len=meta.max_seq_len,
        vocab_size=meta.vocab_size,
        precision=meta.precision,
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_model_repository(
    model_dir: str | Path, repo_dir: str | Path, cfg: Any = None, options: ModelEntryOptions | None = None
) -> Path:
    """Write ``REPO/<model_name>/`` for the built model folder and return that entry's path.

        REPO/<name>/config.pbtxt       rendered from model_repository/config.pbtxt.template
        REPO/<name>/1/model.py         model_repository/model.py
        REPO/<name>/1/engine/          the built folder (hard links where possible, else copies)

    The entry is assembled next to the repository and renamed into place, so a running
    Triton scanning REPO never sees half an entry. Other entries in REPO are left alone.
    """
    model_dir, repo_dir = Path(model_dir), Path(repo_dir)
    opts = options or ModelEntryOptions.from_config(cfg)
    config_text = render_config(model_dir, opts)  # reads + checks fbas_model.json first
    meta = read_meta(model_dir)
    repo_dir.mkdir(parents=True, exist_ok=True)
    entry = repo_dir / opts.model_name
    if entry.exists() and not (entry / "config.pbtxt").exists():
        raise ConfigError(f"{entry} exists and is not a Triton model entry: refusing to replace it")
    tmp = repo_dir.parent / f".{repo_dir.name}.{opts.model_name}.writing"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / VERSION / "engine").mkdir(parents=True)
    for name in (META_FILE, meta.engine_file, "tokenizer.json"):
        _link_or_copy(model_dir / name, tmp / VERSION / "engine" / name)
    shutil.copy2(TEMPLATE_DIR / "model.py", tmp / VERSION / "model.py")
    (tmp / "config.pbtxt").write_text(config_text, encoding="utf-8")
    if entry.exists():
        old = repo_dir.parent / f".{repo_dir.name}.{opts.model_name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(entry, old)
        os.replace(tmp, entry)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, entry)
    logger.info("wrote Triton model %s (%s, dim %d) to %s", opts.model_name, meta.name, meta.dim, entry)
    return entry
