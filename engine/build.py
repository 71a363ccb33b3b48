"""Checkpoint -> built model folder (the artifact that Triton and `fbas-pipeline embed` load).

``build_model(spec, out)`` resolves the model's defaults (pooling, normalize, max_seq_len),
writes the tokenizer, builds the engine for the target, calibrates int8 when asked, and
writes ``fbas_model.json`` last (so a folder without it is never mistaken for a built one).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.config import EngineSpec
from core.errors import CheckpointError, ConfigError
from engine.calibration import calibration_texts
from engine.checkpoint import Checkpoint, load_checkpoint
from engine.model_dir import META_FILE, ModelMeta, write_meta

if TYPE_CHECKING:
    from engine.onnx_build import GraphSpec

logger = logging.getLogger(__name__)

__all__ = ["build_model", "resolve_spec", "calibration_texts"]


def resolve_spec(spec: EngineSpec, ck: Checkpoint) -> tuple[str, bool, int]:
    """(pooling, normalize, max_seq_len): the flag where given, else the model's own config."""
    pooling = spec.pooling or ck.default_pooling
    if pooling == "pooler" and "pooler.dense.weight" not in ck.weights:
        raise ConfigError(
            f"pooling 'pooler' needs the pooler weights, which {ck.path} does not have: use --pooling cls or mean"
        )
    normalize = ck.default_normalize if spec.normalize is None else spec.normalize
    max_len = spec.max_seq_len or ck.default_max_seq_len
    if max_len > ck.shape.max_position:
        raise ConfigError(
            f"max_seq_len {max_len} exceeds the model's max_position_embeddings "
            f"{ck.shape.max_position}: use --max-seq-len {ck.shape.max_position} or less"
        )
    return pooling, normalize, max_len


@dataclass
class _Resolved:
    """The checkpoint with the settings and tokenizer the build resolved for it."""

    ck: Checkpoint
    pooling: str
    normalize: bool
    max_len: int
    tok_json: str


def _resolve_checkpoint(spec: EngineSpec) -> _Resolved:
    """Load the checkpoint, resolve pooling/normalize/max_seq_len and serialize its tokenizer."""
    from core.tokenize import tokenizer_json_for

    ck = load_checkpoint(spec.model)
    pooling, normalize, max_len = resolve_spec(spec, ck)
    if spec.lowercase is not None and ck.tokenizer.tokenizer_json is None:
        from dataclasses import replace

        ck.tokenizer = replace(ck.tokenizer, lowercase=spec.lowercase)
    return _Resolved(ck, pooling, normalize, max_len, tokenizer_json_for(ck.tokenizer))


def _start_staging(out: Path, tok_json: str) -> Path:
    """Create a fresh ``<out>.building`` folder holding the tokenizer, and return it."""
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    return tmp


def _onnx_graph_spec(
    spec: EngineSpec,
    r: _Resolved,
    options: dict,
    *,
    fusions: str,
    threads: int,
    calibration: str | Path | None,
    calibration_size: int,
    int8_target: float,
    progress: Callable[[int, int], None] | None,
) -> GraphSpec:
    """The ONNX graph spec for ``spec``: fusions, plus the int8 plan when asked; records both in ``options``."""
    from engine.onnx_build import Fusions, GraphSpec

    try:
        fu = Fusions.parse(fusions)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    gspec = GraphSpec(r.pooling, r.normalize, fu)
    options["fusions"] = fu.label()
    if spec.precision == "int8":
        from core.tokenize import Tokenizer
        from engine.quantize import calibrate_int8

        texts = calibration_texts(calibration, calibration_size)
        enc = Tokenizer(r.tok_json, r.max_len).encode(texts)
        plan = calibrate_int8(
            r.ck.shape,
            r.ck.weights,
            gspec,
            enc.token_ids,
            enc.lengths,
            r.max_len,
            target=int8_target,
            threads=threads,
            progress=progress,
        )
        gspec = plan.graph_spec(gspec)
        options["int8"] = plan.to_dict()
    elif spec.precision != "fp32":
        raise ConfigError(f"precision {spec.precision} is not available for target onnx: use fp32 or int8")
    return gspec


def _write_onnx(r: _Resolved, gspec: GraphSpec, tmp: Path) -> str:
    """Build the ONNX graph into ``tmp`` and return the engine file's name."""
    from engine.onnx_build import build_onnx

    model = build_onnx(r.ck.shape, r.ck.weights, gspec)
    engine_file = "model.onnx"
    with open(tmp / engine_file, "wb") as f:
        f.write(model.SerializeToString())
    return engine_file


def _write_gpu_weights(r: _Resolved, tmp: Path) -> str:
    """Write the weights for the gpu target into ``tmp`` and return the engine file's name."""
    from safetensors.numpy import save_file

    engine_file = "weights.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in r.ck.weights.items()}, str(tmp / engine_file))
    return engine_file


def _model_meta(spec: EngineSpec, r: _Resolved, engine_file: str, options: dict) -> ModelMeta:
    """The metadata for the built folder (its fingerprint is filled in by ``write_meta``)."""
    ck = r.ck
    return ModelMeta(
        name=ck.name,
        target=spec.target,
        precision=spec.precision,
        dim=ck.shape.hidden_size,
        pooling=r.pooling,
        normalize=r.normalize,
        max_seq_len=r.max_len,
        vocab_size=ck.shape.vocab_size,
        pad_id=ck.pad_token_id,
        shape=ck.shape.to_dict(),
        weights_hash=ck.weights_hash(),
        tokenizer_hash=hashlib.sha256(r.tok_json.encode()).hexdigest()[:16],
        engine_file=engine_file,
        source=str(ck.path),
        options=options,
    )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` with the staged ``tmp``, refusing to replace a folder that is not a built model."""
    if out.exists():
        if not (out / META_FILE).exists() and any(out.iterdir()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"{out} exists and is not a built model folder: refusing to replace it; "
                "choose another --out or empty it"
            )
        shutil.rmtree(out)
    os.replace(tmp, out)


def build_model(
    spec: EngineSpec,
    out: str | Path,
    *,
    fusions: str = "all",
    threads: int = 0,
    calibration: str | Path | None = None,
    calibration_size: int = 256,
    int8_target: float = 0.995,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Build ``spec`` into the folder ``out`` (created or replaced) and return it."""
    out = Path(out)
    r = _resolve_checkpoint(spec)
    tmp = _start_staging(out, r.tok_json)
    options: dict = {}
    if spec.target == "onnx":
        gspec = _onnx_graph_spec(
            spec,
            r,
            options,
            fusions=fusions,
            threads=threads,
            calibration=calibration,
            calibration_size=calibration_size,
            int8_target=int8_target,
            progress=progress,
        )
        engine_file = _write_onnx(r, gspec, tmp)
    elif spec.target == "gpu":
        engine_file = _write_gpu_weights(r, tmp)
    else:
        raise ConfigError(
            f"target {spec.target!r} cannot be built on this machine (TensorRT is not installed): "
            "use --target onnx or gpu"
        )
    meta = _model_meta(spec, r, engine_file, options)
    write_meta(tmp, meta)
    _move_into_place(tmp, out)
    logger.info(
        "built %s (%s, %s) into %s, fingerprint %s", r.ck.name, spec.target, spec.precision, out, meta.fingerprint
    )
    return out
