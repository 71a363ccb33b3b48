"""Secrets never reach logs, errors or ``status``: ``redact_url`` hides every credential a broker URL can carry.

redis-py takes a password in a URL's userinfo (``redis://:PASS@host``, ``redis://user:PASS@host``, also with
``@`` or ``:`` inside the password, percent-encoded or not) and in its query string (``?password=PASS``);
``redact`` also scrubs those values wherever else they turn up in a text (an error message that quotes them).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote

__all__ = ["redact_url", "redact", "url_secrets"]

MASK = "***"
_SECRET_KEYS = re.compile(r"pass|secret|token|key", re.IGNORECASE)  # query parameters whose values are secret
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<netloc>[^/?#]*)(?P<rest>.*)$", re.DOTALL)
# userinfo may hold '/', '?' or '#' unescaped (a base64 password): it runs to the last '@' before the host
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>.*)@(?P<tail>[^@]*)$", re.DOTALL)


def redact_url(url: str | None) -> str:
    """The URL with its password (userinfo or query string) replaced by ``***``."""
    if not url:
        return str(url)
    if not _URL.match(url):
        return redact(url)
    # the query's secrets first (a password there may hold '@'), then the userinfo up to the last '@'
    url = re.sub(
        r"([?&;])([^=&;#]*)=([^&;#]*)",
        lambda q: f"{q[1]}{q[2]}={MASK}" if _SECRET_KEYS.search(q[2]) else q[0],
        url,
    )
    m = _USERINFO.match(url)
    if not m:
        return url
    user, sep, _ = m["userinfo"].partition(":")
    userinfo = f"{user}:{MASK}" if sep and "/" not in user else MASK  # a lone userinfo may be a password too
    return f"{m['scheme']}{userinfo}@{m['tail']}"


def url_secrets(url: str | None) -> list[str]:
    """Every secret value a URL carries (raw and percent-decoded), to scrub from other texts."""
    if not _URL.match(url or ""):
        return []
    url = url or ""
    found: list[str] = []
    query = url.partition("?")[2].partition("#")[0]
    found += [v for k, v in parse_qsl(query, keep_blank_values=False) if _SECRET_KEYS.search(k)]
    found += [v for k, v in re.findall(r"([^=&;]*)=([^&;]*)", query) if _SECRET_KEYS.search(k)]  # as written
    bare = url
    for v in found:  # the query's values out first: one may hold an '@'
        bare = bare.replace(v, "")
    m = _USERINFO.match(bare)
    if m:
        user, sep, password = m["userinfo"].partition(":")
        found.append(password if sep and "/" not in user else m["userinfo"])
    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def redact(text: str, url: str | None = None) -> str:
    """``text`` with every URL in it redacted, and the secrets of ``url`` masked wherever they appear."""
    text = re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", lambda u: redact_url(u[0]) if _URL.match(u[0]) else u[0], text)
    for secret in url_secrets(url):
        text = text.replace(secret, MASK)
    return text
