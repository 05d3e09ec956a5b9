/* Fused row-block kernels of the effective-weight function (lora_loaders/kernels.py).

   Every kernel computes exactly what the torch reference path in kernels.py computes, element
   by element: float32 arithmetic (one add or one subtract), then one IEEE round-to-nearest-even
   cast to the weight's dtype. Only NaN payloads may differ (any NaN stays a NaN). Built with the
   machine's C compiler on first use; the AVX-512 paths are used when the compiler targets them,
   the portable scalar paths otherwise (kernels.py then prefers torch). */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#include <immintrin.h>
#define LE_AVX512 1
#else
#define LE_AVX512 0
#endif

int le_isa(void) { return LE_AVX512 ? 512 : 0; }

/* ---- scalar conversions (IEEE round to nearest even), as c10::Half / c10::BFloat16 do ---- */
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float h2f(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = bits_f32((two_w >> 4) + (0xE0u << 23)) * bits_f32(0x7800000u);
    const float denormalized = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_f32(sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized)));
}
static inline uint16_t f2h(float f) {
    float base = (__builtin_fabsf(f) * bits_f32(0x77800000u)) * bits_f32(0x08800000u);
    const uint32_t w = f32_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = f32_bits(base);
    const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
static inline float b2f(uint16_t b) { return bits_f32((uint32_t)b << 16); }
static inline uint16_t f2b(float f) {
    const uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static inline int h_bad(uint16_t h) { return (h & 0x7c00u) == 0x7c00u; }
static inline int b_bad(uint16_t b) { return (b & 0x7f80u) == 0x7f80u; }
static inline int f_bad(float f) { return (f32_bits(f) & 0x7f800000u) == 0x7f800000u; }

#if LE_AVX512
/* ---- 16 lanes at a time ---- */
static inline __m512 vh2f(__m256i h) { return _mm512_cvtph_ps(h); }
static inline __m256i vf2h(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline __m512 vb2f(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }
static inline __m256i vf2b(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                 _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}
static inline __mmask16 vh_bad(__m256i h) {
    const __m256i m = _mm256_set1_epi16(0x7c00);
    return _mm256_cmpeq_epi16_mask(_mm256_and_si256(h, m), m);
}
static inline __mmask16 vb_bad(__m256i b) {
    const __m256i m = _mm256_set1_epi16(0x7f80);
    return _mm256_cmpeq_epi16_mask(_mm256_and_si256(b, m), m);
}
static inline __mmask16 vf_bad(__m512 v) {
    const __m512i m = _mm512_set1_epi32(0x7f800000);
    return _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), m), m);
}
#define LD16(p) _mm256_loadu_si256((const __m256i *)(p))
#define ST16(p, v) _mm256_storeu_si256((__m256i *)(p), (v))
#endif

/* apply: out[i, j] = cast(f32(base[i, j]) + d[i, j]) for an (n_rows, n_cols) block, each operand
   row-major with its own leading dimension (out may be base). Returns 1 if any output is Inf/NaN. */
#define APPLY(NAME, T, TOF, FROMF, BAD, VLD, VST, VBAD)                                              \
    int NAME(const T *base, int64_t bld, const float *d, int64_t dld, T *out, int64_t old,            \
             int64_t n_rows, int64_t n_cols) {                                                       \
        int bad = 0;                                                                                 \
        for (int64_t r = 0; r < n_rows; r++) {                                                       \
            const T *b = base + r * bld; const float *dr = d + r * dld; T *o = out + r * old;        \
            int64_t j = 0;                                                                           \
            VLOOP(VLD, VST, VBAD)                                                                    \
            for (; j < n_cols; j++) { const T v = FROMF(TOF(b[j]) + dr[j]); bad |= BAD(v); o[j] = v; } \
        }                                                                                            \
        return bad;                                                                                  \
    }

/* remove: out = cast(f32(cur) - d), contiguous (the first step of an exact restore). */
#define REMOVE(NAME, T, TOF, FROMF, VLD, VST)                                                        \
    void NAME(const T *cur, const float *d, T *out, int64_t n) {                                     \
        int64_t j = 0;                                                                               \
        RLOOP(VLD, VST)                                                                              \
        for (; j < n; j++) out[j] = FROMF(TOF(cur[j]) - d[j]);                                       \
    }

