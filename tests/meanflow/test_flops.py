"""meanflow.flops: the explicit FLOP count against torch's FlopCounterMode, layer by layer and for whole MeanFlow
steps; the peak table's name lookup; MFU; the README table's command. (That a CPU run logs img_per_s, model TFLOP/s
from this count and a null MFU is checked on the runs of tests/meanflow/test_resume_world_size.py.)

Tolerance: none, the counts are integers compared for equality. FlopCounterMode counts exactly the matmul-like ops
(mm, addmm, bmm, convolution and their backwards, SDPA) with the same 2 m n k rule, and nothing else; meanflow.flops
neglects exactly the ops it does not count (norms, softmax, activations, residuals, biases). An off-by-one in a
layer's shape, a missed layer, a tangent matmul too many or a wrong share of r != t rows all change the integer.
"""

from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import mfkernels
from meanflow import flops
from meanflow.models import create_model
from meanflow.objective import ObjectiveConfig, draw, meanflow_loss, sample_times


@pytest.fixture
def torch_ops():
    """The torch reference ops (what FlopCounterMode can see; a native CPU kernel would hide its matmuls)."""
    previous = mfkernels.get_backend()
    mfkernels.set_backend("torch")
    yield
    mfkernels.set_backend(previous)


def counted_layers(model, *inputs):
    """{module name: FLOPs} of one forward on meta tensors, attention's core as ``blocks.<i>.attn.core``."""
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    root = type(model).__name__
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    layers = {}
    for name, value in per_module.items():
        if name.endswith(".attn"):
            layers[name[len(root) + 1:] + ".core"] = value - per_module[name + ".qkv"] - per_module[name + ".proj"]
        elif name.startswith(root + ".") and not any(other.startswith(name + ".") for other in per_module):
            layers[name[len(root) + 1:]] = value  # leaves only: parents hold their children's sums
    return layers, counter.get_total_flops()


DIT_CASES = {  # (model name, overrides): the paper's XL/2 (on meta tensors: no memory, no compute) and odd sizes
    "XL/2 ImageNet": ("DiT-XL/2", dict(input_size=32, in_channels=4, num_classes=1000)),
    "Nano/4 odd": ("DiT-Nano/4", dict(input_size=12, in_channels=3, num_classes=7)),
    "Micro/8 unconditional": ("DiT-Micro/8", dict(input_size=32, in_channels=1, num_classes=0)),
}


@pytest.mark.parametrize("case", list(DIT_CASES))
def test_dit_forward_matches_flop_counter_layer_by_layer(case, torch_ops):
    name, kw = DIT_CASES[case]
    with torch.device("meta"):
        model = create_model(name, **kw).to("meta")
        model.check_values = False
        z, t = torch.zeros(1, kw["in_channels"], kw["input_size"], kw["input_size"]), torch.ones(1)
        y = torch.zeros(1, dtype=torch.long) if kw["num_classes"] else None
    counted, total = counted_layers(model, z, t, t, y)
    size, patch = name[len("DiT-"):].split("/")
    depth, hidden, heads = flops.DIT_SIZES[size]
    ours = flops.dit_forward_flops(kw["input_size"], int(patch), kw["in_channels"], hidden, depth, heads)
    assert ours.layers == counted
    assert ours.total == total
    assert ours.attention == sum(v for k, v in counted.items() if k.endswith("attn.core")) > 0


def test_dit_conv_head_counted(torch_ops):
    try:
        model = create_model("DiT-Nano/4", input_size=16, in_channels=3, num_classes=0, head="conv")
    except ValueError:
        pytest.skip("this DiT has no conv head")
    model = model.to("meta")
    model.check_values = False
    counted, _ = counted_layers(model, torch.zeros(1, 3, 16, 16, device="meta"),
                                torch.ones(1, device="meta"), torch.ones(1, device="meta"), None)
    ours = flops.dit_forward_flops(16, 4, 3, 64, 2, 2, head="conv")
    assert {k: v for k, v in ours.layers.items() if "conv_head" in k} == {
        k: v for k, v in counted.items() if "conv_head" in k}


