/* Fused row-block kernels of the effective-weight function (lora_loaders/kernels.py).

   Every kernel computes exactly what the torch reference path in kernels.py computes, element
   by element: float32 arithmetic (one add or one subtract), then one IEEE round-to-nearest-even
   cast to the weight's dtype. Only NaN payloads may differ (any NaN stays a NaN). Built with the
   machine's C compiler on first use; vector paths for AVX-512 (16 lanes) or AVX2 (8 lanes), each
   with F16C and FMA, when the compiler targets them, written once over a few per-ISA primitives; the portable scalar
   paths otherwise (kernels.py then prefers torch). */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define LE_ISA 512
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define LE_ISA 256
#else
#define LE_ISA 0
#endif

int le_isa(void) { return LE_ISA; }

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

#if LE_ISA == 512
/* ---- primitives, 16 lanes: VF float32 lanes, VH the same lanes as 16-bit values ---- */
#define LE_W 16
typedef __m512 VF;
typedef __m256i VH;
#define vldf(p) _mm512_loadu_ps(p)
#define vaddf _mm512_add_ps
#define vsubf _mm512_sub_ps
#define vmulf _mm512_mul_ps
#define vfmaf _mm512_fmadd_ps /* a * b + c, rounded once */
#define vset1f _mm512_set1_ps
#define vstf(p, v) _mm512_storeu_ps((p), (v))
#define vldh(p) _mm256_loadu_si256((const __m256i *)(p))
#define vsth(p, v) _mm256_storeu_si256((__m256i *)(p), (v))
static inline VF vh2f(VH h) { return _mm512_cvtph_ps(h); }
static inline VH vf2h(VF v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline VF vb2f(VH b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }
static inline VH vf2b(VF v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                 _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}
/* lanes whose exponent bits are all ones (Inf / NaN), and lanes that differ in bits: one bit per lane */
static inline unsigned vh_bad(VH h, unsigned m16) {
    const __m256i m = _mm256_set1_epi16((short)m16);
    return _mm256_cmpeq_epi16_mask(_mm256_and_si256(h, m), m);
}
static inline unsigned vf_bad(VF v) {
    const __m512i m = _mm512_set1_epi32(0x7f800000);
    return _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), m), m);
}
static inline unsigned vh_neq(VH a, VH b) { return _mm256_cmpneq_epi16_mask(a, b); }
static inline unsigned vf_neq(VF a, VF b) {
    return _mm512_cmpneq_epi32_mask(_mm512_castps_si512(a), _mm512_castps_si512(b));
}
#elif LE_ISA == 256
/* ---- the same primitives, 8 lanes ---- */
#define LE_W 8
typedef __m256 VF;
typedef __m128i VH;
#define vldf(p) _mm256_loadu_ps(p)
#define vaddf _mm256_add_ps
#define vsubf _mm256_sub_ps
#define vmulf _mm256_mul_ps
#define vfmaf _mm256_fmadd_ps
#define vset1f _mm256_set1_ps
#define vstf(p, v) _mm256_storeu_ps((p), (v))
#define vldh(p) _mm_loadu_si128((const __m128i *)(p))
#define vsth(p, v) _mm_storeu_si128((__m128i *)(p), (v))
static inline VF vh2f(VH h) { return _mm256_cvtph_ps(h); }
static inline VH vf2h(VF v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
static inline VF vb2f(VH b) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16)); }
static inline VH vf2b(VF v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    /* |u| as bits is below 2^31, so a signed compare is the unsigned one */
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    /* every lane fits 16 bits: pack within 128-bit halves, then put the two halves' results together */
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    return _mm256_castsi256_si128(packed);
}
static inline unsigned mask16(__m128i eq) {  /* 8 x 16-bit all-ones / zero lanes -> 8 bits */
    return (unsigned)_mm_movemask_epi8(_mm_packs_epi16(eq, _mm_setzero_si128()));
}
static inline unsigned vh_bad(VH h, unsigned m16) {
    const __m128i m = _mm_set1_epi16((short)m16);
    return mask16(_mm_cmpeq_epi16(_mm_and_si128(h, m), m));
}
static inline unsigned vf_bad(VF v) {
    const __m256i m = _mm256_set1_epi32(0x7f800000);
    return (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), m), m)));
}
static inline unsigned vh_neq(VH a, VH b) { return ~mask16(_mm_cmpeq_epi16(a, b)) & 0xffu; }
static inline unsigned vf_neq(VF a, VF b) {
    return ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b)))) & 0xffu;
}
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

