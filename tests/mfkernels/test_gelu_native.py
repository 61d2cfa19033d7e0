"""The native CPU tanh-GELU (csrc/gelu_cpu.c via mfkernels._native) against float64: values, derivative, autograd;
bf16 rounded once from it; dispatch (fp32 and bf16 CPU only; ``MFKERNELS_NATIVE=0``, torch.func, forward-mode AD
and double backward route around it); a whole model's du/dt no further from the float64 oracle than torch's own fp32
GELU; input validation.
Without the library these tests fail (tests/mfkernels/conftest.py)."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import mfkernels
from mfkernels import _native
from mfkernels.gelu import _GeluTanhNative

pytestmark = pytest.mark.usefixtures("native_library")

K0, K1 = (2 / torch.pi) ** 0.5, 0.044715
RTOL = 1e-6  # ~8 fp32 ulps of each result (or of its derivative's two terms), times _conditioning: measured 3.1e-7
TINY = 1e-33  # results this small may be 0: exp(-2 |u|) under fp32's normal range is (csrc/gelu_cpu.c)


@pytest.fixture
def native_calls(monkeypatch):
    """Counts calls into the native kernels, so that tests can tell which path an op took."""
    calls = []
    for name in ("gelu_tanh_forward_cpu", "gelu_tanh_backward_cpu"):
        real = getattr(_native, name)
        monkeypatch.setattr(_native, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


def _x(*shape):
    """fp32 inputs over GELU's whole range (|x| up to ~20: large negatives are where 1 + tanh cancels), and their
    exact float64 copy."""
    x = (torch.randn(*shape, dtype=torch.float64) * 5).float()
    return x, x.double()


def _one_plus_minus_tanh(x):
    """(1 + tanh u, 1 - tanh u) in float64 without cancellation: 2 / (1 + t) and 2 t / (1 + t), t = exp(-2 |u|).
    (torch's float64 GELU rounds 1 + tanh u to 0 below x ~ -7, where the fp32 kernel still has digits.)"""
    u = K0 * (x + K1 * x**3)
    t = torch.exp(-2 * u.abs())
    big, small = 2 / (1 + t), 2 * t / (1 + t)
    return torch.where(u >= 0, big, small), torch.where(u >= 0, small, big)


def _conditioning(x):
    """1 + |u|: below x ~ -3 the results are ~exp(2 u), whose relative error is 2 |u| times u's own, and u = k0 (x +
    k1 x^3) rounds in fp32 (torch's fp32 GELU is 0 there)."""
    return 1 + (K0 * (x + K1 * x**3)).abs()


def _reference(x):
    """gelu_tanh(x) in float64."""
    return 0.5 * x * _one_plus_minus_tanh(x)[0]


def _derivative_terms(x):
    """The two terms of gelu_tanh'(x) = (1 + tanh u) / 2 + x (1 - tanh^2 u) u' / 2, in float64."""
    plus, minus = _one_plus_minus_tanh(x)
    return 0.5 * plus, 0.5 * x * plus * minus * K0 * (1 + 3 * K1 * x**2)


def test_the_reference_is_gelu_tanh():
    x = torch.linspace(-3, 12, 1001, dtype=torch.float64)  # where torch's float64 GELU cancels little (y > 3e-3)
    assert torch.allclose(_reference(x), F.gelu(x, approximate="tanh"), rtol=1e-12, atol=0)
    a, b = _derivative_terms(x)
    assert torch.allclose(a + b, torch.ops.aten.gelu_backward(torch.ones_like(x), x, approximate="tanh"),
                          rtol=1e-10, atol=0)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 512), (40000,)])  # the last splits across threads
def test_values_and_derivative_match_float64(seed, native_calls, shape):
    x, x64 = _x(*shape)
    g, g64 = _x(*shape)
    y = mfkernels.gelu_tanh(x)
    ref = _reference(x64)
    c = _conditioning(x64)
    assert (y.double() - ref).abs().le(RTOL * c * ref.abs() + TINY).all()
    dx = mfkernels.gelu_tanh_backward(g, x)
    a, b = _derivative_terms(x64)
    assert (dx.double() - g64 * (a + b)).abs().le(RTOL * c * g64.abs() * (a.abs() + b.abs()) + TINY).all()
    assert native_calls == ["gelu_tanh_forward_cpu", "gelu_tanh_backward_cpu"]


