"""Small reference models for the demo, the tests and the experiments.

* :class:`GPT` — a nanoGPT-style decoder (karpathy/nanoGPT model.py): token + position embeddings, pre-LN
  blocks of causal self-attention (``F.scaled_dot_product_attention``) and a GELU MLP, weight-tied LM head.
* :class:`ConvNet` — a CNN with BatchNorm (conv-BN-ReLU stages, pooling, a linear head).
* :class:`TiedMLP` — an autoencoder-style MLP whose decoder reuses the encoder's weight (tied) and uses
  in-place ReLU.

They are deliberately plain PyTorch: nothing here knows about memprof.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "GPT", "ConvNet", "TiedMLP", "gpt_batch", "DEMO_GPT"]


@dataclass
class GPTConfig:
    block_size: int = 256  # longest sequence the position table covers
    vocab_size: int = 4096  # small vocabulary keeps the demo's logits from dominating memory
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 256
    dropout: float = 0.0  # 0 for exact reproducibility; the apply tests turn it on
    bias: bool = True


DEMO_GPT = GPTConfig()  # ~6.8M parameters: a CPU step takes well under a second


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(idx, targets)`` returns the mean cross-entropy loss."""

    def __init__(self, cfg: GPTConfig | None = None):
        super().__init__()
        cfg = cfg or GPTConfig()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (nanoGPT)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def gpt_batch(cfg: GPTConfig, batch_size: int = 4, seq_len: int | None = None, device="cpu", seed: int = 0):
    """Random token ids and next-token targets, ``(B, T)`` int64 each."""
    g = torch.Generator().manual_seed(seed)
    T = seq_len or cfg.block_size
    idx = torch.randint(0, cfg.vocab_size, (batch_size, T + 1), generator=g)
    return idx[:, :-1].contiguous().to(device), idx[:, 1:].contiguous().to(device)


class ConvNet(nn.Module):
    """conv-BN-ReLU stages with max-pooling, global average pooling and a linear classifier."""

    def __init__(self, channels=(32, 64, 128), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers, c_in = [], in_channels
        for c in channels:
            layers.append(nn.Sequential(
                nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                nn.MaxPool2d(2),
            ))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.head(x.mean(dim=(2, 3)))


class TiedMLP(nn.Module):
    """MLP whose output projection shares the input projection's weight (tied), with in-place ReLUs."""

    def __init__(self, dim: int = 1024, depth: int = 3):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.hidden = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.act = nn.ReLU(inplace=True)
        self.proj_out = nn.Linear(dim, dim)
        self.proj_out.weight = self.proj_in.weight  # tied: one storage, two modules

    def forward(self, x):
        h = self.act(self.proj_in(x))
        for layer in self.hidden:
            h = self.act(layer(h))
        return self.proj_out(h)
