/* expertpager's native CPU kernels (runtime/native.py builds and loads them): the compact tier's packed matrices
   times activations quantized to int8 in groups of 32 (one scale each, as llama.cpp's Q8 activations), integer dot
   products, group scales applied in float32, output rounded to bfloat16. Two instruction sets, chosen at run time:
   AVX-512 (VNNI, VBMI) and AVX2 (FMA). They give the same bits: the integer sums are exact and each output's
   float32 operations run in the same order in both (an AVX2 register holds half an AVX-512 one's lanes).
   Each output element is computed by one thread in a fixed order: results do not depend on the thread count or on
   where the weights lie in memory. The file is compiled for AVX2; the AVX-512 functions carry their own target. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32
#define MT 2       /* activation rows per pass over a block of 64 int4 rows */
#define ROWS 64    /* int8 rows per task */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Quantized activations: codes int8 [M, K] (round to nearest even of x / scale), scale [M, K/32] (max |x| / 127 of
   each group of 32), code sums [M, K/32]; for int8 weights also |codes| [M, K], the sign bits of each 64 codes
   (AVX-512 only) and each 64 codes' two scales spread over 16 lanes [M, K/64, 16]. */
typedef struct {
    long M, K;
    int8_t *q;
    float *scale;
    int32_t *sums;
    uint8_t *absq;
    uint64_t *neg;
    float *lanes;
} Acts;

typedef void (*quantize_fn)(const uint16_t *x, Acts *a);
typedef void (*q4_block_fn)(int mt, const Acts *a, long m0, const uint8_t *w, const uint16_t *sz, long N, float *out);
typedef void (*q8_rows_fn)(const Acts *a, const int8_t *w, const uint16_t *scale, long n0, long n1, long N, uint16_t *out);

static float group_step(float amax) { return amax / 127.0f; }

static void spread_scales(Acts *a) {
    for (long i = 0; i < a->M * a->K / 64; i++)
        for (int l = 0; l < 16; l++) a->lanes[i * 16 + l] = a->scale[i * 2 + l / 8];
}

AVX512 static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

AVX512 static void quantize_avx512(const uint16_t *x, Acts *a) {
    for (long i = 0; i < a->M * a->K / GROUP; i++) {
        __m512 lo = load_bf16x16(x + i * GROUP), hi = load_bf16x16(x + i * GROUP + 16);
        float d = group_step(_mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi))));
        __m512 inv = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        __m512i qlo = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(lo, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m512i qhi = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(hi, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm_storeu_si128((__m128i *)(a->q + i * GROUP), _mm512_cvtsepi32_epi8(qlo));
        _mm_storeu_si128((__m128i *)(a->q + i * GROUP + 16), _mm512_cvtsepi32_epi8(qhi));
        a->scale[i] = d;
        a->sums[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    }
    if (a->absq)
        for (long i = 0; i < a->M * a->K / 64; i++) {
            __m512i v = _mm512_loadu_si512(a->q + i * 64);
            _mm512_storeu_si512(a->absq + i * 64, _mm512_abs_epi8(v));
            a->neg[i] = _mm512_movepi8_mask(v);
        }
}

static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static inline int32_t hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

static void quantize_avx2(const uint16_t *x, Acts *a) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (long i = 0; i < a->M * a->K / GROUP; i++) {
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = load_bf16x8(x + i * GROUP + 8 * j);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
        }
        float d = group_step(hmax8(amax));
        __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        __m256i c[4], sum = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            c[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            sum = _mm256_add_epi32(sum, c[j]);
        }
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
        /* the packs interleave 128-bit lanes: dwords 0 4 1 5 2 6 3 7 back in order */
        bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(a->q + i * GROUP), bytes);
        a->scale[i] = d;
        a->sums[i] = hsum8i(sum);
    }
    if (a->absq)
        for (long i = 0; i < a->M * a->K / 32; i++)
            _mm256_storeu_si256((__m256i *)(a->absq + i * 32), _mm256_abs_epi8(_mm256_loadu_si256((const __m256i *)(a->q + i * 32))));
}

