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
from pathlib import Path

import numpy as np

from engine.checkpoint import Checkpoint, load_checkpoint
from engine.model_dir import META_FILE, ModelMeta, write_meta
from core.config import EngineSpec
from core.errors import CheckpointError, ConfigError
from engine.calibration import calibration_texts

logger = logging.getLogger(__name__)

__all__ = ["build_model", "resolve_spec", "calibration_texts"]



def resolve_spec(spec: EngineSpec, ck: Checkpoint) -> tuple[str, bool, int]:
    """(pooling, normalize, max_seq_len): the flag where given, else the model's own config."""
    pooling = spec.pooling or ck.default_pooling
    if pooling == "pooler" and "pooler.dense.weight" not in ck.weights:
        raise ConfigError(f"pooling 'pooler' needs the pooler weights, which {ck.path} does not have: "
                          "use --pooling cls or mean")
    normalize = ck.default_normalize if spec.normalize is None else spec.normalize
    max_len = spec.max_seq_len or ck.default_max_seq_len
    if max_len > ck.shape.max_position:
        raise ConfigError(f"max_seq_len {max_len} exceeds the model's max_position_embeddings "
                          f"{ck.shape.max_position}: use --max-seq-len {ck.shape.max_position} or less")
    return pooling, normalize, max_len




def build_model(spec: EngineSpec, out: str | Path, *, fusions: str = "all", threads: int = 0,
                calibration: str | Path | None = None, calibration_size: int = 256, int8_target: float = 0.995,
                progress: Callable[[int, int], None] | None = None) -> Path:
    """Build ``spec`` into the folder ``out`` (created or replaced) and return it."""
    from core.tokenize import Tokenizer, tokenizer_json_for

    out = Path(out)
    ck = load_checkpoint(spec.model)
    pooling, normalize, max_len = resolve_spec(spec, ck)
    if spec.lowercase is not None and ck.tokenizer.tokenizer_json is None:
        from dataclasses import replace

        ck.tokenizer = replace(ck.tokenizer, lowercase=spec.lowercase)
    tok_json = tokenizer_json_for(ck.tokenizer)
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    options: dict = {}

    if spec.target == "onnx":
        from engine.onnx_build import Fusions, GraphSpec, build_onnx

        try:
            fu = Fusions.parse(fusions)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        gspec = GraphSpec(pooling, normalize, fu)
        options["fusions"] = fu.label()
        if spec.precision == "int8":
            from engine.quantize import calibrate_int8

            texts = calibration_texts(calibration, calibration_size)
            enc = Tokenizer(tok_json, max_len).encode(texts)
            plan = calibrate_int8(ck.shape, ck.weights, gspec, enc.token_ids, enc.lengths, max_len,
                                  target=int8_target, threads=threads, progress=progress)
            gspec = plan.graph_spec(gspec)
            options["int8"] = plan.to_dict()
        elif spec.precision != "fp32":
            raise ConfigError(f"precision {spec.precision} is not available for target onnx: use fp32 or int8")
        model = build_onnx(ck.shape, ck.weights, gspec)
        engine_file = "model.onnx"
        with open(tmp / engine_file, "wb") as f:
            f.write(model.SerializeToString())
    elif spec.target == "gpu":
        from safetensors.numpy import save_file

        engine_file = "weights.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in ck.weights.items()}, str(tmp / engine_file))
    else:
        raise ConfigError(f"target {spec.target!r} cannot be built on this machine (TensorRT is not installed): "
                          "use --target onnx or gpu")

    meta = ModelMeta(
        name=ck.name, target=spec.target, precision=spec.precision, dim=ck.shape.hidden_size, pooling=pooling,
        normalize=normalize, max_seq_len=max_len, vocab_size=ck.shape.vocab_size, pad_id=ck.pad_token_id,
        shape=ck.shape.to_dict(), weights_hash=ck.weights_hash(),
        tokenizer_hash=hashlib.sha256(tok_json.encode()).hexdigest()[:16], engine_file=engine_file,
        source=str(ck.path), options=options)
    write_meta(tmp, meta)
    if out.exists():
        if not (out / META_FILE).exists() and any(out.iterdir()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"{out} exists and is not a built model folder: refusing to replace it; "
                                  "choose another --out or empty it")
        shutil.rmtree(out)
    os.replace(tmp, out)
    logger.info("built %s (%s, %s) into %s, fingerprint %s", ck.name, spec.target, spec.precision, out,
                meta.fingerprint)
    return out
