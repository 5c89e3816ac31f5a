"""The fused residual-encode kernel (semid.fused) gives the codes of the PyTorch walk.

Without a GPU the kernel runs in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1), so CI checks
the kernel's logic (chunked argmax, padding of K and D, the prefix-centre binary search) on every run; the
CUDA test checks the compiled kernel where a GPU is present.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from semid import fused
from semid.config import QuantizerConfig
from semid.residual import ResidualQuantizer

pytest.importorskip("triton", reason="Triton is not installed (CPU builds of torch come without it)")
needs_interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter is used only without a GPU")


def _stack(x: torch.Tensor, sizes: list[int], distance: str, centres: bool) -> ResidualQuantizer:
    stack = ResidualQuantizer(x.shape[1], QuantizerConfig(levels=len(sizes), codebook_size=sizes, distance=distance))
    stack.init_from_data(x, torch.Generator().manual_seed(0))
    if centres:
        assert stack.fit_prefix_centres(x, 0.0) > 0
    return stack


@needs_interpreter
@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("sizes, centres", [([64, 64, 64], False), ([64, 64, 64], True), ([16, 100, 37], True),
                                            ([256], False)])
def test_kernel_gives_the_codes_of_the_pytorch_walk(real_data, distance, sizes, centres):
    """Real 384-d embeddings (D padded to 512), codebook sizes that are not powers of two (K padded with -inf
    scores), one level (no prefix), and a prefix-centre table searched inside the kernel."""
    x = torch.from_numpy(real_data("ml-100k"))[:700]
    stack = _stack(x, sizes, distance, centres)
    expected = stack._walk_codes(x)
    assert torch.equal(fused.residual_codes(stack, x), expected)
    if centres:  # the centres decide some last codes, so a kernel that ignored them would be caught
        keys, table = stack.prefix_keys, stack.prefix_centres
        stack._drop_centres()
        assert not torch.equal(stack._walk_codes(x), expected)
        stack.prefix_keys, stack.prefix_centres = keys, table


@needs_interpreter
@pytest.mark.parametrize("kept", [1, 2, 5, None])
def test_prefix_tables_of_any_size_are_searched_by_the_same_kernel(real_data, kept):
    """The table's length is a runtime argument: tables of 1, 2 and 5 keys (a slice of the fitted one) and
    the whole table give the walk's codes, with enough search steps for each."""
    x = torch.from_numpy(real_data("ml-100k"))[:700]
    stack = _stack(x, [16, 16, 16], "cosine", centres=True)
    if kept is not None:
        stack.prefix_keys, stack.prefix_centres = stack.prefix_keys[:kept], stack.prefix_centres[:kept]
    assert torch.equal(fused.residual_codes(stack, x), stack._walk_codes(x))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_latents_are_read_without_a_cast(dtype, monkeypatch):
    """An encoder under autocast hands the kernel bf16 latents: it reads them as they are (a cast to fp32 would be
    one more pass over the latents) and gives the walk's codes of the same values."""
    stack, x = _clustered_stack()
    low = x.to(dtype)
    kernel, cdiv = fused._kernel()
    read = []

    class Recording:  # the jitted kernel, noting the dtype of the latents it is launched on
        def __getitem__(self, grid):
            return lambda e, *args, **kwargs: read.append(e.dtype) or kernel[grid](e, *args, **kwargs)

    monkeypatch.setattr(fused, "_kernel", lambda: (Recording(), cdiv))
    codes = fused.residual_codes(stack, low)
    assert read == [dtype]
    assert torch.equal(codes, stack._walk_codes(low))


def test_row_and_key_counts_are_runtime_values_that_never_make_another_compile():
    """Triton specialises integer arguments on ==1 and on divisibility by 16 unless told not to: batches of 12,101
    and 262,144 rows would each compile (tens of seconds) and escape the first-use check, keyed by constexprs."""
    kernel, _ = fused._kernel()  # jitted, or in the CPU interpreter a wrapper that keeps jit's arguments
    names = kernel.kwargs["do_not_specialize"] if hasattr(kernel, "kwargs") else kernel.do_not_specialize
    assert set(names) == {"n", "n_keys"}


def test_search_steps_cover_the_table_in_few_compiled_variants():
    for n_keys in [0, 1, 2, 255, 256, 65_535, 65_536, 10**7, 2**40]:
        steps = fused._search_steps(n_keys)
        assert steps >= n_keys.bit_length() and steps % 8 == 0  # lower bound of n keys takes bit_length(n) halvings
    assert {fused._search_steps(n) for n in range(1, 256)} == {8}


@needs_interpreter
def test_kernel_on_a_latent_of_the_trained_default_shape_and_on_no_rows():
    """A 64-d latent and 3 x 256 codes, cosine (configs/default.toml's shape), on seeded data with clusters."""
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(20, 64, generator=g) * 3
    x = centres[torch.randint(0, 20, (3000,), generator=g)] + 0.3 * torch.randn(3000, 64, generator=g)
    stack = _stack(x, [256, 256, 256], "cosine", centres=True)
    rows = x[:1000]  # the interpreter's time grows with the rows: 1,000 of the 3,000 the codebooks were fitted on
    assert torch.equal(fused.residual_codes(stack, rows), stack._walk_codes(rows))
    assert fused.residual_codes(stack, x[:0]).shape == (0, 3)


