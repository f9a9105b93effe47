"""nginx in front of real ``dispatchd serve`` processes, for tests: the documented configuration
(``deploy/nginx/dispatchd.conf``) rendered with test ports and paths, a self-signed certificate, and the
access log read back.

nginx runs as a foreground child (``daemon off``) with its prefix, pid file, logs and temp paths all in
the test's directory, so nothing under ``/etc`` or ``/var`` is read or written. Missing nginx (or
openssl): a skip with the reason, a failure under ``DISPATCHD_REQUIRE_SERVICES=1`` (``.ci/run`` installs
Debian's package).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import _unavailable

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_CONF = ROOT / "deploy" / "nginx" / "dispatchd.conf"
#: the instances the documented configuration names (``dispatchd-serve@8000``, ``…@8001``)
DOCUMENTED_UPSTREAMS = ("127.0.0.1:8000", "127.0.0.1:8001")

#: one line of the ``dispatchd`` log_format (deploy/nginx/dispatchd.conf)
_LINE = re.compile(
    r'^(?P<time>\S+) (?P<request_id>\S+) (?P<remote>\S+) "(?P<method>\S+) (?P<uri>\S*)" (?P<status>\d+) '
    r"(?P<bytes>\d+) (?P<request_time>\S+) upstream=(?P<upstream>.*?) "
    r"upstream_status=(?P<upstream_status>.*?) upstream_time=(?P<upstream_time>.*)$"
)


def nginx_binary() -> str:
    """The nginx executable, or a skip (a failure under ``DISPATCHD_REQUIRE_SERVICES=1``) naming what to
    install."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        _unavailable("nginx is not installed (apt-get install nginx-light); the load-balancer test needs it")
    if shutil.which("openssl") is None:
        _unavailable("openssl is not installed; the load-balancer test needs it for a test certificate")
    return found


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A P-256 certificate for ``127.0.0.1`` and ``localhost``, valid one day: ``(cert, key)``."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def _replace_once(text: str, old: str, new: str) -> str:
    """Replace ``old``, which must occur exactly once: a documented configuration that no longer has the
    line the test substitutes fails here, rather than being tested with the wrong ports."""
    count = text.count(old)
    assert count == 1, f"{DEPLOY_CONF.name}: expected {old!r} once, found it {count} times"
    return text.replace(old, new)


def render_site(
    *,
    upstream_ports: tuple[int, int],
    https_port: int,
    http_port: int,
    cert: Path,
    key: Path,
    access_log: Path,
) -> str:
    """``deploy/nginx/dispatchd.conf`` with the test's ports, certificate and log path; nothing else
    changes."""
    text = DEPLOY_CONF.read_text()
    for documented, port in zip(DOCUMENTED_UPSTREAMS, upstream_ports, strict=True):
        text = _replace_once(text, f"server {documented} ", f"server 127.0.0.1:{port} ")
    text = _replace_once(text, "listen 80;", f"listen 127.0.0.1:{http_port};")
    text = _replace_once(text, "listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
    text = _replace_once(text, "/etc/letsencrypt/live/dispatch.example.com/fullchain.pem", str(cert))
    text = _replace_once(text, "/etc/letsencrypt/live/dispatch.example.com/privkey.pem", str(key))
    return _replace_once(text, "/var/log/nginx/dispatchd.access.log", str(access_log))


def main_config(directory: Path, site: Path) -> str:
    """The ``nginx.conf`` around the site: one worker, logs and temp paths in ``directory``."""
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, workers would run as "nobody" and could not write the temp paths of a 0700 test directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes 1;\n"
        f"error_log {directory / 'error.log'} notice;\n"
        "events { worker_connections 2048; }\n"
        "http {\n"
        f"{temp}\n"
        f"    include {site};\n"
        "}\n"
    )


@dataclass
class Nginx:
    """A running nginx: its process, its public URLs, the TLS context that trusts its certificate."""

    process: subprocess.Popen
    url: str  # https://127.0.0.1:<port>
    http_url: str  # http://127.0.0.1:<port> (the redirect to https)
    directory: Path
    ssl_context: ssl.SSLContext

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"

    def log_lines(self) -> list[dict[str, Any]]:
        """The access log, one dict per request (fields of the ``dispatchd`` log_format; ``upstreams`` is
        the list of instances tried, in order)."""
        lines = []
        for raw in self.access_log.read_text().splitlines():
            match = _LINE.match(raw)
            assert match, f"access log line not in the documented format: {raw!r}"
            line = match.groupdict()
            line["upstreams"] = [
                a.strip() for a in re.split(r"[,:] (?=\d)", line["upstream"]) if a.strip() not in ("", "-")
            ]
            lines.append(line)
        return lines

    async def lines_for(self, uri: str, count: int, timeout_s: float = 5) -> list[dict[str, Any]]:
        """The access log's lines for ``uri`` once there are ``count`` of them, or those there are after
        ``timeout_s``: nginx writes a request's line after sending its answer, so a client may read the
        answer first."""
        deadline = time.monotonic() + timeout_s
        while True:
            lines = [line for line in self.log_lines() if line["uri"] == uri]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # fast shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_nginx(directory: Path, upstream_ports: tuple[int, int], https_port: int, http_port: int) -> Nginx:
    """Render the documented site for ``upstream_ports``, check it with ``nginx -t``, start nginx in the
    foreground and wait (10 s at most) until it accepts TLS connections."""
    binary = nginx_binary()
    directory.mkdir(parents=True, exist_ok=True)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / kind).mkdir(exist_ok=True)
    cert, key = self_signed_certificate(directory)
    site = directory / "dispatchd.conf"
    site.write_text(
        render_site(
            upstream_ports=upstream_ports,
            https_port=https_port,
            http_port=http_port,
            cert=cert,
            key=key,
            access_log=directory / "access.log",
        )
    )
    conf = directory / "nginx.conf"
    conf.write_text(main_config(directory, site))
    command = [binary, "-e", str(directory / "error.log"), "-p", f"{directory}/", "-c", str(conf)]
    globals_ = f"daemon off; pid {directory / 'nginx.pid'};"
    checked = subprocess.run([*command, "-t", "-g", globals_], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, f"nginx -t refused the configuration:\n{checked.stderr}"
    output = (directory / "nginx.out").open("w")
    process = subprocess.Popen([*command, "-g", globals_], stdout=output, stderr=subprocess.STDOUT)
    output.close()
    context = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 10
    while True:
        assert process.poll() is None, f"nginx exited:\n{(directory / 'error.log').read_text()[-3000:]}"
        try:
            with socket.create_connection(("127.0.0.1", https_port), timeout=1) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                    break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError("nginx did not accept TLS connections within 10 s") from None
            time.sleep(0.05)
    return Nginx(
        process, f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}", directory, context
    )
