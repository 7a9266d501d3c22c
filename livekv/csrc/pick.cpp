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
#include <functional>
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

// out[i] = the group's pooled bound of row ids[i] of codes [*, C] (C = 2D: max | min) with bfloat16 scales,
// 16 rows at a time (the last block repeats its last row). C is a template parameter so that the 16 accumulators
// stay in registers.
template <int C>
void score(const Query& q, const int8_t* codes, const uint16_t* scales, const int64_t* ids, int64_t n, float* out) {
    constexpr int half = C / 2;
#pragma omp parallel for schedule(static) if (n >= 256)  // torch's threads: the same libgomp
    for (int64_t start = 0; start < n; start += 16) {
        alignas(64) int8_t block[16][C];
        alignas(64) float sums[16];
        const int m = int(std::min<int64_t>(16, n - start));
        for (int64_t i = start + 32; i < std::min(n, start + 48); ++i)  // two blocks ahead: 15-25% less time at 32k
            for (int c = 0; c < C; c += 64) _mm_prefetch(reinterpret_cast<const char*>(codes + ids[i] * C + c), _MM_HINT_T0);
        for (int i = 0; i < 16; ++i) {  // the min half negated: one chain of unsigned x signed products
            const int8_t* row = codes + ids[start + std::min(i, m - 1)] * C;
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
        _mm512_store_ps(sums, best);
        for (int i = 0; i < m; ++i) out[start + i] = sums[i] * bf16(scales[ids[start + i]]);
    }
}

// out[i] = the group's max of q_j . row(ids[i]) for rows of D int8 codes with bfloat16 scales (ClusterKV's
// centroids). The signed query is biased to unsigned (u = q + 128), so each dot product is one VNNI chain minus
// 128 times the row's code sum (one more chain, shared by the group).
template <int D>
void score_dot(const Query& q, const int8_t* codes, const uint16_t* scales, int64_t n, float* out) {
#pragma omp parallel for schedule(static) if (n >= 256)
    for (int64_t start = 0; start < n; start += 16) {
        alignas(64) float sums[16];
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
        _mm512_store_ps(sums, best);
        for (int i = 0; i < m; ++i) out[start + i] = sums[i] * bf16(scales[start + i]);
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

    void score(const Query& q, const int64_t* ids, int64_t n, float* out) const {
        if (C == 128) ::score<128>(q, codes, scales, ids, n, out);
        else if (C == 256) ::score<256>(q, codes, scales, ids, n, out);
        else ::score<512>(q, codes, scales, ids, n, out);  // C == 512: checked by the caller
    }
};

// The k best of ids [n] by scores [n] (k <= n), written to out[0:k] in no particular order (ties: the first ids).
// The k-th largest score is found by bisection over the scores' order-preserving integer keys, at most 32 passes of
// vector compares (nth_element's branches cost more here), stopping where exactly k keys are at or above the
// threshold; then the ids above it and enough ties at it are kept.
void top(const std::vector<float>& scores, const std::vector<int64_t>& ids, int64_t k, int64_t* out) {
    const int64_t n = int64_t(scores.size()), padded = (n + 15) / 16 * 16;
    static thread_local std::vector<uint32_t> keys;
    keys.assign(padded, 0u);  // 0: below every float's key
    for (int64_t i = 0; i < n; ++i) {
        uint32_t bits;
        std::memcpy(&bits, &scores[i], 4);
        keys[i] = bits ^ (uint32_t(int32_t(bits) >> 31) | 0x80000000u);
    }
    uint32_t kth = 0;
    for (int bit = 31; bit >= 0; --bit) {
        const __m512i cand = _mm512_set1_epi32(int(kth | (1u << bit)));
        int64_t count = 0;
        for (int64_t i = 0; i < padded; i += 16)
            count += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(keys.data() + i), cand));
        if (count >= k) kth |= 1u << bit;
        if (count == k) break;  // exactly k keys at or above kth: those
    }
    int64_t w = 0;
    for (int64_t i = 0; i < n; ++i)
        if (keys[i] > kth) out[w++] = ids[i];
    for (int64_t i = 0; i < n && w < k; ++i)
        if (keys[i] == kth) out[w++] = ids[i];
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
    std::vector<float> scores;
    std::vector<int64_t> ids, kept(std::max<int64_t>(keep, 1)), picked(n);
    Query q;
    for (int64_t bg = 0; bg < int64_t(B) * G; ++bg) {
        const int64_t b = bg / G, g = bg % G;
        quantize(query + bg * r * D, r, D, q);
        Rows pages{page_codes + (b * page_sb + g * page_sg) * C, page_scales + b * page_sb + g * page_sg, C};
        ids.clear();
        if (per) {
            Rows runs{run_codes + (b * run_sb + g * run_sg) * C, run_scales + b * run_sb + g * run_sg, C};
            for (int64_t j = 0; j < full; ++j) ids.push_back(j);
            scores.resize(full);
            runs.score(q, ids.data(), full, scores.data());
            top(scores, ids, keep, kept.data());
            ids.clear();
            for (int64_t i = 0; i < keep; ++i)
                for (int64_t pg = std::max(kept[i] * per, first); pg < (kept[i] + 1) * per; ++pg) ids.push_back(pg);
        }
        for (int64_t pg = std::max(full * per, first); pg < last; ++pg) ids.push_back(pg);
        if (int64_t(ids.size()) < n) return -1;
        scores.resize(ids.size());
        pages.score(q, ids.data(), int64_t(ids.size()), scores.data());
        top(scores, ids, n, picked.data());
        int64_t* row = out + bg * k;
        for (int64_t t = 0; t < sink; ++t) *row++ = t;
        for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < p; ++j) *row++ = picked[i] * p + j;
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
    std::vector<float> scores(n);
    std::vector<int64_t> ids(n), order(std::min(fill, n));
    Query q;
    for (int64_t bg = 0; bg < int64_t(B) * G; ++bg) {
        const int64_t b = bg / G, g = bg % G;
        const int8_t* codes = cen_codes + (b * cen_sb + g * cen_sg) * D;
        const uint16_t* scale = cen_scales + b * cen_sb + g * cen_sg;
        const int64_t *size = sizes + bg * n, *begin = starts + bg * n, *member = members + bg * N;
        quantize_signed(query + bg * r * D, r, D, q);
        if (D == 64) score_dot<64>(q, codes, scale, n, scores.data());
        else if (D == 128) score_dot<128>(q, codes, scale, n, scores.data());
        else score_dot<256>(q, codes, scale, n, scores.data());
        for (int64_t c = 0; c < n; ++c) {
            ids[c] = c;
            if (size[c] == 0) scores[c] = -INFINITY;
        }
        const int64_t m = int64_t(order.size());
        top(scores, ids, m, order.data());
        std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return scores[x] > scores[y]; });
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
