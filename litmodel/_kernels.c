/* Kernels for batch-1 decoding on CPU: matrix-vector products, RMSNorm of one row, attention of one token.
 *
 * gemv: y = W x (+ b), W row-major (out, in).
 * A decode step of one sequence multiplies every weight matrix by one vector, so it is bound by reading the
 * weights. oneDNN's kernels (`mkldnn::_linear_pointwise`, what `PackedLinear` calls) cost ~11 us of fixed work
 * per call and read at ~25-30 GB/s on the 2-core CPU litmodel is benchmarked on; SmolLM2-135M makes 121 such
 * calls per token. These read each weight once, front to back, and split the rows over torch's OpenMP threads.
 *
 *   bf16: AVX512-BF16 dot products (`vdpbf16ps`: bf16 pairs multiplied exactly, summed in float32), the
 *         result rounded to bf16 (to nearest even), as oneDNN does. Needs a CPU with AVX512-BF16.
 *   fp32: AVX-512 or AVX2 + FMA fused multiply-adds.
 *   int4: groupwise codes in litmodel's layout (litmodel/int4.py), unpacked into bf16 and summed as bf16.
 *
 * rmsnorm, attend: the small steps between the products of one layer, each one call instead of 4-20 torch ops
 * of ~2 us each (see `DecodeBlock` in litmodel/fast_decode.py, which mirrors them op for op in torch); plain C
 * loops, vectorised by the compiler (`omp simd`) in clones for AVX-512, AVX2 and any x86-64 CPU.
 * decode_layer: a whole Llama block for 1-8 tokens in one call (norms, products, attention, residuals, SiLU).
 *
 * Built by `pip install` as the extension `litmodel._kernels` (plain C, no torch headers: it takes data
 * pointers, so torch is not needed to build it); litmodel falls back to oneDNN and torch ops without it.
 * Python API (addresses as ints): gemv_bf16(w, x, b, y, n, k, m, threads) and gemv_f32(...) for m <= 8 rows
 * of x (b may be 0; gemv_f32_avx2 is gemv_f32's AVX2 version, for tests), rmsnorm(x, w, y, n, eps, is_bf16),
 * attend(...) (see py_attend), gemv_int4 and int4_dequant (see int4_call), decode_layer(...) (see py_decode_layer),
 * supported() -> (bf16 gemv and int4 usable, fp32 gemv usable) on this CPU.
 * After editing this file, rebuild with `pip install -e .`.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <immintrin.h>
#include <omp.h>
#include <pthread.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;
typedef void (*rows_fn)(const void *w, const void *x, const void *b, void *y, int64_t n, int64_t k, int m, int64_t r0,
                        int64_t r1);

/* ---------------------------------------------------------------- kernels: rows r0..r1-1 of y = W x + b */

static inline float bf16_to_float(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 float_to_bf16(float f) { /* round to nearest even, NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

__attribute__((target("avx512f"))) static inline float sum512(__m512 v) { return _mm512_reduce_add_ps(v); }

/* One weight row at a time, front to back: the weights are read as one sequential stream, which the hardware
 * prefetcher follows best (12-20% faster here than 4 or 8 rows interleaved). Two accumulators per product.
 * Up to MAX_M inputs (x: m rows of k, y: m rows of n) share each pass over the weights (a prompt, a
 * speculative verification); every product is summed in the same order whatever m is, so a row computed
 * alone and in a batch come out the same, bit for bit. `name##_m` is compiled for each m. */
#define MAX_M 8
#define ROWS(name, target_, wt, vec, wvec, width, zero, dot, load, load_tail, mask_t, make_mask, sum, out)           \
    __attribute__((target(target_), always_inline)) static inline void name##_m(                               \
        const void *wp, const void *xp, const void *bp, void *yp, int64_t n, int64_t k, const int m,           \
        int64_t r0, int64_t r1) {                                                                               \
        const wt *x = xp, *b = bp;                                                                              \
        wt *y = yp;                                                                                             \
        mask_t tail = make_mask(k % width);                                                                     \
        for (int64_t r = r0; r < r1; r++) {                                                                     \
            const wt *w = (const wt *)wp + r * k;                                                               \
            vec a0[MAX_M], a1[MAX_M];                                                                           \
            for (int j = 0; j < m; j++) a0[j] = zero(), a1[j] = zero();                                         \
            int64_t i = 0;                                                                                      \
            for (; i + 2 * width <= k; i += 2 * width) {                                                        \
                wvec w0 = load(w + i), w1 = load(w + i + width);                                                \
                for (int j = 0; j < m; j++) {                                                                   \
                    a0[j] = dot(a0[j], w0, load(x + j * k + i));                                                \
                    a1[j] = dot(a1[j], w1, load(x + j * k + i + width));                                        \
                }                                                                                               \
            }                                                                                                   \
            if (i + width <= k) {                                                                               \
                wvec w0 = load(w + i);                                                                          \
                for (int j = 0; j < m; j++) a0[j] = dot(a0[j], w0, load(x + j * k + i));                        \
                i += width;                                                                                     \
            }                                                                                                   \
            if (i < k) {                                                                                        \
                wvec w1 = load_tail(w + i, tail);                                                               \
                for (int j = 0; j < m; j++) a1[j] = dot(a1[j], w1, load_tail(x + j * k + i, tail));             \
            }                                                                                                   \
            for (int j = 0; j < m; j++) y[j * n + r] = out(sum(a0[j]) + sum(a1[j]), b, r);                      \
        }                                                                                                       \
    }                                                                                                           \
    __attribute__((target(target_))) static void name(const void *wp, const void *xp, const void *bp, void *yp, \
                                                      int64_t n, int64_t k, int m, int64_t r0, int64_t r1) {    \
        switch (m) { /* a constant m for each: the accumulators stay in registers */                           \
        case 1: name##_m(wp, xp, bp, yp, n, k, 1, r0, r1); break;                                               \
        case 2: name##_m(wp, xp, bp, yp, n, k, 2, r0, r1); break;                                               \
        case 3: name##_m(wp, xp, bp, yp, n, k, 3, r0, r1); break;                                               \
        case 4: name##_m(wp, xp, bp, yp, n, k, 4, r0, r1); break;                                               \
        case 5: name##_m(wp, xp, bp, yp, n, k, 5, r0, r1); break;                                               \
        case 6: name##_m(wp, xp, bp, yp, n, k, 6, r0, r1); break;                                               \
        case 7: name##_m(wp, xp, bp, yp, n, k, 7, r0, r1); break;                                               \
        default: name##_m(wp, xp, bp, yp, n, k, 8, r0, r1);                                                     \
        }                                                                                                       \
    }

/* bf16: 32 per register, `vdpbf16ps` multiplies pairs exactly and adds them to float32 sums */
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static inline __m512 dot_bf16(__m512 a, __m512i w, __m512i x) {
    return _mm512_dpbf16_ps(a, (__m512bh)w, (__m512bh)x);
}
__attribute__((target("avx512f,avx512bw"))) static inline __m512i load_bf16(const bf16 *p) {
    return _mm512_loadu_si512(p);
}
__attribute__((target("avx512f,avx512bw"))) static inline __m512i load_tail_bf16(const bf16 *p, __mmask32 m) {
    return _mm512_maskz_loadu_epi16(m, p);
}
static inline __mmask32 mask32(int64_t n) { return (__mmask32)((1ull << n) - 1); }
static inline bf16 out_bf16(float s, const bf16 *b, int64_t r) { return float_to_bf16(b ? s + bf16_to_float(b[r]) : s); }
ROWS(rows_bf16, "avx512f,avx512bw,avx512bf16", bf16, __m512, __m512i, 32, _mm512_setzero_ps, dot_bf16, load_bf16,
     load_tail_bf16, __mmask32, mask32, sum512, out_bf16)

/* float32: fused multiply-adds, 16 (AVX-512) or 8 (AVX2) per register */
static inline float out_f32(float s, const float *b, int64_t r) { return b ? s + b[r] : s; }
__attribute__((target("avx512f"))) static inline __m512 fma512(__m512 a, __m512 w, __m512 x) {
    return _mm512_fmadd_ps(w, x, a);
}
__attribute__((target("avx512f"))) static inline __m512 load_tail512(const float *p, __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, p);
}
static inline __mmask16 mask16(int64_t n) { return (__mmask16)((1u << n) - 1); }
ROWS(rows_f32_avx512, "avx512f", float, __m512, __m512, 16, _mm512_setzero_ps, fma512, _mm512_loadu_ps, load_tail512,
     __mmask16, mask16, sum512, out_f32)