/* apply_check: in place, w = cast(f32(w) + d); where cast(f32(new) - d) differs in bits from the old
   w, record (offset + i, old w[i]): what an exact restore needs besides recomputing d. Returns the
   number recorded (idx / val have room for n). */
#define CHECK(NAME, T, U, TOF, FROMF, VLD, VST)                                                      \
    int64_t NAME(T *w, const float *d, int64_t n, int64_t offset, int64_t *idx, T *val) {            \
        int64_t cnt = 0, j = 0;                                                                      \
        CLOOP(VLD, VST)                                                                              \
        for (; j < n; j++) {                                                                         \
            const T nw = FROMF(TOF(w[j]) + d[j]);                                                    \
            const T bk = FROMF(TOF(nw) - d[j]);                                                      \
            U bb, wb; memcpy(&bb, &bk, sizeof(T)); memcpy(&wb, &w[j], sizeof(T));                    \
            if (bb != wb) { idx[cnt] = offset + j; val[cnt] = w[j]; cnt++; }                         \
            w[j] = nw;                                                                               \
        }                                                                                            \
        return cnt;                                                                                  \
    }

#if LE_AVX512
#define VLOOP(VLD, VST, VBAD)                                                                        \
    __mmask16 vbad = 0;                                                                              \
    for (; j + 16 <= n_cols; j += 16) {                                                              \
        const __typeof__(VLD(b + j)) bv = VLD(b + j);                                                \
        VST(o + j, bv, dr + j, vbad);                                                                \
    }                                                                                                \
    bad |= vbad != 0;
#define RLOOP(VLD, VST) for (; j + 16 <= n; j += 16) { VST(out + j, cur + j, d + j); }
#define CLOOP(VLD, VST) for (; j + 16 <= n; j += 16) { VST(w + j, d + j, offset + j, idx, val, cnt); }

/* float16 */
#define H_APPLY_ST(o, bv, dp, vbad) do { const __m256i nh = vf2h(_mm512_add_ps(vh2f(bv), _mm512_loadu_ps(dp))); \
    vbad |= vh_bad(nh); ST16(o, nh); } while (0)
#define H_REMOVE_ST(o, cp, dp) ST16(o, vf2h(_mm512_sub_ps(vh2f(LD16(cp)), _mm512_loadu_ps(dp))))
#define H_CHECK_ST(wp, dp, base_i, idx, val, cnt) do {                                                 \
    const __m256i wh = LD16(wp); const __m512 dv = _mm512_loadu_ps(dp);                               \
    const __m256i nh = vf2h(_mm512_add_ps(vh2f(wh), dv));                                             \
    __mmask16 m = _mm256_cmpneq_epi16_mask(vf2h(_mm512_sub_ps(vh2f(nh), dv)), wh);                    \
    while (m) { const int k = __builtin_ctz(m); idx[cnt] = (base_i) + k; val[cnt] = (wp)[k]; cnt++; m &= m - 1; } \
    ST16(wp, nh); } while (0)
/* bfloat16 */
#define B_APPLY_ST(o, bv, dp, vbad) do { const __m256i nb = vf2b(_mm512_add_ps(vb2f(bv), _mm512_loadu_ps(dp))); \
    vbad |= vb_bad(nb); ST16(o, nb); } while (0)
#define B_REMOVE_ST(o, cp, dp) ST16(o, vf2b(_mm512_sub_ps(vb2f(LD16(cp)), _mm512_loadu_ps(dp))))
#define B_CHECK_ST(wp, dp, base_i, idx, val, cnt) do {                                                 \
    const __m256i wb = LD16(wp); const __m512 dv = _mm512_loadu_ps(dp);                               \
    const __m256i nb = vf2b(_mm512_add_ps(vb2f(wb), dv));                                             \
    __mmask16 m = _mm256_cmpneq_epi16_mask(vf2b(_mm512_sub_ps(vb2f(nb), dv)), wb);                    \
    while (m) { const int k = __builtin_ctz(m); idx[cnt] = (base_i) + k; val[cnt] = (wp)[k]; cnt++; m &= m - 1; } \
    ST16(wp, nb); } while (0)
