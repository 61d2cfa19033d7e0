"""Fixtures of the native CPU kernel tests (test_adaln_native.py, test_gelu_native.py)."""

import os

import pytest

from mfkernels import _native


@pytest.fixture
def native_library(monkeypatch):
    """The library, enabled (whatever MFKERNELS_NATIVE says outside); fails, or skips on request, without it.

    Without the library these tests FAIL, so that a missing build never passes silently; MFKERNELS_REQUIRE_NATIVE=0
    skips them instead (a machine without cmake or a C compiler)."""
    monkeypatch.delenv("MFKERNELS_NATIVE", raising=False)
    if not _native.native_available():
        msg = (f"the native CPU library is not available ({_native.load_error()}): build it with `make native`, "
               "or set MFKERNELS_REQUIRE_NATIVE=0 to skip these tests")
        if os.environ.get("MFKERNELS_REQUIRE_NATIVE", "1") == "0":
            pytest.skip(msg)
        pytest.fail(msg)
