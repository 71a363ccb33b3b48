"""A broker's password never reaches output, and TLS failures say so: the real CLI against a real redis-server
(password-protected, and TLS-only with a certificate of its own) started here on loopback ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from services.triton import free_port
from tests.pipeline_support import fbas_cli

ROOT = Path(__file__).resolve().parents[2]
SECRET = "p@ss:w0rd-Zq"  # holds '@' and ':', the forms a naive redaction misses

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real command; from ``cwd`` (a folder without ``out/``) status reports the broker's jobs."""
    return fbas_cli(*args, env={k: v for k, v in os.environ.items() if k.startswith("FBAS_")} | (env or {}), cwd=cwd)


def _start_redis(tmp: Path, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    return proc


@pytest.fixture
def redis_with_password(tmp_path):
    port = free_port()
    proc = _start_redis(tmp_path, "--port", str(port), "--requirepass", SECRET)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield port
    proc.kill()
    proc.wait()


def test_no_form_of_the_password_reaches_status_or_its_errors(redis_with_password, tmp_path):
    port = redis_with_password
    forms = [
        f"redis://:{SECRET}@127.0.0.1:{port}/0",  # the right password: works
        f"redis://127.0.0.1:{port}/0?password={SECRET}",  # query string: works
        f"redis://:{SECRET}x@127.0.0.1:{port}/0",  # wrong password: refused
        f"redis://:{SECRET}@127.0.0.1:{free_port()}/0",  # nobody listens: unreachable
    ]
    outputs = []
    for url in forms:
        r = _cli("status", env={"FBAS_BROKER": url}, cwd=tmp_path)
        outputs.append((url, r.returncode, r.stdout + r.stderr))
        j = _cli("status", "--json", "--broker", url, cwd=tmp_path)
        outputs.append((url, j.returncode, j.stdout + j.stderr))
    for url, _, text in outputs:
        assert SECRET not in text and SECRET.replace("@", "%40") not in text, f"{url}: {text}"
    assert outputs[0][1] == 0 and "queue:" in outputs[0][2]
    assert outputs[2][1] == 0 and "queue:" in outputs[2][2]
    assert outputs[4][1] == 2 and "refused the credentials" in outputs[4][2]
    assert outputs[6][1] == 2 and "not reachable" in outputs[6][2]


@pytest.fixture
def tls_redis(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for the TLS server")
    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = _start_redis(
        tmp_path,
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-auth-clients",
        "no",
    )
    if proc.poll() is not None:
        pytest.skip("this redis-server was built without TLS")
    yield port, cert
    proc.kill()
    proc.wait()


def test_a_tls_failure_is_named_and_the_right_ca_works(tls_redis):
    port, cert = tls_redis
    untrusted = _cli("status", "--broker", f"rediss://127.0.0.1:{port}/0", cwd=cert.parent)
    assert untrusted.returncode == 2
    assert "TLS with Redis at rediss://127.0.0.1" in untrusted.stderr and "certificate" in untrusted.stderr
    plain = _cli("status", "--broker", f"redis://127.0.0.1:{port}/0", cwd=cert.parent)  # TLS port, plain client
    assert plain.returncode == 2 and "not reachable" in plain.stderr
    trusted = _cli("status", "--broker", f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}", cwd=cert.parent)
    assert trusted.returncode == 0, trusted.stderr
    assert "queue: 0 batches waiting" in trusted.stdout