/* int4: one block of 64 output rows of torch's CPU int4 packing (for each k, 32 bytes: byte j holds row j in its
   low nibble, row j + 32 in its high one) times `mt` activation rows from m0, into out[m * 64 + row] (float32).
   scale_zero: bf16 [K/32][N][2], weight = (code - 8) * scale + zero, so per group of 32
   sum(weight * x) = x scale * (scale * sum(code * xq) + (zero - 8 scale) * sum(xq)). */

AVX512 static void q4_block_avx512(int mt, const Acts *a, long m0, const uint8_t *w, const uint16_t *sz, long N, float *out) {
    const long K = a->K, G = K / GROUP;
    const __m512i low = _mm512_set1_epi8(0x0F), high16 = _mm512_set1_epi32((int)0xFFFF0000u);
    uint8_t idx[2][64];  /* byte 4 j + i of quads[h]: row k + i's byte 16 h + j (x01 holds rows k, k+1; x23 k+2, k+3) */
    for (int h = 0; h < 2; h++) for (int j = 0; j < 16; j++) for (int i = 0; i < 4; i++) idx[h][4 * j + i] = (uint8_t)(32 * i + 16 * h + j);
    const __m512i quads0 = _mm512_loadu_si512(idx[0]), quads1 = _mm512_loadu_si512(idx[1]);
    __m512 accf[MT][4];
    for (int m = 0; m < mt; m++) for (int j = 0; j < 4; j++) accf[m][j] = _mm512_setzero_ps();
    for (long g = 0; g < G; g++) {
        __m512i acc[MT][4];
        for (int m = 0; m < mt; m++) for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_si512();
        for (long k = g * GROUP; k < (g + 1) * GROUP; k += 4) {  /* 4 k of 16 rows in the quads one vpdpbusd takes */
            const uint8_t *r = w + k * 32;
            __m512i x01 = _mm512_loadu_si512(r), x23 = _mm512_loadu_si512(r + 64);
            __m512i p0 = _mm512_permutex2var_epi8(x01, quads0, x23), p1 = _mm512_permutex2var_epi8(x01, quads1, x23);
            __m512i e[4] = {_mm512_and_si512(p0, low), _mm512_and_si512(p1, low),  /* rows 0-15, 16-31, 32-47, 48-63 */
                            _mm512_and_si512(_mm512_srli_epi16(p0, 4), low), _mm512_and_si512(_mm512_srli_epi16(p1, 4), low)};
            for (int m = 0; m < mt; m++) {
                int32_t quad;
                memcpy(&quad, a->q + (m0 + m) * K + k, 4);
                __m512i xb = _mm512_set1_epi32(quad);
                for (int j = 0; j < 4; j++) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], e[j], xb);
            }
        }
        __m512 s[4], zs[4];  /* scale and zero - 8 scale of each row's group g */
        for (int j = 0; j < 4; j++) {
            __m512i v = _mm512_loadu_si512(sz + (g * N + 16 * j) * 2);
            s[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            zs[j] = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s[j], _mm512_castsi512_ps(_mm512_and_si512(v, high16)));
        }
        for (int m = 0; m < mt; m++) {
            __m512 xs = _mm512_set1_ps(a->scale[(m0 + m) * G + g]), xsum = _mm512_set1_ps((float)a->sums[(m0 + m) * G + g]);
            for (int j = 0; j < 4; j++) {
                __m512 dot = _mm512_fmadd_ps(s[j], _mm512_cvtepi32_ps(acc[m][j]), _mm512_mul_ps(zs[j], xsum));
                accf[m][j] = _mm512_fmadd_ps(xs, dot, accf[m][j]);
            }
        }
    }
    for (int m = 0; m < mt; m++) for (int j = 0; j < 4; j++) _mm512_storeu_ps(out + m * 64 + 16 * j, accf[m][j]);
}