#if LE_ISA
/* The vector loops, LE_W lanes at a time, over the primitives above (the scalar loops finish). */
#define VLOOP(VLD, VST, VBAD)                                                                        \
    unsigned vbad = 0;                                                                               \
    for (; j + LE_W <= n_cols; j += LE_W) {                                                          \
        const __typeof__(VLD(b + j)) bv = VLD(b + j);                                                \
        VST(o + j, bv, dr + j, vbad);                                                                \
    }                                                                                                \
    bad |= vbad != 0;
#define RLOOP(VLD, VST) for (; j + LE_W <= n; j += LE_W) { VST(out + j, cur + j, d + j); }
#define CLOOP(VLD, VST) for (; j + LE_W <= n; j += LE_W) { VST(w + j, d + j, offset + j, idx, val, cnt); }
#define RECORD(m, wp, base_i, idx, val, cnt)                                                          \
    while (m) { const int k = __builtin_ctz(m); idx[cnt] = (base_i) + k; val[cnt] = (wp)[k]; cnt++; m &= m - 1; }

/* 16-bit weights: TOV / FROMV convert lanes, EXP the exponent mask (float16 0x7c00, bfloat16 0x7f80) */
#define H16_APPLY_ST(TOV, FROMV, EXP, o, bv, dp, vbad) do {                                             \
    const VH nh = FROMV(vaddf(TOV(bv), vldf(dp))); vbad |= vh_bad(nh, EXP); vsth(o, nh); } while (0)
#define H16_REMOVE_ST(TOV, FROMV, o, cp, dp) vsth(o, FROMV(vsubf(TOV(vldh(cp)), vldf(dp))))
#define H16_CHECK_ST(TOV, FROMV, wp, dp, base_i, idx, val, cnt) do {                                    \
    const VH wh = vldh(wp); const VF dv = vldf(dp);                                                   \
    const VH nh = FROMV(vaddf(TOV(wh), dv));                                                        \
    unsigned m = vh_neq(FROMV(vsubf(TOV(nh), dv)), wh);                                             \
    RECORD(m, wp, base_i, idx, val, cnt)                                                              \
    vsth(wp, nh); } while (0)
#define H_APPLY_ST(o, bv, dp, vbad) H16_APPLY_ST(vh2f, vf2h, 0x7c00u, o, bv, dp, vbad)
#define H_REMOVE_ST(o, cp, dp) H16_REMOVE_ST(vh2f, vf2h, o, cp, dp)
#define H_CHECK_ST(wp, dp, base_i, idx, val, cnt) H16_CHECK_ST(vh2f, vf2h, wp, dp, base_i, idx, val, cnt)
#define B_APPLY_ST(o, bv, dp, vbad) H16_APPLY_ST(vb2f, vf2b, 0x7f80u, o, bv, dp, vbad)
#define B_REMOVE_ST(o, cp, dp) H16_REMOVE_ST(vb2f, vf2b, o, cp, dp)
#define B_CHECK_ST(wp, dp, base_i, idx, val, cnt) H16_CHECK_ST(vb2f, vf2b, wp, dp, base_i, idx, val, cnt)
/* float32 */
#define F_APPLY_ST(o, bv, dp, vbad) do { const VF nf = vaddf(bv, vldf(dp)); vbad |= vf_bad(nf); vstf(o, nf); } while (0)
#define F_REMOVE_ST(o, cp, dp) vstf(o, vsubf(vldf(cp), vldf(dp)))
#define F_CHECK_ST(wp, dp, base_i, idx, val, cnt) do {                                                 \
    const VF wf = vldf(wp); const VF dv = vldf(dp); const VF nf = vaddf(wf, dv);                    \
    unsigned m = vf_neq(vsubf(nf, dv), wf);                                                         \
    RECORD(m, wp, base_i, idx, val, cnt)                                                              \
    vstf(wp, nf); } while (0)