__attribute__((target("avx2,fma"))) static inline float sum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
__attribute__((target("avx2,fma"))) static inline __m256 fma256(__m256 a, __m256 w, __m256 x) {
    return _mm256_fmadd_ps(w, x, a);
}
__attribute__((target("avx2,fma"))) static inline __m256i mask8(int64_t n) { /* the first n of 8 lanes */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
ROWS(rows_f32_avx2, "avx2,fma", float, __m256, __m256, 8, _mm256_setzero_ps, fma256, _mm256_loadu_ps, _mm256_maskload_ps,
     __m256i, mask8, sum256, out_f32)

/* int4, groupwise (litmodel/int4.py): w = (q - 8) * scale + zero for codes q in 0..15, one bf16 scale and zero
 * per `group` (64, 128 or 256) columns of a row. A row's codes are packed per block of 128 columns in 64 bytes
 * (a last block of 64 columns in 32 bytes where k % 128 == 64), in the order that makes unpacking cheap: the
 * low nibbles hold the block's first half, the high nibbles its second, and `vpunpck{l,h}bw` with the byte 0x43
 * turn codes q into the bf16 numbers 128 + q (0x4300 | q, exact) in the columns' order (`pack_int4` in
 * litmodel/int4.py). So `vdpbf16ps` sums D = sum((128 + q) x) in float32 per 64 columns, and per group
 * sum(w x) = scale D + (zero - 136 scale) X, with X the group's sum of x (computed once per call).
 * ~14 instructions per 128 weights: unlike the bf16 and float32 products, this one is bound by arithmetic about
 * as much as by reading (benchmarks/RESULTS.md). */
typedef struct {
    const bf16 *x;           /* m rows of k */
    const float *group_sums; /* m rows of k / group */
    const bf16 *scales;      /* n rows of (k / group scales, then k / group zeros) */
    int64_t group;
} int4_in;

#define INT4_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* D of 64 columns: codes in the 32 low (lo) or high nibbles, unpacked with the bytes c */
INT4_TARGET static inline __m512 int4_dot64(__m512i codes, __m512i c, const bf16 *x) {
    __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_unpacklo_epi8(codes, c),
                                (__m512bh)_mm512_loadu_si512(x));
    return _mm512_dpbf16_ps(d, (__m512bh)_mm512_unpackhi_epi8(codes, c), (__m512bh)_mm512_loadu_si512(x + 32));
}

INT4_TARGET static inline __m256 int4_dot32(__m256i codes, __m256i c, const bf16 *x) { /* the same, 32 columns */
    __m256 d = _mm256_dpbf16_ps(_mm256_setzero_ps(), (__m256bh)_mm256_unpacklo_epi8(codes, c),
                                (__m256bh)_mm256_loadu_si256((const __m256i *)x));
    return _mm256_dpbf16_ps(d, (__m256bh)_mm256_unpackhi_epi8(codes, c),
                            (__m256bh)_mm256_loadu_si256((const __m256i *)(x + 16)));
}

