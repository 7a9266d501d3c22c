// Decode-step selection over int8 summaries in one call per layer (livekv.kernels): Quest's pages by their
// min/max digests (QuestSelector.select) and ClusterKV's clusters by their centroids (ClusterKVSelector.select),
// with max pooling over the GQA group, on CPUs with AVX-512 VNNI.
//
// A digest row is C = 2D int8 codes (the page's key max | key min, rounded outward) with one bfloat16 scale. The
// group's query rows are packed as [relu(q) | -min(q, 0)] and quantized to uint8 with one scale per query row, so
// that a row's bound (the sum over channels of max(q * max, q * min)) is one VNNI dot product per half:
//     bound = scale_row * scale_q * (u[:D] . max - u[D:] . min).
// The group's bounds are pooled by max. Two levels: score the runs of `per` pages, keep the best `keep`, then score
// their pages and the tail pages past the last full run; pages outside [first, last) are never candidates.
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" int livekv_supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
}

// Everything below runs only where livekv_supported() says so.
#pragma GCC target("avx512f,avx512bw,avx512vnni")

namespace {

constexpr int kMaxGroup = 16;
constexpr int kMaxC = 512;

inline float bf16(uint16_t x) {
    uint32_t bits = uint32_t(x) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

struct Query {
    int r, C;
    alignas(64) uint8_t u[kMaxGroup][kMaxC];
    float scale[kMaxGroup];
};

// query rows q [r, D] (float32) -> packed uint8 [relu(q) | -min(q, 0)] with one scale per row.
void quantize(const float* q, int r, int D, Query& out) {
    out.r = r;
    out.C = 2 * D;
    for (int j = 0; j < r; ++j) {
        const float* row = q + j * D;
        float amax = 0.f;
        for (int d = 0; d < D; ++d) amax = std::max(amax, std::fabs(row[d]));
        float s = amax > 0.f ? amax / 255.f : 1.f;
        out.scale[j] = s;
        for (int d = 0; d < D; ++d) {
            out.u[j][d] = uint8_t(std::lrint(std::max(row[d], 0.f) / s));
            out.u[j][D + d] = uint8_t(std::lrint(std::max(-row[d], 0.f) / s));
        }
    }
}

// Lane i of the result: the sum of the lanes of v[i] (a transposing reduction, 45 instructions for 16 sums).
inline __attribute__((always_inline)) __m512i lane_sums(const __m512i* v) {
    __m512i t[8], u[4], w[2];
    for (int i = 0; i < 8; ++i)
        t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i)
        u[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]),
                                _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
    for (int i = 0; i < 2; ++i)
        w[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2 * i], u[2 * i + 1], 0x88),
                                _mm512_shuffle_i32x4(u[2 * i], u[2 * i + 1], 0xDD));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(w[0], w[1], 0x88), _mm512_shuffle_i32x4(w[0], w[1], 0xDD));
}

// Order-preserving unsigned keys of 16 floats (a larger float, a larger key; every float's key is above 0).
inline __m512i sortable(__m512 s) {
    const __m512i bits = _mm512_castps_si512(s);
    return _mm512_xor_si512(bits, _mm512_or_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32(INT32_MIN)));
}

// keys[start:start+m] = sortable(sums * the rows' bfloat16 scales), rows ids[start + i] (ids null: rows start + i).
inline void store_keys(__m512 sums, const uint16_t* scales, const int64_t* ids, int64_t start, int m,
                       uint32_t* keys) {
    alignas(64) float scale[16];
    for (int i = 0; i < 16; ++i) {
        const int64_t row = start + std::min(i, m - 1);
        scale[i] = bf16(scales[ids ? ids[row] : row]);
    }
    const __m512i k = sortable(_mm512_mul_ps(sums, _mm512_load_ps(scale)));
    _mm512_mask_storeu_epi32(keys + start, __mmask16((1u << m) - 1), k);
}