#define LD16(p) vldh(p)
#define F_LD(p) vldf(p)
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

/* transpose: dst[c * dld + r] = src[r * sld + c] for an (n_rows, n_cols) block (moves bits: no
   arithmetic). For the initializer layouts that hold a Linear weight transposed. By 8 x 8 register
   tiles (AVX2 shuffles), column strips outermost so each dst row is written whole lines at a time
   and the src lines a strip reads are still in L1 for the next strip; scalar at the edges. */
#if LE_ISA
static inline void tile8_32(const uint32_t *s, int64_t sld, uint32_t *d, int64_t dld) {
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps((const float *)(s + i * sld));
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]); t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps((float *)(d + i * dld), _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps((float *)(d + (i + 4) * dld), _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
    }
}
static inline void tile8_16(const uint16_t *s, int64_t sld, uint16_t *d, int64_t dld) {
    __m128i a[8], b[8], c[8];
    for (int i = 0; i < 8; i++) a[i] = _mm_loadu_si128((const __m128i *)(s + i * sld));
    for (int i = 0; i < 8; i += 2) {
        b[i] = _mm_unpacklo_epi16(a[i], a[i + 1]); b[i + 1] = _mm_unpackhi_epi16(a[i], a[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        c[i] = _mm_unpacklo_epi32(b[i], b[i + 2]); c[i + 1] = _mm_unpackhi_epi32(b[i], b[i + 2]);
        c[i + 2] = _mm_unpacklo_epi32(b[i + 1], b[i + 3]); c[i + 3] = _mm_unpackhi_epi32(b[i + 1], b[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        _mm_storeu_si128((__m128i *)(d + 2 * i * dld), _mm_unpacklo_epi64(c[i], c[i + 4]));
        _mm_storeu_si128((__m128i *)(d + (2 * i + 1) * dld), _mm_unpackhi_epi64(c[i], c[i + 4]));
    }
}
#define TILES8(U)                                                                                    \
    for (; c8 + 8 <= n_cols; c8 += 8)                                                                \
        for (int64_t r = 0; r + 8 <= n_rows; r += 8) tile8_##U(src + r * sld + c8, sld, dst + c8 * dld + r, dld);
#else
#define TILES8(U)
#endif
#define TRANSPOSE(NAME, T, U)                                                                        \
    void NAME(const T *src, int64_t sld, T *dst, int64_t dld, int64_t n_rows, int64_t n_cols) {      \
        int64_t c8 = 0;                                                                              \
        TILES8(U)                                                                                    \
        const int64_t r8 = LE_ISA ? n_rows / 8 * 8 : 0; /* rows the tiles covered in columns < c8 */ \
        for (int64_t c = 0; c < n_cols; c++)                                                         \
            for (int64_t r = c < c8 ? r8 : 0; r < n_rows; r++) dst[c * dld + r] = src[r * sld + c];  \
    }
TRANSPOSE(le_transpose_16, uint16_t, 16)
TRANSPOSE(le_transpose_32, uint32_t, 32)

/* ---- the low-rank product, and the operations above fused with it ----
   product: out[i, j] = up[i, 0] * down[0, j] rounded to float32, then for k = 1 .. R-1 in that
   order acc = fma(up[i, k], down[k, j], acc): each step one fused multiply-add, rounded once (as
   IEEE fusedMultiplyAdd). tests/test_weights_perf.py reproduces it with torch, element by
   element. Every element is computed the same way whatever the ISA (AVX-512, AVX2, scalar fmaf),
   tile, lane or row block it falls in, so the bits depend on neither blocking nor threads nor the
   vector width; -ffp-contract=off keeps the compiler from fusing anything else.
   Tiles of up to LE_GROUP rows x LE_VN vectors keep their accumulators in registers while the rank
   runs (AVX-512: 6 x 4 of its 32 registers; AVX2: 6 x 2 of 16); down is read from panels
   (le_lora_pack: R x LE_VN vectors of columns, contiguous), so each tile streams one small
   contiguous panel; columns past the last whole panel are scalar. */
#if LE_ISA == 512
#define LE_VN 4
#elif LE_ISA == 256
#define LE_VN 2
#endif
#if LE_ISA
#define LE_PANEL (LE_VN * LE_W)
#else
#define LE_PANEL 1
#endif
#define LE_GROUP 6

int64_t le_lora_panel(void) { return LE_ISA ? LE_PANEL : 0; }

/* packed[p][k][c] = down[k][p * LE_PANEL + c] for the whole panels of columns */
void le_lora_pack(const float *dn, int64_t ldd, int64_t R, int64_t cols, float *packed) {
    if (!LE_ISA) return;
    const int64_t np = cols / LE_PANEL;
    for (int64_t p = 0; p < np; p++)
        for (int64_t k = 0; k < R; k++)
            memcpy(packed + (p * R + k) * LE_PANEL, dn + k * ldd + p * LE_PANEL, LE_PANEL * sizeof(float));
}

static inline float dot1(const float *u, const float *dn, int64_t ldd, int64_t R, int64_t j) {
    float acc = u[0] * dn[j];
    for (int64_t k = 1; k < R; k++) acc = __builtin_fmaf(u[k], dn[k * ldd + j], acc);
    return acc;
}

#if LE_ISA
#define TILE(NR)                                                                                     \
    static inline void tile##NR(const float *up, int64_t ldu, const float *pp, int64_t R, float *out, \
                                int64_t ldo) {                                                       \
        VF a[NR][LE_VN], d[LE_VN];                                                                   \
        _Pragma("GCC unroll 8") for (int v = 0; v < LE_VN; v++) d[v] = vldf(pp + v * LE_W);          \
        _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) {                                       \
            const VF b = vset1f(up[i * ldu]);                                                        \
            _Pragma("GCC unroll 8") for (int v = 0; v < LE_VN; v++) a[i][v] = vmulf(b, d[v]);         \
        }                                                                                            \
        for (int64_t k = 1; k < R; k++) {                                                            \
            _Pragma("GCC unroll 8") for (int v = 0; v < LE_VN; v++) d[v] = vldf(pp + k * LE_PANEL + v * LE_W); \
            _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++) {                                   \
                const VF b = vset1f(up[i * ldu + k]);                                                \
                _Pragma("GCC unroll 8") for (int v = 0; v < LE_VN; v++) a[i][v] = vfmaf(b, d[v], a[i][v]); \
            }                                                                                        \
        }                                                                                            \
        _Pragma("GCC unroll 8") for (int i = 0; i < NR; i++)                                         \
            _Pragma("GCC unroll 8") for (int v = 0; v < LE_VN; v++) vstf(out + i * ldo + v * LE_W, a[i][v]); \
    }
TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)
#endif