INT4_TARGET static inline __m512 bf16x16_to_float(const bf16 *p, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

INT4_TARGET __attribute__((always_inline)) static inline void int4_rows_m(const int4_in *in, const uint8_t *wp,
                                                                        const bf16 *b, bf16 *y, int64_t n, int64_t k,
                                                                        const int m, int64_t r0, int64_t r1) {
    const int64_t groups = k / in->group, blocks = k / 128, shift = in->group == 64 ? 0 : in->group == 128 ? 1 : 2;
    const __m512i low4 = _mm512_set1_epi8(15), c = _mm512_set1_epi8(0x43);
    float scale_f[groups + 16]; /* a row's scales in float32: broadcast from memory, no conversion per block */
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *codes = wp + r * (k / 2);
        const bf16 *scale = in->scales + r * 2 * groups, *zero = scale + groups;
        __m512 t_lo[MAX_M], t_hi[MAX_M], rest[MAX_M];
        for (int j = 0; j < m; j++) t_lo[j] = t_hi[j] = rest[j] = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; g += 16) { /* the sum over groups of (zero - 136 scale) X, 16 at a time */
            __mmask16 mask = groups - g >= 16 ? 0xffff : (__mmask16)((1u << (groups - g)) - 1);
            __m512 s = bf16x16_to_float(scale + g, mask), z = bf16x16_to_float(zero + g, mask);
            _mm512_storeu_ps(scale_f + g, s);
            __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(136.f), s, z);
            for (int j = 0; j < m; j++)
                rest[j] = _mm512_fmadd_ps(offset, _mm512_maskz_loadu_ps(mask, in->group_sums + j * groups + g),
                                          rest[j]);
        }
        for (int64_t blk = 0; blk < blocks; blk++) { /* 128 columns: 64 in the low nibbles, 64 in the high */
            __m512i p = _mm512_loadu_si512(codes + blk * 64);
            __m512i lo = _mm512_and_si512(p, low4), hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), low4);
            __m512 s_lo = _mm512_set1_ps(scale_f[(2 * blk) >> shift]);
            __m512 s_hi = _mm512_set1_ps(scale_f[(2 * blk + 1) >> shift]);
            for (int j = 0; j < m; j++) {
                const bf16 *x = in->x + j * k + blk * 128;
                t_lo[j] = _mm512_fmadd_ps(s_lo, int4_dot64(lo, c, x), t_lo[j]);
                t_hi[j] = _mm512_fmadd_ps(s_hi, int4_dot64(hi, c, x + 64), t_hi[j]);
            }
        }
        if (k % 128) { /* the last 64 columns in 32 bytes, the same order on 256-bit registers */
            const __m256i low4_256 = _mm256_set1_epi8(15), c_256 = _mm256_set1_epi8(0x43);
            __m256i p = _mm256_loadu_si256((const __m256i *)(codes + blocks * 64));
            __m256i lo = _mm256_and_si256(p, low4_256), hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), low4_256);
            __m256 s = _mm256_set1_ps(scale_f[(2 * blocks) >> shift]);
            for (int j = 0; j < m; j++) {
                const bf16 *x = in->x + j * k + blocks * 128;
                __m256 d = _mm256_mul_ps(s, _mm256_add_ps(int4_dot32(lo, c_256, x), int4_dot32(hi, c_256, x + 32)));
                t_lo[j] = _mm512_add_ps(t_lo[j], _mm512_zextps256_ps512(d));
            }
        }
        for (int j = 0; j < m; j++)
            y[j * n + r] = out_bf16(sum512(_mm512_add_ps(_mm512_add_ps(t_lo[j], t_hi[j]), rest[j])), b, r);
    }
}

INT4_TARGET static void rows_int4(const void *wp, const void *xp, const void *bp, void *yp, int64_t n, int64_t k, int m,
                                  int64_t r0, int64_t r1) {
    switch (m) { /* a constant m for each: the accumulators stay in registers */
    case 1: int4_rows_m(xp, wp, bp, yp, n, k, 1, r0, r1); break;
    case 2: int4_rows_m(xp, wp, bp, yp, n, k, 2, r0, r1); break;
    case 3: int4_rows_m(xp, wp, bp, yp, n, k, 3, r0, r1); break;
    case 4: int4_rows_m(xp, wp, bp, yp, n, k, 4, r0, r1); break;
    case 5: int4_rows_m(xp, wp, bp, yp, n, k, 5, r0, r1); break;
    case 6: int4_rows_m(xp, wp, bp, yp, n, k, 6, r0, r1); break;
    case 7: int4_rows_m(xp, wp, bp, yp, n, k, 7, r0, r1); break;
    default: int4_rows_m(xp, wp, bp, yp, n, k, 8, r0, r1);
    }
}

/* Rows r0..r1-1 of the bf16 weight (n, k) the codes stand for, (q - 8) * scale + zero rounded to bf16: prompts
 * multiply it with oneDNN */
INT4_TARGET static void int4_store16(bf16 *out, __m256i words, __m512 scale, __m512 zero) { /* 16 codes 0x4300 | q */
    __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(words), 16)); /* 128 + q */
    v = _mm512_fmadd_ps(_mm512_sub_ps(v, _mm512_set1_ps(136.f)), scale, zero);
    _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(v));
}

INT4_TARGET static void rows_int4_dequant(const void *wp, const void *xp, const void *bp, void *yp, int64_t n,
                                          int64_t k, int m, int64_t r0, int64_t r1) {
    const int4_in *in = xp;
    const int64_t groups = k / in->group;
    const __m512i low4 = _mm512_set1_epi8(15), c = _mm512_set1_epi8(0x43);
    (void)bp, (void)m, (void)n;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *codes = (const uint8_t *)wp + r * (k / 2);
        const bf16 *scale = in->scales + r * 2 * groups, *zero = scale + groups;
        bf16 *out = (bf16 *)yp + r * k;
        for (int64_t base = 0; base < k; base += 128) {
            int64_t width = k - base >= 128 ? 128 : 64; /* the unpacked registers hold 32 columns each, in order */
            __m512i p = width == 128 ? _mm512_loadu_si512(codes + base / 2)
                                     : _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(codes + base / 2)));
            __m512i lo = _mm512_and_si512(p, low4), hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), low4);
            __m512i words[4] = {_mm512_unpacklo_epi8(lo, c), _mm512_unpackhi_epi8(lo, c), _mm512_unpacklo_epi8(hi, c),
                                _mm512_unpackhi_epi8(hi, c)};
            for (int u = 0; u < 4; u++) {
                /* 128 columns: register u holds columns 32u..32u+31 (its 128-bit lanes: 8 each, in order) */
                /* 64 columns (256-bit halves): register u's low half holds columns 16u..16u+15 */
                for (int half = 0; half < (width == 128 ? 2 : 1); half++) {
                    int64_t col = base + (width == 128 ? 32 * u + 16 * half : 16 * u);
                    __m512 s = _mm512_set1_ps(bf16_to_float(scale[col / in->group]));
                    __m512 z = _mm512_set1_ps(bf16_to_float(zero[col / in->group]));
                    __m256i w16 = half ? _mm512_extracti64x4_epi64(words[u], 1) : _mm512_castsi512_si256(words[u]);
                    int4_store16(out + col, w16, s, z);
                }
            }
        }
    }
}