/* AVX2: 8 rows a register. Interleaving 4 k rows' bytes within 128-bit lanes leaves register j of each half
   holding rows {4j..4j+3, 16+4j..16+4j+3} (+32 for the high nibbles); scales are permuted to match, outputs back. */
static void q4_block_avx2(int mt, const Acts *a, long m0, const uint8_t *w, const uint16_t *sz, long N, float *out) {
    const long K = a->K, G = K / GROUP;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), high16 = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 accf[MT][8];
    for (int m = 0; m < mt; m++) for (int j = 0; j < 8; j++) accf[m][j] = _mm256_setzero_ps();
    for (long g = 0; g < G; g++) {
        __m256i acc[MT][8];
        for (int m = 0; m < mt; m++) for (int j = 0; j < 8; j++) acc[m][j] = _mm256_setzero_si256();
        for (long k = g * GROUP; k < (g + 1) * GROUP; k += 4) {
            const uint8_t *r = w + k * 32;
            __m256i e[8];
            for (int h = 0; h < 2; h++) {  /* h = 0: low nibbles (rows 0-31), 1: high (rows 32-63) */
                __m256i v[4];
                for (int i = 0; i < 4; i++) {
                    __m256i b = _mm256_loadu_si256((const __m256i *)(r + 32 * i));
                    v[i] = _mm256_and_si256(h ? _mm256_srli_epi16(b, 4) : b, low);
                }
                __m256i a01 = _mm256_unpacklo_epi8(v[0], v[1]), b01 = _mm256_unpackhi_epi8(v[0], v[1]);
                __m256i a23 = _mm256_unpacklo_epi8(v[2], v[3]), b23 = _mm256_unpackhi_epi8(v[2], v[3]);
                e[4 * h + 0] = _mm256_unpacklo_epi16(a01, a23);  /* rows 0-3 | 16-19 */
                e[4 * h + 1] = _mm256_unpackhi_epi16(a01, a23);  /* rows 4-7 | 20-23 */
                e[4 * h + 2] = _mm256_unpacklo_epi16(b01, b23);  /* rows 8-11 | 24-27 */
                e[4 * h + 3] = _mm256_unpackhi_epi16(b01, b23);  /* rows 12-15 | 28-31 */
            }
            for (int m = 0; m < mt; m++) {
                int32_t quad;
                memcpy(&quad, a->q + (m0 + m) * K + k, 4);
                __m256i xb = _mm256_set1_epi32(quad);
                for (int j = 0; j < 8; j++)
                    acc[m][j] = _mm256_add_epi32(acc[m][j], _mm256_madd_epi16(_mm256_maddubs_epi16(e[j], xb), ones));
            }
        }
        __m256 s[8], zs[8];
        for (int h = 0; h < 2; h++) {
            __m256 ns[4], nz[4];  /* natural order: rows 32 h + 8 t .. + 7 */
            for (int t = 0; t < 4; t++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(sz + (g * N + 32 * h + 8 * t) * 2));
                ns[t] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                nz[t] = _mm256_castsi256_ps(_mm256_and_si256(v, high16));
            }
            for (int j = 0; j < 4; j++) {  /* register j: rows 4j..4j+3 (in ns[j/2]'s half j%2) and 16 more */
                int sel = j % 2 ? 0x31 : 0x20;
                s[4 * h + j] = _mm256_permute2f128_ps(ns[j / 2], ns[j / 2 + 2], sel);
                zs[4 * h + j] = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s[4 * h + j], _mm256_permute2f128_ps(nz[j / 2], nz[j / 2 + 2], sel));
            }
        }
        for (int m = 0; m < mt; m++) {
            __m256 xs = _mm256_set1_ps(a->scale[(m0 + m) * G + g]), xsum = _mm256_set1_ps((float)a->sums[(m0 + m) * G + g]);
            for (int j = 0; j < 8; j++) {
                __m256 dot = _mm256_fmadd_ps(s[j], _mm256_cvtepi32_ps(acc[m][j]), _mm256_mul_ps(zs[j], xsum));
                accf[m][j] = _mm256_fmadd_ps(xs, dot, accf[m][j]);
            }
        }
    }
    for (int m = 0; m < mt; m++)  /* registers (0, 1) hold rows 0-7 | 16-23 of each half, (2, 3) rows 8-15 | 24-31 */
        for (int h = 0; h < 2; h++)
            for (int p = 0; p < 2; p++) {
                __m256 a = accf[m][4 * h + 2 * p], b = accf[m][4 * h + 2 * p + 1];
                _mm256_storeu_ps(out + m * 64 + 32 * h + 8 * p, _mm256_permute2f128_ps(a, b, 0x20));
                _mm256_storeu_ps(out + m * 64 + 32 * h + 8 * p + 16, _mm256_permute2f128_ps(a, b, 0x31));
            }
}

