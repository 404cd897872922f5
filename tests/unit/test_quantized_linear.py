"""The quantized-weight kernels against a torch reference of the same math, on each vector
path this CPU runs (AVX-512 VNNI, AVX2, plain C), and the packed formats' round trips."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

from kvcache.errors import KVCacheError
from kvcache.models import packed_tiles
from kvcache.models import weight_packing as wp
from kvcache.native import build, qlinear
from tests.helpers import quantize_activations, rounded_activations

pytestmark = pytest.mark.skipif(not build.wanted(), reason="no C compiler on this machine, or KVCACHE_NATIVE=0")


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


FLAGS = _cpu_flags()
# other vector targets of the library: (flags added to the build's, what this CPU needs to run it)
TARGETS = {"avx2": (["-mno-avx512f"], {"avx2", "fma", "f16c"}), "c": (["-mno-avx512f", "-mno-avx2"], set())}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """isa name -> QLinearKernels: this machine's library, and the library built for the other targets."""
    out = {}
    native = qlinear.kernels()
    assert native is not None, "the native library built without the quantized kernels"
    out[native.isa] = native
    if os.uname().machine == "x86_64":
        for name, (flags, needs) in TARGETS.items():
            if name in out or not needs <= FLAGS:
                continue
            so = tmp_path_factory.mktemp(name) / "kernels.so"
            build.compile_to(build._compiler(), [*build.FLAGS, *flags], so)  # the whole library, for that target
            out[name] = qlinear.QLinearKernels(ctypes.CDLL(str(so)))
            assert out[name].isa == name
    return out


def test_this_machine_runs_its_widest_path():
    isa = qlinear.kernels().isa
    if {"avx512f", "avx512bw", "avx512_vnni"} <= FLAGS:
        assert isa == "avx512-vnni"
    elif {"avx2", "fma", "f16c"} <= FLAGS:
        assert isa == "avx2"


def reference(x: torch.Tensor, p: wp.PackedWeight, digits: int = 1) -> torch.Tensor:
    """x quantized as the kernel does, times the dequantized weight, in float64: (M, N)."""
    return rounded_activations(x, digits) @ wp.dequantize(p).double().T


def random_weight(fmt: str, n: int, k: int) -> wp.PackedWeight:
    g = torch.Generator().manual_seed(n * 1000 + k)
    if fmt == "q4":
        nb = k // 32
        return wp.pack_q4(torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                          (torch.rand(n, nb, generator=g) * 0.02).half(),
                          (torch.randn(n, nb, generator=g) * 0.1).half(), "Q4_1")
    if fmt == "q8":
        codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        codes[0] = -128  # the extreme code
        return wp.pack_q8(codes, (torch.rand(n, k // 32, generator=g) * 0.01).half(), "Q8_0")
    return wp.quantize_int8(torch.randn(n, k, generator=g))


SHAPES = {"q4": [(40, 64), (17, 96), (3, 32)], "q8": [(40, 64), (17, 96)], "i8": [(40, 64), (17, 70), (5, 31)]}
CASES = [(fmt, n, k) for fmt, shapes in SHAPES.items() for n, k in shapes]


@pytest.mark.parametrize("fmt,n,k", CASES)
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("digits", [1, 2])
def test_kernel_matches_the_reference_on_every_path(builds, fmt, n, k, rows, dtype, digits):
    p = random_weight(fmt, n, k)
    x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3).to(dtype)
    x[0, : min(k, 32)] = 0  # an all-zero block
    want = reference(x, p, digits)
    for isa, kern in builds.items():
        y = torch.full((rows, n + 3), 7.0, dtype=dtype)  # written at column 2 of a wider output
        kern.matmul(x, p.data, wp.FORMAT_CODES[fmt], n, y, col=2, digits=digits)
        got = y[:, 2 : n + 2].double()
        tol = 1e-5 if dtype == torch.float32 else 8e-3  # fp32 sums; bf16 output rounding
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()), msg=isa)
        assert (y[:, :2] == 7).all() and (y[:, n + 2:] == 7).all(), f"{isa} wrote outside its columns"


def test_a_long_prompt_quantizes_its_rows_in_parallel_alike(builds):
    p = random_weight("q4", 40, 256)
    x = torch.randn(300, 256)  # 300 x 256 values: the activations are quantized by several threads
    want = reference(x, p)
    for isa, kern in builds.items():
        y = torch.empty(300, 40)
        kern.matmul(x, p.data, 0, 40, y)
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=isa)