/* ---------------------------------------------------------------- threads
 * The rows are split over an OpenMP team. Linked against libgomp.so.1, this module shares the OpenMP runtime
 * torch has loaded (the same soname: the loader reuses it), so its threads are torch's intra-op threads: no
 * second pool competing for the cores, and they are awake when a decode step calls in. */

static int has_bf16, has_avx512, has_avx2; /* what this CPU has (set at import) */
#define ROWS_F32 (has_avx512 ? rows_f32_avx512 : rows_f32_avx2)
static int forked; /* libgomp's threads do not survive fork(): a forked child computes on one thread */
static void after_fork_in_child(void) { forked = 1; }

static void gemv(rows_fn fn, const void *w, const void *x, const void *b, void *y, int64_t n, int64_t k, int m,
                 int threads) {
    if (threads < 2 || forked || n < 32 * threads || n * k < 32768) { /* too small to be worth a parallel region */
        fn(w, x, b, y, n, k, m, 0, n);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        int64_t parts = omp_get_num_threads(), chunk = ((n + parts - 1) / parts + 15) & ~(int64_t)15;
        int64_t r0 = omp_get_thread_num() * chunk, r1 = r0 + chunk < n ? r0 + chunk : n;
        if (r0 < r1) fn(w, x, b, y, n, k, m, r0, r1); /* whole cache lines of output rows per thread */
    }
}

/* ---------------------------------------------------------------- the small steps of one token
 * Values are bf16 or float32 (`is_bf16`); all arithmetic is float32, rounded where the torch version rounds. */

#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

/* e^x for x <= 0 (softmax scores minus their maximum), within ~2 ulp, written so that the compiler vectorises it
 * (glibc's expf is a scalar call): x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor series to r^7, times 2^n. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;                                   /* e^-87 ~ 1.6e-38: no subnormals */
    float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;      /* round(x / ln2): 1.5 * 2^23 rounds */
    float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f; /* ln2 in two parts (Cody-Waite) */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f + r * (8.3333338e-3f +
                                                                   r * (1.3888889e-3f + r * 1.9841270e-4f))))));
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;            /* 2^n */
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

static inline float load_value(const void *p, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_float(((const bf16 *)p)[i]) : ((const float *)p)[i];
}
static inline void store_value(void *p, int64_t i, float v, int is_bf16) {
    if (is_bf16) ((bf16 *)p)[i] = float_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* litmodel.layers.RMSNorm of one row: weight * (x * rsqrt(mean(x^2) + eps)), the normalised row rounded to
 * the dtype before the product (as `self.weight * x_f.to(x.dtype)` does) */
static inline __attribute__((always_inline)) void rmsnorm_body(const void *x, const void *w, void *y, int64_t n,
                                                                float eps, const int is_bf16) {
    float ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) {
        float v = load_value(x, i, is_bf16);
        ss += v * v;
    }
    float r = 1.0f / sqrtf(ss / n + eps);
    for (int64_t i = 0; i < n; i++) {
        float v = load_value(x, i, is_bf16) * r;
        if (is_bf16) v = bf16_to_float(float_to_bf16(v));
        store_value(y, i, load_value(w, i, is_bf16) * v, is_bf16);
    }
}
CLONES static void rmsnorm_bf16(const void *x, const void *w, void *y, int64_t n, float eps) {
    rmsnorm_body(x, w, y, n, eps, 1);
}
CLONES static void rmsnorm_f32(const void *x, const void *w, void *y, int64_t n, float eps) {
    rmsnorm_body(x, w, y, n, eps, 0);
}

/* The heads of `attend` with AVX-512 where hs is a multiple of 16: the query heads that share a kv head (up to 4
 * at a time) read each cached key and value row once (converted to float32 once for all of them), and the
 * scores of 16 slots are summed across lanes together (a transposed reduction: ~3 instructions a score instead
 * of ~8). Each head's arithmetic is the same however heads are grouped, so the threads (heads split over them
 * from 512 slots on) give the same output bit for bit. */
#define ATT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))
#define ATT_HEADS 4

ATT_TARGET static inline __m512 load16_float(const void *p, int64_t i, int is_bf16) {
    if (is_bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const bf16 *)p + i))), 16));
    return _mm512_loadu_ps((const float *)p + i);
}

ATT_TARGET static inline __m512 sum16(const __m512 *v) { /* lane i: the sum of v[i]'s lanes */
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

/* query heads h0..h0+nh-1 (nh <= ATT_HEADS) of kv head g */
ATT_TARGET static void attend_group(const float *q, const void *k_cache, const void *v_cache, int64_t S, int64_t lo,
                                    int64_t L, int64_t g, int64_t h0, int nh, int64_t hs, float scale, void *y,
                                    int is_bf16, float *scores, float *accs) {
    const int64_t base = g * S * hs, chunks = hs / 16;
    __m512 part[ATT_HEADS][16];
    for (int64_t s0 = 0; s0 < L; s0 += 16) { /* scores, 16 slots at a time */
        int64_t n_s = L - s0 < 16 ? L - s0 : 16;
        for (int64_t s = 0; s < 16; s++)
            for (int j = 0; j < nh; j++) part[j][s] = _mm512_setzero_ps();
        for (int64_t s = 0; s < n_s; s++) {
            int64_t at = base + (lo + s0 + s) * hs;
            for (int64_t c = 0; c < chunks; c++) {
                __m512 kv = load16_float(k_cache, at + 16 * c, is_bf16);
                for (int j = 0; j < nh; j++)
                    part[j][s] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (h0 + j) * hs + 16 * c), kv, part[j][s]);
            }
        }
        for (int j = 0; j < nh; j++)
            _mm512_mask_storeu_ps(scores + (h0 + j) * L + s0, (__mmask16)((1u << n_s) - 1),
                                  _mm512_mul_ps(sum16(part[j]), _mm512_set1_ps(scale)));
    }
    for (int j = 0; j < nh; j++) { /* softmax, each weight divided by the total as the generic loop does */
        float *sc = scores + (h0 + j) * L, top = -INFINITY, total = 0;
        for (int64_t s = 0; s < L; s++) top = sc[s] > top ? sc[s] : top;
        for (int64_t s = 0; s < L; s++) total += sc[s] = exp_nonpositive(sc[s] - top);
        for (int64_t s = 0; s < L; s++) sc[s] /= total;
    }
    for (int64_t c = 0; c < chunks; c++) { /* values: 16 dims of every head at a time */
        __m512 acc[ATT_HEADS];
        for (int j = 0; j < nh; j++) acc[j] = _mm512_setzero_ps();
        for (int64_t s = 0; s < L; s++) {
            __m512 v = load16_float(v_cache, base + (lo + s) * hs + 16 * c, is_bf16);
            for (int j = 0; j < nh; j++) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(h0 + j) * L + s]), v, acc[j]);
        }
        for (int j = 0; j < nh; j++) {
            float *out = accs + (h0 + j) * hs + 16 * c;
            _mm512_storeu_ps(out, acc[j]);
            for (int i = 0; i < 16; i++) store_value(y, (h0 + j) * hs + 16 * c + i, out[i], is_bf16);
        }
    }
}