@needs_interpreter
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_ties_go_to_the_lowest_code_across_chunks(distance):
    """Codewords 64..127 repeat 0..63 exactly, one chunk of the scan later: every tie is won by the copy with
    the lower index, as in the PyTorch walk."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 32, generator=g)
    stack = _stack(x, [128, 128], distance, centres=False)
    for level in stack.levels:
        with torch.no_grad():
            level.codebook[64:] = level.codebook[:64]
    codes = fused.residual_codes(stack, x)
    assert torch.equal(codes, stack._walk_codes(x)) and int(codes.max()) < 64


def test_encode_takes_the_kernel_only_on_a_gpu_and_for_large_batches(monkeypatch):
    from types import SimpleNamespace

    x = torch.randn(8, 16)
    monkeypatch.setattr(fused, "_MIN_ROWS", 8)
    assert not fused.usable(x)  # CPU tensors keep the PyTorch walk
    monkeypatch.setattr(fused, "available", lambda: True)  # what `usable` sees of a CUDA batch, on any machine
    assert fused.usable(SimpleNamespace(is_cuda=True, shape=(8, 64)))
    assert not fused.usable(SimpleNamespace(is_cuda=True, shape=(7, 64)))  # a small batch: no compile to wait for
    assert not fused.usable(SimpleNamespace(is_cuda=True, shape=(8, 65)))  # a latent too wide for the tiles
    if torch.cuda.is_available():
        assert fused.usable(x.cuda()) and not fused.usable(x[:7].cuda())  # below _MIN_ROWS: no compile to wait for
        monkeypatch.setenv("SEMID_FUSED", "0")
        assert not fused.usable(x.cuda())


@pytest.fixture
def kernel_on_the_cpu(monkeypatch):
    """`ResidualQuantizer.encode` takes the kernel (in the interpreter) on CPU tensors, with a fresh check state."""
    monkeypatch.setattr(fused, "_state", {"checked": {}, "off_because": None})
    monkeypatch.setattr(fused, "usable", lambda e: fused._state["off_because"] is None)


def _clustered_stack(n: int = 600) -> tuple[ResidualQuantizer, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 32, generator=g)[torch.randint(0, 12, (n,), generator=g)] + 0.2 * torch.randn(n, 32, generator=g)
    return _stack(x, [16, 16], "cosine", centres=True), x


@needs_interpreter
def test_a_kernel_that_agrees_is_checked_until_enough_items_agreed_then_trusted(kernel_on_the_cpu, monkeypatch, recwarn):
    monkeypatch.setattr(fused, "_CHECK_ROWS", 100)  # 1,024 in use; fewer keep the interpreter quick
    stack, x = _clustered_stack(110)
    walks = []
    real_walk = stack._walk_codes
    monkeypatch.setattr(stack, "_walk_codes", lambda e: walks.append(len(e)) or real_walk(e))
    assert torch.equal(stack.encode(x[:60]), real_walk(x[:60]))
    assert torch.equal(stack.encode(x[60:]), real_walk(x[60:]))  # checked too: 60 distinct items are not enough
    assert walks == [60, 50] and list(fused._state["checked"].values()) == [110]
    stack.encode(x[:50])
    assert walks == [60, 50]  # trusted now: no more walks
    y = x[:30, :16]  # another latent width: another compiled variant, checked anew
    other = _stack(y, [16, 16], "cosine", centres=True)
    monkeypatch.setattr(other, "_walk_codes", lambda e: walks.append(len(e)) or ResidualQuantizer._walk_codes(other, e))
    other.encode(y)
    assert walks[-1] == 30 and len(fused._state["checked"]) == 2
    assert not [w for w in recwarn if issubclass(w.category, fused.FusedKernelWarning)]


@needs_interpreter
def test_ties_on_a_few_items_or_on_copies_of_one_item_do_not_turn_the_kernel_off(kernel_on_the_cpu, monkeypatch,
                                                                                recwarn):
    stack, x = _clustered_stack()
    real = fused.residual_codes

    def one_tie(s, e):  # the first row's last code lands on the other side of a tie
        codes = real(s, e)
        codes[(e == e[0]).all(-1), -1] = (codes[0, -1] + 1) % 16
        return codes

    monkeypatch.setattr(fused, "residual_codes", one_tie)
    stack.encode(x[:3])  # 1 of 3 items differs
    stack.encode(torch.cat([x[5:6].repeat(40, 1), x[6:20]]))  # 40 copies of one tied item count once
    assert fused._state["off_because"] is None
    assert not [w for w in recwarn if issubclass(w.category, fused.FusedKernelWarning)]


@needs_interpreter
def test_a_kernel_that_fails_to_launch_falls_back_to_pytorch_with_a_warning(kernel_on_the_cpu, monkeypatch):
    stack, x = _clustered_stack()

    def broken_kernel():
        raise RuntimeError("PTX compile failed: out of registers\nmore detail")

    monkeypatch.setattr(fused, "_kernel", broken_kernel)
    with pytest.warns(fused.FusedKernelWarning, match="RuntimeError: PTX compile failed: out of registers"):
        codes = stack.encode(x)
    assert torch.equal(codes, stack._walk_codes(x))
    assert not fused.usable(x) and "out of registers" in fused._state["off_because"]


@needs_interpreter
def test_a_kernel_that_gives_other_codes_is_turned_off_before_its_codes_are_used(kernel_on_the_cpu, monkeypatch):
    stack, x = _clustered_stack()
    real = fused.residual_codes
    monkeypatch.setattr(fused, "residual_codes", lambda s, e: (real(s, e) + 1) % 16)  # every code off by one
    with pytest.warns(fused.FusedKernelWarning, match=r"differed from PyTorch's on 600 of 600 distinct items"):
        codes = stack.encode(x)
    assert torch.equal(codes, stack._walk_codes(x)) and fused._state["checked"] == {}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernel_matches_the_cpu_walk(monkeypatch):
    """The default's shape: a 64-d latent (the kernel takes latents of at most 64 dims; a 384-d input would
    take the PyTorch walk and prove nothing), 3 x 256 cosine codes, prefix centres."""
    monkeypatch.setattr(fused, "_MIN_ROWS", 1)  # 20,000 rows would otherwise take the PyTorch walk
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(50, 64, generator=g) * 3
    x = centres[torch.randint(0, 50, (20_000,), generator=g)] + 0.3 * torch.randn(20_000, 64, generator=g)
    stack = _stack(x[:8192], [256, 256, 256], "cosine", centres=True)
    assert fused.usable(x.cuda())
    expected = stack._walk_codes(x)
    with warnings.catch_warnings():  # a kernel that failed its first-use check would fall back unseen
        warnings.simplefilter("error", fused.FusedKernelWarning)
        got = stack.cuda().encode(x.cuda()).cpu()  # through ResidualQuantizer.encode: the fused path
    assert (got == expected).all(-1).float().mean().item() > 0.999  # only sub-round-off ties may differ


# Compiles the kernel ahead of time for an H100/H200 (sm_90), with no GPU, and reads its resource usage from
# the cubin: a change that breaks the compiled kernel, or makes it spill registers, fails here and not first
# on a lent GPU. Triton's jit must not be in interpreter mode, so each variant compiles in a fresh process
# (argv: latent width, latent dtype, output folder), all at once: a compile takes up to a minute of one core.
_COMPILE_FOR_SM90 = r"""
import json, subprocess, sys
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from semid import fused