/* rows up[0 .. nr-1] (nr <= LE_GROUP) of the product into out */
static void product_rows(const float *up, int64_t ldu, const float *dn, int64_t ldd, const float *packed,
                         int64_t R, float *out, int64_t ldo, int64_t nr, int64_t cols) {
    int64_t j = 0;
#if LE_ISA
    for (const int64_t np = cols / LE_PANEL; j < np * LE_PANEL; j += LE_PANEL) {
        const float *pp = packed + (j / LE_PANEL) * R * LE_PANEL;
        switch (nr) {
            case 6: tile6(up, ldu, pp, R, out + j, ldo); break;
            case 5: tile5(up, ldu, pp, R, out + j, ldo); break;
            case 4: tile4(up, ldu, pp, R, out + j, ldo); break;
            case 3: tile3(up, ldu, pp, R, out + j, ldo); break;
            case 2: tile2(up, ldu, pp, R, out + j, ldo); break;
            default: tile1(up, ldu, pp, R, out + j, ldo); break;
        }
    }
#else
    (void)packed;
#endif
    for (int64_t i = 0; i < nr; i++)
        for (int64_t jj = j; jj < cols; jj++) out[i * ldo + jj] = dot1(up + i * ldu, dn, ldd, R, jj);
}

void le_lora_product(const float *up, int64_t ldu, const float *dn, int64_t ldd, const float *packed, int64_t R,
                     float *out, int64_t ldo, int64_t n_rows, int64_t n_cols) {
    for (int64_t i = 0; i < n_rows; i += LE_GROUP)
        product_rows(up + i * ldu, ldu, dn, ldd, packed, R, out + i * ldo, ldo,
                     n_rows - i < LE_GROUP ? n_rows - i : LE_GROUP, n_cols);
}

