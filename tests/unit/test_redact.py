"""core.redact: every credential form redis-py accepts in a URL is hidden, and nothing else is changed."""

from __future__ import annotations

import pytest

from core.redact import redact, redact_url, url_secrets

CASES = [
    ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0", "s3cret"),
    ("redis://alice:s3cret@host/0", "redis://alice:***@host/0", "s3cret"),
    ("redis://:p@ss@host/0", "redis://:***@host/0", "p@ss"),  # '@' inside the password
    ("redis://:p:a:ss@host/0", "redis://:***@host/0", "p:a:ss"),  # ':' inside the password
    ("redis://host:1/0?password=s3cret", "redis://host:1/0?password=***", "s3cret"),
    ("redis://host/0?db=1&password=s3cret&x=y", "redis://host/0?db=1&password=***&x=y", "s3cret"),
    ("rediss://u:p%40ss@h:1/0?ssl_cert_reqs=required", "rediss://u:***@h:1/0?ssl_cert_reqs=required", "p%40ss"),
    ("redis://lonepass@h/0", "redis://***@h/0", "lonepass"),
    ("unix:///run/r.sock?password=pw1&db=0", "unix:///run/r.sock?password=***&db=0", "pw1"),
]


@pytest.mark.parametrize("url,shown,secret", CASES)
def test_every_credential_form_is_hidden(url, shown, secret):
    assert redact_url(url) == shown
    assert secret in url_secrets(url)
    assert secret not in redact_url(url)


def test_urls_without_secrets_are_unchanged():
    for url in ("redis://127.0.0.1:6379/0", "rediss://host:6380/2?ssl_cert_reqs=none", "unix:///tmp/r.sock?db=3"):
        assert redact_url(url) == url
        assert url_secrets(url) == []


def test_secrets_are_scrubbed_from_any_text_that_quotes_them():
    url = "redis://:p%40ss@host/0?password=qs-secret"
    text = f"Error 111 connecting to {url}. auth p@ss and p%40ss and qs-secret failed"
    out = redact(text, url)
    for secret in ("p@ss", "p%40ss", "qs-secret"):
        assert secret not in out
    assert "host/0" in out


@pytest.mark.parametrize("secret", ["p/ss", "ab+c/d==", "p?ss", "p#ss", "a@b/c?d"])
def test_passwords_with_url_delimiters_are_hidden(secret):
    for url in (f"redis://:{secret}@host:6379/0", f"redis://user:{secret}@host/0"):
        shown = redact_url(url)
        assert secret not in shown and shown.endswith("@host:6379/0" if ":6379" in url else "@host/0"), shown