ATT_TARGET static void attend_heads_avx512(const float *q, const void *k_cache, const void *v_cache, int64_t S,
                                           int64_t lo, int64_t L, int64_t H, int64_t G, int64_t hs, float scale,
                                           void *y, int is_bf16, float *scores, float *accs, int threads) {
    int64_t group = H / G;
    if (threads > 1 && L >= 512) { /* long contexts: one head per task, over the threads */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t h = 0; h < H; h++)
            attend_group(q, k_cache, v_cache, S, lo, L, h / group, h, 1, hs, scale, y, is_bf16, scores, accs);
        return;
    }
    for (int64_t h = 0; h < H;) { /* the heads of one kv head together, up to ATT_HEADS at a time */
        int64_t g = h / group, left = (g + 1) * group - h;
        int nh = (int)(left < ATT_HEADS ? left : ATT_HEADS);
        attend_group(q, k_cache, v_cache, S, lo, L, g, h, nh, hs, scale, y, is_bf16, scores, accs);
        h += nh;
    }
}

/* Attention of one new token of one sequence at cache slot p, over slots lo..p:
 *   qkv (H + 2G) heads of hs values [q heads; k heads; v heads];
 *   q and k: the first n_rot dims of each head rotated (RoPE, halves convention: out[i] = x[i] cos[i] -
 *   x[i + n/2] sin[i], out[i + n/2] = x[i + n/2] cos[i + n/2] + x[i] sin[i + n/2]) in float32, if n_rot > 0;
 *   k and v written into the caches (G, S, hs) at slot p, k rounded to the cache dtype;
 *   y (H * hs) = softmax(scale q k^T) v per head, query head h reading kv head h / (H / G). */
static inline __attribute__((always_inline)) void attend_body(
    const void *qkv, const float *cos, const float *sin, int64_t n_rot, void *k_cache, void *v_cache, int64_t S,
    int64_t p, int64_t lo, int64_t H, int64_t G, int64_t hs, float scale, void *y, const int is_bf16, float *scores,
    float *work, int threads) {
    float *q = work, *k = work + H * hs, *accs = work + (H + 1) * hs; /* work: (2 H + 1) * hs floats */
    int64_t half = n_rot / 2, L = p + 1 - lo;
    for (int64_t h = 0; h < H + G; h++) { /* rotate q heads into q, k heads into the cache */
        float *out = h < H ? q + h * hs : k;
        for (int64_t i = 0; i < hs; i++) out[i] = load_value(qkv, h * hs + i, is_bf16);
        for (int64_t i = 0; i < half; i++) {
            float a = out[i], b = out[i + half];
            out[i] = a * cos[i] - b * sin[i];
            out[i + half] = b * cos[i + half] + a * sin[i + half];
        }
        if (h >= H)
            for (int64_t i = 0; i < hs; i++) store_value(k_cache, ((h - H) * S + p) * hs + i, k[i], is_bf16);
    }
    for (int64_t g = 0; g < G; g++) /* v: copied as it is */
        for (int64_t i = 0; i < hs; i++)
            store_value(v_cache, (g * S + p) * hs + i, load_value(qkv, (H + G + g) * hs + i, is_bf16), is_bf16);
    if (has_avx512 && hs % 16 == 0) {
        attend_heads_avx512(q, k_cache, v_cache, S, lo, L, H, G, hs, scale, y, is_bf16, scores, accs, threads);
        return;
    }
    int64_t group = H / G;
    /* heads on several threads only for long contexts (a parallel region costs more than a short head) */
#pragma omp parallel for num_threads(threads) if (threads > 1 && L >= 512) schedule(static)
    for (int64_t h = 0; h < H; h++) {
        int64_t base = (h / group) * S * hs;
        const float *qh = q + h * hs;
        float *scores_h = scores + h * L, *acc = accs + h * hs, top = -INFINITY, total = 0;
        for (int64_t s = 0; s < L; s++) {
            float d = 0;
            int64_t at = base + (lo + s) * hs;
#pragma omp simd reduction(+ : d)
            for (int64_t i = 0; i < hs; i++) d += qh[i] * load_value(k_cache, at + i, is_bf16);
            scores_h[s] = d * scale;
            top = scores_h[s] > top ? scores_h[s] : top;
        }
#pragma omp simd reduction(+ : total)
        for (int64_t s = 0; s < L; s++) total += scores_h[s] = exp_nonpositive(scores_h[s] - top);
        for (int64_t i = 0; i < hs; i++) acc[i] = 0;
        for (int64_t s = 0; s < L; s++) {
            float e = scores_h[s] / total;
            int64_t at = base + (lo + s) * hs;
#pragma omp simd
            for (int64_t i = 0; i < hs; i++) acc[i] += e * load_value(v_cache, at + i, is_bf16);
        }
        for (int64_t i = 0; i < hs; i++) store_value(y, h * hs + i, acc[i], is_bf16);
    }
}