/* The sum of 16 lanes given as two halves, in one fixed order for both instruction sets (a compiler's own
   _mm512_reduce_add_ps may add in another). */
static inline float sum_halves(__m256 hi, __m256 lo) {
    __m256 t = _mm256_add_ps(hi, lo);
    __m128 u = _mm_add_ps(_mm256_extractf128_ps(t, 1), _mm256_castps256_ps128(t));
    u = _mm_add_ps(u, _mm_shuffle_ps(u, u, 0x4E));
    return _mm_cvtss_f32(u) + _mm_cvtss_f32(_mm_shuffle_ps(u, u, 1));
}

/* int8 rows n0..n1 times every activation row. Each 64-byte step multiplies |xq| (unsigned) by w with xq's sign
   (signed); lanes 0-7 of the sum hold one group of 32, lanes 8-15 the next. One weight row at a time: a single
   sequential stream per thread reads faster here than several interleaved rows. */
AVX512 static void q8_rows_avx512(const Acts *a, const int8_t *w, const uint16_t *scale, long n0, long n1, long N, uint16_t *out) {
    const long K = a->K, C = K / 64;
    for (long n = n0; n < n1; n++) {
        float rs = bf16_to_f32(scale[n]);
        for (long m = 0; m < a->M; m++) {
            __m512 acc = _mm512_setzero_ps();
            for (long c = 0; c < C; c++) {
                long i = m * C + c;
                __m512i wv = _mm512_loadu_si512(w + n * K + c * 64);
                __m512i b = _mm512_mask_sub_epi8(wv, a->neg[i], _mm512_setzero_si512(), wv);
                __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(a->absq + i * 64), b);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(a->lanes + i * 16), acc);
            }
            __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
            out[m * N + n] = f32_to_bf16(sum_halves(hi, _mm512_castps512_ps256(acc)) * rs);
        }
    }
}

static void q8_rows_avx2(const Acts *a, const int8_t *w, const uint16_t *scale, long n0, long n1, long N, uint16_t *out) {
    const long K = a->K, C = K / 64;
    const __m256i ones = _mm256_set1_epi16(1);
    for (long n = n0; n < n1; n++) {
        float rs = bf16_to_f32(scale[n]);
        for (long m = 0; m < a->M; m++) {
            __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  /* an AVX-512 sum's lanes 0-7 and 8-15 */
            for (long c = 0; c < C; c++) {
                long i = m * C + c;
                for (int h = 0; h < 2; h++) {
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(w + n * K + c * 64 + 32 * h));
                    __m256i b = _mm256_sign_epi8(wv, _mm256_loadu_si256((const __m256i *)(a->q + i * 64 + 32 * h)));
                    __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(a->absq + i * 64 + 32 * h)), b), ones);
                    acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(a->lanes + i * 16 + 8 * h), acc[h]);
                }
            }
            out[m * N + n] = f32_to_bf16(sum_halves(acc[1], acc[0]) * rs);
        }
    }
}