def _half_bf16_ulp(v):
    """Half a bf16 unit in the last place at |v| (8 significant bits: v in [2^k, 2^(k+1)) has ulp 2^(k-7)), taken
    just above |v| so that a result rounded up across a power of two is covered."""
    _, e = torch.frexp((v.abs() * (1 + 1e-5)).double())
    return torch.ldexp(torch.ones_like(v, dtype=torch.float64), e - 9)


@pytest.mark.parametrize("shape", [(7,), (3, 5, 512), (40000,)])
def test_bf16_is_the_float64_result_rounded_once(seed, native_calls, shape):
    """bf16 in and out: the fp32 computation of the bf16 input (within the fp32 bound), rounded to the nearest bf16."""
    x = _x(*shape)[0].bfloat16()
    g = _x(*shape)[0].bfloat16()
    x64, g64 = x.double(), g.double()
    y = mfkernels.gelu_tanh(x)
    ref = _reference(x64)
    c = _conditioning(x64)
    assert y.dtype == torch.bfloat16
    assert (y.double() - ref).abs().le(RTOL * c * ref.abs() + _half_bf16_ulp(ref) + TINY).all()
    dx = mfkernels.gelu_tanh_backward(g, x)
    a, b = _derivative_terms(x64)
    exact = g64 * (a + b)
    bound = RTOL * c * g64.abs() * (a.abs() + b.abs()) + _half_bf16_ulp(exact) + TINY
    assert dx.dtype == torch.bfloat16 and (dx.double() - exact).abs().le(bound).all()
    assert native_calls == ["gelu_tanh_forward_cpu", "gelu_tanh_backward_cpu"]


def test_bf16_agrees_with_torch_bf16_to_one_ulp(seed):
    """torch's bf16 GELU also computes in fp32 and rounds once: the two differ only where their fp32 values straddle a
    rounding midpoint, by one bf16 ulp. (Below x ~ -3 torch's fp32 formula loses the tiny result's digits, see
    test_at_least_as_accurate_as_torch_fp32: not compared there.)"""
    x = torch.randn(200000).mul(4).clamp(min=-3).bfloat16()
    ours, torchs = mfkernels.gelu_tanh(x).double(), F.gelu(x, approximate="tanh").double()
    assert (ours - torchs).abs().le(2 * _half_bf16_ulp(torchs) + TINY).all()
    assert (ours != torchs).float().mean() < 0.01


def test_bf16_nan_and_infinity(seed):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0e38], dtype=torch.bfloat16)
    y = mfkernels.gelu_tanh(x)
    assert y[0].isnan() and y[1] == float("inf") and y[2].isnan() and y[3] == x[3]  # -inf: inf * 0, as torch


def test_at_least_as_accurate_as_torch_fp32(seed):
    """Where 1 + tanh u rounds to 0 in fp32 (x below ~-5), torch's fp32 GELU returns 0 or loses its digits; the
    kernel keeps the tiny values to the bound's precision."""
    x = torch.linspace(-12, 12, 4001)
    ref = _reference(x.double())

    def worst(y):  # the largest error in units of the bound
        return ((y.double() - ref).abs() / (RTOL * _conditioning(x.double()) * ref.abs() + TINY)).max()

    assert worst(mfkernels.gelu_tanh(x)) <= 1 < worst(F.gelu(x, approximate="tanh"))


def test_autograd_gradient(seed, native_calls):
    x, x64 = _x(4, 9, 64)
    w = torch.randn(4, 9, 64, dtype=torch.float64)
    x.requires_grad_()
    (mfkernels.gelu_tanh(x) * w.float()).sum().backward()
    a, b = _derivative_terms(x64)
    ref = w.float().double() * (a + b)
    bound = RTOL * _conditioning(x64) * w.abs() * (a.abs() + b.abs()) + TINY
    assert (x.grad.double() - ref).abs().le(bound).all()
    assert native_calls == ["gelu_tanh_forward_cpu", "gelu_tanh_backward_cpu"]


def test_threads_change_nothing(seed):
    x, _ = _x(70000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mfkernels.gelu_tanh(x), mfkernels.gelu_tanh_backward(x, x)
        torch.set_num_threads(2)
        two = mfkernels.gelu_tanh(x), mfkernels.gelu_tanh_backward(x, x)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(p, q) for p, q in zip(one, two))


def test_strided_input_is_copied_not_refused(seed, native_calls):
    x, x64 = _x(64, 48)
    y = mfkernels.gelu_tanh(x.t())
    ref = _reference(x64.t())
    assert (y.double() - ref).abs().le(RTOL * _conditioning(x64.t()) * ref.abs() + TINY).all()
    assert native_calls == ["gelu_tanh_forward_cpu"]


