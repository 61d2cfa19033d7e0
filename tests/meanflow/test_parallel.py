"""meanflow.parallel: FSDP2's resharding after forward, as train.reshard_after_forward asks (one-process gloo group)."""

import pytest
import torch

from meanflow.models import create_model
from meanflow.parallel import parallelize
from tests.meanflow.reference_models import random_inputs


def _unsharded_after_forward(model) -> list:
    """Whether each FSDP unit (the blocks, then the root) holds its gathered weights after a forward."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

    z, r, t, y, _ = random_inputs(model, dtype=torch.float32)
    model(z, r, t, y).sum().backward()  # a full step first: lazy init, and the backward reshards everything
    with torch.no_grad():
        model(z, r, t, y)
    units = [*model.blocks, model]
    return [all(p.sharded_state == ShardedState.UNSHARDED for p in u._get_fsdp_state()._fsdp_param_group.fsdp_params)
            for u in units]


@pytest.mark.parametrize("reshard", [True, False])
def test_reshard_after_forward_frees_or_keeps_the_gathered_weights(process_group, reshard):
    model = create_model("DiT-Nano/2", input_size=4, in_channels=2, num_classes=3)
    parallelize(model, distributed=True, compute_dtype=torch.float32, reshard_after_forward=reshard)
    kept = _unsharded_after_forward(model)
    assert len(kept) == len(model.blocks) + 1
    assert kept == [not reshard] * len(kept)
