"""Peer tokenizers that semid is measured against, behind one small interface.

Each peer is what a practitioner would reach for instead of semid:
- `FaissResidualQuantizer`: FAISS `ResidualQuantizer` (greedy encoding, beam 1), trained on the data.
- `ResidualKMeans`: plain greedy residual k-means, one `faiss.Kmeans` per level on the residual.
- `VQPytorchRVQ`: vector-quantize-pytorch `ResidualVQ` inside the same MLP autoencoder as semid's TIGER
  configuration, trained with Adam on MSE + commitment loss.

All three expose `fit(x, levels, codebook_size, seed) -> self`, `encode(x) -> (n, L) int64` and
`reconstruct(x) -> (n, d) float32`, with host numpy arrays in and out, so the benchmark measures every
system (semid included) through the same calls and the same metric function.

These are benchmark-only dependencies (the `bench` extra): the semid package never imports this file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class Peer(Protocol):
    """What the benchmark needs from a tokenizer."""

    name: str

    def fit(self, x: np.ndarray, levels: int, codebook_size: int, seed: int) -> "Peer": ...

    def encode(self, x: np.ndarray) -> np.ndarray: ...

    def reconstruct(self, x: np.ndarray) -> np.ndarray: ...


def as_matrix(x: np.ndarray) -> np.ndarray:
    """Validate and convert input to a C-contiguous float32 (n, d) matrix (what FAISS requires)."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"expected a non-empty 2-D array (items, dim), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"expected a numeric array, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("input contains NaN or infinite values")
    return x


def _check_shape(levels: int, codebook_size: int) -> None:
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if codebook_size < 2:
        raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")


def _check_fitted(fitted: object, name: str) -> None:
    if fitted is None:
        raise ValueError(f"{name} is not fitted: call fit(x, levels, codebook_size, seed) first")


def unpack_codes(packed: np.ndarray, levels: int, nbits: int) -> np.ndarray:
    """Bit-packed FAISS codes (n, code_size) uint8 -> (n, levels) int64.

    FAISS packs the code of level l into bits [l * nbits, (l + 1) * nbits) of each row, least
    significant bit first within the stream (its BitstringWriter), so the bytes are unpacked in
    little-endian bit order and each group of nbits is read as a little-endian integer.
    """
    n = packed.shape[0]
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : levels * nbits]  # (n, levels * nbits)
    bits = bits.reshape(n, levels, nbits).astype(np.int64)  # (n, l, b)
    weights = np.left_shift(1, np.arange(nbits, dtype=np.int64))  # (b,)
    return bits @ weights  # (n, l)


@dataclass
class FaissResidualQuantizer:
    """FAISS `ResidualQuantizer` with greedy (beam 1) encoding, trained on the data."""

    name: str = "faiss-rq"
    _rq: object = field(default=None, init=False, repr=False)
    _levels: int = field(default=0, init=False, repr=False)
    _nbits: int = field(default=0, init=False, repr=False)

    def fit(self, x: np.ndarray, levels: int, codebook_size: int, seed: int) -> "FaissResidualQuantizer":
        import faiss

        _check_shape(levels, codebook_size)
        nbits = int(codebook_size).bit_length() - 1
        if 1 << nbits != codebook_size:
            raise ValueError(f"FAISS ResidualQuantizer needs a power-of-two codebook_size, got {codebook_size}")
        x = as_matrix(x)
        rq = faiss.ResidualQuantizer(x.shape[1], levels, nbits)
        rq.max_beam_size = 1
        rq.cp.seed = seed
        rq.cp.min_points_per_centroid = 1  # only silences FAISS's "provide more points" warning on small sets
        rq.train(x)
        self._rq, self._levels, self._nbits = rq, levels, nbits
        return self

    def _packed(self, x: np.ndarray) -> np.ndarray:
        _check_fitted(self._rq, self.name)
        return self._rq.compute_codes(as_matrix(x))  # (n, code_size) uint8

    def encode(self, x: np.ndarray) -> np.ndarray:
        return unpack_codes(self._packed(x), self._levels, self._nbits)

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        return self._rq.decode(self._packed(x))

    def codebooks(self) -> np.ndarray:
        """The trained codewords as (levels, codebook_size, d)."""
        import faiss

        _check_fitted(self._rq, self.name)
        flat = faiss.vector_to_array(self._rq.codebooks)
        return flat.reshape(self._levels, 1 << self._nbits, self._rq.d)