@pytest.mark.parametrize("depth, canvas, head", [(4, 0, "linear"), (5, 0, "linear"), (4, 8, "conv")])
def test_dit_long_skips_and_canvas_counted(depth, canvas, head, torch_ops):
    model = create_model("DiT-Nano/4", input_size=16, in_channels=3, num_classes=0, depth=depth, long_skips=True,
                         canvas=canvas, head=head, prediction="x")
    model = model.to("meta")
    model.check_values = False
    counted, total = counted_layers(model, torch.zeros(1, 3, 16, 16, device="meta"),
                                    torch.ones(1, device="meta"), torch.ones(1, device="meta"), None)
    hidden, heads = flops.DIT_SIZES["Nano"][1:]
    ours = flops.dit_forward_flops(16, 4, 3, hidden, depth, heads, long_skips=True, canvas=canvas, head=head)
    assert sum(k.startswith("long_skips.") for k in counted) == depth // 2
    assert ours.layers == counted and ours.total == total


def test_mlp_forward_matches_flop_counter():
    model = create_model("MLP", dim=5, num_classes=3)
    counted, total = counted_layers(model, torch.zeros(1, 5), torch.ones(1), torch.ones(1), torch.zeros(1).long())
    ours = flops.mlp_forward_flops(5)
    assert ours.layers == counted and ours.total == total and ours.attention == 0


STEP_CASES = {  # objective overrides: each branch of meanflow_loss, with and without guidance
    "flow matching": dict(ratio_r_neq_t=0.0),
    "flow matching, guided w k": dict(ratio_r_neq_t=0.0, cfg_w=1.5, cfg_k=0.5, class_drop=0.3),
    "split, guided w k": dict(ratio_r_neq_t=0.25, cfg_w=0.2, cfg_k=0.92, class_drop=0.3),
    "split, drops past the r = t rows": dict(ratio_r_neq_t=0.5, cfg_w=1.5, cfg_k=0.5, class_drop=0.7),
    "split, odd batch share": dict(ratio_r_neq_t=0.4),
    "one dual pass, guided w": dict(ratio_r_neq_t=0.75, cfg_w=2.0),
    "one dual pass, guided w k": dict(ratio_r_neq_t=0.75, cfg_w=0.5, cfg_k=0.3, class_drop=0.3),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
@pytest.mark.parametrize("conditional", [True, False], ids=["conditional", "unconditional"])
def test_step_count_matches_a_counted_meanflow_step(case, conditional, torch_ops):
    """meanflow_loss and its backward on a real small DiT (CPU, fp32), every FLOP counted: B x the formula."""
    torch.manual_seed(0)
    B, classes = 7, 5
    model = create_model("DiT-Nano/4", input_size=12, in_channels=3, num_classes=classes if conditional else 0)
    cfg = ObjectiveConfig(**STEP_CASES[case]).validate()
    x = torch.randn(B, 3, 12, 12)
    y = torch.randint(0, classes, (B,)) if conditional else None
    rnd = draw(cfg, B, (3, 12, 12), torch.Generator().manual_seed(1))
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:  # MATH: SDPA as counted bmm's
        loss, _ = meanflow_loss(model, x, y, rnd, cfg)
        loss.backward()
    fwd = flops.dit_forward_flops(12, 4, 3, 64, 2, 2)
    expected = B * flops.step_flops_per_image(fwd, cfg, conditional, global_batch=B)
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)


