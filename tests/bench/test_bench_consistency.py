"""The benchmarks' reference and project paths compute the same numbers, so that a benchmark never times a wrong
result: each suite's own setup factory and callables run once on a small float64 shape and are compared.

Kernel paths run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton loads).
"""

import copy

import pytest
import torch

from bench import report
from bench import test_adaln as adaln_bench
from bench import test_attention as attn_bench
from bench import test_train_step as step_bench
from tests.meanflow.reference_models import randomize

CPU = torch.device("cpu")
SMALL_DIT = ("DiT-Nano/2", dict(input_size=6, in_channels=3, num_classes=4, hidden_size=32, num_heads=2), 3)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _case(seed):
    name, overrides, batch = SMALL_DIT
    case = step_bench.train_step_case(name, overrides, batch, device=CPU, dtype=torch.float64, seed=seed, pool=2)
    # DiT's zero init makes u = 0 and du/dt = 0 everywhere, which any two engines agree on: draw every weight.
    randomize(case.model, generator=torch.Generator().manual_seed(seed))
    return case


def _two_steps(engine, seed):
    case = _case(seed)
    losses = [case.step(engine) for _ in range(2)]  # two batches of the pool, and AdamW past its sign-like step 1
    grads = {n: p.grad.clone() for n, p in case.model.named_parameters() if p.grad is not None}
    return losses, grads, copy.deepcopy(case.model.state_dict())


@pytest.mark.parametrize("engine", ["dual", "dual+kernels"])
def test_train_step_engines_match_func(engine, seed):
    ref_losses, ref_grads, ref_params = _two_steps("func", seed)
    losses, grads, params = _two_steps(engine, seed)
    for got, want in zip(losses, ref_losses):
        assert rel_err(got, want) <= 1e-10
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, name
        err = ((grads[name] - g).norm() / g.norm()).item()
        assert err <= 1e-9, f"{name}: relative gradient error {err:.3e}"
    for name, p in ref_params.items():
        assert rel_err(params[name], p) <= 1e-10, name


def test_train_step_flow_matching_floor_trains(seed):
    """The flow-matching floor has no reference to match: it must run the full step and reach every weight."""
    case = _case(seed)
    assert case.engines() == ["flow matching", "func", "dual"]  # no kernels timed on CPU
    loss = case.step("flow matching")
    assert torch.isfinite(loss) and loss > 0
    assert all(p.grad is not None for p in case.model.parameters())


def test_attention_impls_agree(seed):
    case = attn_bench.attention_case(2, 2, 13, 16, dtype=torch.float64, device=CPU, pool=2, seed=seed)
    inputs = case.sets[0]
    o_ref, do_ref = case.run(attn_bench.REFERENCE, inputs)
    assert do_ref.abs().max() > 1e-3
    for impl in attn_bench.IMPLS:
        o, do = case.run(impl, inputs)
        assert rel_err(o, o_ref) <= 1e-10, impl
        if impl in attn_bench.TANGENT_FREE:
            assert do is None, impl
        else:
            assert rel_err(do, do_ref) <= 1e-10, impl
    case.call(attn_bench.REFERENCE)()  # the timed call: next set of the pool
    assert case.inputs.calls == 1


def test_adaln_impls_agree(seed):
    case = adaln_bench.adaln_case(2, 5, 24, dtype=torch.float64, device=CPU, pool=2, seed=seed)
    inputs = case.sets[0]
    y_ref, dy_ref = case.run(adaln_bench.REFERENCE, inputs)
    assert dy_ref.abs().max() > 1e-3
    for impl in adaln_bench.IMPLS:
        y, dy = case.run(impl, inputs)
        if impl == adaln_bench.CEILING:
            assert torch.equal(y, inputs[0]) and torch.equal(dy, inputs[3])
        else:
            assert rel_err(y, y_ref) <= 1e-10, impl
            assert rel_err(dy, dy_ref) <= 1e-10, impl



ATTN_FAKE_MS = {attn_bench.REFERENCE: 10.0, attn_bench.PROJECT: 1.0, "func.jvp(kernel)": 1.25,
                "attention_jvp_torch": 5.0, attn_bench.FORWARD: 0.6, attn_bench.FLOOR: 0.5}
