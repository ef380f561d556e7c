"""LoRA on a fused nn.MultiheadAttention (OpenCLIP: SD2's and SDXL's second text encoder)."""

import pytest
import torch
from torch import nn

from lora_train.network import fused
from lora_train.network.lora import LoRAModule

E, H = 32, 4


def _loras(mha, seed=0):
    g = torch.Generator().manual_seed(seed)
    loras = {}
    for part in fused.PARTS:
        m = LoRAModule(f"x_{part}", mha, 3, 1.5, generator=g, part=part)
        with torch.no_grad():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.3)
        loras[part] = m
    return loras


def _delta_weight(m: LoRAModule) -> torch.Tensor:
    return (m.lora_up.weight @ m.lora_down.weight) * m.scale * m.multiplier


def _causal(n):
    return torch.full((n, n), float("-inf")).triu(1)  # OpenCLIP's text mask


@pytest.mark.parametrize("batch_first", [False, True])
def test_output_equals_attention_with_the_deltas_merged(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first)
    loras = _loras(mha)
    x = torch.randn((2, 7, E) if batch_first else (7, 2, E))
    mask = _causal(7)
    before = mha(x, x, x, need_weights=False, attn_mask=mask)[0]

    merged = nn.MultiheadAttention(E, H, batch_first=batch_first)
    merged.load_state_dict(mha.state_dict())
    with torch.no_grad():
        merged.in_proj_weight += torch.cat([_delta_weight(loras[p]) for p in ("q", "k", "v")])
        merged.out_proj.weight += _delta_weight(loras["out"])
    want = merged(x, x, x, need_weights=False, attn_mask=mask)[0]

    for m in loras.values():
        m.attach(mha)
    got, weights = mha(x, x, x, need_weights=False, attn_mask=mask)
    assert weights is None
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, before, atol=1e-3)

    # each part on its own moves the output too (no part is silently ignored)
    for part, m in loras.items():
        others = [o for p, o in loras.items() if p != part]
        for o in others:
            o.detach()
        alone = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        assert not torch.allclose(alone, before, atol=1e-4), part
        for o in others:
            o.attach(mha)

    for m in loras.values():
        m.detach()
    assert "forward" not in mha.__dict__
    assert torch.equal(mha(x, x, x, need_weights=False, attn_mask=mask)[0], before)


def test_weights_padding_mask_and_no_lora_match_torch():
    """With zero LoRA deltas our forward is torch's attention: weights, padding mask and bool masks."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(E, H)
    loras = _loras(mha)
    for m in loras.values():
        with torch.no_grad():
            m.lora_up.weight.zero_()
    x = torch.randn(5, 3, E)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    bool_mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    ref_out, ref_w = mha(x, x, x, key_padding_mask=pad, attn_mask=bool_mask, need_weights=True)
    for m in loras.values():
        m.attach(mha)
    out, w = mha(x, x, x, key_padding_mask=pad, attn_mask=bool_mask, need_weights=True)
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(w, ref_w, atol=1e-6)


def test_gradients_reach_all_four_parts():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(E, H).requires_grad_(False)
    loras = _loras(mha)
    for m in loras.values():
        m.attach(mha)
    x = torch.randn(6, 2, E)
    mha(x, x, x, need_weights=False, attn_mask=_causal(6))[0].square().sum().backward()
    for part, m in loras.items():
        for p in m.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, part


def test_attaching_a_part_twice_is_refused_and_leaves_the_attention_usable():
    mha = nn.MultiheadAttention(E, H)
    a, b = (LoRAModule(f"n{i}", mha, 2, 1.0, part="q") for i in range(2))
    a.attach(mha)
    with pytest.raises(RuntimeError, match="already attached"):
        b.attach(mha)
    a.detach()
    assert "forward" not in mha.__dict__