def test_guided_step_with_an_interval_counts_the_rows_inside(torch_ops):
    """With a guidance interval the formula is an expectation; on one draw, the count is that of its guided rows."""
    B, classes = 16, 5
    model = create_model("DiT-Nano/4", input_size=12, in_channels=3, num_classes=classes)
    cfg = ObjectiveConfig(ratio_r_neq_t=0.25, cfg_w=0.2, cfg_k=0.92, cfg_t_end=0.6, class_drop=0.1).validate()
    x, y = torch.randn(B, 3, 12, 12), torch.randint(0, classes, (B,))
    rnd = draw(cfg, B, (3, 12, 12), torch.Generator().manual_seed(3))
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        loss, _ = meanflow_loss(model, x, y, rnd, cfg)
        loss.backward()
    guided = (rnd.t <= 0.6) & ~rnd.drop
    rows = int(guided.sum()) + int((guided & (rnd.r != rnd.t)).sum())  # null on each, cond where r != t
    assert 0 < rows < 2 * B
    fwd = flops.dit_forward_flops(12, 4, 3, 64, 2, 2)
    unguided = replace(cfg, cfg_w=1.0, cfg_k=0.0)
    expected = B * flops.step_flops_per_image(fwd, unguided, True, global_batch=B) + rows * fwd.total
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("sampler", ["logit_normal", "uniform"])
def test_guidance_interval_share_is_the_drawn_share(sampler):
    cfg = ObjectiveConfig(time_sampler=sampler, time_mu=-0.4, time_sigma=1.0, cfg_w=2.0, cfg_t_start=0.3,
                          cfg_t_end=0.8)
    _, t = sample_times(replace(cfg, ratio_r_neq_t=1.0), 400_000, torch.Generator().manual_seed(0), torch.float64)
    drawn = float(((t >= 0.3) & (t <= 0.8)).double().mean())
    assert flops.guidance_interval_share(cfg) == pytest.approx(drawn, abs=4e-3)  # ~5 standard errors
    assert flops.guidance_interval_share(replace(cfg, cfg_t_start=0.0, cfg_t_end=1.0)) == 1.0


def test_step_formula_terms():
    """The docstring's formula on round numbers: F = 100, A = 10, E = 4."""
    fwd = flops.ForwardFlops({"all": 100}, attention=10, no_input_grad=4)
    fm, split, dual = (ObjectiveConfig(ratio_r_neq_t=r) for r in (0.0, 0.25, 0.75))
    assert flops.step_flops_per_image(fwd, fm, True) == 100 + 196
    assert flops.step_flops_per_image(fwd, split, True) == 100 + 196 + 0.25 * 210
    assert flops.step_flops_per_image(fwd, dual, True) == 210 + 196
    guided = ObjectiveConfig(ratio_r_neq_t=0.0, cfg_w=1.0, cfg_k=0.5, class_drop=0.1)
    assert flops.step_flops_per_image(fwd, guided, True) == pytest.approx(296 + 90)  # null on the kept rows only
    assert flops.step_flops_per_image(fwd, guided, False) == 296  # no labels: objective never guides
    split_guided = replace(guided, ratio_r_neq_t=0.25)  # + cond on the r != t rows (none dropped)
    assert flops.step_flops_per_image(fwd, split_guided, True) == pytest.approx(100 + 196 + 0.25 * 210 + 90 + 25)
    assert flops.r_neq_t_share(split, global_batch=10) == 0.2  # round(0.75 * 10) = 8 rows have r = t


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA A100-SXM4-80GB", "A100 (SXM or PCIe)"),
    ("NVIDIA A100 80GB PCIe", "A100 (SXM or PCIe)"), ("NVIDIA L40S", "L40S"), ("NVIDIA L40", "L40"),
    ("NVIDIA L4", "L4"), ("NVIDIA A10", "A10"), ("NVIDIA B200", "B200 (HGX)"), ("NVIDIA A10G", None),
    ("NVIDIA GeForce RTX 3090", None), ("cpu", None),
])
def test_peak_lookup_by_device_name(name, expected):
    peak = flops.device_peak(name)
    assert (peak.name if peak else None) == expected


def test_peak_rate_and_mfu():
    assert flops.peak_flops_per_device(torch.device("cpu"), torch.float32, True) is None
    assert flops.peak_flops_per_device(torch.device("cpu"), torch.bfloat16, True, override_tflops=100) == 1e14
    h100 = flops.device_peak("NVIDIA H100 80GB HBM3")
    assert (h100.bf16, h100.tf32) == (989.5, 494.5)  # dense: half the data sheet's "with sparsity" figures
    assert flops.mfu(1e12, 100.0, 2, 1e14) == pytest.approx(0.5)  # 1e14 FLOP/s over 2 x 1e14
    assert flops.mfu(1e12, 100.0, 2, None) is None


