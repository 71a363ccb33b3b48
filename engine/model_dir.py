"""The built model folder: what `fbas-pipeline build` writes and every server/worker loads.

    DIR/fbas_model.json   metadata (below), including the engine fingerprint
    DIR/model.onnx        the engine artifact for target onnx (or weights.safetensors for gpu)
    DIR/tokenizer.json    the tokenizer, always as a HF tokenizers file

The fingerprint covers everything that changes the numbers: weights hash, target,
precision, pooling, normalize, max_seq_len, tokenizer, fusions and the int8 plan.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.config import fingerprint
from core.errors import CheckpointError

__all__ = ["ModelMeta", "META_FILE", "read_meta", "write_meta", "load_engine", "load_tokenizer"]

META_FILE = "fbas_model.json"
FORMAT_VERSION = 1


@dataclass
class ModelMeta:
    """Everything a server needs to know about a built engine."""

    name: str
    target: str
    precision: str
    dim: int
    pooling: str
    normalize: bool
    max_seq_len: int
    vocab_size: int
    pad_id: int
    shape: dict[str, Any]
    weights_hash: str
    tokenizer_hash: str
    engine_file: str
    source: str
    options: dict[str, Any] = field(default_factory=dict)  # fusions, int8 plan, calibration facts
    fingerprint: str = ""
    format_version: int = FORMAT_VERSION

    def compute_fingerprint(self) -> str:
        keys = (
            "target",
            "precision",
            "pooling",
            "normalize",
            "max_seq_len",
            "weights_hash",
            "tokenizer_hash",
            "options",
        )
        return fingerprint({k: getattr(self, k) for k in keys})


def write_meta(folder: Path, meta: ModelMeta) -> None:
    meta.fingerprint = meta.compute_fingerprint()
    tmp = folder / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(meta), indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, folder / META_FILE)


def read_meta(folder: str | Path) -> ModelMeta:
    folder = Path(folder)
    path = folder / META_FILE
    if not path.exists():
        is_checkpoint = (folder / "config.json").exists() or (folder / "bert_config.json").exists()
        hint = (
            f"it is a checkpoint: build it into a new folder with `fbas-pipeline build --model {folder} --out "
            "models/NAME`, then pass --model-dir models/NAME"
            if is_checkpoint
            else "build one into a new folder with `fbas-pipeline build --out models/NAME`"
        )
        raise CheckpointError(f"{folder} is not a built model folder (no {META_FILE}): {hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        meta = ModelMeta(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path} is damaged ({e}): rebuild the model folder") from None
    if meta.format_version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {meta.format_version}, this fbas reads "
            f"{FORMAT_VERSION}: rebuild the model folder"
        )
    if not (folder / meta.engine_file).exists():
        raise CheckpointError(f"{folder / meta.engine_file} is missing: rebuild the model folder")
    return meta


def load_tokenizer(folder: str | Path, meta: ModelMeta | None = None):
    """The folder's tokenizer, truncating at the model's max_seq_len: the C WordPiece tokenizer where it
    applies (``dll.wordpiece``), else HF's."""
    from dll.wordpiece import make_tokenizer

    meta = meta or read_meta(folder)
    return make_tokenizer((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"), meta.max_seq_len)


def load_engine(
    folder: str | Path, threads: int = 0, token_budget: int = 2048, max_batch: int = 256, device: str | None = None
):
    """The engine for a built folder, chosen by its target (imports the runtime lazily)."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta.target == "onnx":
        from engine.onnx_engine import OnnxEngine

        return OnnxEngine(
            folder / meta.engine_file,
            meta.dim,
            meta.max_seq_len,
            meta.vocab_size,
            meta.precision,
            threads=threads,
            token_budget=token_budget,
            max_batch=max_batch,
            pad_id=meta.pad_id,
        )
    if meta.target == "gpu":
        from engine.torch_gpu import load_gpu_engine

        return load_gpu_engine(folder, meta, device=device)
    raise CheckpointError(f"{folder}: target {meta.target!r} cannot be loaded here")
