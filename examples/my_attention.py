"""The smallest mixer attnbench benchmarks: exact attention through PyTorch's fused kernel, as a
plain nn.Module (docs/custom_attention.md walks through checking and benchmarking it).

    make conformance TARGET=examples.my_attention.MyAttention ARGS="model.exact=true model.memory_order=1"
"""
import torch.nn.functional as F
from torch import nn


class MyAttention(nn.Module):
    def __init__(self, d_model, n_heads, causal=True):
        super().__init__()
        self.h, self.causal = n_heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)  # named as vanilla's, so the exactness
        self.out = nn.Linear(d_model, d_model, bias=False)      # check can put its weights in

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(B, T, D))