def test_table_command_prints_every_preset(capsys):
    assert flops.main(["--table"]) == 0
    out = capsys.readouterr().out
    for preset, fid in flops.PAPER_FID_1NFE.items():
        row = next(line for line in out.splitlines() if line.startswith(f"| {preset} |"))
        assert row.endswith(f"| {fid:.2f} |")
    assert "| imagenet-XL2 | DiT-XL/2 | 676.4M |" in out  # the paper's 676M
    assert "| imagenet-iMF-B2 | iMF-B/2 | 145.6M (88.9M w/o v-head) |" in out  # the paper's 89M without the v-head
    assert "| mnist-imf | iMF-Micro/8 |" in out
    capsys.readouterr()
    assert flops.main([]) == 2  # nothing asked for: the project's error line, exit status 2
    assert capsys.readouterr().err.startswith("meanflow.flops: error: nothing to print")


def test_memory_estimate_orders():
    from meanflow.config import PRESETS, Config, apply_overrides

    cfg = apply_overrides(Config(), PRESETS["imagenet-XL2"]())
    plain = flops.memory_per_gpu_bytes(cfg)
    checkpointed = flops.memory_per_gpu_bytes(cfg, activation_checkpointing=True)
    state = 20 * flops.parameter_count(cfg.model) / 8
    assert state < checkpointed < plain
    # activations: 32 images x 28 blocks x 256 tokens x 1152 x 18 values x 2 bytes
    assert plain - checkpointed == pytest.approx(32 * 256 * 1152 * 2 * (28 * 18 - 28 - 18))



# ----------------------------------------------------------------------------------------------------------------------
# iMF: the in-context DiT's forward (with and without its v-head) and whole iMF steps

IMF_CASES = {  # (model name, overrides): the paper's XL/2 on meta tensors, odd sizes, no labels, no v-head
    "XL/2 ImageNet": ("iMF-XL/2", dict(input_size=32, in_channels=4, num_classes=1000)),
    "Nano/4 odd": ("iMF-Nano/4", dict(input_size=12, in_channels=3, num_classes=7)),
    "Micro/8 unconditional": ("iMF-Micro/8", dict(input_size=32, in_channels=1, num_classes=0)),
    "Tiny/2 inference model": ("iMF-Tiny/2", dict(input_size=8, in_channels=2, num_classes=5, aux_head_depth=0)),
}


def imf_config(name, kw):
    from meanflow.models.config import ModelConfig

    aux = kw.get("aux_head_depth", -1)
    return ModelConfig(name=name, input_size=kw["input_size"], in_channels=kw["in_channels"],
                       num_classes=kw["num_classes"], aux_head_depth=aux)


@pytest.mark.parametrize("v_head", [False, True], ids=["u", "u and v"])
@pytest.mark.parametrize("case", list(IMF_CASES))
def test_imf_forward_matches_flop_counter_layer_by_layer(case, v_head, torch_ops):
    name, kw = IMF_CASES[case]
    cfg = imf_config(name, kw)
    if v_head and kw.get("aux_head_depth") == 0:
        with pytest.raises(ValueError, match="no v-head"):
            flops.model_forward_flops(cfg, v_head=True)
        return
    with torch.device("meta"):
        model = create_model(name, **cfg.build_kwargs()).to("meta")
        model.check_values = False
        z, t = torch.zeros(1, kw["in_channels"], kw["input_size"], kw["input_size"]), torch.ones(1)
        y = torch.zeros(1, dtype=torch.long) if kw["num_classes"] else None
    counted, total = counted_layers(model, z, t, t, y, None, v_head)
    counted = {k: v for k, v in counted.items() if v}  # norms, RoPE and the label table count nothing
    ours = flops.model_forward_flops(cfg, v_head=v_head)
    assert ours.layers == counted
    assert ours.total == total
    assert ours.attention == sum(v for k, v in counted.items() if k.endswith("attn.core")) > 0
    assert any(k.startswith("v_blocks.") for k in ours.layers) == v_head


IMF_STEP_CASES = {  # (model overrides, objective overrides)
    "imf conditional": (dict(num_classes=5), dict(kind="imf", ratio_r_neq_t=0.5, class_drop=0.3)),
    "imf unconditional": (dict(num_classes=0), dict(kind="imf", ratio_r_neq_t=0.5)),
    "imf v-head of 2": (dict(num_classes=5, aux_head_depth=2), dict(kind="imf", ratio_r_neq_t=0.75)),
    "meanflow on an iMF model, guided": (dict(num_classes=5), dict(ratio_r_neq_t=0.75, cfg_w=2.0)),
}


