"""Model shapes users train, for the scale gates: a ResNet-18 for 32x32 images (62 parameter
tensors) and a 12-layer pre-norm transformer (150 tensors), torch only, CPU-sized widths."""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout with the CIFAR stem (3x3 conv, no max-pool)."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        layers, cin = [], w[0]
        for i, c in enumerate(w):
            layers += [_Block(cin, c, 1 if i == 0 else 2), _Block(c, c, 1)]
            cin = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.layers(x).mean((2, 3)))


class Transformer(nn.Module):
    """A GPT-style language model: token and position embeddings, ``layers`` pre-norm
    blocks (nn.TransformerEncoderLayer, causal), a final norm and an untied head."""

    def __init__(self, layers: int = 12, d: int = 128, heads: int = 4, vocab: int = 512,
                 context: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context),
                             persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for b in self.blocks:
            x = b(x, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x)).flatten(0, 1)


def resnet_batch(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def transformer_batch(n: int = 8, context: int = 64, vocab: int = 512, seed: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (n, context + 1), generator=g)
    return idx[:, :-1], idx[:, 1:].reshape(-1)


class Wide(nn.Module):
    """``tensors`` parameter tensors in ``tensors // 2`` small Linear layers, each applied to
    the input and summed: the number of tensors of a large model at a CPU-sized cost."""

    def __init__(self, tensors: int = 5000, d: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, classes) for _ in range(tensors // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(layer(x) for layer in self.layers)


def wide_batch(n: int = 8, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 10, (n,), generator=g)
