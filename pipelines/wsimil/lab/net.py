"""The attention-MIL tumour network: a small tile encoder and a gated-attention head (torch).

The encoder maps one RGB tile of :data:`~pipelines.wsimil.preprocess.TILE_PX`
pixels at :data:`~pipelines.wsimil.preprocess.MODEL_MPP` um/pixel, values in
[0, 1] (:func:`~pipelines.wsimil.preprocess.to_model_input`), to an embedding
``h_k`` of :data:`EMBED_DIM` values. The head is the gated attention pooling
of Ilse, Tomczak and Welling, "Attention-based deep multiple instance
learning", ICML 2018 (their equation 9):

* ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))``;
* ``z = sum_k a_k h_k``;
* slide logit ``= c^T z + b``.

The same classifier applied to each embedding gives a tile logit
``c^T h_k + b``; because the classifier is affine and the weights sum to 1,
the slide logit is the attention-weighted mean of the tile logits, and the
tile probabilities are the localisation (a tile segmentation).

The two halves are exported as two ONNX graphs so that a whole slide can be
embedded in batches of any size and pooled once at the end.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMBED_DIM", "ATTENTION_DIM", "MilHead", "TileEncoder", "count_parameters"]

EMBED_DIM = 64
ATTENTION_DIM = 32


class TileEncoder(nn.Module):
    """Small CNN, ``[N, 3, 32, 32]`` in [0, 1] -> ``[N, EMBED_DIM]``.

    Four 3x3 convolutions (widths ``widths``) with ReLU, each of the first
    three followed by 2x2 max pooling (32 -> 16 -> 8 -> 4), global average
    pooling, then a linear layer with ReLU. No normalisation layers: a bag
    is one slide, so batch statistics would carry that slide's stain and
    differ between training and inference.

    Parameters
    ----------
    widths : tuple of int
        Channels of the four convolutions.
    dim : int
        Embedding size.
    """

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 48, 64), dim: int = EMBED_DIM) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.Linear(c_in, dim), nn.ReLU(inplace=True))
        self.dim = dim

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """Embed tiles, ``[N, 3, H, W]`` -> ``[N, dim]``."""
        # Centre the [0, 1] input so that the first layer starts balanced.
        f = self.features(tiles - 0.5)
        return self.proj(f.mean(dim=(2, 3)))


class MilHead(nn.Module):
    """Gated attention pooling and a shared linear classifier.

    Parameters
    ----------
    dim : int
        Embedding size (``h_k``).
    att_dim : int
        Hidden size of the attention network (rows of ``V`` and ``U``).
    """

    def __init__(self, dim: int = EMBED_DIM, att_dim: int = ATTENTION_DIM) -> None:
        super().__init__()
        self.V = nn.Linear(dim, att_dim)
        self.U = nn.Linear(dim, att_dim)
        self.w = nn.Linear(att_dim, 1)
        self.classifier = nn.Linear(dim, 1)

    def attention_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention ``w^T (tanh(V h) * sigmoid(U h))``, ``[N, dim]`` -> ``[N]``."""
        return self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)

    def logits(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slide logit ``[1]``, attention ``[N]`` (sums to 1) and tile logits ``[N]`` of one bag."""
        a = torch.softmax(self.attention_logits(h), dim=0)
        z = (a.unsqueeze(-1) * h).sum(dim=0, keepdim=True)
        slide = self.classifier(z).reshape(1)
        tile = self.classifier(h).squeeze(-1)
        return slide, a, tile

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slide probability ``[1]``, attention ``[N]`` and tile probabilities ``[N]`` (the exported graph)."""
        slide, a, tile = self.logits(h)
        return torch.sigmoid(slide), a, torch.sigmoid(tile)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (weights and biases, frozen or not)."""
    return sum(p.numel() for p in module.parameters())
