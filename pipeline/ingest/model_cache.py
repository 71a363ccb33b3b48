"""The built model an ingest serves: ``OUT/.fbas/model``, reused while its build key matches, else linked from
the per-user cache (``~/.cache/fbas/models/<key>``), else built."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from core.config import FbasConfig, fingerprint
from core.errors import FbasError
from core.layout import MODEL_SPEC, MODEL_SUBDIR, OutputDir

logger = logging.getLogger(__name__)

__all__ = ["ensure_model", "model_key", "MODEL_CACHE"]


MODEL_CACHE = Path.home() / ".cache" / "fbas" / "models"  # built engines, by model_key


def model_key(cfg: FbasConfig) -> str:
    """Identity of a model build: every engine setting plus the checkpoint files' names, sizes and mtimes."""
    from engine.checkpoint import default_model_path

    src = Path(cfg.engine.model) if cfg.engine.model else default_model_path()
    files = (
        sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in src.glob("*") if p.is_file())
        if src.is_dir()
        else []
    )
    return fingerprint({"engine": asdict(cfg.engine), "source": str(src.resolve()), "files": files})


def _valid_model(folder: Path, stamp: Path, key: str) -> bool:
    from engine.model_dir import read_meta

    if not (folder.is_dir() and stamp.exists() and stamp.read_text(encoding="utf-8").strip() == key):
        return False
    try:
        read_meta(folder)
        return True
    except FbasError:
        logger.warning("model in %s is damaged: rebuilding", folder)
        return False


def ensure_model(cfg: FbasConfig, out: OutputDir, cache: Path | None = MODEL_CACHE) -> Path:
    """The built model for ``cfg.engine`` in ``OUT/.fbas/model``: reused while its key matches, else taken from
    the per-user build cache (``~/.cache/fbas/models/<key>``, hard links), else built (and cached)."""
    from engine.build import build_model

    key = model_key(cfg)
    target, stamp = out.state(MODEL_SUBDIR), out.state(MODEL_SPEC)
    if _valid_model(target, stamp, key):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    cached = cache / key if cache else None
    if cached is not None:
        try:
            if not _valid_model(cached, cached.with_suffix(".key"), key):
                logger.info(
                    "building the model (%s, %s) into the cache %s",
                    cfg.engine.model or "default",
                    cfg.engine.precision,
                    cached,
                )
                build_model(cfg.engine, cached, threads=cfg.runtime.threads)
                cached.with_suffix(".key").write_text(key, encoding="utf-8")
            tmp = target.with_name(target.name + ".copying")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(cached, tmp, copy_function=_link_or_copy)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            stamp.write_text(key, encoding="utf-8")
            return target
        except OSError as e:  # a read-only or full home folder: build in place instead
            logger.warning("model cache %s unusable (%s): building into %s", cache, e, target)
    logger.info("building the model (%s, %s) into %s", cfg.engine.model or "default", cfg.engine.precision, target)
    build_model(cfg.engine, target, threads=cfg.runtime.threads)
    stamp.write_text(key, encoding="utf-8")
    return target


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
