"""litmodel's C matrix-vector kernels (`litmodel/_kernels.c`) against a float64 reference: both dtypes, widths
that are and are not a multiple of the vector width, row counts around the 4-row blocks and the thread split,
bias, 1-3 threads, concurrent callers and a forked child; `GemvLinear` and `fast_linear`'s choices."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch
import torch.nn as nn

from litmodel import cpu_linear
from litmodel.cpu_linear import GemvLinear, PackedLinear, fast_linear

KERNELS = cpu_linear.GEMV_KERNELS
needs_kernels = pytest.mark.skipif(not KERNELS, reason="litmodel's C kernels are not built (or not usable) here")
DTYPES = [d for d in (torch.float32, torch.bfloat16) if d in KERNELS]


def gemv(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None, threads: int) -> torch.Tensor:
    """x (k,) or (m, k) times W^T (+ b)."""
    y = torch.empty(*x.shape[:-1], w.size(0), dtype=w.dtype)
    KERNELS[w.dtype](w.data_ptr(), x.data_ptr(), 0 if b is None else b.data_ptr(), y.data_ptr(), w.size(0),
                     w.size(1), x.numel() // w.size(1), threads)
    return y


def check(w, x, b, y):
    """``y`` = W x + b up to the rounding of the accumulation (float32) and of the result (its dtype)."""
    ref = w.double() @ x.double() + (0 if b is None else b.double())
    scale = (w.double().abs() @ x.double().abs()).max().item() + 1e-30
    tol = 2 ** -7 if w.dtype == torch.bfloat16 else 1e-6  # one rounding of the result; float32 sums
    assert ((y.double() - ref).abs() <= tol * scale + 1e-30).all(), ((y.double() - ref).abs().max().item(), scale)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES + (["avx2"] if torch.float32 in KERNELS else []))
@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (7, 33), (130, 70), (517, 64), (1030, 257), (2048, 576)])
def test_kernel_equals_reference(dtype, n, k, monkeypatch):
    if dtype == "avx2":  # the float32 kernel an AVX2-only CPU runs
        dtype = torch.float32
        monkeypatch.setitem(KERNELS, torch.float32, cpu_linear.kernels.gemv_f32_avx2)
    torch.manual_seed(n * 1000 + k)
    w, x, b = torch.randn(n, k, dtype=dtype), torch.randn(k, dtype=dtype), torch.randn(n, dtype=dtype)
    for threads in (1, 2, 3):
        for bias in (None, b):
            check(w, x, bias, gemv(w, x, bias, threads))
    xs = torch.randn(5, k, dtype=dtype)  # several rows in one pass: each the same, bit for bit, as alone
    assert torch.equal(gemv(w, xs, b, 2), torch.stack([gemv(w, row, b, 2) for row in xs]))
    if dtype == torch.bfloat16:  # the same rounding as oneDNN's bf16 product, but for the order of the sums
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        ref = torch.ops.mkldnn._linear_pointwise(x[None], packed, b, "none", [], "")[0]
        assert (gemv(w, x, b, 2).float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()


@needs_kernels
def test_concurrent_callers_and_a_forked_child():
    """Python threads calling at once (the GIL is released: one uses the pool, the others compute on their
    own thread) all get right answers; a forked child (libgomp's threads do not survive a fork) computes on
    one thread."""
    dtype = DTYPES[0]
    torch.manual_seed(0)
    w, xs = torch.randn(4096, 256, dtype=dtype), [torch.randn(256, dtype=dtype) for _ in range(4)]
    gemv(w, xs[0], None, 2)  # the pool exists before the fork
    results, errors = {}, []

    def run(i):
        try:
            for _ in range(50):
                results[i] = gemv(w, xs[i], None, 2)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        check(w, xs[i], None, results[i])
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        y = pool.apply(gemv, (w, xs[1], None, 2))
    check(w, xs[1], None, y)


@needs_kernels
def test_gemv_linear_layer():
    """One row by the kernel, several rows and products that need a gradient by F.linear; same parameters."""
    dtype = DTYPES[0]
    linear = nn.Linear(96, 200, dtype=dtype)
    layer = fast_linear(linear)
    assert isinstance(layer, GemvLinear) and layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(3, 96, dtype=dtype)
    with torch.no_grad():
        ref = linear(x)
        for rows in (x, torch.randn(80, 96, dtype=dtype)):  # 3 rows: the kernel; 80: F.linear itself
            ref = linear(rows)
            assert torch.allclose(layer(rows), ref, rtol=1e-2, atol=1e-2) and layer(rows).shape == ref.shape
        for threads in (1, 2):
            one = layer.row(x[1:2].view(1, 1, 96), threads)
            assert one.shape == (1, 1, 200) and one.dtype == dtype
            check(linear.weight, x[1], linear.bias, one.view(-1))
    out = layer(x[:1])  # grad enabled and the weight requires it: autograd's F.linear
    out.sum().backward()
    assert linear.weight.grad is not None


def test_fast_linear_choices(monkeypatch):
    """The C kernel where it is usable, else oneDNN's packed weight (a shared weight packed once), else None."""
    linear, other = nn.Linear(64, 32), nn.Linear(64, 32)
    other.weight = linear.weight
    if torch.float32 in KERNELS:
        assert isinstance(fast_linear(linear), GemvLinear)
    monkeypatch.setattr(cpu_linear, "GEMV_KERNELS", {})
    packed: dict = {}
    a, b = fast_linear(linear, packed), fast_linear(other, packed)
    assert isinstance(a, PackedLinear) and a.weight is b.weight
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.allclose(a(x), linear(x), atol=1e-6)
    assert fast_linear(nn.Linear(4, 4, device="meta")) is None


needs_c = pytest.mark.skipif(cpu_linear.kernels is None, reason="litmodel's C kernels are not built here")


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_kernel_equals_the_module(dtype):
    from litmodel.layers import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(100, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
    x = torch.randn(100, dtype=dtype) * 3
    y = torch.empty_like(x)
    cpu_linear.kernels.rmsnorm(x.data_ptr(), norm.weight.data_ptr(), y.data_ptr(), 100, 1e-5, dtype == torch.bfloat16)
    with torch.no_grad():
        ref = norm(x)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-6  # bf16: one rounding apart at most
    assert ((y.float() - ref.float()).abs() <= tol * ref.float().abs() + 1e-6).all()


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,G,n_rot,lo", [(4, 2, 16, 0), (4, 4, 8, 3), (6, 1, 0, 0), (4, 2, 16, 5), (9, 3, 16, 2)])
@pytest.mark.parametrize("hs,S,p", [(16, 12, 7), (64, 60, 40), (24, 30, 20)])
def test_attend_kernel_equals_reference(dtype, H, G, n_rot, lo, hs, S, p):
    """One token at slot p: q and k rotated (the first n_rot dims, none for 0), k and v written into the cache,
    softmax attention over slots lo..p, per kv group (GQA/MQA/MHA) - against apply_rope + float64 attention.
    Head sizes of 16 and 64 take the AVX-512 path (heads of a kv head together, 16 slots per reduction; 41 - lo
    slots: a last partial block), 24 the generic loop."""
    from litmodel.layers import apply_rope

    torch.manual_seed(H * 10 + lo)
    scale = 0.3
    qkv = torch.randn(H + 2 * G, hs, dtype=dtype)
    k_cache, v_cache = torch.randn(G, S, hs, dtype=dtype), torch.randn(G, S, hs, dtype=dtype)
    angles = torch.rand(n_rot // 2) * 3
    cos, sin = torch.cat((angles, angles)).cos(), torch.cat((angles, angles)).sin()
    y = torch.empty(H * hs, dtype=dtype)
    kc, vc = k_cache.clone(), v_cache.clone()
    cpu_linear.kernels.attend(qkv.data_ptr(), cos.data_ptr() if n_rot else 0, sin.data_ptr() if n_rot else 0, n_rot,
                              kc.data_ptr(), vc.data_ptr(), S, p, lo, H, G, hs, scale, y.data_ptr(),
                              dtype == torch.bfloat16)
    qk = qkv[: H + G].double()
    if n_rot:
        qk = apply_rope(qk[None, :, None], cos.double(), sin.double())[0, :, 0]
    q, k = qk[:H], qk[H:]
    k_cache[:, p], v_cache[:, p] = k.to(dtype), qkv[H + G:]
    assert torch.equal(vc, v_cache) and (kc.double() - k_cache.double()).abs().max() <= 1e-6 + 2 ** -8 * k.abs().max()
    keys, values = kc.double()[:, lo: p + 1], vc.double()[:, lo: p + 1]
    kv = torch.arange(H) // (H // G)
    att = torch.softmax(scale * torch.einsum("hd,hsd->hs", q, keys[kv]), -1)
    ref = torch.einsum("hs,hsd->hd", att, values[kv]).reshape(-1)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    assert ((y.double() - ref).abs() <= tol * ref.abs().max()).all(), (y.double() - ref).abs().max()


@needs_c
def test_attend_on_two_threads_for_long_contexts():
    """From 512 visible slots the heads are split over threads: the same output, bit for bit, as on one."""
    torch.manual_seed(0)
    H, G, hs, S, p = 4, 2, 32, 700, 650
    qkv = torch.randn(H + 2 * G, hs, dtype=torch.bfloat16)
    cache = torch.randn(2, G, S, hs, dtype=torch.bfloat16)
    cos, sin = torch.rand(hs), torch.rand(hs)
    outs = []
    for threads in (1, 2):
        kc, vc, y = cache[0].clone(), cache[1].clone(), torch.empty(H * hs, dtype=torch.bfloat16)
        cpu_linear.kernels.attend(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), hs, kc.data_ptr(), vc.data_ptr(), S,
                                  p, 0, H, G, hs, 0.2, y.data_ptr(), True, threads)
        outs.append(y)
    assert torch.equal(outs[0], outs[1]) and outs[0].isfinite().all()


# ---- int4 (litmodel's layout, `litmodel.int4.pack_int4`) ------------------------------------------------------
needs_int4 = pytest.mark.skipif(not (cpu_linear.kernels and torch.bfloat16 in KERNELS),
                                reason="litmodel's int4 kernel needs the C kernels and AVX512-BF16")


@needs_int4
@pytest.mark.parametrize("group", [64, 128, 256])
@pytest.mark.parametrize("n,k", [(16, 256), (48, 320), (130, 576), (2048, 1536)])
def test_int4_kernel_equals_reference(group, n, k):
    """gemv_int4 against float64 sums of the weights the codes stand for: groups of 64-256, rows of whole blocks
    of 128 columns and with a last block of 64, 1-3 threads, bias; 1-8 rows in one pass each equal, bit for bit,
    to the row alone; int4_dequant gives those weights rounded to bf16."""
    from litmodel.int4 import dequantize_int4, pack_int4, quantize_groupwise_int4

    if k % group:
        pytest.skip("k not a multiple of the group")
    torch.manual_seed(n + k + group)
    q, sz = quantize_groupwise_int4(torch.randn(n, k), group)
    sz = sz.bfloat16()
    w = dequantize_int4(q, sz, group)
    packed, scales = pack_int4(q), sz.permute(1, 2, 0).contiguous()
    b = torch.randn(n, dtype=torch.bfloat16)

    def run(x, bias, threads):
        y = torch.empty(x.size(0), n, dtype=torch.bfloat16)
        cpu_linear.kernels.gemv_int4(packed.data_ptr(), scales.data_ptr(), group, x.data_ptr(),
                                     0 if bias is None else bias.data_ptr(), y.data_ptr(), n, k, x.size(0), threads)
        return y

    xs = torch.randn(8, k, dtype=torch.bfloat16)
    for threads in (1, 2, 3):
        for bias in (None, b):
            y = run(xs[:1], bias, threads)[0].double()
            ref = w.double() @ xs[0].double() + (0 if bias is None else bias.double())
            scale = (w.double().abs() @ xs[0].double().abs()).max().item()
            assert ((y - ref).abs() <= 2 ** -8 * ref.abs() + 1e-5 * scale).all()  # one bf16 rounding
    for m in range(2, 9):
        assert torch.equal(run(xs[:m], b, 2), torch.cat([run(xs[i:i + 1], b, 2) for i in range(m)]))
    out = torch.empty(n, k, dtype=torch.bfloat16)
    cpu_linear.kernels.int4_dequant(packed.data_ptr(), scales.data_ptr(), group, out.data_ptr(), n, k, 2)
    assert ((out.float() - w).abs() <= 2 ** -8 * w.abs()).all()  # each weight rounded to bf16
    with pytest.raises(ValueError, match="bad int4 arguments"):
        cpu_linear.kernels.gemv_int4(packed.data_ptr(), scales.data_ptr(), 32, xs.data_ptr(), 0, out.data_ptr(), n,
                                     k, 1, 1)  # groups of 32: torch's kernel takes those
