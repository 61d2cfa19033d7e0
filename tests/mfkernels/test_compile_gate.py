"""The ahead-of-time compile gate (mfkernels.aot): every Triton kernel, in every autotune config it may pick on a GPU,
compiles for sm_90 and sm_80 with no register spills and within shared memory; and the gate really reports a config
that spills. Compiles run in subprocesses without the interpreter (the kernels must be JIT functions there)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from mfkernels import aot  # noqa: E402


def _python(code, timeout=300):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_every_kernel_compiles_spill_free_for_sm90_and_sm80(tmp_path):
    out = tmp_path / "aot.json"
    proc = aot.run(["--grid", "gate", "--arch", "90", "80", "--json", str(out)], timeout=900)
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    assert proc.returncode == 0, f"compile gate failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    results = json.loads(out.read_text())
    kernels = {r["kernel"].split(":")[1] for r in results}
    assert kernels == {"_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq", "_adaln_fwd",
                       "_adaln_bwd", "_gated_fwd", "_gated_bwd"}
    assert {r["arch"] for r in results} == {90, 80}
    # DiT-XL/2's head dim, with its tangent, on both targets: the case this gate exists for
    xl = [r for r in results if r["kernel"].endswith("_attn_fwd") and r["shape"] == "D=72 tangent"]
    assert {r["arch"] for r in xl} == {90, 80} and all(r["ok"] for r in xl)


def test_the_gate_reports_a_spilling_config():
    """A deliberately oversized tile (the fp32 tangent kernel at D = 128 with 128 x 64 tiles on 4 warps) spills: the
    gate must say so, name it, and exit 1."""
    proc = _python("""
        import sys
        from mfkernels import aot

        consts = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_E=0, TANGENT=True, ACC="fp32", DOT="fp32", PRECISION="tf32",
                      TDOT="fp32", TPRECISION="tf32", BLOCK_M=128, BLOCK_N=64)
        ptrs = [(n, "fp32") for n in ("Q", "K", "V", "O", "DQ", "DK", "DV", "DO", "M", "L2")]
        case = aot.Case("mfkernels.attention:_attn_fwd", "fp32 (tf32)", "D=128 tangent", tuple(ptrs),
                        ("SCALE_HI", "SCALE_LO", "QK_SCALE_HI", "QK_SCALE_LO"), tuple(consts.items()), 4, 3,
                        "BLOCK_M=128 BLOCK_N=64 w4 s3 (oversized)")
        result = aot.compile_case(case, 90)
        print("RESULT", result.registers, result.stack, result.local, result.shared, result.ok, result.problem())
        aot.cases_for = lambda grid, arch: [case]
        sys.exit(aot.main(["--arch", "90", "--jobs", "1"]))
    """)
    print(proc.stdout, proc.stderr[-2000:])
    result = next(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    registers, stack, local = (int(x) for x in result[:3])
    assert registers == 255 and stack + local > 0, "the oversized config no longer spills: pick a bigger one"
    assert proc.returncode == 1
    assert "FAIL sm_90 mfkernels.attention:_attn_fwd [fp32 (tf32), D=128 tangent, BLOCK_M=128 BLOCK_N=64 w4 s3 " \
           "(oversized)]: spills" in proc.stdout


def test_the_gate_refuses_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "mfkernels.aot", "--arch", "90"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "without TRITON_INTERPRET=1" in proc.stderr