ADALN_FAKE_US = {adaln_bench.REFERENCE: 300.0, adaln_bench.PROJECT: 100.0, "func.jvp(layer_norm + modulate)": 600.0,
                 adaln_bench.CEILING: 80.0}


def _fake_run(device_kind, device):
    """A pytest-benchmark JSON with the records the suites write (their own record functions), made-up times."""
    assert ATTN_FAKE_MS.keys() == attn_bench.IMPLS.keys() and ADALN_FAKE_US.keys() == adaln_bench.IMPLS.keys()
    benches = []
    for impl, ms in ATTN_FAKE_MS.items():
        group, info = attn_bench.attention_record(4, 16, 4096, 64, impl)
        benches.append({"group": group, "extra_info": info, "stats": {"median": ms * 1e-3}})
    for impl, us in ADALN_FAKE_US.items():
        group, info = adaln_bench.adaln_record(32, 256, 768, impl)
        benches.append({"group": group, "extra_info": info, "stats": {"median": us * 1e-6}})
    steps = {"flow matching": 1.0, "func": 2.0, "dual": 1.3, "dual+kernels": 1.2}
    memory = {"flow matching": 100, "func": 300, "dual": 110, "dual+kernels": 100}
    shares = {e: [None, None] for e in steps} if device_kind == "gpu" else {e: [1.0, 1.0] for e in steps}
    info = step_bench.train_step_record("DiT-B/2", {}, 64, "bf16 autocast", {e: [t, t] for e, t in steps.items()},
                                        shares, {e: m * 2**20 for e, m in memory.items()}, "m",
                                        {"before": 0.1, "after": 1.0, "cores": 16})
    benches.append({"group": "train_step", "extra_info": info, "stats": {"median": 5.5}})
    env = {"device": device, "device_kind": device_kind, "torch": "t", "triton": "x", "commit": "abc"}
    return {"machine_info": {"meanflow": env}, "commit_info": {}, "datetime": "2030-01-02T00:00:00",
            "benchmarks": benches}


def test_report_renders_ratios_rates_and_goals():
    run = _fake_run("gpu", "Test GPU")
    text = report.render(run)
    assert "### Test GPU, 2030-01-02" in text and "commit abc" in text
    # speedup 2.0 / 1.2, time 1.2 / 1.0, memory 100 / 300 MiB, 64 img / 1.2 s
    assert "| dual+kernels | 1.67x / 1.67x | 1.20x / 1.20x | 100.0 | 0.33x | 53.3 | 1200.0 |" in text
    # 10x the MATH JVP, 2x the flash forward, 3 * 4 * 4 * 16 * 4096^2 * 64 FLOP in 1 ms
    assert "| attention_jvp kernel | 10.00x | 2.00x | 824.6 | 1000.0 |" in text
    # a primal-only row: no speedup against a JVP, one forward's FLOPs (4 * 4 * 16 * 4096^2 * 64) in 0.6 ms
    assert "| attention kernel (forward) | - | 1.20x | 458.1 | 600.0 |" in text
    # 3x the composite; (4BNC + 4BC) * 2 bytes in 100 us against the copy's 4BNC * 2 bytes in 80 us
    share = (4 * 32 * 256 * 768 + 4 * 32 * 768) / 100 / (4 * 32 * 256 * 768 / 80)
    assert f"| adaln_modulate_jvp kernel | 3.00x | {share:.0%} |" in text
    goals = report.measure_goals(run)
    assert goals["gpu-step-speed"]["value"].startswith("1.67x") and not goals["gpu-step-speed"]["met"]
    assert goals["gpu-attn-4096"]["value"] == "10.00x" and not goals["gpu-attn-4096"]["met"]
    assert goals["gpu-attn-flash"]["value"] == "2.00x" and goals["gpu-attn-flash"]["met"]
    assert goals["gpu-adaln-bw"]["value"] == f"{share:.0%}" and goals["gpu-adaln-bw"]["met"]
    assert "gpu-attn-256" not in goals and "cpu-step-speed" not in goals