// keys[i] = the sortable key of the group's pooled bound of row ids[i] (ids null: row i) of codes [*, C]
// (C = 2D: max | min) with bfloat16 scales, 16 rows at a time (the last block repeats its last row). C is a
// template parameter so that the 16 accumulators stay in registers.
template <int C>
void score(const Query& q, const int8_t* codes, const uint16_t* scales, const int64_t* ids, int64_t n,
           uint32_t* keys) {
    constexpr int half = C / 2;
#pragma omp parallel for schedule(static) if (n >= 256)  // torch's threads: the same libgomp
    for (int64_t start = 0; start < n; start += 16) {
        alignas(64) int8_t block[16][C];
        const int m = int(std::min<int64_t>(16, n - start));
        for (int64_t i = start + 32; i < std::min(n, start + 48); ++i)  // two blocks ahead: 15-25% less time at 32k
            for (int c = 0; c < C; c += 64)
                _mm_prefetch(reinterpret_cast<const char*>(codes + (ids ? ids[i] : i) * C + c), _MM_HINT_T0);
        for (int i = 0; i < 16; ++i) {  // the min half negated: one chain of unsigned x signed products
            const int64_t id = start + std::min(i, m - 1);
            const int8_t* row = codes + (ids ? ids[id] : id) * C;
            for (int c = 0; c < half; c += 64) {
                _mm512_store_si512(block[i] + c, _mm512_loadu_si512(row + c));
                __m512i lo = _mm512_loadu_si512(row + half + c);
                _mm512_store_si512(block[i] + half + c, _mm512_sub_epi8(_mm512_setzero_si512(), lo));
            }
        }
        __m512 best = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < q.r; ++j) {
            __m512i acc[16];
            for (int i = 0; i < 16; ++i) {
                acc[i] = _mm512_setzero_si512();
                for (int c = 0; c < C; c += 64)
                    acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_load_si512(q.u[j] + c), _mm512_load_si512(block[i] + c));
            }
            __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(lane_sums(acc)), _mm512_set1_ps(q.scale[j]));
            best = _mm512_max_ps(best, s);
        }
        store_keys(best, scales, ids, start, m, keys);
    }
}

// keys[i] = the sortable key of the group's max of q_j . row i for rows of D int8 codes with bfloat16 scales
// (ClusterKV's centroids). The signed query is biased to unsigned (u = q + 128), so each dot product is one VNNI
// chain minus 128 times the row's code sum (one more chain, shared by the group).
template <int D>
void score_dot(const Query& q, const int8_t* codes, const uint16_t* scales, int64_t n, uint32_t* keys) {
#pragma omp parallel for schedule(static) if (n >= 256)
    for (int64_t start = 0; start < n; start += 16) {
        const int m = int(std::min<int64_t>(16, n - start));
        for (int64_t i = start + 32; i < std::min(n, start + 48); ++i)
            for (int c = 0; c < D; c += 64) _mm_prefetch(reinterpret_cast<const char*>(codes + i * D + c), _MM_HINT_T0);
        const int8_t* rows[16];
        for (int i = 0; i < 16; ++i) rows[i] = codes + (start + std::min(i, m - 1)) * D;
        __m512i acc[16];
        const __m512i ones = _mm512_set1_epi8(1);
        for (int i = 0; i < 16; ++i) {
            acc[i] = _mm512_setzero_si512();
            for (int c = 0; c < D; c += 64) acc[i] = _mm512_dpbusd_epi32(acc[i], ones, _mm512_loadu_si512(rows[i] + c));
        }
        const __m512i bias = _mm512_slli_epi32(lane_sums(acc), 7);  // 128 * the rows' code sums
        __m512 best = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < q.r; ++j) {
            for (int i = 0; i < 16; ++i) {
                acc[i] = _mm512_setzero_si512();
                for (int c = 0; c < D; c += 64)
                    acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_load_si512(q.u[j] + c), _mm512_loadu_si512(rows[i] + c));
            }
            __m512i dots = _mm512_sub_epi32(lane_sums(acc), bias);
            best = _mm512_max_ps(best, _mm512_mul_ps(_mm512_cvtepi32_ps(dots), _mm512_set1_ps(q.scale[j])));
        }
        store_keys(best, scales, nullptr, start, m, keys);
    }
}

// query rows q [r, D] (float32) -> uint8 q / scale + 128 with one scale per row (|q| / scale <= 127).
void quantize_signed(const float* q, int r, int D, Query& out) {
    out.r = r;
    out.C = D;
    for (int j = 0; j < r; ++j) {
        const float* row = q + j * D;
        float amax = 0.f;
        for (int d = 0; d < D; ++d) amax = std::max(amax, std::fabs(row[d]));
        const float s = amax > 0.f ? amax / 127.f : 1.f;
        out.scale[j] = s;
        for (int d = 0; d < D; ++d) out.u[j][d] = uint8_t(std::lrint(row[d] / s) + 128);
    }
}