@dataclass
class ResidualKMeans:
    """Greedy residual k-means: k-means on the input, then on what is left, level by level."""

    niter: int = 20
    name: str = "faiss-rkmeans"
    _indexes: list = field(default_factory=list, init=False, repr=False)  # one flat index per level
    _centroids: list = field(default_factory=list, init=False, repr=False)  # [(k, d)] per level

    def fit(self, x: np.ndarray, levels: int, codebook_size: int, seed: int) -> "ResidualKMeans":
        import faiss

        _check_shape(levels, codebook_size)
        residual = as_matrix(x).copy()  # (n, d)
        if residual.shape[0] < codebook_size:
            raise ValueError(f"need at least codebook_size={codebook_size} items to fit, got {residual.shape[0]}")
        self._indexes, self._centroids = [], []
        for level in range(levels):
            km = faiss.Kmeans(
                residual.shape[1], codebook_size, niter=self.niter, seed=seed + level, min_points_per_centroid=1
            )
            km.train(residual)
            self._indexes.append(km.index)
            self._centroids.append(km.centroids)
            _, assign = km.index.search(residual, 1)  # (n, 1)
            residual -= km.centroids[assign[:, 0]]
        return self

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes (n, L) int64 and the reconstruction (n, d), from one greedy pass."""
        _check_fitted(self._indexes or None, self.name)
        x = as_matrix(x)
        residual = x.copy()
        codes = np.empty((x.shape[0], len(self._indexes)), dtype=np.int64)
        for level, (index, centroids) in enumerate(zip(self._indexes, self._centroids)):
            _, assign = index.search(residual, 1)  # (n, 1)
            codes[:, level] = assign[:, 0]
            residual -= centroids[assign[:, 0]]
        return codes, x - residual

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self._run(x)[0]

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        return self._run(x)[1]


def _mlp(widths: list[int]):
    """Linear layers with ReLU between them and none after the last (the latent / output is linear)."""
    from torch import nn

    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(w_in, w_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class VQPytorchRVQ:
    """vector-quantize-pytorch `ResidualVQ` in an MLP autoencoder shaped like semid's TIGER config.

    The library is used as shipped (EMA codebooks, its own k-means init on the first batch); only the
    commitment weight is set, to the same 0.25 semid's configs use, so the comparison is about the
    quantizer and not about a loss weight.
    """

    steps: int = 3000
    batch_size: int = 1024
    lr: float = 1e-3
    hidden: tuple[int, ...] = (512, 256, 128)
    latent_dim: int = 32
    commitment: float = 0.25
    device: str = "cpu"
    encode_batch: int = 8192
    name: str = "vqtorch-rvq"
    _model: object = field(default=None, init=False, repr=False)

    def fit(self, x: np.ndarray, levels: int, codebook_size: int, seed: int) -> "VQPytorchRVQ":
        import torch
        from torch import nn
        from vector_quantize_pytorch import ResidualVQ

        _check_shape(levels, codebook_size)
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        torch.manual_seed(seed)
        data = torch.from_numpy(as_matrix(x)).to(self.device)  # (n, d)
        dim = data.shape[1]
        model = nn.ModuleDict(
            {
                "encoder": _mlp([dim, *self.hidden, self.latent_dim]),
                "rvq": ResidualVQ(
                    dim=self.latent_dim,
                    num_quantizers=levels,
                    codebook_size=codebook_size,
                    kmeans_init=True,
                    commitment_weight=self.commitment,
                ),
                "decoder": _mlp([self.latent_dim, *reversed(self.hidden), dim]),
            }
        ).to(self.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        model.train()
        for _ in range(self.steps):
            batch = data[torch.randint(data.shape[0], (self.batch_size,), generator=generator).to(self.device)]
            quantized, _, commit = model["rvq"](model["encoder"](batch))  # commit: (levels,)
            loss = nn.functional.mse_loss(model["decoder"](quantized), batch) + commit.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        self._model = model
        return self

    def _run(self, x: np.ndarray, want_reconstruction: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Codes (n, L) int64 and, when asked, the decoder output (n, d), in bounded-memory batches."""
        import torch

        _check_fitted(self._model, self.name)
        data = torch.from_numpy(as_matrix(x))
        codes, recons = [], []
        with torch.no_grad():
            for chunk in data.split(self.encode_batch):
                quantized, idx, _ = self._model["rvq"](self._model["encoder"](chunk.to(self.device)))
                codes.append(idx.cpu())
                if want_reconstruction:
                    recons.append(self._model["decoder"](quantized).float().cpu())
        codes_np = torch.cat(codes).numpy().astype(np.int64)
        return codes_np, (torch.cat(recons).numpy() if want_reconstruction else None)

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self._run(x, want_reconstruction=False)[0]

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        return self._run(x, want_reconstruction=True)[1]
