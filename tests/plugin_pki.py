"""Pytest fixtures for certificates (tests/pki.py), each made once per session."""

from __future__ import annotations

import pytest

from tests.pki import Pki, TlsFiles, make_pki, make_tls_files

# Every device account a test logs in with on the shipped brokers: gen-certs.sh's defaults (which
# compose.yaml expects), test_gateway's and test_ota_gateway's devices, test_mosquitto_configs' two.
DEVICE_ACCOUNTS = ["pi-0001", "pi-0002", "pi-0003", "dev-1", "dev-2", "dev-a", "dev-b"]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """What scripts/gen-certs.sh writes (CA, broker and gateway certificates, passwords) for the tests
    of the shipped brokers and compose; read-only for the tests that share it."""
    return make_pki(tmp_path_factory.mktemp("pki") / "pki", DEVICE_ACCOUNTS)


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway CA, its broker certificate for 127.0.0.1 and an unrelated CA (read-only)."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))