struct Rows {  // int8 digest rows of one (batch, KV head)
    const int8_t* codes;
    const uint16_t* scales;
    int C;

    void score(const Query& q, const int64_t* ids, int64_t n, uint32_t* keys) const {
        if (C == 128) ::score<128>(q, codes, scales, ids, n, keys);
        else if (C == 256) ::score<256>(q, codes, scales, ids, n, keys);
        else ::score<512>(q, codes, scales, ids, n, keys);  // C == 512: checked by the caller
    }
};

// Room for n keys, padded with zeros (below every score's key) to a multiple of 16.
uint32_t* key_buffer(std::vector<uint32_t>& keys, int64_t n) {
    keys.resize((n + 15) / 16 * 16);
    std::fill(keys.begin() + n, keys.end(), 0u);
    return keys.data();
}

// The positions of the k largest of keys [n] (k <= n; padded as key_buffer leaves them), written to out[0:k] in
// ascending order (ties: the first positions); out has room for k + 16. The k-th largest key is found by bisection,
// at most 32 passes of vector compares (nth_element's branches cost more here), stopping where exactly k keys are
// at or above the threshold; then the positions above it and enough ties at it are kept.
void top(const uint32_t* keys, int64_t n, int64_t k, uint32_t* out) {
    const int64_t padded = (n + 15) / 16 * 16;
    uint32_t kth = 0;
    for (int bit = 31; bit >= 0; --bit) {
        const __m512i cand = _mm512_set1_epi32(int(kth | (1u << bit)));
        int64_t count = 0;
        for (int64_t i = 0; i < padded; i += 16)
            count += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(keys + i), cand));
        if (count >= k) kth |= 1u << bit;
        if (count == k) break;  // exactly k keys at or above kth: those
    }
    const __m512i threshold = _mm512_set1_epi32(int(kth));
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t w = 0;
    for (int64_t i = 0; i < padded; i += 16) {
        const __mmask16 above = _mm512_cmpgt_epu32_mask(_mm512_loadu_si512(keys + i), threshold);
        const __m512i at = _mm512_add_epi32(lanes, _mm512_set1_epi32(int(i)));
        _mm512_storeu_si512(out + w, _mm512_maskz_compress_epi32(above, at));
        w += __builtin_popcount(above);
    }
    for (int64_t i = 0; i < padded && w < k; i += 16) {
        const __mmask16 valid = i + 16 <= n ? 0xFFFF : __mmask16((1u << (n - i)) - 1);
        const __mmask16 tie = _mm512_mask_cmpeq_epu32_mask(valid, _mm512_loadu_si512(keys + i), threshold);
        const __m512i at = _mm512_add_epi32(lanes, _mm512_set1_epi32(int(i)));
        _mm512_storeu_si512(out + w, _mm512_maskz_compress_epi32(tie, at));
        w += __builtin_popcount(tie);
    }
}

}  // namespace