d, latent, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
kernel, _ = fused._kernel()
pointers = {"e_ptr": f"*{latent}", "search_ptr": "*fp32", "bias_ptr": "*fp32", "codeword_ptr": "*fp32",
            "keys_ptr": "*i64", "centres_ptr": "*fp32", "strides_ptr": "*i64", "codes_ptr": "*i64", "n": "i32",
            "n_keys": "i32"}
rows, codes = fused._TILES[d]
consts = {"D": d, "D_PAD": d, "K_PAD": 256, "LEVELS": 3, "CENTRES": True, "SEARCH_STEPS": 16,
          "BLOCK_ROWS": rows, "BLOCK_CODES": codes}
source = ASTSource(fn=kernel, signature={**pointers, **{k: "constexpr" for k in consts}}, constexprs=consts)
cubin = out / f"d{d}_{latent}.cubin"
cubin.write_bytes(triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"])
cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
line = next(l for l in subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True,
                                      text=True, check=True).stdout.splitlines() if "REG:" in l)
print(json.dumps(dict(item.split(":") for item in line.split()[:2])))
"""
# Every tile in fp32, and bf16 latents (an encoder under autocast) at the widest tile, where registers are tightest.
_SM90_VARIANTS = [(16, "fp32"), (32, "fp32"), (64, "fp32"), (64, "bf16")]


def test_kernel_compiles_for_sm90_without_spilling(tmp_path):
    import json
    import os
    import subprocess
    import sys

    assert {d for d, _ in _SM90_VARIANTS} == set(fused._TILES)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    runs = {f"{d}-{latent}": subprocess.Popen([sys.executable, "-c", _COMPILE_FOR_SM90, str(d), latent, str(tmp_path)],
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for d, latent in _SM90_VARIANTS}
    usage = {}
    for variant, run in runs.items():
        stdout, stderr = run.communicate(timeout=600)
        if run.returncode and ("ASTSource" in stderr or "GPUTarget" in stderr):
            pytest.skip("this Triton has no ahead-of-time compile API")
        assert run.returncode == 0, f"{variant}: {stderr[-3000:]}"
        usage[variant] = json.loads(stdout.strip().splitlines()[-1])
    for variant, resources in usage.items():
        assert resources["STACK"] == "0", f"latent {variant}: the kernel spills registers ({resources})"
        assert int(resources["REG"]) <= 255
