"""Ahead-of-time compile of every Triton kernel for GPU targets, with no GPU: registers, spills and shared memory.

    python -m mfkernels.aot [--grid gate|full] [--arch 90 80] [--jobs N] [--table FILE] [--json FILE]

Triton compiles for a GPU target without a driver (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc,
32))``); the cubin's resource usage comes from the ``cuobjdump`` that Triton's wheel carries. A kernel *passes* when it
compiles, keeps everything in registers (no stack frame, no local memory: spills are slow loads and stores on every
use) and fits the target's shared memory per block. Every config a kernel's autotune may pick on a GPU is compiled, for
the dtypes the kernel accepts there and the shapes that matter (head dims 32, 64, 72, 128; the adaLN rows of DiT-B,
L, XL and wider ones). Exit status: 0 when every case passes, 1 when one fails (each failure named), 2 on bad
arguments.

The kernels must be JIT functions here, not the interpreter's: run this in a process without ``TRITON_INTERPRET=1``
(:func:`run` spawns such processes; tests call it from an interpreting process).

Grids: ``full`` is every (kernel, dtype, shape, config) for every target; ``gate`` (the one ``make test`` runs) is the
full grid on sm_90 and, on sm_80, the same kernels at the DiT-XL/2 shapes (head dim 72, 1152 channels), which are the
largest tiles each kernel takes at the shapes that matter.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes of shared memory one block may use (H100/H200, A100)
ARCH_NAMES = {90: "sm_90 (H100/H200)", 80: "sm_80 (A100)"}
HEAD_DIMS = (32, 64, 72, 128)
CHANNELS = (768, 1024, 1152, 4096, 8192)
TOKENS = 256  # rows per sample for the adaLN tiles: DiT's 256 tokens (the row tile stops growing well before)

_SCALES = ("SCALE_HI", "SCALE_LO", "QK_SCALE_HI", "QK_SCALE_LO")  # the attention kernels' fp32 scalar arguments
_TL_DTYPES = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One compile: a kernel at one dtype, shape and autotune config."""

    kernel: str  # "module:function"
    dtype: str  # e.g. "bf16", "fp32 (tf32)", "bf16 + fp32 tangent"
    shape: str  # e.g. "D=72 tangent", "C=1152 jvp"
    pointers: tuple  # ((arg name, triton type), ...): every other non-constexpr arg is i32, or fp32 when named here
    floats: tuple  # scalar args that are fp32
    constexprs: tuple  # ((name, value), ...): tl dtypes as their names ("fp32"), resolved in the worker
    num_warps: int
    num_stages: int
    block: str  # the config, as a short string for the table

    def key(self):
        return (self.kernel, self.dtype, self.shape, self.block)


@dataclasses.dataclass
class Result:
    case: Case
    arch: int
    registers: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0  # static + dynamic bytes
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self):
        return not self.error and self.stack == 0 and self.local == 0 and self.shared <= SHARED_LIMIT[self.arch]

    def problem(self):
        if self.error:
            return f"compile error: {self.error}"
        out = []
        if self.stack or self.local:
            out.append(f"spills (stack {self.stack} B, local {self.local} B per thread)")
        if self.shared > SHARED_LIMIT[self.arch]:
            out.append(f"shared memory {self.shared} B > {SHARED_LIMIT[self.arch]} B")
        return ", ".join(out)


# ----------------------------------------------------------------------------------------------------------------------
# the grid: which cases exist (imports the kernel modules, so it runs in the non-interpreting worker)
# ----------------------------------------------------------------------------------------------------------------------

def _config_parts(config):
    kw = dict(config.kwargs)
    block = " ".join(f"{k}={v}" for k, v in kw.items())
    return kw, config.num_warps, config.num_stages, f"{block} w{config.num_warps} s{config.num_stages}".strip()