/* one compiled body per dtype (a dtype test inside the loops would keep them from being vectorised) */
#define ATTEND_ARGS                                                                                           \
    const void *qkv, const float *cos, const float *sin, int64_t n_rot, void *k_cache, void *v_cache, int64_t S, \
        int64_t p, int64_t lo, int64_t H, int64_t G, int64_t hs, float scale, void *y, float *scores, float *work,   \
        int threads
CLONES static void attend_bf16(ATTEND_ARGS) {
    attend_body(qkv, cos, sin, n_rot, k_cache, v_cache, S, p, lo, H, G, hs, scale, y, 1, scores, work, threads);
}
CLONES static void attend_f32(ATTEND_ARGS) {
    attend_body(qkv, cos, sin, n_rot, k_cache, v_cache, S, p, lo, H, G, hs, scale, y, 0, scores, work, threads);
}

/* ---------------------------------------------------------------- one decoder layer of one token
 * A Llama block (`DecodeBlock` in litmodel/fast_decode.py) for one new token, in one call: the ~40 Python and
 * torch calls of a layer cost ~45 us here, ~2x its attention, ~1/3 of an int4 layer's products. Each step is
 * what the torch version computes, rounded where it rounds:
 *   h = rmsnorm_1(x); qkv = W_qkv h (+ b); y = attend(qkv); mid = x + (W_proj y (+ b));
 *   h = rmsnorm_2(mid); [gate, up] = W_fc h (+ b); g = silu(gate) * up; out = mid + (W_down g (+ b)).
 * The plan (int64s, built once per layer and cache by `DecodeBlock.native_plan`) holds the sizes, the
 * addresses of weights, caches and scratch buffers, and per product (kind, weight, int4 scales, group, bias,
 * rows, columns). */
enum { LIN_BF16 = 0, LIN_F32 = 1, LIN_INT4 = 2 };
enum { P_IS_BF16, P_N, P_H, P_G, P_HS, P_S, P_K_CACHE, P_V_CACHE, P_NORM_1, P_NORM_2, P_H_BUF, P_QKV_BUF, P_Y_BUF,
       P_MID_BUF, P_FC_BUF, P_G_BUF, P_T_BUF, P_SCORES, P_WORK, P_INTER, P_QKV, P_PROJ = P_QKV + 7,
       P_FC = P_PROJ + 7, P_DOWN = P_FC + 7, P_LEN = P_DOWN + 7 };

static void group_sums(const void *x, int64_t n_sums, int64_t group, float *sums) { /* each group's sum of x */
    for (int64_t i = 0; i < n_sums; i++) {
        const bf16 *xs = (const bf16 *)x + i * group;
        float s = 0;
        for (int64_t c = 0; c < group; c++) s += bf16_to_float(xs[c]);
        sums[i] = s;
    }
}

static void product(const int64_t *pr, const void *x, void *y, int m, int threads) { /* y = x W^T (+ b), m rows */
    const void *w = (const void *)pr[1], *b = (const void *)pr[4];
    int64_t n = pr[5], k = pr[6];
    if (pr[0] == LIN_INT4) {
        float sums[m * (k / 64) + 1];
        group_sums(x, m * (k / pr[3]), pr[3], sums);
        int4_in in = {x, sums, (const bf16 *)pr[2], pr[3]};
        gemv(rows_int4, w, &in, b, y, n, k, m, threads);
    } else {
        gemv(pr[0] == LIN_BF16 ? rows_bf16 : ROWS_F32, w, x, b, y, n, k, m, threads);
    }
}

static inline float silu(float v) { /* v / (1 + e^-v), with e^ of a non-positive number either way */
    float e = exp_nonpositive(v < 0 ? v : -v);
    return v < 0 ? v * e / (1.0f + e) : v / (1.0f + e);
}

static inline __attribute__((always_inline)) void add_body(const void *a, const void *b, void *out, int64_t n,
                                                            const int is_bf16) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) store_value(out, i, load_value(a, i, is_bf16) + load_value(b, i, is_bf16), is_bf16);
}
CLONES static void add_bf16(const void *a, const void *b, void *out, int64_t n) { add_body(a, b, out, n, 1); }
CLONES static void add_f32(const void *a, const void *b, void *out, int64_t n) { add_body(a, b, out, n, 0); }

/* g = silu(gate) * up (F.silu(gate).mul_(up): silu rounded to the dtype, then the product) */
static inline __attribute__((always_inline)) void swiglu_body(const void *gate_up, void *g, int64_t n,
                                                               const int is_bf16) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float s = silu(load_value(gate_up, i, is_bf16));
        if (is_bf16) s = bf16_to_float(float_to_bf16(s));
        store_value(g, i, s * load_value(gate_up, n + i, is_bf16), is_bf16);
    }
}
CLONES static void swiglu_bf16(const void *gate_up, void *g, int64_t n) { swiglu_body(gate_up, g, n, 1); }
CLONES static void swiglu_f32(const void *gate_up, void *g, int64_t n) { swiglu_body(gate_up, g, n, 0); }

/* m <= MAX_M consecutive tokens at slots p..p+m-1 (x, out: m rows of n; cos, sin: m rows of n_rot), token i
 * seeing slots lo_i..p+i with lo_i = lo, or the last `window` slots where window > 0. Each product makes one pass
 * over the weights for all rows, and each row comes out the same, bit for bit, as alone. */
