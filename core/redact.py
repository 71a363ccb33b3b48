"""Secrets never reach logs or errors: ``redact_url`` hides a URL's password."""

from __future__ import annotations

import re



__all__ = ["redact_url"]


def redact_url(url: str | None) -> str:
    """The URL with any password replaced by ``***`` (safe for logs and errors)."""
    if not url:
        return str(url)
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