def _attention_cases(head_dims):
    import importlib

    # importlib: the package re-exports functions under the modules' names
    fwd = importlib.import_module("mfkernels.attention")
    bwd = importlib.import_module("mfkernels.attention_backward")
    # (label, primal type, tangent type, PRECISION, TPRECISION): what the launchers pass on a GPU
    variants = [
        ("bf16", "bf16", "bf16", "tf32", "tf32"),
        ("fp16", "fp16", "fp16", "tf32", "tf32"),
        ("bf16 + fp32 tangent", "bf16", "fp32", "tf32", "tf32"),
        ("fp16 + fp32 tangent", "fp16", "fp32", "tf32", "tf32"),
        ("fp32 (tf32)", "fp32", "fp32", "tf32", "tf32"),
    ]
    cases = []
    for D in head_dims:
        block_d, block_e = fwd.head_dim_tiles(D)
        for label, pt, tt, prec, tprec in variants:
            for tangent in (False, True):
                if not tangent and pt != tt:
                    continue  # the primal-only kernel has no tangent type
                for config in fwd.fwd_configs(tangent, block_d + block_e):
                    kw, w, s, block = _config_parts(config)
                    ptrs = [(n, pt) for n in ("Q", "K", "V", "O")] + [(n, tt) for n in ("DQ", "DK", "DV", "DO")]
                    ptrs += [("M", "fp32"), ("L2", "fp32")]
                    consts = dict(HEAD_DIM=D, BLOCK_D=block_d, BLOCK_E=block_e, TANGENT=tangent, ACC="fp32", DOT=pt,
                                  PRECISION=prec, TDOT=tt, TPRECISION=tprec, **kw)
                    shape = f"D={D} {'tangent' if tangent else 'primal'}"
                    cases.append(Case("mfkernels.attention:_attn_fwd", label, shape, tuple(ptrs), _SCALES,
                                      tuple(consts.items()), w, s, block))
        block = max(16, 1 << (D - 1).bit_length())
        for label, pt, tt, prec, _ in variants:
            if pt != tt:
                continue  # the backward sees the primal only
            for name, table, outs in (("_attn_bwd_dkdv", bwd.DKDV_CONFIGS, ("DK", "DV")),
                                      ("_attn_bwd_dq", bwd.DQ_CONFIGS, ("DQ",))):
                for config in bwd.bwd_configs(table, block):
                    kw, w, s, block_s = _config_parts(config)
                    ptrs = [(n, pt) for n in ("Q", "K", "V", "GO", *outs)] + [(n, "fp32") for n in ("M", "L2", "DELTA")]
                    consts = dict(HEAD_DIM=D, BLOCK_D=block, ACC="fp32", DOT=pt, PRECISION=prec, **kw)
                    cases.append(Case(f"mfkernels.attention_backward:{name}", label, f"D={D}", tuple(ptrs),
                                      _SCALES, tuple(consts.items()), w, s, block_s))
            ptrs = ((("O", pt), ("GO", pt), ("DELTA", "fp32")))
            consts = dict(HEAD_DIM=D, BLOCK_D=block, ACC="fp32", BLOCK_M=bwd.PREPROCESS_BLOCK_M)
            # launched with triton's defaults: 4 warps, 3 stages
            cases.append(Case("mfkernels.attention_backward:_attn_bwd_preprocess", label, f"D={D}", ptrs, (),
                              tuple(consts.items()), 4, 3, f"BLOCK_M={bwd.PREPROCESS_BLOCK_M} w4 s3"))
    return cases