extern "C" {

// query [B, G, r, D] float32; page codes [B, G, *, C] int8 and scales [B, G, *] bf16 with strides (in rows) per
// batch and KV head; run codes and scales likewise (runs of `per` pages over pages [0, full * per); per == 0: one
// level). Picks the n best pages of [first, last) per (batch, KV head) and writes a decode step's token ids to
// out [B, G, k]: [0, sink), the p tokens of each picked page, [window_start, length). Returns 0, or -1 when the
// candidates are fewer than n (the caller falls back).
int livekv_quest_select(int B, int G, int r, int D, const float* query,
                        const int8_t* page_codes, const uint16_t* page_scales, int64_t page_sb, int64_t page_sg,
                        const int8_t* run_codes, const uint16_t* run_scales, int64_t run_sb, int64_t run_sg,
                        int per, int64_t full, int64_t keep, int64_t first, int64_t last, int64_t n,
                        int64_t sink, int64_t p, int64_t window_start, int64_t length, int64_t* out) {
    if (r > kMaxGroup || (D != 64 && D != 128 && D != 256) || (per && keep > full)) return -2;
    const int C = 2 * D;
    const int64_t k = sink + n * p + length - window_start;
    std::vector<uint32_t> keys, pos(std::max(keep, n) + 16);
    std::vector<int64_t> candidates(keep * per + last - std::min(last, full * per));
    int64_t* ids = candidates.data();
    Query q;
    for (int64_t bg = 0; bg < int64_t(B) * G; ++bg) {
        const int64_t b = bg / G, g = bg % G;
        quantize(query + bg * r * D, r, D, q);
        Rows pages{page_codes + (b * page_sb + g * page_sg) * C, page_scales + b * page_sb + g * page_sg, C};
        int64_t m = 0;
        if (per) {
            Rows runs{run_codes + (b * run_sb + g * run_sg) * C, run_scales + b * run_sb + g * run_sg, C};
            runs.score(q, nullptr, full, key_buffer(keys, full));
            top(keys.data(), full, keep, pos.data());
            for (int64_t i = 0; i < keep; ++i) {
                const int64_t run = pos[i];
                for (int64_t pg = std::max(run * per, first); pg < (run + 1) * per; ++pg) ids[m++] = pg;
            }
        }
        for (int64_t pg = std::max(full * per, first); pg < last; ++pg) ids[m++] = pg;
        if (m < n) return -1;
        pages.score(q, ids, m, key_buffer(keys, m));
        top(keys.data(), m, n, pos.data());
        int64_t* row = out + bg * k;
        for (int64_t t = 0; t < sink; ++t) *row++ = t;
        for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < p; ++j) *row++ = ids[pos[i]] * p + j;
        for (int64_t t = window_start; t < length; ++t) *row++ = t;
    }
    return 0;
}

// ClusterKV's decode step. query [B, G, r, D] float32; centroids: codes [B, G, n, D] int8 and scales [B, G, n]
// bf16 (row strides per batch and KV head: cen_sb, cen_sg); sizes and starts [B, G, n] and members [B, G, N]
// int64, contiguous. Takes whole clusters in descending score (q . centroid, the group's max; empty clusters
// never), the last one cut, to fill `fill` tokens; writes [0, sink), those tokens, [clustered, length) to
// out [B, G, sink + fill + length - clustered]. Returns 0, or -1 when the clusters hold fewer than `fill` tokens.
int livekv_clusterkv_select(int B, int G, int r, int D, const float* query,
                            const int8_t* cen_codes, const uint16_t* cen_scales, int64_t cen_sb, int64_t cen_sg,
                            int64_t n, const int64_t* sizes, const int64_t* starts, const int64_t* members,
                            int64_t N, int64_t fill, int64_t sink, int64_t clustered, int64_t length, int64_t* out) {
    if (r > kMaxGroup || (D != 64 && D != 128 && D != 256)) return -2;
    const int64_t k = sink + fill + length - clustered;
    const int64_t m = std::min(fill, n);
    std::vector<uint32_t> keys, order(m + 16);
    Query q;
    for (int64_t bg = 0; bg < int64_t(B) * G; ++bg) {
        const int64_t b = bg / G, g = bg % G;
        const int8_t* codes = cen_codes + (b * cen_sb + g * cen_sg) * D;
        const uint16_t* scale = cen_scales + b * cen_sb + g * cen_sg;
        const int64_t *size = sizes + bg * n, *begin = starts + bg * n, *member = members + bg * N;
        quantize_signed(query + bg * r * D, r, D, q);
        uint32_t* key = key_buffer(keys, n);
        if (D == 64) score_dot<64>(q, codes, scale, n, key);
        else if (D == 128) score_dot<128>(q, codes, scale, n, key);
        else score_dot<256>(q, codes, scale, n, key);
        for (int64_t c = 0; c < n; ++c)
            if (size[c] == 0) key[c] = 0;  // empty: last
        top(key, n, m, order.data());
        std::sort(order.begin(), order.begin() + m, [&](uint32_t x, uint32_t y) { return key[x] > key[y]; });
        int64_t* row = out + bg * k;
        for (int64_t t = 0; t < sink; ++t) *row++ = t;
        int64_t taken = 0;
        for (int64_t i = 0; i < m && taken < fill; ++i)
            for (int64_t j = 0; j < size[order[i]] && taken < fill; ++j, ++taken) *row++ = member[begin[order[i]] + j];
        if (taken < fill) return -1;
        for (int64_t t = clustered; t < length; ++t) *row++ = t;
    }
    return 0;
}

}  // extern "C"