static void decode_layer(const int64_t *P, const double *eps_scale, const void *x, void *out, const float *cos,
                         const float *sin, int64_t n_rot, int64_t p, int64_t lo, int64_t window, int m, int threads) {
    int is_bf16 = (int)P[P_IS_BF16];
    int64_t n = P[P_N], size = is_bf16 ? 2 : 4, H = P[P_H], G = P[P_G], hs = P[P_HS], inter = P[P_INTER];
    char *h = (char *)P[P_H_BUF], *qkv = (char *)P[P_QKV_BUF], *y = (char *)P[P_Y_BUF], *mid = (char *)P[P_MID_BUF];
    char *fc = (char *)P[P_FC_BUF], *g = (char *)P[P_G_BUF], *t = (char *)P[P_T_BUF];
    void (*rmsnorm)(const void *, const void *, void *, int64_t, float) = is_bf16 ? rmsnorm_bf16 : rmsnorm_f32;
    for (int i = 0; i < m; i++)
        rmsnorm((const char *)x + i * n * size, (const void *)P[P_NORM_1], h + i * n * size, n, (float)eps_scale[0]);
    product(P + P_QKV, h, qkv, m, threads);
    for (int i = 0; i < m; i++) { /* token i writes its cache slot before token i + 1 reads it */
        int64_t at = p + i, from = window > 0 ? (at + 1 - window > 0 ? at + 1 - window : 0) : lo;
        (is_bf16 ? attend_bf16 : attend_f32)(qkv + i * (H + 2 * G) * hs * size, cos + i * n_rot, sin + i * n_rot, n_rot,
                                             (void *)P[P_K_CACHE], (void *)P[P_V_CACHE], P[P_S], at, from, H, G, hs,
                                             (float)eps_scale[2], y + i * H * hs * size, (float *)P[P_SCORES],
                                             (float *)P[P_WORK], threads);
    }
    product(P + P_PROJ, y, t, m, threads);
    (is_bf16 ? add_bf16 : add_f32)(x, t, mid, m * n);
    for (int i = 0; i < m; i++)
        rmsnorm(mid + i * n * size, (const void *)P[P_NORM_2], h + i * n * size, n, (float)eps_scale[1]);
    product(P + P_FC, h, fc, m, threads);
    for (int i = 0; i < m; i++)
        (is_bf16 ? swiglu_bf16 : swiglu_f32)(fc + i * 2 * inter * size, g + i * inter * size, inter);
    product(P + P_DOWN, g, t, m, threads);
    (is_bf16 ? add_bf16 : add_f32)(mid, t, out, m * n);
}

/* ---------------------------------------------------------------- Python bindings */

/* gemv_*(w, x, b, y, n, k, m, threads): y (m, n) = x (m, k) W^T + b, W (n, k), m <= MAX_M */
static PyObject *call(rows_fn fn, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) return PyErr_Format(PyExc_TypeError, "expected 8 arguments (w, x, b, y, n, k, m, threads)");
    void *p[4];
    for (int i = 0; i < 4; i++) {
        p[i] = PyLong_AsVoidPtr(args[i]);
        if (PyErr_Occurred()) return NULL;
    }
    long long n = PyLong_AsLongLong(args[4]), k = PyLong_AsLongLong(args[5]);
    long m = PyLong_AsLong(args[6]), threads = PyLong_AsLong(args[7]);
    if (PyErr_Occurred()) return NULL;
    if (!p[0] || !p[1] || !p[3] || n < 0 || k < 1 || m < 1 || m > MAX_M)
        return PyErr_Format(PyExc_ValueError, "bad gemv arguments");
    Py_BEGIN_ALLOW_THREADS gemv(fn, p[0], p[1], p[2], p[3], n, k, (int)m, (int)threads);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *py_gemv_bf16(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!has_bf16) return PyErr_Format(PyExc_RuntimeError, "this CPU has no AVX512-BF16");
    return call(rows_bf16, args, nargs);
}

static PyObject *py_gemv_f32(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!has_avx2) return PyErr_Format(PyExc_RuntimeError, "this CPU has no AVX2 + FMA");
    return call(ROWS_F32, args, nargs);
}

static PyObject *py_gemv_f32_avx2(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!has_avx2) return PyErr_Format(PyExc_RuntimeError, "this CPU has no AVX2 + FMA");
    return call(rows_f32_avx2, args, nargs); /* what an AVX2-only CPU runs: for the tests on AVX-512 machines */
}

/* gemv_int4(w, scales, group, x, b, y, n, k, m, threads): y (m, n) = x (m, k) W^T + b, W in int4 (see int4_in);
 * int4_dequant(w, scales, group, out, n, k, threads): out (n, k) = W in bf16 */
static PyObject *int4_call(int dequant, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t want = dequant ? 7 : 10;
    if (nargs != want) return PyErr_Format(PyExc_TypeError, "expected %zd arguments", want);
    if (!has_bf16) return PyErr_Format(PyExc_RuntimeError, "this CPU has no AVX512-BF16");
    int at[5] = {0, 1, 3, 4, 5}, n_ptrs = dequant ? 3 : 5;
    void *p[5] = {0};
    for (int i = 0; i < n_ptrs; i++) {
        p[i] = PyLong_AsVoidPtr(args[at[i]]);
        if (PyErr_Occurred()) return NULL;
    }
    long long group = PyLong_AsLongLong(args[2]), n = PyLong_AsLongLong(args[dequant ? 4 : 6]),
              k = PyLong_AsLongLong(args[dequant ? 5 : 7]);
    long m = dequant ? 1 : PyLong_AsLong(args[8]), threads = PyLong_AsLong(args[dequant ? 6 : 9]);
    if (PyErr_Occurred()) return NULL;
    void *w = p[0], *x = dequant ? NULL : p[2], *b = dequant ? NULL : p[3], *y = dequant ? p[2] : p[4];
    if (!w || !p[1] || !y || (!dequant && !x) || n < 0 || (group != 64 && group != 128 && group != 256) ||
        k < 64 || k % group || k % 64 || m < 1 || m > MAX_M)
        return PyErr_Format(PyExc_ValueError, "bad int4 arguments");
    int4_in in = {x, NULL, p[1], group};
    int64_t groups = k / group, n_sums = dequant ? 0 : m * groups;
    float stack[1024], *sums = n_sums <= 1024 ? stack : malloc(n_sums * sizeof(float));
    if (!sums) return PyErr_NoMemory();
    group_sums(x, n_sums, group, sums);
    in.group_sums = sums;
    Py_BEGIN_ALLOW_THREADS gemv(dequant ? rows_int4_dequant : rows_int4, w, &in, b, y, n, k, (int)m, (int)threads);
    Py_END_ALLOW_THREADS if (sums != stack) free(sums);
    Py_RETURN_NONE;
}

static PyObject *py_gemv_int4(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return int4_call(0, args, nargs);
}

static PyObject *py_int4_dequant(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return int4_call(1, args, nargs);
}

