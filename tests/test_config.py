"""ShardConfig validates itself: each bad configuration is a ValueError naming the value and what to do."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import autotp
from autotp.config import ShardConfig, resolve_config
from distributed import run_ranks


def _mlp():
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))


def test_unknown_option_names_it_and_suggests():
    with pytest.raises(ValueError, match=r"unknown autotp option\(s\) 'strcit' \(did you mean 'strict'\?\)"):
        autotp.plan(_mlp(), 2, example_inputs=(torch.randn(4, 16),), strcit=True)
    with pytest.raises(ValueError, match=r"'frobnicate'; the options are strict, dynamic"):
        resolve_config(None, {"frobnicate": 1})


def test_config_and_keyword_options_together_is_an_error():
    with pytest.raises(ValueError, match=r"either config=ShardConfig\(...\) or keyword options, not both "
                                         r"\(got config= and strict\)"):
        autotp.plan(_mlp(), 2, example_inputs=(torch.randn(4, 16),), config=ShardConfig(), strict=True)
    # each alone is fine, and they mean the same
    a = autotp.plan(_mlp(), 2, example_inputs=(torch.randn(4, 16),), config=ShardConfig(gather_outputs=False))
    b = autotp.plan(_mlp(), 2, example_inputs=(torch.randn(4, 16),), gather_outputs=False)
    assert a.to_json() == b.to_json()


@pytest.mark.parametrize("field,value", [("strict", "yes"), ("dynamic", 1), ("check_inputs", None),
                                         ("seed", 1.5), ("seed", True)])
def test_fields_of_the_wrong_type(field, value):
    with pytest.raises(ValueError, match=rf"ShardConfig.{field} must be"):
        ShardConfig(**{field: value})


def test_config_must_be_a_shard_config():
    with pytest.raises(ValueError, match="config must be an autotp.ShardConfig, got dict"):
        resolve_config({"strict": True}, {})


def test_world_size_must_be_positive():
    with pytest.raises(ValueError, match=r"world_size must be a positive int, got 0"):
        autotp.plan(_mlp(), 0, example_inputs=(torch.randn(4, 16),))


@pytest.mark.parametrize("option", [{"gather_outputs": False}, {"activation_checkpointing": True}])
def test_options_that_contradict_generation(option):
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"{name}=\w+ contradicts generation"):
        autotp.plan_generation(model, 2, **option)


def _mismatched(rank, world):
    try:
        autotp.shard(_mlp(), 4, example_inputs=(torch.randn(4, 16),))
    except ValueError as e:
        return str(e)
    return "no error"


def test_world_size_that_disagrees_with_the_group():
    for msg in run_ranks(_mismatched, 2):
        assert "world_size (4) disagrees with the process group, which has 2 ranks" in msg, msg


def test_parameters_on_meta_need_a_loader():
    with torch.device("meta"):
        model = _mlp()
    with pytest.raises(ValueError, match=r"parameter 0.weight is on the meta device: autotp.shard needs real weights "
                                         r"\(or a `load` callback / autotp.from_pretrained"):
        autotp.shard(model, 1, example_inputs=(torch.randn(4, 16, device="meta"),))


def test_inputs_of_another_shape_than_a_static_capture():
    model = _mlp()
    sharded = autotp.shard(model, 1, example_inputs=(torch.randn(4, 16),))
    with pytest.raises(ValueError, match=r"captured for other input shapes .* got tensor inputs of shapes "
                                         r"\[\(5, 16\)\]\. Pass dynamic=True"):
        sharded(torch.randn(5, 16))
    assert autotp.shard(model, 1, example_inputs=(torch.randn(4, 16),), dynamic=True)(torch.randn(5, 16)).shape == (5, 16)
