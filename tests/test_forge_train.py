"""Forge's weights made trainable (model/forge_train.py), on a stand-in for Forge's transformer block.

`ForgeLikeBlock` behaves as Forge's BasicTransformerBlock does where it matters here (written for this
test from Forge's behaviour, not copied): its `forward` calls `self._forward`, which adds residuals in
place, and the attention takes `value=` and `transformer_options=`. The model is built under inference
mode, as Forge builds and loads its models, so every weight is an inference tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_train.model.forge_train import float32_embeddings, inference_weights, out_of_place_blocks, own_weights


class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context if value is None else value)
        return self.to_out(torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ v)


class BasicTransformerBlock(nn.Module):  # the class name is what the patch looks for
    def __init__(self, dim):
        super().__init__()
        self.ff_in, self.is_res, self.disable_self_attn = False, True, False
        self.attn1, self.attn2 = Attention(dim), Attention(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.n_heads, self.d_head = 1, dim

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006
        return self._forward(x, context, transformer_options)

    def _forward(self, x, context=None, transformer_options={}):  # noqa: B006
        n = self.attn1(self.norm1(x), transformer_options=transformer_options)
        x += n
        n = self.attn2(self.norm2(x), context=context, transformer_options=transformer_options)
        x += n
        skip = x
        x = self.ff(self.norm3(x))
        x += skip
        return x


class Model(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList([BasicTransformerBlock(dim), BasicTransformerBlock(dim)])

    def forward(self, x, context):
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x, context=context)
        return x


def forge_loaded_model() -> Model:
    torch.manual_seed(0)
    with torch.inference_mode():
        model = Model()
        for p in model.parameters():  # loaded weights, written in place under inference mode
            p.add_(0.01)
    return model


def lora_on(model: Model):
    """A trainable change on the first layer, hooked from outside as our networks do."""
    delta = nn.Parameter(torch.full((8, 8), 0.01))
    handle = model.proj_in.register_forward_hook(lambda m, args, out: out + args[0] @ delta.T)
    return delta, handle


def checksums(model: nn.Module) -> dict[str, bytes]:
    return {name: t.detach().clone().numpy().tobytes() for name, t in model.state_dict().items()}


def test_forge_weights_cannot_be_trained_through_as_loaded():
    model = forge_loaded_model()
    assert inference_weights([model]) == len(list(model.parameters()))
    delta, _ = lora_on(model)
    x, ctx = torch.randn(1, 4, 8), torch.randn(1, 3, 8)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        model(x, ctx).sum().backward()
    model = forge_loaded_model()
    own_weights([model])
    delta, _ = lora_on(model)
    with pytest.raises(RuntimeError, match="inplace"):  # in-place residuals still break the backward
        model(x, ctx).sum().backward()


def test_owned_weights_and_out_of_place_blocks_train_and_leave_the_model_bit_identical():
    model = forge_loaded_model()
    before = checksums(model)
    x, ctx = torch.randn(2, 4, 8), torch.randn(2, 3, 8)
    with torch.inference_mode():
        stock = model(x.clone(), ctx)  # Forge samples under inference mode
    assert own_weights([model]) == len(before)
    assert inference_weights([model]) == 0 and checksums(model) == before
    assert not any(p.requires_grad for p in model.parameters())
    delta, handle = lora_on(model)
    with out_of_place_blocks(model) as patched:
        assert patched == 2 and all("_forward" in b.__dict__ for b in model.blocks)
        out = model(x, ctx)
        out.square().mean().backward()
        with torch.inference_mode():  # the stock forward while Forge samples: same numbers
            sampled = model(x.clone(), ctx)
    handle.remove()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    with torch.no_grad():
        delta.zero_()
    assert not any("_forward" in b.__dict__ for b in model.blocks)
    assert checksums(model) == before
    with torch.no_grad():
        after = model(x.clone(), ctx)
    assert torch.equal(after, stock)
    assert sampled.shape == stock.shape


def test_out_of_place_forward_equals_the_stock_forward():
    model = forge_loaded_model()
    own_weights([model])
    x, ctx = torch.randn(2, 4, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        stock = model(x.clone(), ctx)
    with out_of_place_blocks(model), torch.enable_grad():
        ours = model(x.clone().requires_grad_(True), ctx)
    assert torch.allclose(ours, stock, atol=0, rtol=0)


def test_own_weights_refuses_inference_mode():
    model = forge_loaded_model()
    with torch.inference_mode(), pytest.raises(RuntimeError):
        own_weights([model])


def test_shared_weights_stay_shared():
    with torch.inference_mode():
        a, b = nn.Linear(4, 4), nn.Linear(4, 4)
        b.weight = a.weight
    root = nn.Sequential(a, b)
    assert own_weights([root]) == 3  # a.weight (shared), a.bias, b.bias
    assert root[0].weight is root[1].weight and not root[0].weight.is_inference()


class _TIWrapper(nn.Module):  # Forge's CLIPEmbeddingForTextualInversion: the token embedding, wrapped
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, ids):
        return self.wrapped(ids)


def _forge_like_text_encoders():
    """Forge's JointTextEncoder as loaded: children with transformer.text_model.embeddings, weights in
    fp16 (its text-encoder storage dtype, also on the CPU) and inference tensors."""
    def clip(vocab, dim):
        c = nn.Module()
        c.transformer = nn.Module()
        c.transformer.text_model = nn.Module()
        e = c.transformer.text_model.embeddings = nn.Module()
        e.token_embedding = _TIWrapper(nn.Embedding(vocab, dim))
        e.position_embedding = nn.Embedding(77, dim)
        c.transformer.text_model.encoder = nn.Linear(dim, dim)
        return c
    with torch.inference_mode():
        return nn.ModuleDict({"clip_l": clip(50, 8), "clip_g": clip(50, 16)}).to(torch.float16)


def test_text_encoder_embeddings_become_float32_as_forge_encodes_them():
    """By hand in Forge: a run started before any generation trained 6x slower on the CPU, because the
    embeddings were still fp16 (Forge's first encode makes them fp32) and so were all the captions'
    hidden states."""
    te = _forge_like_text_encoders()
    before = {n: p.clone() for n, p in te.named_parameters()}
    assert float32_embeddings(te) == 4  # token + position, two encoders
    for name, p in te.named_parameters():
        embedding = ".embeddings." in name
        assert p.dtype == (torch.float32 if embedding else torch.float16), name
        assert torch.equal(p.float(), before[name].float()), name  # fp16 -> fp32 is exact
    assert float32_embeddings(te) == 0  # again after a preview: nothing left to do
    own_weights([te])
    hidden = te["clip_l"].transformer.text_model.embeddings.token_embedding(torch.tensor([[1, 2]]))
    assert hidden.dtype == torch.float32 and not any(p.is_inference() for p in te.parameters())


class _ForgeVAE(nn.Module):  # Forge's first_stage_model where the adapter reads it: encoder, quant_conv
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.quant_conv = nn.Conv2d(8, 8, 1)


@pytest.mark.parametrize("no_half_vae", [False, True])
def test_no_half_vae_encodes_a_half_forge_vae_in_float32_and_leaves_it_as_it_was(no_half_vae):
    """Forge keeps its VAE in half precision on a GPU and builds it under inference mode. With no_half_vae
    the encode runs in float32 (an SDXL VAE overflows in fp16), and the VAE's own tensors stay the
    same objects with the same half-precision values."""
    from types import SimpleNamespace

    from lora_train.model.forge import ForgeAdapter

    torch.manual_seed(0)
    with torch.inference_mode():
        vae = _ForgeVAE().half()
    reference = _ForgeVAE()
    reference.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
    before = {k: (v, v.clone()) for k, v in vae.state_dict(keep_vars=True).items()}
    adapter = ForgeAdapter.__new__(ForgeAdapter)  # only the VAE is read here
    adapter.vae_wrapper, adapter._device, adapter.vae_fp32 = SimpleNamespace(first_stage_model=vae), torch.device("cpu"), no_half_vae
    pixels = torch.rand(2, 3, 8, 8) * 2 - 1

    mean, _ = adapter.encode_posterior(pixels)
    with torch.no_grad():
        want = reference.quant_conv(reference.encoder(pixels)).chunk(2, dim=1)[0]
    if no_half_vae:
        assert torch.equal(mean, want), "computed in float32"
    else:
        assert not torch.equal(mean, want) and torch.allclose(mean, want, atol=2e-2), "half precision, as Forge has it"
    after = vae.state_dict(keep_vars=True)
    for key, (tensor, values) in before.items():
        assert after[key] is tensor and tensor.dtype == torch.float16 and torch.equal(tensor, values), key
