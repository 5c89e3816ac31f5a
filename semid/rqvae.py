"""The RQ-VAE: MLP encoder, residual quantizer, MLP decoder that mirrors the encoder.

With `model.type = "rqkmeans"` the encoder and decoder are identities and the same class is residual
k-means on the (standardised) raw embeddings, so every caller handles one model type.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from semid.config import ModelConfig, QuantizerConfig
from semid.residual import ResidualOutput, ResidualQuantizer

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def mlp(widths: list[int], activation: str, layer_norm: bool) -> nn.Sequential:
    """Linear layers through `widths`; every hidden layer gets (LayerNorm and) the activation."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(widths) - 2:
            if layer_norm:
                layers.append(nn.LayerNorm(d_out))
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


@dataclass
class RQVAEOutput:
    x_hat: torch.Tensor  # (n, D) reconstruction, in standardised units
    latent: torch.Tensor  # (n, d) encoder output, before quantization
    codes: torch.Tensor  # (n, L)
    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    quantizer_loss: torch.Tensor
    residual: ResidualOutput


class RQVAE(nn.Module):
    def __init__(self, input_dim: int, model: ModelConfig, quantizer: QuantizerConfig) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.is_autoencoder = model.type == "rqvae"
        if self.is_autoencoder:
            self.encoder = mlp([input_dim, *model.hidden, model.latent_dim], model.activation, model.layer_norm)
            self.decoder = mlp([model.latent_dim, *reversed(model.hidden), input_dim], model.activation, model.layer_norm)
            latent = model.latent_dim
        else:
            self.encoder, self.decoder = nn.Identity(), nn.Identity()
            latent = input_dim
        self.quantizer = ResidualQuantizer(latent, quantizer)
        self.standardize = model.standardize
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("scale", torch.ones(()))

    @property
    def codebook_sizes(self) -> list[int]:
        return self.quantizer.codebook_sizes

    @torch.no_grad()
    def fit_standardizer(self, x: torch.Tensor) -> None:
        """Centre on the data mean and divide by the root-mean-square element, one factor for all dims."""
        if not self.standardize:
            return
        mean = x.float().mean(0)
        self.mean.copy_(mean)
        self.scale.copy_((x.float() - mean).pow(2).mean().sqrt().clamp_min(1e-12))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.scale

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalize(x))

    def forward(self, x: torch.Tensor) -> RQVAEOutput:
        target = self.normalize(x)
        latent = self.encoder(target).float()
        out = self.quantizer(latent)
        x_hat = self.decoder(out.quantized)
        reconstruction = F.mse_loss(x_hat.float(), target)
        quantizer_loss = self.quantizer.loss(out)
        return RQVAEOutput(x_hat, latent, out.codes, reconstruction + quantizer_loss, reconstruction, quantizer_loss, out)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(n, D) raw embeddings -> (n, L) int64 codes."""
        return self.quantizer.encode(self.latent(x))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(n, L) codes -> (n, D) reconstruction in the input's units."""
        return self.decoder(self.quantizer.decode(codes)).float() * self.scale + self.mean