def _row_cases(channels):
    from mfkernels import _launch, gated

    cases = []
    # (label, primal type, tangent type); fp64 is interpreter-only (mfkernels._launch.fp64_on_gpu)
    dtypes = [("bf16", "bf16", "bf16"), ("fp16", "fp16", "fp16"), ("fp32", "fp32", "fp32"),
              ("bf16 + fp32 tangent", "bf16", "fp32"), ("fp16 + fp32 tangent", "fp16", "fp32")]
    for C in channels:
        adaln_takes = C <= _launch.MAX_BLOCK_C  # wider rows take the torch path
        block_c = _launch.next_power_of_2(C)
        block_n = _launch.row_tile(TOKENS, block_c)
        warps = _launch.warps_for_tile(block_n, block_c)
        gate_n, gate_c = gated._tiles(TOKENS, C)
        gate_warps = _launch.warps_for_tile(gate_n, gate_c)
        for label, pt, tt in dtypes:
            acc = "fp32"
            mixed = pt != tt
            # adaLN forward in the forms the launchers use: y (+ stats for a backward, or none), y and dy (+ stats,
            # or none), dy only
            forms = (("forward", True, False, True), ("jvp", True, True, True),
                     ("forward, no stats", True, False, False), ("jvp, no stats", True, True, False),
                     ("tangent", False, True, False))
            for form, write_y, tangent, stats in forms:
                if (mixed and not tangent) or not adaln_takes:
                    continue
                ptrs = [(n, pt) for n in ("X", "SHIFT", "SCALE", "Y")] + [(n, tt) for n in ("DX", "DSHIFT", "DSCALE",
                                                                                          "DY")]
                ptrs += [("MEAN", acc), ("RSTD", acc)]
                consts = dict(WRITE_Y=write_y, HAS_TANGENT=tangent, SAVE_STATS=stats, ACC=acc, BLOCK_N=block_n,
                              BLOCK_C=block_c)
                for w in warps:
                    cases.append(Case("mfkernels.adaln:_adaln_fwd", label, f"C={C} {form}", tuple(ptrs), ("eps",),
                                      tuple(consts.items()), w, 3, f"BLOCK_N={block_n} BLOCK_C={block_c} w{w}"))
            for form, write, tangent in (("forward", True, False), ("jvp", True, True), ("tangent", False, True)):
                if mixed and not tangent:
                    continue
                ptrs = [(n, pt) for n in ("X", "GATE", "Y", "OUT")] + [(n, tt) for n in ("DX", "DGATE", "DY", "DOUT")]
                consts = dict(WRITE_OUT=write, HAS_TANGENT=tangent, ACC=acc, BLOCK_N=gate_n, BLOCK_C=gate_c)
                for w in gate_warps:
                    cases.append(Case("mfkernels.gated:_gated_fwd", label, f"C={C} {form}", tuple(ptrs), (),
                                      tuple(consts.items()), w, 3, f"BLOCK_N={gate_n} BLOCK_C={gate_c} w{w}"))
            if mixed:
                continue  # the backward kernels see the primal only
            ptrs = [(n, pt) for n in ("X", "SCALE", "G", "GX")] + [(n, acc) for n in ("MEAN", "RSTD", "PSHIFT",
                                                                                    "PSCALE")]
            for w in warps if adaln_takes else ():
                cases.append(Case("mfkernels.adaln:_adaln_bwd", label, f"C={C}", tuple(ptrs), (),
                                  (("ACC", acc), ("BLOCK_N", block_n), ("BLOCK_C", block_c)), w, 3,
                                  f"BLOCK_N={block_n} BLOCK_C={block_c} w{w}"))
            ptrs = [(n, pt) for n in ("G", "GATE", "Y", "GY")] + [("PGATE", acc)]
            for w in gate_warps:
                cases.append(Case("mfkernels.gated:_gated_bwd", label, f"C={C}", tuple(ptrs), (),
                                  (("ACC", acc), ("BLOCK_N", gate_n), ("BLOCK_C", gate_c)), w, 3,
                                  f"BLOCK_N={gate_n} BLOCK_C={gate_c} w{w}"))
    return cases


def cases_for(grid, arch):
    if grid == "full" or arch == 90:
        return _attention_cases(HEAD_DIMS) + _row_cases(CHANNELS)
    return _attention_cases((72,)) + _row_cases((1152,))


# ----------------------------------------------------------------------------------------------------------------------
# compiling one case (in a worker process)
# ----------------------------------------------------------------------------------------------------------------------

def _jit_function(kernel):
    import importlib

    module, name = kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    return fn.fn if hasattr(fn, "configs") else fn  # an autotuned kernel wraps the JIT function


