"""scripts/services/haproxy.sh writes a configuration that haproxy itself accepts, with what the replicas need."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.scale.cluster import HAPROXY_SCRIPT


def _config(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HAPROXY_SCRIPT), "config", str(directory), *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_config_streams_checks_readyz_and_retries_only_connections(tmp_path: Path) -> None:
    # `config` ends with `haproxy -c`: a configuration haproxy refuses fails here.
    done = _config(tmp_path, "--backend", "127.0.0.1:18001", "--backend", "localhost:8000", "--port", "18000")
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "haproxy.cfg").read_text()
    lines = {line.strip() for line in text.splitlines()}
    assert not any("http-buffer-request" in line for line in lines if not line.startswith("#"))  # bodies stream
    assert {"timeout client 15m", "timeout server 15m"} <= lines
    assert {"option httpchk GET /readyz", "http-check expect status 200"} <= lines
    assert {"retries 3", "retry-on conn-failure", "option redispatch 1", "balance roundrobin"} <= lines
    assert "server replica1 127.0.0.1:18001 check inter 1s fall 2 rise 2" in lines
    assert "server replica2 localhost:8000 check inter 1s fall 2 rise 2" in lines
    assert "bind 127.0.0.1:18000" in lines


def test_resolver_and_bad_arguments(tmp_path: Path) -> None:
    done = _config(tmp_path, "--backend", "ckpt-1:8000", "--bind", "0.0.0.0", "--resolver", "127.0.0.11:53")
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "haproxy.cfg").read_text()
    assert "nameserver dns1 127.0.0.11:53" in text and "resolvers dns init-addr last,libc,none" in text
    for args in ([], ["--backend", "no-port"], ["--backend", "a:1", "--port", "x"], ["--backend", "a:1", "--nope"]):
        refused = _config(tmp_path / "refused", *args)
        assert refused.returncode == 64, (args, refused.stderr)
    # Without a resolver a name must resolve at start; haproxy's own check says which one does not.
    unresolved = _config(tmp_path / "unresolved", "--backend", "no-such-host.invalid:8000")
    assert unresolved.returncode != 0 and "no-such-host.invalid" in unresolved.stderr
