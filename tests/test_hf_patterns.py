"""The patterns that kept Hugging Face architectures from compiling, each in a tiny module trained in
float64 next to PyTorch: a `where` with a broadcast operand (T5's position bias), a cat with an empty
input (Phi-3's partial-rotary pass-through), a view after attention (GPT-2's Conv1D), and Conv1d +
GroupNorm (Whisper's and wav2vec2's front ends)."""

import pytest
import torch
from torch import nn

import pockengine as pe
from conftest import parity

F64 = 1e-10


def batches(shape, classes=3, steps=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (shape[0],), generator=g))
            for _ in range(steps)]


class MaskedBias(nn.Module):
    """scores + where(mask, bias, min): the bias is (1, heads, q, k), the mask (batch, 1, q, k)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, 2, 6, 6))
        self.head = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        mask = (x > 0).unsqueeze(1)  # (batch, 1, 6, 6)
        scores = torch.where(mask, self.bias, torch.finfo(x.dtype).min / 2) + x.unsqueeze(1)
        return self.head(torch.softmax(scores, -1).flatten(1))


class EmptyPassThrough(nn.Module):
    """Rotate all of the last axis and concatenate the (empty) rest, as Phi-3 does."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.proj(x)
        rotated, rest = h[..., :8], h[..., 8:]
        return self.head(torch.cat([torch.cos(rotated) * rotated, rest], dim=-1))


class ViewAfterAttention(nn.Module):
    """GPT-2: attention output transposed, reshaped, `.contiguous()`, then `.view(-1, E)` and addmm."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.weight = nn.Parameter(torch.randn(16, 16) / 4)
        self.bias = nn.Parameter(torch.zeros(16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        b, s, e = x.shape
        q, k, v = (t.view(b, s, 2, 8).transpose(1, 2) for t in self.qkv(x).split(16, dim=2))
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(b, s, -1).contiguous()
        out = torch.addmm(self.bias, out.view(-1, e), self.weight).view(b, s, e)
        return self.head(out.mean(1))


class ConvGroupNorm(nn.Module):
    """wav2vec2's first feature-encoder layer and Whisper's strided Conv1d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 10, stride=5, bias=False)
        self.norm = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv1d(8, 8, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = nn.functional.gelu(self.norm(self.conv(x.unsqueeze(1))))
        return self.head(nn.functional.gelu(self.conv2(h)).mean(-1))


@pytest.mark.parametrize("model, shape", [(MaskedBias, (2, 6, 6)), (EmptyPassThrough, (4, 8)),
                                          (ViewAfterAttention, (2, 5, 16)), (ConvGroupNorm, (2, 80))],
                         ids=["where-broadcast", "cat-empty", "view-after-sdpa", "conv1d-groupnorm"])
def test_pattern_trains_like_pytorch_in_float64(model, shape):
    torch.manual_seed(0)
    _, (worst, where) = parity(model().double().train(), batches(shape), pe.optim.SGD(lr=0.1, momentum=0.9))
    assert worst <= F64, f"{where} differs by {worst:.3g}"
