"""meanflow.host_malloc: glibc serves mid-sized blocks from its heap once told to, and a user's malloc setting wins.

Each case runs in a fresh interpreter: malloc's settings are per process and cannot be undone, and the check reads
glibc's own count of mmap-served blocks (mallinfo2().hblks) around one 1 MiB malloc.
"""

import ctypes
import os
import subprocess
import sys

import pytest

from meanflow.host_malloc import _glibc

PROBE = r"""
import ctypes, sys
from meanflow.host_malloc import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    print(keep_freed_memory())
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
print("mmapped" if libc.mallinfo2().hblks > before else "heap")
libc.free(block)
"""


def _has_mallinfo2() -> bool:
    libc = _glibc()
    return libc is not None and hasattr(libc, "mallinfo2")  # glibc >= 2.33


pytestmark = pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")


def _probe(mode, **env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(env_extra)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_glibc_defaults_mmap_a_1_mib_block():
    assert _probe("default") == ["mmapped"]  # the premise: untouched, glibc maps a fresh 1 MiB block


def test_kept_freed_memory_serves_1_mib_from_the_heap():
    said, where = _probe("keep")
    assert said.startswith("glibc keeps freed memory")
    assert where == "heap"


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}])
def test_a_malloc_setting_in_the_environment_is_left_alone(env):
    said, where = _probe("keep", **env)
    assert said == "as the environment sets it"
    assert where == "mmapped"


def test_glibc_is_found_through_ctypes():
    libc = _glibc()
    assert isinstance(libc, ctypes.CDLL)
    assert libc.gnu_get_libc_version  # the glibc check itself