@pytest.mark.parametrize("case", list(IMF_STEP_CASES))
def test_step_count_matches_a_counted_imf_step(case, torch_ops):
    """imf_loss (or meanflow_loss) and its backward on a random iMF-Nano/4 (CPU, fp32), every FLOP counted."""
    from meanflow.config import Config
    from meanflow.models.config import ModelConfig
    from tests.meanflow.reference_models import randomize_imf

    model_kw, objective_kw = IMF_STEP_CASES[case]
    torch.manual_seed(0)
    B = 6
    mcfg = ModelConfig(name="iMF-Nano/4", input_size=12, in_channels=3, num_classes=model_kw["num_classes"],
                       aux_head_depth=model_kw.get("aux_head_depth", -1))
    model = randomize_imf(create_model(mcfg.name, **mcfg.build_kwargs()), torch.Generator().manual_seed(2))
    cfg = Config()
    cfg.model, cfg.objective, cfg.train.global_batch = mcfg, ObjectiveConfig(**objective_kw).validate(), B
    x = torch.randn(B, 3, 12, 12)
    y = torch.randint(0, 5, (B,)) if mcfg.num_classes else None
    rnd = draw(cfg.objective, B, (3, 12, 12), torch.Generator().manual_seed(1))
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        loss, _ = meanflow_loss(model, x, y, rnd, cfg.objective)
        loss.backward()
    assert counter.get_total_flops() == pytest.approx(B * flops.config_step_flops(cfg), rel=1e-12)


def test_imf_step_formula_terms():
    """g F_v + (F_v + U) + (2 F_v - E) on round numbers: F_v = 100, U = 70, E = 4."""
    fwd = flops.ForwardFlops({"all": 100}, attention=10, no_input_grad=4, tangent=70)
    assert flops.imf_step_flops_per_image(fwd, conditional=True) == 200 + 170 + 196
    assert flops.imf_step_flops_per_image(fwd, conditional=False) == 100 + 170 + 196


def test_unknown_or_mismatched_models_are_refused_not_counted_as_a_dit():
    from meanflow.models.config import ModelConfig

    for name in ("UViT-B/2", "DiT-Huge/2"):
        with pytest.raises(ValueError, match=f"no FLOP count for model '{name}'"):
            flops.model_forward_flops(ModelConfig(name=name))
    with pytest.raises(ValueError, match="DiT-B/2 has no v-head"):
        flops.model_forward_flops(ModelConfig(name="DiT-B/2"), v_head=True)


def test_imf_memory_estimate():
    from meanflow.config import PRESETS, Config, apply_overrides

    cfg = apply_overrides(Config(), PRESETS["imagenet-iMF-XL2"]())
    plain = flops.memory_per_gpu_bytes(cfg)
    checkpointed = flops.memory_per_gpu_bytes(cfg, activation_checkpointing=True)
    # activations: 128 images x (48 + 8 v-head) blocks x (256 patches + 20 prefix tokens) x 1024 x 28 values x 4 bytes
    L, a = 48 + 8, flops.IMF_SAVED_PER_TOKEN_PER_BLOCK
    assert plain - checkpointed == pytest.approx(128 * 276 * 1024 * 4 * (L * a - L - a))
    cfg.model.name = "UViT-B/2"  # not a name the estimate knows: refused, not estimated as a DiT
    with pytest.raises(ValueError, match="model 'UViT-B/2'"):
        flops.memory_per_gpu_bytes(cfg)


def test_imf_saved_activations_per_block_as_the_estimate_says(torch_ops):
    """IMF_SAVED_PER_TOKEN_PER_BLOCK against what autograd keeps for one random iMF block's backward (fp32, CPU)."""
    from meanflow.models.imf_layers import ImfBlock, Rope1D

    B, N, D, H = 2, 40, 256, 4
    block, rope = ImfBlock(D, H), Rope1D(D // H, N)
    x = torch.randn(B, N, D, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, rope)
    for p in block.parameters():
        saved.pop(p.untyped_storage().data_ptr(), None)
    values = sum(saved.values()) / (B * N * D * 4)  # the block's input included
    assert values == pytest.approx(flops.IMF_SAVED_PER_TOKEN_PER_BLOCK, abs=0.5)
