"""Models from config and their split into stages."""

import pytest
import torch

from forwardflow.pipeline.model import BlockSpec, ModelConfig, build_stage_blocks, plan_stages
from forwardflow.pipeline.presets import fc_model, vgg_model
from forwardflow.pipeline.validation import ConfigError


def kinds(spec):
    return [block.kind for block in spec.blocks]


def test_parameter_free_blocks_join_their_layer_and_leading_ones_the_first():
    plans = plan_stages(fc_model((10, 10, 10)), (1, 4, 4), 3)
    assert kinds(plans[0]) == ["flatten", "linear", "relu", "layernorm"]
    assert kinds(plans[1]) == kinds(plans[2]) == ["linear", "relu", "layernorm"]
    assert [p.input_shape for p in plans] == [(1, 4, 4), (10,), (10,)]


def test_stages_are_balanced_by_compute_not_by_layer_count():
    # Costs 16*100, 100*10, 10*10, 10*10: two stages split after the first layer.
    model = ModelConfig(
        "uneven",
        (
            BlockSpec("flatten"),
            BlockSpec("linear", 100),
            BlockSpec("linear", 10),
            BlockSpec("linear", 10),
            BlockSpec("linear", 10),
        ),
    )
    plans = plan_stages(model, (1, 4, 4), 2)
    assert [kinds(p).count("linear") for p in plans] == [1, 3]
    assert plans[0].cost == 1600 and plans[1].cost == 1000 + 100 + 100


def test_every_split_chains_shapes_and_runs():
    model = vgg_model(channels=(4, 8), fc_width=16, pool_after=(0, 1))
    for stages in (1, 2, 3):
        plans = plan_stages(model, (3, 8, 8), stages)
        x = torch.randn(2, 3, 8, 8)
        for plan in plans:
            assert tuple(x.shape[1:]) == plan.input_shape
            for block in build_stage_blocks(plan):
                x = block(x)
            assert tuple(x.shape[1:]) == plan.output_shape
        assert plans[-1].is_last and plans[0].is_first


def test_more_stages_than_layers_is_refused():
    with pytest.raises(ConfigError, match="--stages: must be between 1 and 3"):
        ModelConfig("three", fc_model((5, 5, 5)).blocks, stages=4)


def test_conv_on_flat_input_is_refused():
    model = ModelConfig("bad", (BlockSpec("flatten"), BlockSpec("conv", 4)))
    with pytest.raises(ConfigError, match="image-shaped"):
        plan_stages(model, (1, 4, 4), 1)