static PyObject *py_rmsnorm(PyObject *self, PyObject *args) {
    unsigned long long x, w, y;
    long long n;
    float eps;
    int is_bf16;
    if (!PyArg_ParseTuple(args, "KKKLfp", &x, &w, &y, &n, &eps, &is_bf16)) return NULL;
    if (!x || !w || !y || n < 1) return PyErr_Format(PyExc_ValueError, "bad rmsnorm arguments");
    (is_bf16 ? rmsnorm_bf16 : rmsnorm_f32)((void *)x, (void *)w, (void *)y, n, eps);
    Py_RETURN_NONE;
}

/* attend(qkv, cos, sin, n_rot, k_cache, v_cache, S, p, lo, H, G, hs, scale, y, is_bf16[, threads]): see
 * attend_body() */
static PyObject *py_attend(PyObject *self, PyObject *args) {
    unsigned long long qkv, cos, sin, kc, vc, y;
    long long n_rot, S, p, lo, H, G, hs;
    float scale;
    int is_bf16, threads = 1;
    if (!PyArg_ParseTuple(args, "KKKLKKLLLLLLfKp|i", &qkv, &cos, &sin, &n_rot, &kc, &vc, &S, &p, &lo, &H, &G, &hs,
                          &scale, &y, &is_bf16, &threads))
        return NULL;
    if (!qkv || !kc || !vc || !y || (n_rot && (!cos || !sin)) || n_rot < 0 || n_rot > hs || n_rot % 2 || G < 1 ||
        H % G || p < 0 || p >= S || lo < 0 || lo > p || hs < 1)
        return PyErr_Format(PyExc_ValueError, "bad attend arguments");
    int64_t n_scores = H * (p + 1 - lo); /* each head's scores over the visible slots */
    float stack[4096], *scores = n_scores <= 4096 ? stack : malloc(n_scores * sizeof(float));
    float *work = malloc((2 * H + 1) * hs * sizeof(float));
    if (!scores || !work) {
        if (scores != stack) free(scores);
        free(work);
        return PyErr_NoMemory();
    }
    if (forked || threads < 1) threads = 1;
    Py_BEGIN_ALLOW_THREADS(is_bf16 ? attend_bf16 : attend_f32)((void *)qkv, (float *)cos, (float *)sin, n_rot,
                                                               (void *)kc, (void *)vc, S, p, lo, H, G, hs, scale,
                                                               (void *)y, scores, work, threads);
    Py_END_ALLOW_THREADS
    if (scores != stack) free(scores);
    free(work);
    Py_RETURN_NONE;
}

/* decode_layer(plan, eps_scale, x, out, cos, sin, n_rot, p, lo, window, m, threads): see decode_layer() */
static PyObject *py_decode_layer(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 12) return PyErr_Format(PyExc_TypeError, "expected 12 arguments");
    void *ptr[6];
    for (int i = 0; i < 6; i++) {
        ptr[i] = PyLong_AsVoidPtr(args[i]);
        if (PyErr_Occurred()) return NULL;
    }
    long long n_rot = PyLong_AsLongLong(args[6]), p = PyLong_AsLongLong(args[7]), lo = PyLong_AsLongLong(args[8]),
              window = PyLong_AsLongLong(args[9]);
    long m = PyLong_AsLong(args[10]), threads = PyLong_AsLong(args[11]);
    if (PyErr_Occurred()) return NULL;
    const int64_t *P = ptr[0];
    if (!P || !ptr[1] || !ptr[2] || !ptr[3] || (n_rot && (!ptr[4] || !ptr[5])) || n_rot < 0 || n_rot > P[P_HS] ||
        n_rot % 2 || m < 1 || m > MAX_M || p < 0 || p + m > P[P_S] || lo < 0 || lo > p || window < 0)
        return PyErr_Format(PyExc_ValueError, "bad decode_layer arguments");
    if (P[P_IS_BF16] && !has_bf16) return PyErr_Format(PyExc_RuntimeError, "this CPU has no AVX512-BF16");
    if (forked || threads < 1) threads = 1;
    Py_BEGIN_ALLOW_THREADS decode_layer(P, ptr[1], ptr[2], ptr[3], ptr[4], ptr[5], n_rot, p, lo, window, (int)m,
                                        (int)threads);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *py_layer_plan_size(PyObject *self, PyObject *unused) { return PyLong_FromLong(P_LEN); }

static PyObject *py_supported(PyObject *self, PyObject *unused) {
    return Py_BuildValue("(OO)", has_bf16 ? Py_True : Py_False, has_avx2 ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"gemv_bf16", (PyCFunction)(void (*)(void))py_gemv_bf16, METH_FASTCALL, "y = x W^T + b in bf16, m rows"},
    {"gemv_f32", (PyCFunction)(void (*)(void))py_gemv_f32, METH_FASTCALL, "y = x W^T + b in float32, m rows"},
    {"gemv_f32_avx2", (PyCFunction)(void (*)(void))py_gemv_f32_avx2, METH_FASTCALL, "gemv_f32's AVX2 version"},
    {"gemv_int4", (PyCFunction)(void (*)(void))py_gemv_int4, METH_FASTCALL, "y = x W^T + b, W in int4, m rows"},
    {"int4_dequant", (PyCFunction)(void (*)(void))py_int4_dequant, METH_FASTCALL, "the bf16 weight of int4 codes"},
    {"decode_layer", (PyCFunction)(void (*)(void))py_decode_layer, METH_FASTCALL, "one Llama block, one token"},
    {"layer_plan_size", py_layer_plan_size, METH_NOARGS, "the number of int64s in a decode_layer plan"},
    {"rmsnorm", py_rmsnorm, METH_VARARGS, "RMSNorm of one row"},
    {"attend", py_attend, METH_VARARGS, "attention of one new token over the cache"},
    {"supported", py_supported, METH_NOARGS, "(bf16 gemv, fp32 gemv usable) on this CPU"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Kernels for batch-1 decoding on CPU", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    __builtin_cpu_init();
    has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl");
    has_bf16 = has_avx512 && __builtin_cpu_supports("avx512bf16");
    has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    pthread_atfork(NULL, NULL, after_fork_in_child);
    return PyModule_Create(&module);
}
