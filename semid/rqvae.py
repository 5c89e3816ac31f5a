"""The RQ-VAE: MLP encoder, residual quantizer, MLP decoder that mirrors the encoder.

With `model.type = "rqkmeans"` the encoder and decoder are identities and the same class is residual
k-means on the (standardised) raw embeddings, so every caller handles one model type.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from semid.config import ModelConfig, QuantizerConfig
from semid.residual import ResidualOutput, ResidualQuantizer

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
# Rows per encode block on a CPU: bounds the activations (16384 rows of a 1024-wide layer are 64 MiB) while
# keeping blocks large enough that per-block costs and thread synchronisation do not show: on a busy
# 2-core host, 4096-row blocks encoded up to 3x slower. On a GPU the caller sizes its batches.
_CPU_ENCODE_BLOCK_ROWS = 16384


def _onednn_linear() -> Callable[..., torch.Tensor] | None:
    """torch's oneDNN linear kernel (the one torch.compile emits on CPU), or None where the build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear()
# Devices where `_linear` runs a ReLU inside the matrix product: on a CPU, torch._addmm_activation is a plain
# addmm then ReLU, and slower than F.linear's oneDNN path for bf16 (and fp32 has oneDNN already).
_RELU_IN_PRODUCT = {"cuda"}


def _linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """F.linear, then ReLU where `relu`, through the fastest kernel for inference.

    fp32 on a CPU: oneDNN, which on the 2-core AMD host of bench/speed_cpu.json runs the TIGER encoder's layers
    about 15% faster than F.linear's MKL gemm, at the same precision. On CUDA the ReLU runs inside the matrix
    product (`torch._addmm_activation`: cuBLASLt's bias+ReLU epilogue), so the layer's output is written
    once instead of written, read and written again: in bf16 that is about a quarter of the memory traffic
    of the TIGER encoder (bench_speed.py's `encode_phases` times it). Neither kernel has a backward, so
    anything that needs a gradient takes F.linear, and so does everything while torch.backends.mkldnn is
    switched off on a CPU.
    """
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad or bias.requires_grad)
    onednn = _ONEDNN_LINEAR is not None and torch.backends.mkldnn.enabled
    if not needs_grad and onednn and h.device.type == "cpu" and h.dtype == torch.float32:
        out = _ONEDNN_LINEAR(h, weight, bias, "none", [], "")
    elif not needs_grad and relu and h.device.type in _RELU_IN_PRODUCT and h.dim() == 2:
        return torch._addmm_activation(bias, h, weight.t())
    else:
        out = F.linear(h, weight, bias)
    return F.relu(out, inplace=not needs_grad) if relu else out


