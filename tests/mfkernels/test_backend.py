"""The backend switch's per-call cost: no import probe where the answer cannot depend on triton, and one per process."""

import builtins
import sys

import torch

from mfkernels import _backend


def test_triton_is_probed_once_per_process(monkeypatch):
    attempts = []
    real_import = builtins.__import__

    def counting_import(name, *args, **kwargs):
        if name == "triton":
            attempts.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setitem(sys.modules, "triton", None)  # importing it now raises ImportError, as where it is absent
    monkeypatch.setattr(builtins, "__import__", counting_import)
    _backend.triton_available.cache_clear()
    try:
        assert [_backend.triton_available() for _ in range(3)] == [False] * 3
        assert len(attempts) == 1
    finally:
        _backend.triton_available.cache_clear()  # the next caller probes the real triton again


def test_cpu_tensors_without_the_interpreter_never_probe_triton(monkeypatch):
    def probe():
        raise AssertionError("use_triton probed triton for CPU tensors outside the interpreter")

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "triton_available", probe)
    monkeypatch.setattr(_backend, "_backend", "auto")
    assert _backend.use_triton(torch.randn(3), torch.randn(2, 2)) is False
