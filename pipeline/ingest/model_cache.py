"""The built model an ingest serves: ``OUT/.fbas/model``, reused while its build key matches, else linked from
the per-user cache (``~/.cache/fbas/models/<key>``), else built."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from core.config import FbasConfig, fingerprint
from core.errors import FbasError, InputError
from core.layout import MODEL_SPEC, MODEL_SUBDIR, OutputDir
from pipeline.ingest.progress import Steps

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


def ensure_model(
    cfg: FbasConfig,
    out: OutputDir,
    cache: Path | None = MODEL_CACHE,
    steps: Steps | None = None,
    built: Path | None = None,
) -> Path:
    """The built model for ``cfg.engine`` in ``OUT/.fbas/model``: reused while its key matches, else taken from
    the per-user build cache (``~/.cache/fbas/models/<key>``, hard links), else built (and cached). A disk
    too full for it is an ``InputError`` naming the folder and the space needed, with nothing partial left.

    ``built``: a model folder built already (``fbas-pipeline build``; also what ``--model`` names when it is
    one), used as it is: the engine settings are then its own. ``steps`` reports a build as it goes."""
    steps = steps or Steps(enabled=False)
    built = built or (built_folder(cfg.engine.model) if cfg.engine.model else None)
    key = _built_key(built) if built else model_key(cfg)
    target, stamp = out.state(MODEL_SUBDIR), out.state(MODEL_SPEC)
    if _valid_model(target, stamp, key):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if built is not None:
        try:
            _staged(target, ".copying", lambda tmp: shutil.copytree(built, tmp, copy_function=_link_or_copy))
        except OSError as e:
            _refuse_if_full(e, target, lambda: _size(built))
            raise
        stamp.write_text(key, encoding="utf-8")
        return target
    cached = cache / key if cache else None
    if cached is not None:
        try:
            _fill_cache(cfg, cached, key, steps)
            _staged(target, ".copying", lambda tmp: shutil.copytree(cached, tmp, copy_function=_link_or_copy))
            stamp.write_text(key, encoding="utf-8")
            return target
        except OSError as e:  # a full cache (or home quota) is no reason to stop: build into OUT instead
            _refuse_if_full(e, target, lambda: _size(cached), unnamed_is_target=False)
            logger.warning("model cache %s unusable (%s): building into %s", cache, e, target)
    logger.info("building the model (%s, %s) into %s", cfg.engine.model or "default", cfg.engine.precision, target)
    try:
        _build(cfg, target, steps)
    except OSError as e:
        _refuse_if_full(e, target, lambda: _build_size(cfg))
        raise
    stamp.write_text(key, encoding="utf-8")
    return target


def _fill_cache(cfg: FbasConfig, cached: Path, key: str, steps: Steps) -> None:
    """Build the model into the cache unless it holds it already."""
    if _valid_model(cached, cached.with_suffix(".key"), key):
        return
    logger.info(
        "building the model (%s, %s) into the cache %s", cfg.engine.model or "default", cfg.engine.precision, cached
    )
    _build(cfg, cached, steps)
    cached.with_suffix(".key").write_text(key, encoding="utf-8")


def _build(cfg: FbasConfig, folder: Path, steps: Steps) -> None:
    """``build_model`` into ``folder`` (reported by ``steps``); on any error its staging folder
    (``<folder>.building``) is removed."""
    from engine.build import build_model

    e = cfg.engine
    what = f"building the model ({e.model or 'all-MiniLM-L6-v2'}, {e.target} {e.precision}; once per setting)"
    steps.begin(what)
    try:
        build_model(
            e,
            folder,
            threads=cfg.runtime.threads,
            progress=lambda done, total: steps.tick("calibrating int8, layers", done, total),
        )
    except BaseException:
        shutil.rmtree(folder.with_name(folder.name + ".building"), ignore_errors=True)
        raise
    steps.end(what)


def built_folder(model: str) -> Path | None:
    """``model`` when it names a built model folder (``fbas-pipeline build``'s output), not a checkpoint."""
    from engine.model_dir import META_FILE

    p = Path(model).expanduser()
    return p if (p / META_FILE).is_file() else None


def _built_key(folder: Path) -> str:
    """A built folder's identity: its engine fingerprint (it covers weights, precision, pooling, tokenizer)."""
    from engine.model_dir import read_meta

    return "built:" + read_meta(folder).fingerprint


def _staged(target: Path, suffix: str, fill) -> None:
    """Fill ``<target><suffix>`` and rename it over ``target``; the staging folder is removed on any error."""
    tmp = target.with_name(target.name + suffix)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
        target.with_name(MODEL_SPEC).unlink(missing_ok=True)  # the old key goes before the old model does
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _no_space(e: OSError) -> bool:
    """A write that failed for want of space (``copytree`` reports its files' errors as a list of strings)."""
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list):
        return any(f"[Errno {errno.ENOSPC}]" in str(x) or f"[Errno {errno.EDQUOT}]" in str(x) for x in e.args[0])
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def _is_under(target: Path, e: OSError, unnamed_is_target: bool) -> bool:
    """Whether a failed write was in ``target``'s folder (not in the cache's)."""
    where = str(e.args[0]) if isinstance(e, shutil.Error) else str(e.filename or e.filename2 or "")
    return str(target.parent) in where if where else unnamed_is_target


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _build_size(cfg: FbasConfig) -> int:
    """About what a build writes: the checkpoint's weights (an ONNX or GPU engine holds them once)."""
    from engine.checkpoint import default_model_path

    src = Path(cfg.engine.model) if cfg.engine.model else default_model_path()
    return _size(src) if src.is_dir() else 0


def _refuse_if_full(e: OSError, target: Path, need: Callable[[], int], unnamed_is_target: bool = True) -> None:
    """Turn a write into ``target``'s folder that failed for want of space into the ``InputError`` that names
    the folder and the space the model needs. ``unnamed_is_target``: whether an error that names no file was
    a write into ``target`` (not where a write into the cache also happened)."""
    if _no_space(e) and _is_under(target, e, unnamed_is_target):
        raise _full(target.parent, need()) from None


def _full(folder: Path, need: int) -> InputError:
    free = shutil.disk_usage(folder).free
    return InputError(
        f"{folder} is out of disk space for the model: it needs about {need / 2**20:,.0f} MB and "
        f"{free / 2**20:,.0f} MB are free. Free some space there or write to another --out; nothing was left behind"
    )


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
