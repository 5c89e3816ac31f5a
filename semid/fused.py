"""Greedy residual encoding as one Triton kernel: every level's scores, argmax and residual update on chip.

Encoding the quantizer stack in PyTorch writes and reads an (n, K) fp32 score matrix per level, and the
residual, codeword and codes in between: about 15 KB per item for 3 x 256 codes, which caps a GPU at a
few hundred million items per second before the encoder has done anything. Here each program loads a
block of latents once, keeps the residual in registers through all levels, scans each codebook in chunks
with a running maximum, gathers the chosen codeword, and writes only the (n, L) codes: about 150 bytes
per item.

It computes what `ResidualQuantizer.encode` computes: the same scores (`semid.distance.score_terms`:
x.c - |c|^2/2 for l2, x.c/|c| for cosine), ties to the lowest index, the prefix centre looked up by binary
search in the same sorted key table, the same fp32 residual subtractions. The scores come from tensor
cores in "tf32x3" (three TF32 products that carry about fp32's precision); plain fp32 ("ieee") products
run on CUDA cores and, at these tile sizes, spill registers. So a code can differ where two codewords tie
to within about 1e-6 of the score. Used on CUDA when Triton is importable (it ships with CUDA builds of
torch); SEMID_FUSED=0 turns it off. The tests run it on the CPU through Triton's interpreter.

The kernel is checked where it runs (`checked_codes`): each compiled variant's first batches in a process
are compared with the PyTorch walk, and a kernel that fails to build or launch, or disagrees beyond ties,
is turned off for the process with a `FusedKernelWarning`, so encoding falls back to PyTorch instead of
failing or giving other IDs.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from semid.device import as_current
from semid.distance import score_terms

if TYPE_CHECKING:
    from semid.residual import ResidualQuantizer

tl = None  # triton.language once `_kernel` has imported it: the kernel body reads it from this module's globals
# A program keeps its rows' residuals, one chunk of score vectors and the chunk's scores in registers. These
# (rows, codes) tiles compile for sm_90 without spilling (ptxas, 4 warps: 225 registers at d <= 32, 243 at
# d <= 64); wider latents spill, so `usable` leaves them to PyTorch.
_TILES = {16: (16, 16), 32: (64, 64), 64: (64, 16)}  # by the latent's width padded to a power of two
_WIDEST_FUSED = max(_TILES)
# Each compiled variant of the kernel, on each device, is compared with the PyTorch walk on its first batches
# until this many distinct rows have agreed; at most this share of them (and at least 2 rows) may differ,
# since only sub-round-off ties should. Distinct rows, so that copies of one tied item count once.
_CHECK_ROWS = 1024
_CHECK_TOLERANCE = 0.01
_state = {"checked": {}, "off_because": None}  # checked: (device, dtype, constants) -> distinct rows agreed
_READ_AS_IS = (torch.float32, torch.bfloat16, torch.float16)  # latent dtypes the kernel reads without a cast
# The kernel's first compile on a machine takes tens of seconds (36 s for a 64-d latent, compiled ahead of time
# on a 2-core CPU; Triton keeps it on disk afterwards), which the PyTorch walk of a small batch never costs: by
# arithmetic a GPU walks 65,536 latents through 3 x 256 codes in about a millisecond (0.4 GB of score matrices).
# So only calls of at least this many rows take the kernel (bulk encodes), and a training run's evaluations of a
# catalogue below that size, which encode it in one call, never wait for a compile.
_MIN_ROWS = 65_536


class FusedKernelWarning(RuntimeWarning):
    """The fused GPU kernel failed or disagreed with PyTorch, and encoding fell back to PyTorch."""


@functools.cache
def available() -> bool:
    """Whether Triton can be imported (CUDA builds of torch bring it; CPU builds do not)."""
    return importlib.util.find_spec("triton") is not None


def usable(e: torch.Tensor) -> bool:
    """Whether `ResidualQuantizer.encode` of e should take the fused kernel: at least `_MIN_ROWS` CUDA latents of at
    most 64 dims."""
    return (e.is_cuda and e.shape[0] >= _MIN_ROWS and e.shape[-1] <= _WIDEST_FUSED and available()
            and _state["off_because"] is None and os.environ.get("SEMID_FUSED", "1") != "0")


def _turn_off(reason: str) -> None:
    _state["off_because"] = reason
    warnings.warn(f"semid's fused encode kernel is off for this process ({reason}); encoding continues in "
                  "PyTorch, with the same codes. Please report this with your GPU, torch and triton versions.",
                  FusedKernelWarning, stacklevel=3)


def checked_codes(stack: ResidualQuantizer, e: torch.Tensor,
                  reference: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """`residual_codes(stack, e)`, or None once the kernel is turned off (then the caller uses `reference`).

    Why: the kernel is compiled by whatever Triton and driver the user has, so each compiled variant's first
    batches are compared with `reference` (the PyTorch walk) before their codes are used, until
    `_CHECK_ROWS` distinct rows have agreed.
    """
    try:
        codes = residual_codes(stack, e)
    except torch.OutOfMemoryError:
        raise  # the PyTorch walk needs that memory too: the batch is too large, not the kernel broken
    except Exception as error:  # compile, resource or launch errors of this Triton on this GPU
        _turn_off(f"it failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        return None
    variant = (str(e.device), e.dtype, tuple(sorted(_compile_constants(stack, e.shape[-1]).items())))
    agreed = _state["checked"].get(variant, 0)
    if agreed < _CHECK_ROWS and len(e):
        rows = e[:_CHECK_ROWS]
        differ = (codes[: len(rows)] != reference(rows)).any(-1)
        distinct, differing = _distinct(rows), _distinct(rows[differ])
        if differing > max(2, _CHECK_TOLERANCE * distinct):
            _turn_off(f"its codes differed from PyTorch's on {differing} of {distinct} distinct items")
            return None
        _state["checked"][variant] = agreed + distinct
    return codes


def _distinct(rows: torch.Tensor) -> int:
    return int(torch.unique(rows, dim=0).shape[0]) if len(rows) else 0


def _search_steps(n_keys: int) -> int:
    """Binary-search steps for a table of n_keys, rounded up to a multiple of 8: one compile serves every
    table of up to 255 keys, the next every table up to 65,535, and so on."""
    return max(8, -(-n_keys.bit_length() // 8) * 8)


def _next_power_of_two(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def _residual_encode(
    e_ptr, search_ptr, bias_ptr, codeword_ptr, keys_ptr, centres_ptr, strides_ptr, codes_ptr, n, n_keys,
    D: tl.constexpr, D_PAD: tl.constexpr, K_PAD: tl.constexpr, LEVELS: tl.constexpr,
    CENTRES: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_CODES: tl.constexpr,
):
    """One block of rows through every level.

    e (n, D) fp32, bf16 or fp16 (read as fp32); search (L, K_PAD, D): the score vectors; bias (L, K_PAD): the
    score offsets, -inf for padding codes; codeword (L, K_PAD, D): what is subtracted; keys (n_keys,) sorted
    int64 prefix keys with centres (n_keys, D), and strides (L - 1,) that make a prefix's key; codes (n, L)
    int64 output.
    n_keys is a runtime value, so a new model's table needs no new compile; the binary search runs
    SEARCH_STEPS >= log2(n_keys) + 1 steps, idle once its bounds meet.
    """
    # int64 offsets: rows * D passes 2^31 from 5.6M rows of a 384-d input
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    row_ok = rows < n
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    chunk = tl.arange(0, BLOCK_CODES)
    residual = tl.load(e_ptr + rows[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                       other=0.0).to(tl.float32)
    key = tl.zeros([BLOCK_ROWS], dtype=tl.int64)
    for level in tl.static_range(LEVELS):
        if CENTRES and level == LEVELS - 1:  # prefix centre: binary search (lower bound) of the key
            lo = tl.zeros([BLOCK_ROWS], dtype=tl.int64)
            hi = tl.zeros([BLOCK_ROWS], dtype=tl.int64) + n_keys
            for _ in tl.static_range(SEARCH_STEPS):
                mid = (lo + hi) // 2
                probe = tl.load(keys_ptr + mid, mask=mid < n_keys, other=0)
                active = lo < hi
                lo, hi = tl.where(active & (probe < key), mid + 1, lo), tl.where(active & (probe >= key), mid, hi)
            at = tl.minimum(lo, n_keys - 1)
            found = (tl.load(keys_ptr + at) == key) & row_ok
            centre = tl.load(centres_ptr + at[:, None] * D + dims[None, :], mask=found[:, None] & dim_ok[None, :],
                             other=0.0)
            residual = residual - centre
        best = tl.full([BLOCK_ROWS], float("-inf"), dtype=tl.float32)
        code = tl.zeros([BLOCK_ROWS], dtype=tl.int64)
        for start in tl.static_range(0, K_PAD, BLOCK_CODES):
            codes_here = start + chunk
            vectors = tl.load(search_ptr + (level * K_PAD + codes_here[None, :]) * D + dims[:, None],
                              mask=dim_ok[:, None], other=0.0)  # (D_PAD, BLOCK_CODES)
            scores = tl.dot(residual, vectors, input_precision="tf32x3")
            scores = scores + tl.load(bias_ptr + level * K_PAD + codes_here)[None, :]
            top = tl.max(scores, axis=1)
            at_top = tl.argmax(scores, axis=1).to(tl.int64) + start
            better = top > best  # strict: an earlier chunk keeps a tie, as the lowest index must
            best = tl.where(better, top, best)
            code = tl.where(better, at_top, code)
        tl.store(codes_ptr + rows * LEVELS + level, code, mask=row_ok)
        word = tl.load(codeword_ptr + (level * K_PAD + code[:, None]) * D + dims[None, :],
                       mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        residual = residual - word
        if CENTRES and level < LEVELS - 1:  # the prefix key is needed only to look up a centre
            key = key + code * tl.load(strides_ptr + level)


@functools.cache
def _kernel():
    """The jitted kernel, built on first use so that CPU runs never import Triton."""
    global tl
    import triton
    import triton.language as tl

    # n and n_keys unspecialised: Triton would otherwise compile apart batches (and tables) of 1 row (key), of
    # multiples of 16 and of other lengths, each a compile of tens of seconds, and each a variant the first-use
    # check (keyed by the constexprs) would not see
    return triton.jit(_residual_encode, do_not_specialize=["n", "n_keys"]), triton.cdiv


def _compile_constants(stack: ResidualQuantizer, d: int) -> dict[str, int | bool]:
    """The kernel's constexpr arguments for this stack and latent width: each distinct set compiles apart."""
    sizes, n_keys = stack.codebook_sizes, int(stack.prefix_keys.numel())
    d_pad = _next_power_of_two(d)
    block_rows, block_codes = _TILES.get(d_pad, _TILES[16])  # wider latents: direct calls only (tests)
    return {"D": d, "D_PAD": d_pad, "K_PAD": _next_power_of_two(max(sizes), block_codes), "LEVELS": len(sizes),
            "CENTRES": n_keys > 0, "SEARCH_STEPS": _search_steps(n_keys), "BLOCK_ROWS": block_rows,
            "BLOCK_CODES": block_codes}