# ----------------------------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_dtypes_take_the_torch_path(seed, native_calls, dtype):
    x = torch.randn(3, 8, dtype=dtype)
    assert torch.equal(mfkernels.gelu_tanh(x), F.gelu(x, approximate="tanh"))
    assert torch.equal(mfkernels.gelu_tanh_backward(x, x), torch.ops.aten.gelu_backward(x, x, approximate="tanh"))
    assert not native_calls


def test_mixed_dtypes_take_the_torch_path(seed, native_calls):
    g, x = torch.randn(3, 8), torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(mfkernels.gelu_tanh_backward(g, x), torch.ops.aten.gelu_backward(g, x, approximate="tanh"))
    assert not native_calls


def test_env_var_disables_native(seed, native_calls, monkeypatch):
    x, _ = _x(3, 8)
    monkeypatch.setenv("MFKERNELS_NATIVE", "0")
    assert torch.equal(mfkernels.gelu_tanh(x), F.gelu(x, approximate="tanh")) and not native_calls


def test_transforms_and_double_backward_route_around_native(seed, native_calls):
    x, _ = _x(5, 16)
    tx = torch.randn_like(x)
    _, ty = torch.func.jvp(mfkernels.gelu_tanh, (x,), (tx,))
    with fwAD.dual_level():
        ty_fw = fwAD.unpack_dual(mfkernels.gelu_tanh(fwAD.make_dual(x, tx))).tangent
    gx = torch.func.grad(lambda x: mfkernels.gelu_tanh(x).sum())(x)
    assert not native_calls  # torch's own fp32 derivative, which cancels for negative x: compared with itself
    for got, want in ((ty, tx), (ty_fw, tx), (gx, torch.ones_like(x))):
        assert torch.allclose(got, torch.ops.aten.gelu_backward(want, x, approximate="tanh"), rtol=1e-6, atol=1e-7)
    x.requires_grad_()
    (g,) = torch.autograd.grad(mfkernels.gelu_tanh(x).sum(), x, create_graph=True)  # native forward, torch backward
    (gg,) = torch.autograd.grad(g.sum(), x)
    x_ = x.detach().requires_grad_()
    (g_,) = torch.autograd.grad(F.gelu(x_, approximate="tanh").sum(), x_, create_graph=True)
    assert torch.allclose(gg, torch.autograd.grad(g_.sum(), x_)[0], rtol=1e-5, atol=1e-6)
    assert type(mfkernels.gelu_tanh(x).grad_fn).__name__ == f"{_GeluTanhNative.__name__}Backward"


def test_model_dudt_no_further_from_the_oracle_than_torch_gelu(seed, monkeypatch):
    """fp32 du/dt of a DiT by the dual engine with the native GELU, and with torch's: each against the float64 func
    engine on the same weights and inputs. The native kernel may not add error."""
    from meanflow.jvp import u_and_dudt
    from tests.meanflow.reference_models import random_inputs, small_model

    model = small_model("dit")  # float64, randomised weights
    z, r, t, y, v = random_inputs(model, batch=4)
    _, oracle = u_and_dudt(model, z, r, t, y, v, engine="func")
    m32 = model.float()
    ins = [a.float() if a is not None and a.is_floating_point() else a for a in (z, r, t, y, v)]
    errs = {}
    for native in ("1", "0"):
        monkeypatch.setenv("MFKERNELS_NATIVE", native)
        _, dudt = u_and_dudt(m32, *ins, engine="dual")
        errs[native] = ((dudt.double() - oracle).norm() / oracle.norm()).item()
    assert errs["1"] <= 1.5 * errs["0"] + 1e-7, errs


# ----------------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------------

def test_bad_input_raises_value_error_naming_the_argument(seed):
    x = torch.randn(4, 8)
    cases = [
        (_native.gelu_tanh_forward_cpu, (x.double(),), "x must be torch.float32 or torch.bfloat16"),
        (_native.gelu_tanh_backward_cpu, (x.bfloat16(), x), "g must be torch.float32"),
        (_native.gelu_tanh_forward_cpu, (x.t(),), "x must be contiguous"),
        (_native.gelu_tanh_backward_cpu, (x[:2], x), "g must have shape"),
        (_native.gelu_tanh_backward_cpu, (x, x.to("meta")), "x must be on the CPU"),
        (_native.gelu_tanh_backward_cpu, ([1.0], x), "g must be a tensor"),
    ]
    for fn, args, match in cases:
        with pytest.raises(ValueError, match=match):
            fn(*args)