def _centred_as(x: torch.Tensor, mean: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x - mean, computed in fp32 and rounded once to `dtype`.

    Where no gradient is needed it is one pass on a GPU, reading x and writing the low-precision result: an
    `out=` of another dtype is cast inside the kernel there (a CPU makes a temporary, with the same values).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return (x.float() - mean).to(dtype)
    return torch.sub(x, mean, out=torch.empty(x.shape, dtype=dtype, device=x.device))


@contextlib.contextmanager
def dropout_after_activations(decoder: nn.Module, p: float) -> Iterator[None]:
    """Dropout of rate p on the output of every hidden activation of `decoder` while inside (p = 0: none).

    For the decoder refit: with the codes fixed, dropout stops the decoder from becoming a lookup table of
    the training items' tuples, so it reads new items' tuples better, at no cost to the codes (Beauty fitted
    on 90%: held-out fvu 0.544 -> 0.510 at p = 0.1 and 1,000 refit steps, bench/HELDOUT.md). Forward hooks,
    not modules, so the saved weights keep the keys of a decoder without dropout.
    """
    hooks = [] if p == 0 else [
        module.register_forward_hook(lambda _module, _inputs, output: F.dropout(output, p, training=True))
        for module in decoder.modules() if isinstance(module, tuple(_ACTIVATIONS.values()))
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def mlp(widths: list[int], activation: str, layer_norm: bool, dropout: float = 0.0) -> nn.Sequential:
    """Linear layers through `widths`; every hidden layer gets (LayerNorm,) the activation (and dropout).

    Dropout adds a module only when it is on, so a model without it keeps the layer indices, and so the
    checkpoint keys, it had before dropout existed.
    """
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(widths) - 2:
            if layer_norm:
                layers.append(nn.LayerNorm(d_out))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class FixedRMS(nn.Module):
    """Rescales each row to one root-mean-square element: only the row's direction passes, never its length."""

    def __init__(self, rms: float) -> None:
        super().__init__()
        self.rms = rms

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(h, h.shape[-1:]) * self.rms

    def extra_repr(self) -> str:
        return f"rms={self.rms}"


@dataclass
class RQVAEOutput:
    x_hat: torch.Tensor  # (n, D) reconstruction, in standardised units
    latent: torch.Tensor  # (n, d) encoder output, before quantization
    codes: torch.Tensor  # (n, L)
    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    quantizer_loss: torch.Tensor
    residual: ResidualOutput


def scaled_squares_(deviations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(deviations / peak)² in place, and peak, the largest |element| (1 where there is none).

    Squares of float32 values underflow to zero below about 1e-19 and overflow above 1e19: divided by their
    peak first, sums of squares of a catalogue at 1e-20 come out as those of one at 1. In place, because
    the argument is catalogue-sized, and on a GPU a second copy of it is memory the training run lacks.
    """
    low, high = torch.aminmax(deviations)
    peak = torch.maximum(-low, high)
    peak = peak if peak > 0 else torch.ones_like(peak)
    return deviations.div_(peak).pow_(2), peak


def rms_spread(deviations: torch.Tensor) -> torch.Tensor:
    """Root-mean-square element of (n, D) deviations from a mean (overwritten), at any scale float32 can hold;
    1 where there is no spread at all, so that dividing by it stays finite."""
    squares, peak = scaled_squares_(deviations)
    rms = peak * squares.mean().sqrt()
    return rms if rms > 0 else torch.ones_like(rms)


class RQVAE(nn.Module):
    def __init__(self, input_dim: int, model: ModelConfig, quantizer: QuantizerConfig) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.is_autoencoder = model.type == "rqvae"
        if self.is_autoencoder:
            self.encoder = mlp([input_dim, *model.hidden, model.latent_dim], model.activation, model.layer_norm)
            if model.latent_norm:  # parameterless, so the checkpoint keys stay those of a model without it
                self.encoder.append(FixedRMS(model.latent_norm))
            self.decoder = mlp([model.latent_dim, *reversed(model.hidden), input_dim], model.activation,
                               model.layer_norm, model.decoder_dropout)
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
        self.scale.copy_(rms_spread(x.float() - mean))  # x.float() - mean is a new tensor: rms_spread may overwrite it

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw embeddings in standardised units: the space the decoder reconstructs and the loss is taken in."""
        return (x.float() - self.mean) / self.scale

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """(n, D) raw embeddings -> (n, d) encoder output (the standardised input, for rqkmeans).

        The encoder modules as training runs them, rearranged for a cheap pass over large inputs. In fp32 the
        standardiser is folded into the first linear layer, so the input is read once by the matrix product
        instead of also by a subtract and a divide. Under autocast only the scale is folded: the offset is
        taken off in fp32 first, as training does, and the result rounded once to the low precision (one
        pass, where training's subtract, divide and cast make three); folded, the cast would round the raw
        values, whose offset from the mean can be much smaller than the values themselves. A ReLU runs inside
        the matrix product before it where no gradient is needed (`_linear`).
        """
        if not self.is_autoencoder:
            return self.normalize(x)
        low = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if low else torch.float32
        h = _centred_as(x, self.mean, dtype) if low else x.float()
        layers = list(self.encoder)
        relu_after = [isinstance(layer, nn.Linear) and isinstance(then, nn.ReLU)  # that ReLU runs in the product
                      for layer, then in zip(layers, [*layers[1:], None])]
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Linear):
                weight, bias = self._folded_input_layer(layer, centred=low) if i == 0 else (layer.weight, layer.bias)
                h = _linear(h.to(dtype), weight.to(dtype), bias.to(dtype), relu=relu_after[i])
            elif not (i > 0 and relu_after[i - 1]):
                h = layer(h)
        return h

    def _folded_input_layer(self, first: nn.Linear, centred: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of first(normalize(x)) as one layer on x (raw: W / s and b - (W / s) m) or on x - m
        (`centred`: W / s and b).

        Computed on every call (a (h, D) elementwise op, far cheaper than the layer itself), so it can never
        go stale while the model trains.
        """
        weight = first.weight / self.scale
        return weight, first.bias if centred else torch.addmv(first.bias, weight, self.mean, alpha=-1.0)

    def forward(self, x: torch.Tensor, row_weights: torch.Tensor | None = None) -> RQVAEOutput:
        """Training pass. `row_weights` (n,) weight each row's reconstruction error (importance sampling);
        the latent-space losses stay plain means over the rows drawn."""
        target = self.normalize(x)
        latent = self.encoder(target).float()
        out = self.quantizer(latent)
        x_hat = self.decoder(out.quantized)
        if row_weights is None:
            reconstruction = F.mse_loss(x_hat.float(), target)
        else:
            reconstruction = ((x_hat.float() - target).pow(2).mean(-1) * row_weights).mean()
        quantizer_loss = self.quantizer.loss(out)
        return RQVAEOutput(x_hat, latent, out.codes, reconstruction + quantizer_loss, reconstruction, quantizer_loss, out)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(n, D) raw embeddings -> (n, L) int64 codes, on x's device.

        On a CPU the rows go through the encoder and every level in blocks, which bounds the memory of the
        activations whatever the number of rows.
        """
        block = _CPU_ENCODE_BLOCK_ROWS
        if x.device.type != "cpu" or x.shape[0] <= block:
            return self.quantizer.encode(self.latent(x))
        codes = torch.empty(x.shape[0], len(self.codebook_sizes), dtype=torch.long)
        for start in range(0, x.shape[0], block):
            codes[start : start + block] = self.quantizer.encode(self.latent(x[start : start + block]))
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(n, L) codes -> (n, D) reconstruction in the input's units."""
        return self.decoder(self.quantizer.decode(codes)).float() * self.scale + self.mean