def _cuobjdump():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resources(cubin):
    """{"REG": n, "STACK": n, "SHARED": n, "LOCAL": n} of the one kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    line = next(x for x in out.splitlines() if "REG:" in x)
    return {k: int(v) for k, v in (field.split(":") for field in line.split() if field.split(":")[0] in
                                    ("REG", "STACK", "SHARED", "LOCAL"))}


def compile_case(case, arch):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(case.kernel)  # an import error here is a broken package: let it fail loudly
    types = dict(case.pointers)
    consts = {k: getattr(tl, _TL_DTYPES[v]) if k in ("ACC", "DOT", "TDOT") else v for k, v in case.constexprs}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = "*" + types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned; launches specialise so
        else:
            signature[name] = "fp32" if name in case.floats else "i32"
    result = Result(case, arch)
    start = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        res = _resources(kernel.asm["cubin"])
    except Exception as e:  # a compile error is a result to report, not a crash of the whole check
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    else:
        result.registers, result.stack, result.local = res["REG"], res["STACK"], res["LOCAL"]
        result.shared = res["SHARED"] + kernel.metadata.shared
    result.seconds = time.perf_counter() - start
    return result


def _compile_many(items):
    return [compile_case(case, arch) for case, arch in items]


# ----------------------------------------------------------------------------------------------------------------------
# running the grid, reporting
# ----------------------------------------------------------------------------------------------------------------------

def check(grid="gate", archs=(90, 80), jobs=None, cases=None, progress=True):
    """Compile the grid (or the given cases) for each arch; returns the list of Results."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("mfkernels.aot compiles JIT kernels: run it without TRITON_INTERPRET=1 (see run())")
    items = [(c, a) for a in archs for c in (cases if cases is not None else cases_for(grid, a))]
    jobs = jobs or max(1, min(len(items), os.cpu_count() or 1))
    # interleave so each worker gets a mix of slow (tangent attention) and fast compiles
    chunks = [items[i::jobs * 4] for i in range(jobs * 4)]
    results, start = [], time.perf_counter()
    with ProcessPoolExecutor(jobs) as pool:
        for part in pool.map(_compile_many, chunks):
            results.extend(part)
            if progress:
                print(f"\r[aot] {len(results)}/{len(items)} compiled, {time.perf_counter() - start:.0f} s", end="",
                      file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    order = {id(c): i for i, (c, _) in enumerate(items)}
    return sorted(results, key=lambda r: (r.arch != 90, r.arch, order.get(id(r.case), 0)))


def table(results, arch):
    """The resource table of one arch as markdown."""
    import triton

    rows = [r for r in results if r.arch == arch]
    lines = [f"# Triton kernels compiled for {ARCH_NAMES[arch]}", "",
             f"Written by `make compile-check` (`python -m mfkernels.aot --grid full`, triton {triton.__version__}, no "
             f"GPU: ahead-of-time compile, resources from cuobjdump): every kernel in every autotune config it may "
             f"pick on a GPU. Shared memory limit {SHARED_LIMIT[arch] // 1024} KB per block. "
             f"{sum(r.ok for r in rows)} of {len(rows)} cases pass (no spills, shared memory within the limit).", "",
             "| kernel | dtype | shape | config | registers | stack (B) | local (B) | shared (B) | status |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        status = "ok" if r.ok else r.problem()
        lines.append(f"| {r.case.kernel.split(':')[1]} | {r.case.dtype} | {r.case.shape} | {r.case.block} | "
                     f"{r.registers} | {r.stack} | {r.local} | {r.shared} | {status} |")
    return "\n".join(lines) + "\n"


def _as_json(r):
    return {"kernel": r.case.kernel, "dtype": r.case.dtype, "shape": r.case.shape, "config": r.case.block,
            "arch": r.arch, "registers": r.registers, "stack": r.stack, "local": r.local, "shared": r.shared,
            "seconds": round(r.seconds, 2), "error": r.error, "ok": r.ok}


def run(args, timeout=None):
    """Run this module in a fresh process without the interpreter; returns the CompletedProcess (text output)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    return subprocess.run([sys.executable, "-m", "mfkernels.aot", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mfkernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=("gate", "full"), default="gate")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: the CPU count)")
    parser.add_argument("--table", help="write the sm_90 resource table (markdown) to this file")
    parser.add_argument("--json", help="write every result as JSON to this file")
    parser.add_argument("--only", help="compile only the kernels whose name contains this string")
    args = parser.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        parser.error("triton is not installed")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("compiles JIT kernels: run it without TRITON_INTERPRET=1")
    cases = None
    if args.only:
        cases = [c for c in cases_for(args.grid, 90) if args.only in c.kernel]
    start = time.perf_counter()
    results = check(args.grid, tuple(args.arch), args.jobs, cases)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAIL sm_{r.arch} {r.case.kernel} [{r.case.dtype}, {r.case.shape}, {r.case.block}]: {r.problem()}")
    if args.table and 90 in args.arch:
        with open(args.table, "w") as f:
            f.write(table(results, 90))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([_as_json(r) for r in results], f, indent=1)
    worst = max(results, key=lambda r: r.registers)
    print(f"[aot] triton {triton.__version__}: {len(results) - len(failed)}/{len(results)} cases pass on "
          f"{', '.join(f'sm_{a}' for a in args.arch)} ({args.grid} grid) in {time.perf_counter() - start:.0f} s; "
          f"most registers: {worst.registers} ({worst.case.kernel.split(':')[1]}, {worst.case.dtype}, "
          f"{worst.case.shape}, {worst.case.block})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
