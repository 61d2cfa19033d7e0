"""The native CPU adaLN dual forward (csrc/adaln_cpu.c via mfkernels._native) against the float64 references: y, dy,
mean/rstd and gradients; gradcheck of the native-backed public op; dispatch (the public op really runs it, and
``MFKERNELS_NATIVE=0``, torch.func and forward-mode AD route around it); input validation.

These tests need the library (``make native``; ``make test`` builds it on first setup). Without it they FAIL, so that
a missing build never passes silently; set ``MFKERNELS_REQUIRE_NATIVE=0`` to skip them instead (a machine without
cmake or a C compiler).
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import mfkernels
from mfkernels import _native, adaln, adaln_native

DTYPES = [torch.float64, torch.float32]
CS = [1, 7, 64, 72, 1152]
NS = [1, 3, 17]
EPS = adaln.DEFAULT_EPS
_ABS_FLOOR = 1e-12  # only matters where the reference is exactly zero (C = 1: d x and d scale vanish)


pytestmark = pytest.mark.usefixtures("native_library")  # tests/mfkernels/conftest.py


@pytest.fixture
def native_calls(monkeypatch):
    """Counts calls into the native kernel, so that tests can tell which path the public op took."""
    calls = []
    real = _native.adaln_forward_cpu

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(_native, "adaln_forward_cpu", counting)
    return calls


def _randn(*shape, dtype, requires_grad=False):
    """Fresh normals rounded to dtype, and their exact float64 copy (the reference sees the rounded values)."""
    t = torch.randn(*shape, dtype=torch.float64).to(dtype)
    return t.requires_grad_(requires_grad), t.double().requires_grad_(requires_grad)


def _inputs(B, N, C, dtype, requires_grad=False):
    """(x, shift, scale, dx, dshift, dscale) in dtype and in float64; rows of x far from zero mean."""
    x = torch.randn(B, N, C, dtype=torch.float64) + 3 * torch.randn(B, N, 1, dtype=torch.float64)
    x = x.to(dtype)
    ins = [x.requires_grad_(requires_grad), x.double().requires_grad_(requires_grad)]
    ins = [ins] + [_randn(B, C, dtype=dtype, requires_grad=requires_grad) for _ in range(2)]
    ins += [_randn(B, N, C, dtype=dtype)] + [_randn(B, C, dtype=dtype) for _ in range(2)]
    return [p[0] for p in ins], [p[1] for p in ins]


def _assert_close(name, out, ref, dtype):
    """float64: 1e-10 relative, float32: 1e-5 relative (to the reference's largest magnitude)."""
    scale = ref.abs().max().item()
    err = (out.detach().double() - ref).abs().max().item()
    bound = (1e-10 if dtype == torch.float64 else 1e-5) * scale
    assert err <= bound + _ABS_FLOOR, f"{name}: max abs error {err:.3g} > {bound:.3g} (reference max {scale:.3g})"


def _grads(out, w, inputs):
    return torch.autograd.grad((out * w).sum(), inputs)


# ----------------------------------------------------------------------------------------------------------------------
# values, tangents, statistics and gradients against float64
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("C", CS)
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_matches_float64_reference(seed, native_calls, dtype, N, C):
    B = 2
    ins, ins64 = _inputs(B, N, C, dtype, requires_grad=True)
    w, w64 = _randn(B, N, C, dtype=dtype)  # the upstream gradient: the reference sees its rounded values too

    y, dy = mfkernels.adaln_modulate_jvp(*ins)
    assert len(native_calls) == 1 and type(y.grad_fn).__name__ == "_AdaLNModulateJvpNativeBackward"
    assert y.dtype == dy.dtype == dtype and not dy.requires_grad
    grads = _grads(y, w, ins[:3])
    _, _, mean, rstd = _native.adaln_forward_cpu(*(t.detach() for t in ins), EPS)

    x64 = ins64[0].detach()
    y_ref = adaln.adaln_modulate_reference(*ins64[:3])
    _assert_close("y", y, y_ref, dtype)
    _assert_close("dy", dy, adaln.adaln_tangent_reference(*ins64), dtype)
    _assert_close("mean", mean, x64.mean(-1), dtype)
    _assert_close("rstd", rstd, torch.rsqrt(x64.var(-1, unbiased=False) + EPS), dtype)
    for name, g, g_ref in zip(("d x", "d shift", "d scale"), grads, _grads(y_ref, w64, ins64[:3])):
        assert g.dtype == dtype
        _assert_close(name, g, g_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_change_nothing(seed, dtype):
    # rows are independent, so the OpenMP split must give bit-identical results; the shape is above the threshold
    # at which the kernel goes parallel
    ins, ins64 = _inputs(4, 64, 256, dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _native.adaln_forward_cpu(*ins, EPS)
        torch.set_num_threads(max(2, threads))
        many = _native.adaln_forward_cpu(*ins, EPS)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))
    _assert_close("dy", many[1], adaln.adaln_tangent_reference(*ins64), dtype)


def test_two_dimensional_x(seed):
    # (B, C) rows, as in an MLP: the kernel treats them as N = 1
    ins, ins64 = _inputs(5, 1, 33, torch.float64)
    y, dy, mean, rstd = _native.adaln_forward_cpu(ins[0][:, 0], *ins[1:3], ins[3][:, 0], *ins[4:], EPS)
    assert y.shape == dy.shape == (5, 33) and mean.shape == rstd.shape == (5,)
    _assert_close("y", y, adaln.adaln_modulate_reference(*ins64[:3])[:, 0], torch.float64)
    _assert_close("dy", dy, adaln.adaln_tangent_reference(*ins64)[:, 0], torch.float64)


# ----------------------------------------------------------------------------------------------------------------------
# autograd through the native-backed public op
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B, N, C", [(2, 2, 3), (2, 5, 9)])
def test_native_gradcheck(seed, native_calls, B, N, C):
    (x, shift, scale, *tangents), _ = _inputs(B, N, C, torch.float64, requires_grad=True)

    def op(x, shift, scale):
        return mfkernels.adaln_modulate_jvp(x, shift, scale, *tangents)[0]

    assert torch.autograd.gradcheck(op, (x, shift, scale))
    assert native_calls, "gradcheck did not run the native kernel"
    # double backward: the Function's backward switches to the differentiable torch formulas
    assert torch.autograd.gradgradcheck(op, (x, shift, scale))


def test_non_contiguous_inputs(seed, native_calls):
    # the DiT block's shift/scale are chunks of one (B, 6C) tensor; x here is a transposed view
    B, N, C = 2, 7, 24
    x = (torch.randn(B, C, N, dtype=torch.float64) + 1).transpose(1, 2).requires_grad_()  # (B, N, C) view
    mod = torch.randn(B, 4 * C, dtype=torch.float64, requires_grad=True)
    shift, scale, dshift, dscale = mod.chunk(4, dim=1)  # (B, C) each, stride 4C
    dx = torch.randn(B, C, N, dtype=torch.float64).transpose(1, 2)
    w = torch.randn(B, N, C, dtype=torch.float64)
    y, dy = mfkernels.adaln_modulate_jvp(x, shift, scale, dx, dshift, dscale)
    assert len(native_calls) == 1
    grads = _grads(y, w, (x, mod))

    leaves = [t.detach().clone().requires_grad_() for t in (x, mod)]
    s, sc, ds, dsc = leaves[1].chunk(4, dim=1)
    y_ref = adaln.adaln_modulate_reference(leaves[0], s, sc)
    _assert_close("y", y, y_ref, torch.float64)
    _assert_close("dy", dy, adaln.adaln_tangent_reference(leaves[0], s, sc, dx, ds, dsc), torch.float64)
    for name, g, g_ref in zip(("d x", "d mod"), grads, _grads(y_ref, w, leaves)):
        _assert_close(name, g, g_ref, torch.float64)


def test_inputs_and_grad_output_are_not_written(seed):
    ins, _ = _inputs(2, 9, 33, torch.float64, requires_grad=True)
    upstream = torch.randn(2, 9, 33, dtype=torch.float64)
    before = [t.detach().clone() for t in (*ins, upstream)]
    y, _ = mfkernels.adaln_modulate_jvp(*ins)
    torch.autograd.grad(y, ins[:3], grad_outputs=upstream)
    assert all(torch.equal(a, b) for a, b in zip(before, (*ins, upstream)))


# ----------------------------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------------------------

def test_env_var_disables_native(seed, native_calls, monkeypatch):
    ins, _ = _inputs(2, 3, 16, torch.float32, requires_grad=True)
    monkeypatch.setenv("MFKERNELS_NATIVE", "0")
    assert not _native.native_available()
    y, dy = mfkernels.adaln_modulate_jvp(*ins)
    y_t, dy_t = adaln.adaln_modulate_jvp_torch(*ins)
    assert not native_calls and type(y.grad_fn).__name__ != "_AdaLNModulateJvpNativeBackward"
    assert torch.equal(y, y_t) and torch.equal(dy, dy_t)
    monkeypatch.setenv("MFKERNELS_NATIVE", "1")
    mfkernels.adaln_modulate_jvp(*ins)
    assert len(native_calls) == 1


def test_missing_library_falls_back(seed, native_calls, monkeypatch, tmp_path):
    monkeypatch.setattr(_native, "LIBRARY_PATH", tmp_path / "libmfkernels_cpu.so")
    for name, value in (("_lib", None), ("_load_error", None), ("_loaded", False)):
        monkeypatch.setattr(_native, name, value)
    assert not _native.native_available() and "does not exist" in _native.load_error()
    ins, _ = _inputs(2, 3, 16, torch.float64, requires_grad=True)
    y, dy = mfkernels.adaln_modulate_jvp(*ins)
    assert not native_calls and torch.equal(dy, adaln.adaln_modulate_jvp_torch(*ins)[1])
    with pytest.raises(RuntimeError, match="make native"):
        adaln_native.adaln_modulate_jvp_native(*ins, adaln.DEFAULT_EPS)


def test_broken_library_warns_and_falls_back(seed, native_calls, monkeypatch, tmp_path):
    broken = tmp_path / "libmfkernels_cpu.so"
    broken.write_bytes(b"not an ELF file")
    monkeypatch.setattr(_native, "LIBRARY_PATH", broken)
    for name, value in (("_lib", None), ("_load_error", None), ("_loaded", False)):
        monkeypatch.setattr(_native, name, value)
    with pytest.warns(RuntimeWarning, match="native CPU kernels disabled"):
        assert not _native.native_available()
    ins, _ = _inputs(2, 3, 16, torch.float32, requires_grad=True)
    mfkernels.adaln_modulate_jvp(*ins)
    assert not native_calls and "cannot load" in _native.load_error()


def test_transforms_route_around_native(seed, native_calls):
    # the native Function defines no jvp and C cannot read functorch wrappers: torch.func and forward-mode AD take
    # the torch composite, and the results still match the reference
    (x, shift, scale, dx, dshift, dscale), ins64 = _inputs(2, 5, 72, torch.float64)
    tx = torch.randn_like(x)

    def primal(x):
        return mfkernels.adaln_modulate_jvp(x, shift, scale, dx, dshift, dscale)[0]

    _, ty = torch.func.jvp(primal, (x,), (tx,))
    zeros = [torch.zeros_like(shift)] * 2
    _assert_close("func.jvp", ty, adaln.adaln_tangent_reference(x, shift, scale, tx, *zeros), torch.float64)
    with fwAD.dual_level():
        ty_fw = fwAD.unpack_dual(primal(fwAD.make_dual(x, tx))).tangent
    _assert_close("forward_ad", ty_fw, ty, torch.float64)
    w = torch.randn_like(x)
    gx = torch.func.grad(lambda x: (primal(x) * w).sum())(x)
    gx_ref = _grads(adaln.adaln_modulate_reference(*[t.requires_grad_() for t in ins64[:3]]), w, ins64[:1])[0]
    _assert_close("func.grad", gx, gx_ref, torch.float64)
    assert not native_calls
    primal(x)  # outside any transform
    assert len(native_calls) == 1


def test_other_dtypes_take_the_torch_path(seed, native_calls):
    ins, _ = _inputs(2, 3, 16, torch.bfloat16)
    y, dy = mfkernels.adaln_modulate_jvp(*ins)
    assert not native_calls and y.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------------

def test_bad_input_raises_value_error_naming_the_argument(seed):
    ins, _ = _inputs(2, 3, 8, torch.float32)
    x, shift, scale, dx, dshift, dscale = ins
    cases = [
        ("x", (x.half(), shift, scale, dx, dshift, dscale)),  # unsupported dtype
        ("x", (x[0, 0], shift, scale, dx, dshift, dscale)),  # 1-D
        ("x", (x.transpose(1, 2).contiguous().transpose(1, 2), shift, scale, dx, dshift, dscale)),  # strided
        ("shift", (x, shift.double(), scale, dx, dshift, dscale)),  # dtype differs from x
        ("scale", (x, shift, scale[:1], dx, dshift, dscale)),  # wrong batch size
        ("dx", (x, shift, scale, dx[:, :-1], dshift, dscale)),
        ("dshift", (x, shift, scale, dx, dshift.to("meta"), dscale)),  # not on the CPU
        ("dscale", (x, shift, scale, dx, dshift, torch.randn(2, 16)[:, ::2])),  # strided
        ("dscale", (x, shift, scale, dx, dshift, dscale.tolist())),  # not a tensor
    ]
    for name, args in cases:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            _native.adaln_forward_cpu(*args, EPS)