static int acts_alloc(Acts *a, long M, long K, int int8_weights) {
    memset(a, 0, sizeof(*a));
    a->M = M; a->K = K;
    a->q = malloc(M * K);
    a->scale = malloc(sizeof(float) * M * K / GROUP);
    a->sums = malloc(sizeof(int32_t) * M * K / GROUP);
    if (int8_weights) {
        a->absq = malloc(M * K);
        a->neg = malloc(sizeof(uint64_t) * M * K / 64);
        a->lanes = malloc(sizeof(float) * M * K / 4);
    }
    return a->q && a->scale && a->sums && (!int8_weights || (a->absq && a->neg && a->lanes));
}

static void acts_free(Acts *a) { free(a->q); free(a->scale); free(a->sums); free(a->absq); free(a->neg); free(a->lanes); }

/* out bf16 [M, N] = x bf16 [M, K] times the int4-packed [N, K] matrix w with its scale_zero (N a multiple of 64, K
   of 32): torch's _weight_int4pack_mm_for_cpu(x, w, 32, scale_zero) with int8 activations. Returns 0 when out of
   memory. */
static int q4_matmul(quantize_fn quantize, q4_block_fn block, const uint16_t *x, long M, long K, const uint8_t *w,
                     const uint16_t *sz, long N, uint16_t *out, int threads) {
    Acts a;
    if (!acts_alloc(&a, M, K, 0)) { acts_free(&a); return 0; }
    quantize(x, &a);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long nb = 0; nb < N / 64; nb++) {
        float tile[MT * 64];
        for (long m0 = 0; m0 < M; m0 += MT) {
            int mt = M - m0 < MT ? (int)(M - m0) : MT;
            block(mt, &a, m0, w + nb * K * 32, sz + nb * 64 * 2, N, tile);
            for (int m = 0; m < mt; m++)
                for (int j = 0; j < 64; j++) out[(m0 + m) * N + nb * 64 + j] = f32_to_bf16(tile[m * 64 + j]);
        }
    }
    acts_free(&a);
    return 1;
}

/* out bf16 [M, N] = x bf16 [M, K] times int8 rows w [N, K] with bf16 row scales (K a multiple of 64):
   _weight_int8pack_mm(x, w, scale) with int8 activations. Returns 0 when out of memory. */
static int q8_matmul(quantize_fn quantize, q8_rows_fn rows, const uint16_t *x, long M, long K, const int8_t *w,
                     const uint16_t *scale, long N, uint16_t *out, int threads) {
    Acts a;
    if (!acts_alloc(&a, M, K, 1)) { acts_free(&a); return 0; }
    quantize(x, &a);
    spread_scales(&a);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long n0 = 0; n0 < N; n0 += ROWS) rows(&a, w, scale, n0, n0 + ROWS < N ? n0 + ROWS : N, N, out);
    acts_free(&a);
    return 1;
}

int ep_q4_matmul_avx512(const uint16_t *x, long M, long K, const uint8_t *w, const uint16_t *sz, long N, uint16_t *out, int threads) {
    return q4_matmul(quantize_avx512, q4_block_avx512, x, M, K, w, sz, N, out, threads);
}

int ep_q8_matmul_avx512(const uint16_t *x, long M, long K, const int8_t *w, const uint16_t *scale, long N, uint16_t *out, int threads) {
    return q8_matmul(quantize_avx512, q8_rows_avx512, x, M, K, w, scale, N, out, threads);
}

int ep_q4_matmul_avx2(const uint16_t *x, long M, long K, const uint8_t *w, const uint16_t *sz, long N, uint16_t *out, int threads) {
    return q4_matmul(quantize_avx2, q4_block_avx2, x, M, K, w, sz, N, out, threads);
}

int ep_q8_matmul_avx2(const uint16_t *x, long M, long K, const int8_t *w, const uint16_t *scale, long N, uint16_t *out, int threads) {
    return q8_matmul(quantize_avx2, q8_rows_avx2, x, M, K, w, scale, N, out, threads);
}