/* float32 */
#define F_LD(p) _mm512_loadu_ps(p)
#define F_APPLY_ST(o, bv, dp, vbad) do { const __m512 nf = _mm512_add_ps(bv, _mm512_loadu_ps(dp));       \
    vbad |= vf_bad(nf); _mm512_storeu_ps(o, nf); } while (0)
#define F_REMOVE_ST(o, cp, dp) _mm512_storeu_ps(o, _mm512_sub_ps(_mm512_loadu_ps(cp), _mm512_loadu_ps(dp)))
#define F_CHECK_ST(wp, dp, base_i, idx, val, cnt) do {                                                 \
    const __m512 wf = _mm512_loadu_ps(wp); const __m512 dv = _mm512_loadu_ps(dp);                     \
    const __m512 nf = _mm512_add_ps(wf, dv);                                                          \
    __mmask16 m = _mm512_cmpneq_epi32_mask(_mm512_castps_si512(_mm512_sub_ps(nf, dv)), _mm512_castps_si512(wf)); \
    while (m) { const int k = __builtin_ctz(m); idx[cnt] = (base_i) + k; val[cnt] = (wp)[k]; cnt++; m &= m - 1; } \
    _mm512_storeu_ps(wp, nf); } while (0)
#else
#define VLOOP(VLD, VST, VBAD)
#define RLOOP(VLD, VST)
#define CLOOP(VLD, VST)
#define LD16(p) 0
#define F_LD(p) 0
#endif

static inline float id_f(float x) { return x; }

APPLY(le_apply_f16, uint16_t, h2f, f2h, h_bad, LD16, H_APPLY_ST, vh_bad)
APPLY(le_apply_bf16, uint16_t, b2f, f2b, b_bad, LD16, B_APPLY_ST, vb_bad)
APPLY(le_apply_f32, float, id_f, id_f, f_bad, F_LD, F_APPLY_ST, vf_bad)
REMOVE(le_remove_f16, uint16_t, h2f, f2h, LD16, H_REMOVE_ST)
REMOVE(le_remove_bf16, uint16_t, b2f, f2b, LD16, B_REMOVE_ST)
REMOVE(le_remove_f32, float, id_f, id_f, F_LD, F_REMOVE_ST)
CHECK(le_check_f16, uint16_t, uint16_t, h2f, f2h, LD16, H_CHECK_ST)
CHECK(le_check_bf16, uint16_t, uint16_t, b2f, f2b, LD16, B_CHECK_ST)
CHECK(le_check_f32, float, uint32_t, id_f, id_f, F_LD, F_CHECK_ST)

/* transpose: dst[c * dld + r] = src[r * sld + c] for an (n_rows, n_cols) block, by 16 x 16 tiles
   (moves bits: no arithmetic). For the initializer layouts that hold a Linear weight transposed. */
#define TRANSPOSE(NAME, T)                                                                           \
    void NAME(const T *src, int64_t sld, T *dst, int64_t dld, int64_t n_rows, int64_t n_cols) {      \
        for (int64_t r0 = 0; r0 < n_rows; r0 += 16) {                                                \
            const int64_t r1 = r0 + 16 < n_rows ? r0 + 16 : n_rows;                                  \
            for (int64_t c0 = 0; c0 < n_cols; c0 += 16) {                                            \
                const int64_t c1 = c0 + 16 < n_cols ? c0 + 16 : n_cols;                              \
                for (int64_t c = c0; c < c1; c++)                                                    \
                    for (int64_t r = r0; r < r1; r++) dst[c * dld + r] = src[r * sld + c];           \
            }                                                                                        \
        }                                                                                            \
    }
TRANSPOSE(le_transpose_16, uint16_t)
TRANSPOSE(le_transpose_32, uint32_t)