def test_paths_agree_and_rows_do_not_depend_on_each_other(builds):
    p = random_weight("q4", 48, 128)
    x = torch.randn(11, 128)
    results = {}
    for isa, kern in builds.items():
        y = torch.empty(11, 48)
        kern.matmul(x, p.data, 0, 48, y)
        alone = torch.empty(1, 48)
        kern.matmul(x[7:8].contiguous(), p.data, 0, 48, alone)
        assert torch.equal(alone[0], y[7]), isa
        results[isa] = y
    for isa, y in results.items():  # the same integer sums; only the fp32 accumulation order may differ
        torch.testing.assert_close(y, results[qlinear.kernels().isa], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("digits", [1, 2])
def test_activation_quantization_matches_the_reference(builds, digits):
    x = torch.randn(3, 70) * torch.logspace(-3, 2, 70)
    x[1, 32:64] = 0
    codes, scale = quantize_activations(x, digits)
    for isa, kern in builds.items():
        xq, xd, xs = kern.quantize_activations(x, digits)
        assert torch.equal(xq.float(), codes), isa
        assert torch.equal(xd, scale), isa
        assert torch.equal(xs, codes.view(3 * digits, -1, 32).sum(-1).int()), isa


def test_a_block_too_small_to_scale_counts_as_zero(builds):
    x = torch.randn(2, 64)
    x[0, :32] = 1e-38  # 127 / amax overflows a float
    p = random_weight("i8", 16, 64)
    for isa, kern in builds.items():
        for digits in (1, 2):
            xq, xd, xs = kern.quantize_activations(x, digits)
            assert (xq[0, :32] == 0).all() and (xd[0, 0] == 0) and (xs[0, 0] == 0), isa
            y = torch.empty(2, 16)
            kern.matmul(x, p.data, wp.FORMAT_CODES["i8"], 16, y, digits=digits)
            assert torch.isfinite(y).all(), isa


def test_two_digits_carry_the_activations_far_closer_than_one(builds):
    x = torch.randn(4, 96) * torch.logspace(-2, 1, 96)
    kern = qlinear.kernels()
    errs = []
    for digits in (1, 2):
        xq, xd, _ = kern.quantize_activations(x, digits)
        back = (xq.float().view(4 * digits, 3, 32) * xd[..., None]).view(4, digits, 96).sum(1)
        errs.append((back - x).abs().max().item())
    assert errs[1] < errs[0] / 100


@pytest.mark.parametrize("fmt,n,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_dequantize_equals_the_torch_reference(builds, fmt, n, k, dtype):
    p = random_weight(fmt, n, k)
    want = wp.dequantize(p).to(dtype)
    ids = torch.tensor([[n - 1, 0], [n // 2, n - 1]])
    for isa, kern in builds.items():
        assert torch.equal(kern.dequantize(p.data, wp.FORMAT_CODES[fmt], k, n, None, dtype), want), isa
        assert torch.equal(kern.dequantize(p.data, wp.FORMAT_CODES[fmt], k, n, ids, dtype), want[ids]), isa


def test_q4_packing_holds_codes_scales_and_minimums_exactly():
    codes = torch.arange(5 * 64).remainder(16).view(5, 64).to(torch.uint8)
    d = torch.tensor([[0.5, 2.0]] * 5).half()
    m = torch.tensor([[-1.0, 3.0]] * 5).half()
    p = wp.pack_q4(codes, d, m, "int4")
    assert p.data.shape == (1, wp.tile_bytes("q4", 2))  # one tile (5 rows padded to 16)
    want = codes.float() * d.float().repeat_interleave(32, 1) + m.float().repeat_interleave(32, 1)
    assert torch.equal(wp.dequantize(p), want)


def test_int8_is_symmetric_per_row_within_half_a_step():
    w = torch.randn(20, 70) * torch.logspace(-2, 1, 20)[:, None]
    w[3] = 0  # a zero row: scale 0, codes 0
    back = wp.dequantize(wp.quantize_int8(w))
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((back - w).abs() <= step / 2 + 1e-7).all()
    assert (back[3] == 0).all()


def test_int4_is_per_group_of_32_within_half_a_step():
    w = torch.randn(20, 96)
    w[2, :32] = 1.25  # a constant group: exact
    back = wp.dequantize(wp.quantize_int4(w))
    g = w.view(20, 3, 32)
    step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(32, 1)
    assert ((back - w).abs() <= step / 2 + 2e-3 * w.abs().max()).all()  # fp16 scale and minimum
    assert (back[2, :32] == 1.25).all()


def test_int4_needs_inputs_in_groups_of_32():
    with pytest.raises(KVCacheError, match=r"^int4 weights quantize groups of 32 inputs, but q_proj has 40 inputs"):
        wp.quantize_int4(torch.randn(8, 40), "q_proj")


def test_quantizing_in_slices_of_rows_changes_nothing(monkeypatch):
    w = torch.randn(50, 64)
    whole = wp.quantize_int8(w).data, wp.quantize_int4(w).data
    monkeypatch.setattr(packed_tiles, "ROWS_AT_ONCE", 7)
    assert torch.equal(wp.quantize_int8(w).data, whole[0]) and torch.equal(wp.quantize_int4(w).data, whole[1])


@pytest.mark.parametrize("quantize", [wp.quantize_int8, wp.quantize_q8_blocks, wp.quantize_int4])
def test_packing_a_block_of_rows_at_a_time_gives_the_whole_matrix_packing(quantize, monkeypatch):
    w = torch.randn(100, 64) * torch.linspace(0.5, 3, 100)[:, None]  # (100, 64): 7 tiles, the last one short
    whole = quantize(w)  # one block of rows
    monkeypatch.setattr(packed_tiles, "ROWS_AT_ONCE", 32)  # blocks of 32 rows: 2 tiles each, then 4 rows
    blocks = quantize(w)
    assert (blocks.fmt, blocks.out_features, blocks.in_features) == (whole.fmt, whole.out_features, whole.in_features)
    assert torch.equal(blocks.data, whole.data)
    torch.testing.assert_close(wp.dequantize(blocks), wp.dequantize(whole), rtol=0, atol=0)
