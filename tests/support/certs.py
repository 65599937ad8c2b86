"""Throwaway PKI for TLS tests, made with the `openssl` command line tool (no Python
dependency): a CA, a server certificate for localhost / 127.0.0.1, a client certificate
and a service certificate good for both ends (service-to-service mTLS), all signed by
that CA (EC P-256, valid for two days)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Certs:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    service_cert: str = ""  # server and client at once: pdserve services among themselves
    service_key: str = ""

    def read(self, name: str) -> bytes:
        return Path(getattr(self, name)).read_bytes()


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


def _issue(d: Path, name: str, cn: str, extensions: str) -> None:
    (d / f"{name}.ext").write_text(extensions)
    _openssl("req", *CURVE, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-set_serial", str(abs(hash((name, str(d)))) % 2**63), "-days", "2",
             "-out", f"{name}.crt", "-extfile", f"{name}.ext", cwd=d)


def make_certs(directory: str | Path) -> Certs:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", *CURVE, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=pdserve test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _issue(d, "server", "localhost", "basicConstraints=CA:FALSE\n"
           "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _issue(d, "client", "pdserve-test-client", "basicConstraints=CA:FALSE\n"
           "extendedKeyUsage=clientAuth\n")
    _issue(d, "service", "pdserve-service", "basicConstraints=CA:FALSE\n"
           "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    return Certs(*(str(d / f) for f in ("ca.crt", "server.crt", "server.key", "client.crt",
                                         "client.key", "service.crt", "service.key")))