/* Fused: LE_GROUP rows of the product at a time into tmp (LE_GROUP x n_cols floats: in L1 / L2),
   then the operation on those rows, so the float32 delta never leaves the cache. */
#define LORA_ARGS const float *up, int64_t ldu, const float *dn, int64_t ldd, const float *packed, int64_t R
#define GROUPS(BODY)                                                                                 \
    for (int64_t i = 0; i < n_rows; i += LE_GROUP) {                                                 \
        const int64_t nr = n_rows - i < LE_GROUP ? n_rows - i : LE_GROUP;                            \
        product_rows(up + i * ldu, ldu, dn, ldd, packed, R, tmp, n_cols, nr, n_cols);                \
        BODY;                                                                                        \
    }
#define LE_TW 192  /* tiles of the transposed apply: whole groups and panels; LE_TW^2 elements fit L2 */
#define FUSED(S, T, U)                                                                               \
    int le_lora_apply_##S(const T *base, int64_t bld, LORA_ARGS, T *out, int64_t old, int64_t n_rows,  \
                          int64_t n_cols, float *tmp) {                                              \
        int bad = 0;                                                                                 \
        GROUPS(bad |= le_apply_##S(base + i * bld, bld, tmp, n_cols, out + i * old, old, nr, n_cols)) \
        return bad;                                                                                  \
    }                                                                                                \
    /* the same into a column-major out (element (r, c) at out[c * old + r]: a transposed             \
       initializer) from a row-major base, by LE_TW x LE_TW tiles: each tile's sum into wide          \
       (row-major, in cache), then moved into place (whole cache lines of out per row) */            \
    int le_lora_apply_t_##S(const T *base, int64_t bld, LORA_ARGS, T *out, int64_t old, int64_t n_rows, \
                            int64_t n_cols, float *tmp, T *wide) {                                   \
        int bad = 0;                                                                                 \
        for (int64_t r0 = 0; r0 < n_rows; r0 += LE_TW) {                                             \
            const int64_t nw = n_rows - r0 < LE_TW ? n_rows - r0 : LE_TW;                            \
            for (int64_t c0 = 0; c0 < n_cols; c0 += LE_TW) {                                         \
                const int64_t cw = n_cols - c0 < LE_TW ? n_cols - c0 : LE_TW;                        \
                for (int64_t i = 0; i < nw; i += LE_GROUP) {                                         \
                    const int64_t nr = nw - i < LE_GROUP ? nw - i : LE_GROUP;                        \
                    product_rows(up + (r0 + i) * ldu, ldu, dn + c0, ldd, packed + c0 / LE_PANEL * R * LE_PANEL, \
                                 R, tmp, cw, nr, cw);                                                \
                    bad |= le_apply_##S(base + (r0 + i) * bld + c0, bld, tmp, cw, wide + i * cw, cw, nr, cw); \
                }                                                                                    \
                le_transpose_##U((const void *)wide, cw, (void *)(out + c0 * old + r0), old, nw, cw);   \
            }                                                                                        \
        }                                                                                            \
        return bad;                                                                                  \
    }                                                                                                \
    void le_lora_remove_##S(const T *cur, LORA_ARGS, T *out, int64_t n_rows, int64_t n_cols, float *tmp) { \
        GROUPS(le_remove_##S(cur + i * n_cols, tmp, out + i * n_cols, nr * n_cols))                  \
    }                                                                                                \
    int64_t le_lora_check_##S(T *w, LORA_ARGS, int64_t n_rows, int64_t n_cols, int64_t offset, int64_t *idx, \
                              T *val, float *tmp) {                                                  \
        int64_t cnt = 0;                                                                             \
        GROUPS(cnt += le_check_##S(w + i * n_cols, tmp, nr * n_cols, offset + i * n_cols, idx + cnt, val + cnt)) \
        return cnt;                                                                                  \
    }
FUSED(f16, uint16_t, 16)
FUSED(bf16, uint16_t, 16)
FUSED(f32, float, 32)
