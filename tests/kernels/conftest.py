"""Fixtures that force the Triton kernels or the references (``tests/conftest.py`` turns the
Triton interpreter on for the whole session)."""
import pytest


@pytest.fixture
def force_triton(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("SEQSHARD_KERNELS", "triton")


@pytest.fixture
def force_reference(monkeypatch):
    monkeypatch.setenv("SEQSHARD_KERNELS", "reference")
