"""Hand-written example models that ``torch.fx.symbolic_trace`` traces (module-level nodes)."""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, sizes=(16, 32, 32, 4)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


class CNN(nn.Module):
    def __init__(self, channels=(3, 8, 16), classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels[1])
        self.conv2 = nn.Conv2d(channels[1], channels[2], 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels[2])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels[2], classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(torch.flatten(self.pool(x), 1))


class CausalSelfAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections and grouped key-value heads."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, bias: bool = True):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, heads * self.head_dim, bias=bias)
        self.k = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.v = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.o = nn.Linear(heads * self.head_dim, dim, bias=bias)

    def split(self, x, heads):
        b, t, _ = x.shape
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)

    def forward(self, x, rope=None):
        b, t, _ = x.shape
        q, k, v = self.split(self.q(x), self.heads), self.split(self.k(x), self.kv_heads), self.split(
            self.v(x), self.kv_heads
        )
        if rope is not None:
            q, k = rope(q), rope(k)
        if self.kv_heads != self.heads:  # repeat_kv: each key-value head serves heads/kv_heads queries
            group = self.heads // self.kv_heads
            k = k[:, :, None].expand(b, self.kv_heads, group, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
            v = v[:, :, None].expand(b, self.kv_heads, group, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.proj(self.act(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Pre-norm GPT: learned positions, LayerNorm, GELU MLP, output head tied to the embedding."""

    def __init__(self, vocab=64, dim=32, heads=4, hidden=64, layers=2, max_len=32):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(GPTBlock(dim, heads, hidden) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class RotaryEmbedding(nn.Module):
    """RoPE on the last axis (rotate-half convention), cos/sin tables as buffers."""

    def __init__(self, head_dim: int, max_len: int = 64, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(max_len).float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x):
        t = x.shape[-2]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos[:t] + rotated * self.sin[:t]


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.attn = CausalSelfAttention(dim, heads, kv_heads, bias=False)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x, rope):
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class Llama(nn.Module):
    """Llama-style: RMSNorm, SwiGLU, RoPE, grouped-query attention, untied output head."""

    def __init__(self, vocab=64, dim=32, heads=4, kv_heads=2, hidden=48, layers=2, max_len=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rope = RotaryEmbedding(dim // heads, max_len)
        self.blocks = nn.ModuleList(LlamaBlock(dim, heads, kv_heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, self.rope)
        return self.head(self.norm(x))


def _scaled_init(model: nn.Module) -> nn.Module:
    """Give norm gains and biases non-trivial values so tests see them (defaults are 1 and 0)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm2d)) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.uniform_(-0.2, 0.2)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def mlp():
    return MLP(), (torch.randn(4, 16),), {}


def cnn():
    return _scaled_init(CNN()), (torch.randn(2, 3, 16, 16),), {}


def gpt():
    return _scaled_init(GPT()), (torch.randint(0, 64, (2, 12)),), {}


def llama():
    return _scaled_init(Llama()), (torch.randint(0, 64, (2, 12)),), {}


__all__ = ["CNN", "GPT", "MLP", "Llama", "cnn", "gpt", "llama", "mlp"]