def _stack(per_level: list[torch.Tensor], k_pad: int, fill: float) -> torch.Tensor:
    """Levels' (K_l, ...) tensors padded to k_pad rows with `fill` and stacked: (L, k_pad, ...)."""
    out = per_level[0].new_full((len(per_level), k_pad, *per_level[0].shape[1:]), fill)
    for i, t in enumerate(per_level):
        out[i, : t.shape[0]] = t
    return out


@torch.no_grad()
def residual_codes(stack: ResidualQuantizer, e: torch.Tensor) -> torch.Tensor:
    """(n, d) latents -> (n, L) int64 codes of the greedy residual walk, in one kernel launch.

    A CPU tensor needs Triton's interpreter (TRITON_INTERPRET=1 before triton is first imported, as the tests
    set it): correct, slow, and there for the tests.
    """
    # Low-precision latents (an encoder under autocast) are read as they are: a cast would be one more pass
    e = e.detach()
    e = (e if e.dtype in _READ_AS_IS else e.float()).contiguous()
    n, d = e.shape
    sizes = stack.codebook_sizes
    constants = _compile_constants(stack, d)
    k_pad = constants["K_PAD"]
    terms = [score_terms(level.codebook.detach(), level.distance) for level in stack.levels]
    search = _stack([matrix.T.contiguous() for matrix, _ in terms], k_pad, 0.0)  # (L, K_PAD, d)
    bias = _stack([b if b is not None else torch.zeros(k, device=e.device) for (_, b), k in zip(terms, sizes)],
                  k_pad, float("-inf"))
    codewords = _stack([level.codebook.detach().float() for level in stack.levels], k_pad, 0.0)
    # Empty tables still need a valid pointer: a one-row placeholder the kernel never reads.
    keys = stack.prefix_keys if stack.has_centres else torch.zeros(1, dtype=torch.long, device=e.device)
    centres = stack.prefix_centres.float() if stack.has_centres else torch.zeros(1, d, device=e.device)
    strides = stack.prefix_strides if stack.prefix_strides.numel() else torch.zeros(1, dtype=torch.long,
                                                                                      device=e.device)
    n_keys = int(stack.prefix_keys.numel())
    codes = torch.empty(n, len(sizes), dtype=torch.long, device=e.device)
    if n == 0:
        return codes
    kernel, cdiv = _kernel()
    with as_current(e.device):  # Triton launches on the current CUDA device: make it the latents
        kernel[(cdiv(n, constants["BLOCK_ROWS"]),)](
            e, search, bias, codewords, keys.contiguous(), centres.contiguous(), strides, codes, n, n_keys,
            **constants,
        )
    return codes
