"""``forward_with_cache`` passes the cache under the keyword the installed transformers takes,
with no deprecation warning, and a cached step computes what the whole sequence computes."""

import warnings

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2Model
from transformers.cache_utils import DynamicCache

from omnifast.nn.kv_cache import forward_with_cache


class _OldStyle(nn.Module):
    def forward(self, inputs_embeds, past_key_values=None, use_cache=False):
        return {"cache": past_key_values, "use_cache": use_cache}


def test_a_forward_without_a_cache_parameter_gets_past_key_values():
    cache = object()
    assert forward_with_cache(_OldStyle(), cache, inputs_embeds=None) == {"cache": cache, "use_cache": True}


def test_a_cached_step_equals_the_whole_sequence_without_warnings():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Qwen2Model(config).eval().double()
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        whole = model(inputs_embeds=x).last_hidden_state
        cache = DynamicCache(config=config)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            head = forward_with_cache(model, cache, inputs_embeds=x[:, :4]).last_hidden_state
            last = forward_with_cache(model, cache, inputs_embeds=x[:, 4:]).last_hidden_state
    torch.testing.assert_close(torch.cat([head, last], 1), whole, rtol=1e-12, atol=1e-12)
