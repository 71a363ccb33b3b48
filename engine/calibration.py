"""The text int8 calibration and GPU warm-up run on: a file of the user's, or the bundled sample."""

from __future__ import annotations

from pathlib import Path

from core.errors import ConfigError

__all__ = ["calibration_texts"]


def calibration_texts(path: str | Path | None = None, limit: int = 256) -> list[str]:
    """Real-text calibration sample: a user file (one text per line) or the bundled one."""
    p = Path(path) if path else CALIBRATION_FILE
    if not p.exists():
        raise ConfigError(f"calibration file {p} does not exist")
    texts = [t.strip() for t in p.read_text(encoding="utf-8").splitlines() if t.strip()]
    if len(texts) < 16:
        raise ConfigError(f"calibration file {p} has {len(texts)} texts; at least 16 are needed")
    return texts[:limit]


CALIBRATION_FILE = Path(__file__).parent / "data" / "calibration.txt"
