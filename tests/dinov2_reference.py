"""An independent forward pass over a state dict in DINOv2's published key layout.

Written from facebookresearch/dinov2 (``dinov2/models/vision_transformer.py``,
``layers/{patch_embed,attention,block,layer_scale,mlp,swiglu_ffn}.py``) as a plain function of
the tensors, so the timm conversion can be checked against what the original model computes:

- ``prepare_tokens_with_masks``: patch embedding (conv ``patch_embed.proj``, flattened), the
  class token prepended, ``pos_embed`` added to [cls, patches] (interpolation is not needed at
  the trained grid), then ``register_tokens`` inserted after the class token (no position);
- ``NestedTensorBlock``: ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``, LayerNorm
  eps 1e-6, attention ``qkv`` -> (3, heads, head_dim), softmax(q k^T / sqrt(d)) v, ``proj``;
  MLP ``fc1`` -> GELU -> ``fc2``, or SwiGLU ``w12`` -> silu(x1) * x2 -> ``w3``;
- ``forward_features``: final ``norm``; ``x_norm_clstoken`` = token 0, patch tokens after the
  class and register tokens.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F


def _ln(x, state, prefix):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-6)


def _linear(x, state, prefix):
    return F.linear(x, state[f"{prefix}.weight"], state.get(f"{prefix}.bias"))


def dinov2_forward(state: dict[str, torch.Tensor], x: torch.Tensor, num_heads: int) -> dict[str, torch.Tensor]:
    """``{"cls": x_norm_clstoken, "patch_mean": x_norm_patchtokens.mean(1)}`` of a DINOv2 ViT."""
    patch = state["patch_embed.proj.weight"].shape[-1]
    tokens = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2)
    n = tokens.shape[0]
    tokens = torch.cat([state["cls_token"].expand(n, -1, -1), tokens], dim=1) + state["pos_embed"]
    n_registers = 0
    if "register_tokens" in state:
        registers = state["register_tokens"].expand(n, -1, -1)
        n_registers = registers.shape[1]
        tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    for i in range(depth):
        b = f"blocks.{i}"
        h = _ln(tokens, state, f"{b}.norm1")
        qkv = _linear(h, state, f"{b}.attn.qkv")
        B, N, C3 = qkv.shape
        dim = C3 // 3
        qkv = qkv.reshape(B, N, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (dim // num_heads) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(B, N, dim)
        h = _linear(h, state, f"{b}.attn.proj")
        tokens = tokens + state[f"{b}.ls1.gamma"] * h
        h = _ln(tokens, state, f"{b}.norm2")
        if f"{b}.mlp.w12.weight" in state:
            x1, x2 = _linear(h, state, f"{b}.mlp.w12").chunk(2, dim=-1)
            h = _linear(F.silu(x1) * x2, state, f"{b}.mlp.w3")
        else:
            h = _linear(F.gelu(_linear(h, state, f"{b}.mlp.fc1")), state, f"{b}.mlp.fc2")
        tokens = tokens + state[f"{b}.ls2.gamma"] * h
    normed = _ln(tokens, state, "norm")
    return {"cls": normed[:, 0], "patch_mean": normed[:, 1 + n_registers :].mean(dim=1)}


def random_dinov2_state(
    embed_dim: int, depth: int, patch: int, grid: int, registers: int = 0, swiglu: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A DINOv2-layout backbone state dict with random tensors (``mask_token`` included)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s  # noqa: E731
    state = {
        "cls_token": r(1, 1, embed_dim),
        "pos_embed": r(1, 1 + grid * grid, embed_dim),
        "mask_token": r(1, embed_dim),
        "patch_embed.proj.weight": r(embed_dim, 3, patch, patch, s=0.05),
        "patch_embed.proj.bias": r(embed_dim),
        "norm.weight": 1 + r(embed_dim),
        "norm.bias": r(embed_dim),
    }
    if registers:
        state["register_tokens"] = r(1, registers, embed_dim)
    hidden = 4 * embed_dim
    for i in range(depth):
        b = f"blocks.{i}"
        state.update({
            f"{b}.norm1.weight": 1 + r(embed_dim), f"{b}.norm1.bias": r(embed_dim),
            f"{b}.attn.qkv.weight": r(3 * embed_dim, embed_dim), f"{b}.attn.qkv.bias": r(3 * embed_dim),
            f"{b}.attn.proj.weight": r(embed_dim, embed_dim), f"{b}.attn.proj.bias": r(embed_dim),
            f"{b}.ls1.gamma": 0.5 + r(embed_dim),
            f"{b}.norm2.weight": 1 + r(embed_dim), f"{b}.norm2.bias": r(embed_dim),
            f"{b}.ls2.gamma": 0.5 + r(embed_dim),
        })
        if swiglu:
            state.update({
                f"{b}.mlp.w12.weight": r(2 * hidden, embed_dim), f"{b}.mlp.w12.bias": r(2 * hidden),
                f"{b}.mlp.w3.weight": r(embed_dim, hidden), f"{b}.mlp.w3.bias": r(embed_dim),
            })
        else:
            state.update({
                f"{b}.mlp.fc1.weight": r(hidden, embed_dim), f"{b}.mlp.fc1.bias": r(hidden),
                f"{b}.mlp.fc2.weight": r(embed_dim, hidden), f"{b}.mlp.fc2.bias": r(embed_dim),
            })
    return state