def test_report_keeps_one_table_per_device_in_benchmarks_md():
    md = report.update_markdown("", _fake_run("gpu", "Test GPU"))
    md = report.update_markdown(md, _fake_run("cpu", "Test CPU"))
    md = report.update_markdown(md, _fake_run("cpu", "Test CPU"))
    assert md.count("<!-- device: Test GPU -->") == 1 and md.count("<!-- device: Test CPU -->") == 1
    assert "gpu-attn-4096" in md and "cpu-step-speed" in md  # goals measured on either device are kept
    assert "median step (ms)" not in md.split("<!-- device: Test CPU -->")[1]  # no absolute times for CPU runs


def test_report_ratios_skip_rounds_that_lost_their_cores():
    times = {"flow matching": [1.0, 1.0, 1.0, 1.0, 5.0], "func": [2.0, 2.0, 2.0, 2.0, 2.0],
             "dual": [1.4, 1.4, 1.4, 9.0, 1.4]}
    shares = {e: [0.99] * 5 for e in times}
    shares["dual"][3] = shares["flow matching"][4] = 0.4  # other jobs took the cores during these two steps
    info = step_bench.train_step_record("DiT-Tiny/4", {}, 32, "fp32", times, shares, {e: 1 for e in times}, "m",
                                        {"before": 0.0, "after": 0.0, "cores": 2})["train_step"]
    assert report.quiet_rounds(info) == [0, 1, 2]
    ratios = report.train_step_ratios(info)["dual"]
    assert ratios["vs_fm"] == pytest.approx(1.4) and ratios["speedup"] == pytest.approx(2.0 / 1.4)


def _train_step_run(engines, failed, model="DiT-B/2"):
    """A GPU run of one training-step benchmark in which only ``engines`` ran ({engine: seconds per step})."""
    info = step_bench.train_step_record(model, {}, 64, "bf16 autocast", {e: [t, t] for e, t in engines.items()},
                                        {e: [None, None] for e in engines}, {e: 100 * 2**20 for e in engines}, "m",
                                        {"before": 0.0, "after": 0.0, "cores": 16}, failed)
    env = {"device": "Test GPU", "device_kind": "gpu", "torch": "t", "triton": "x", "commit": "abc"}
    return {"machine_info": {"meanflow": env}, "commit_info": {}, "datetime": "2030-01-02T00:00:00",
            "benchmarks": [{"group": "train_step", "extra_info": info, "stats": {"median": 1.0}}]}


def test_report_records_an_engine_that_failed():
    """func out of memory on a GPU is a result: the table says so, the ratios against it are "-", and the goals that
    compare with func read "not measured" rather than a number or "no GPU"."""
    run = _train_step_run({"flow matching": 1.0, "dual+kernels": 1.2},
                          {"func": "OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB"})
    text = report.render(run)
    assert "| dual+kernels | - | 1.20x / 1.20x | 100.0 | - | 53.3 | 1200.0 |" in text
    assert "| func | failed | - | - | - | - | - |" in text
    assert "func did not run: OutOfMemoryError: CUDA out of memory." in text
    goals = report.measure_goals(run)
    assert goals["gpu-step-vs-fm"]["value"].startswith("1.20x") and goals["gpu-step-vs-fm"]["met"]
    for key in ("gpu-step-speed", "gpu-step-memory"):
        assert goals[key]["met"] is None
        assert goals[key]["value"].startswith("not measured: func failed (OutOfMemoryError")
    md = report.update_markdown("", run)
    assert "| not measured: func failed (OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB) " \
           "(DiT-B/2, batch 64) | - |" in md


def test_report_renders_a_step_timed_alone():
    """make gpu-check times DiT-XL/2 with dual+kernels only: its time and memory, no ratios, no goal."""
    run = _train_step_run({"dual+kernels": 0.5}, {}, model="DiT-XL/2")
    assert "| dual+kernels | - | - | 100.0 | - | 128.0 | 500.0 |" in report.render(run)
    assert report.measure_goals(run) == {}


def test_train_step_tolerates_only_func_failures_and_out_of_memory():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried | to allocate\nmore")
    assert step_bench._tolerated("func", RuntimeError("Cannot access storage of TensorWrapper"))
    assert step_bench._tolerated("dual+kernels", oom)
    assert not step_bench._tolerated("dual+kernels", RuntimeError("a kernel bug"))
    assert step_bench._describe(oom) == "OutOfMemoryError: CUDA out of memory. Tried / to allocate"
