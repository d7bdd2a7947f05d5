"""The packed attention: one ``varlen_attn`` launch over a pack equals each record's own attention,
for grouped-query attention on every signature torch has given ``varlen_attn`` (torch 2.11 takes
no ``enable_gqa``: k and v are repeated to the query heads instead), and a Qwen2 decoder over a
pack equals the padded batch on the test device (flash-attention varlen on CUDA in bf16)."""

import pytest
import torch
import torch.nn.functional as F

from omnifast.nn import packing

from ..devices import TEST_DEVICE


def per_record(q, k, v, lengths, causal):
    """Each record's attention by SDPA with its k/v heads repeated: (T, heads, d)."""
    groups = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        out.append(F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=causal)[0].transpose(0, 1))
        start += n
    return torch.cat(out)


def varlen_2_11(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)
):
    """torch 2.11's ``varlen_attn`` signature (no ``enable_gqa``): heads of q, k and v must match."""
    if key.shape[1] != query.shape[1]:
        raise RuntimeError("varlen_attn: query and key must have the same number of heads")
    lengths = (cu_seq_q[1:] - cu_seq_q[:-1]).tolist()
    return per_record(query, key, value, lengths, causal=window_size == (-1, 0))


def pack_inputs(heads=4, kv_heads=2, d=8, lengths=(5, 3, 7)):
    generator = torch.Generator().manual_seed(0)
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, d, generator=generator) for h in (heads, kv_heads, kv_heads))
    return q, k, v, packing.cu_seqlens(torch.tensor(lengths)), list(lengths)


@pytest.mark.parametrize("causal", [True, False])
def test_grouped_query_attention_on_torch_2_11s_varlen_attn_repeats_k_and_v(causal):
    q, k, v, offsets, lengths = pack_inputs()
    with pytest.raises(TypeError):  # what passing enable_gqa to torch 2.11 does
        varlen_2_11(q, k, v, offsets, offsets, 7, 7, enable_gqa=True)
    out = packing.flash_varlen(varlen_2_11, q, k, v, offsets, max(lengths), None, causal)
    torch.testing.assert_close(out, per_record(q, k, v, lengths, causal))


def test_enable_gqa_is_passed_where_varlen_attn_takes_it():
    seen = {}

    def varlen_2_12(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        *,
        return_aux=None,
        scale=None,
        window_size=(-1, -1),
        enable_gqa=False,
    ):
        seen.update(heads=(query.shape[1], key.shape[1]), enable_gqa=enable_gqa)
        return query

    q, k, v, offsets, lengths = pack_inputs()
    packing.flash_varlen(varlen_2_12, q, k, v, offsets, max(lengths), None, True)
    assert seen == {"heads": (4, 2), "enable_gqa": True}  # k and v not repeated: the kernel groups them


@pytest.mark.gpu_check(7)
def test_a_packed_decoder_equals_the_padded_batch_on_the_test_device():
    """A grouped-query Qwen2 decoder over three packed records equals the padded batch; on CUDA in
    bf16 (the flash-attention varlen path), within bf16's error of the float32 padded batch."""
    from transformers import Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=16,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Qwen2Model(config).to(TEST_DEVICE).eval()
    lengths = torch.tensor([9, 4, 13], device=TEST_DEVICE)
    embeds = torch.randn(3, 13, 64, generator=torch.Generator().manual_seed(1)).to(TEST_DEVICE)
    mask = (torch.arange(13, device=TEST_DEVICE)[None] < lengths[:, None]).long()
    with torch.no_grad():
        padded = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        dtype = torch.bfloat16 if TEST_DEVICE.type == "cuda" else torch.float32
        packed = packing.run_packed(model.to(dtype), packing.pack(embeds, lengths).to(dtype), lengths)
    expected = packing.pack(padded, lengths)
    tolerance = dict(atol=5e-2, rtol=5e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.float(), expected, **tolerance)
