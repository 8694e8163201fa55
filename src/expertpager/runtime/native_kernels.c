/* expertpager's native CPU kernels (runtime/native.py builds and loads them): the compact tier's packed matrices
   times activations quantized to int8 in groups of 32 (one scale each, as llama.cpp's Q8 activations), multiplied
   with AVX-512 VNNI integer dot products; group scales applied in float32, output rounded to bfloat16.
   Each output element is computed by one thread in a fixed order: results do not depend on the thread count or on
   where the weights lie in memory. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32
#define MT 2  /* activation rows per pass over a block of 64 int4 rows */

static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* x bf16 [M, K] -> codes int8 [M, K] (round to nearest even of x / scale), scale [M, K/32] (max |x| / 127 of each
   group of 32), code sums [M, K/32]. */
static void quantize_rows(const uint16_t *x, long M, long K, int8_t *q, float *scale, int32_t *sums) {
    for (long i = 0; i < M * K / GROUP; i++) {
        __m512 a = load_bf16x16(x + i * GROUP), b = load_bf16x16(x + i * GROUP + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        __m512i qa = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(a, _mm512_set1_ps(inv)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m512i qb = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(b, _mm512_set1_ps(inv)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm_storeu_si128((__m128i *)(q + i * GROUP), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(q + i * GROUP + 16), _mm512_cvtsepi32_epi8(qb));
        scale[i] = d;
        sums[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    }
}

/* One block of 64 output rows of torch's CPU int4 packing (for each k, 32 bytes: byte j holds row j in its low
   nibble, row j + 32 in its high one) times `mt` quantized activation rows, into out[m * 64 + row] (float32).
   scale_zero: bf16 [K/32][N][2], weight = (code - 8) * scale + zero. Each step gathers 4 k of 16 rows into the
   byte quads that one VNNI dot product multiplies with 4 activation codes. */
static void q4_block(int mt, const int8_t *q, const float *qs, const int32_t *qsum, long K, const uint8_t *w,
                     const uint16_t *sz, long N, const __m512i quads[2], float *out) {
    const __m512i low = _mm512_set1_epi8(0x0F), high16 = _mm512_set1_epi32((int)0xFFFF0000u);
    const long G = K / GROUP;
    __m512 accf[MT][4];
    for (int m = 0; m < mt; m++) for (int j = 0; j < 4; j++) accf[m][j] = _mm512_setzero_ps();
    for (long g = 0; g < G; g++) {
        __m512i acc[MT][4];
        for (int m = 0; m < mt; m++) for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_si512();
        for (long k = g * GROUP; k < (g + 1) * GROUP; k += 4) {
            const uint8_t *r = w + k * 32;
            __m512i x01 = _mm512_loadu_si512(r), x23 = _mm512_loadu_si512(r + 64);
            __m512i p0 = _mm512_permutex2var_epi8(x01, quads[0], x23), p1 = _mm512_permutex2var_epi8(x01, quads[1], x23);
            __m512i e[4] = {_mm512_and_si512(p0, low), _mm512_and_si512(p1, low),  /* rows 0-15, 16-31, 32-47, 48-63 */
                            _mm512_and_si512(_mm512_srli_epi16(p0, 4), low), _mm512_and_si512(_mm512_srli_epi16(p1, 4), low)};
            for (int m = 0; m < mt; m++) {
                int32_t quad;
                memcpy(&quad, q + m * K + k, 4);
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
        for (int m = 0; m < mt; m++) {  /* sum of weight * x = x scale * (scale * sum(code * xq) + (zero - 8 scale) * sum(xq)) */
            __m512 xs = _mm512_set1_ps(qs[m * G + g]), xsum = _mm512_set1_ps((float)qsum[m * G + g]);
            for (int j = 0; j < 4; j++) {
                __m512 dot = _mm512_fmadd_ps(s[j], _mm512_cvtepi32_ps(acc[m][j]), _mm512_mul_ps(zs[j], xsum));
                accf[m][j] = _mm512_fmadd_ps(xs, dot, accf[m][j]);
            }
        }
    }
    for (int m = 0; m < mt; m++) for (int j = 0; j < 4; j++) _mm512_storeu_ps(out + m * 64 + 16 * j, accf[m][j]);
}

/* out bf16 [M, N] = x bf16 [M, K] times the int4-packed [N, K] matrix w with its scale_zero (N a multiple of 64, K
   of 32): torch's _weight_int4pack_mm_for_cpu(x, w, 32, scale_zero) with int8 activations. */
void ep_q4_matmul(const uint16_t *x, long M, long K, const uint8_t *w, const uint16_t *sz, long N, uint16_t *out, int threads) {
    const long G = K / GROUP;
    int8_t *q = malloc(M * K);
    float *qs = malloc(sizeof(float) * M * G);
    int32_t *qsum = malloc(sizeof(int32_t) * M * G);
    quantize_rows(x, M, K, q, qs, qsum);
    uint8_t idx[2][64];  /* byte 4 j + i of quads[h]: row k + i's byte 16 h + j (x01 holds rows k, k+1; x23 k+2, k+3) */
    for (int h = 0; h < 2; h++) for (int j = 0; j < 16; j++) for (int i = 0; i < 4; i++) idx[h][4 * j + i] = (uint8_t)(32 * i + 16 * h + j);
    const __m512i quads[2] = {_mm512_loadu_si512(idx[0]), _mm512_loadu_si512(idx[1])};
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long nb = 0; nb < N / 64; nb++) {
        float tile[MT * 64];
        for (long m0 = 0; m0 < M; m0 += MT) {
            int mt = M - m0 < MT ? (int)(M - m0) : MT;
            q4_block(mt, q + m0 * K, qs + m0 * G, qsum + m0 * G, K, w + nb * K * 32, sz + nb * 64 * 2, N, quads, tile);
            for (int m = 0; m < mt; m++)
                for (int j = 0; j < 64; j++) out[(m0 + m) * N + nb * 64 + j] = f32_to_bf16(tile[m * 64 + j]);
        }
    }
    free(q); free(qs); free(qsum);
}

/* out bf16 [M, N] = x bf16 [M, K] times int8 rows w [N, K] with bf16 row scales (K a multiple of 64):
   _weight_int8pack_mm(x, w, scale) with int8 activations. Each 64-byte step multiplies |xq| (unsigned) by w negated
   where xq is negative (signed); lanes 0-7 hold one group of 32, lanes 8-15 the next. One weight row at a time:
   a single sequential stream per thread reads faster here than several interleaved rows. */
void ep_q8_matmul(const uint16_t *x, long M, long K, const int8_t *w, const uint16_t *scale, long N, uint16_t *out, int threads) {
    const long G = K / GROUP, C = K / 64;
    int8_t *q = malloc(M * K);
    float *qs = malloc(sizeof(float) * M * G);
    int32_t *qsum = malloc(sizeof(int32_t) * M * G);
    quantize_rows(x, M, K, q, qs, qsum);
    uint8_t *qa = malloc(M * K);
    __mmask64 *neg = malloc(sizeof(__mmask64) * M * C);
    float *qsv = malloc(sizeof(float) * 16 * M * C);
    for (long i = 0; i < M * C; i++) {
        __m512i v = _mm512_loadu_si512(q + i * 64);
        _mm512_storeu_si512(qa + i * 64, _mm512_abs_epi8(v));
        neg[i] = _mm512_movepi8_mask(v);
        for (int l = 0; l < 16; l++) qsv[i * 16 + l] = qs[i * 2 + l / 8];
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long n = 0; n < N; n++) {
        float rs = bf16_to_f32(scale[n]);
        for (long m = 0; m < M; m++) {
            __m512 acc = _mm512_setzero_ps();
            for (long c = 0; c < C; c++) {
                long i = m * C + c;
                __m512i wv = _mm512_loadu_si512(w + n * K + c * 64);
                __m512i b = _mm512_mask_sub_epi8(wv, neg[i], _mm512_setzero_si512(), wv);
                __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(qa + i * 64), b);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(qsv + i * 16), acc);
            }
            out[m * N + n] = f32_to_bf16(_mm512_reduce_add_ps(acc) * rs);
        }
    }
    free(q); free(qs); free(qsum); free(qa); free(neg); free(qsv);
}
