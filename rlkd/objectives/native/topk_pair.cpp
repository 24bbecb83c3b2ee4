// One pass over each row for the ranking term: the teacher's and the student's top-k ids, their
// union's validity, the overlap and both models' logits at the union, for a block of fp32 rows.
//
// Why a kernel: the ranking term needs only <= 2k logits per row, but finding them with tensor
// ops means a block-max pass plus several small ops per chunk, about 10% of the KL loss's own
// time at V = 32000. Here each row is read once, as 16-float vectors, while it is in cache.
//
// Per row: (1) the maximum of every group of GROUP entries; (2) the k-th largest group maximum,
// a lower bound on the k-th largest entry (k groups have a maximum at least that large, and each
// maximum is an entry), so (3) only groups whose maximum reaches it can hold a top-k entry and
// only those are scanned with a running top-k. Ties resolve to some valid top-k set.
// Compiled at first use by rlkd/objectives/native.py (-O3 -march=native); no torch headers.

#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));

enum { GROUP = 256, MAX_K = 128 };

static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }

typedef int32_t i16 __attribute__((vector_size(64)));

// The maximum of GROUP entries; *nan becomes nonzero if any of them is NaN (the max drops NaNs).
static inline float group_max(const float *p, int32_t *nan) {
    // four independent chains hide the latency of the vector max
    v16 m0 = load16(p), m1 = load16(p + 16), m2 = load16(p + 32), m3 = load16(p + 48);
    i16 bad = (m0 != m0) | (m1 != m1) | (m2 != m2) | (m3 != m3);
    for (int g = 64; g < GROUP; g += 64) {
        const v16 a = load16(p + g), b = load16(p + g + 16), c = load16(p + g + 32), d = load16(p + g + 48);
        bad |= (a != a) | (b != b) | (c != c) | (d != d);
        m0 = vmax(m0, a); m1 = vmax(m1, b); m2 = vmax(m2, c); m3 = vmax(m3, d);
    }
    const v16 m = vmax(vmax(m0, m1), vmax(m2, m3));
    float best = m[0];
    int32_t any = bad[0];
    for (int l = 1; l < 16; l++) { best = m[l] > best ? m[l] : best; any |= bad[l]; }
    *nan |= any;
    return best;
}

// Insert v into the descending vals[0..k), dropping the smallest.
static inline void insert(float *vals, int64_t *ids, int64_t k, float v, int64_t id) {
    int64_t j = k - 1;
    while (j > 0 && vals[j - 1] < v) { vals[j] = vals[j - 1]; ids[j] = ids[j - 1]; j--; }
    vals[j] = v; ids[j] = id;
}

// NaN ranks above every number, as in torch.topk, so that a NaN logit reaches the gathered
// scores and the loss's finiteness check names it. Only rows holding a NaN take this slow path.
static inline bool above(float a, float b) { return (a != a && b == b) || a > b; }

static void row_topk_with_nan(const float *row, int64_t vocab, int64_t k, int64_t *ids) {
    float vals[MAX_K];
    for (int64_t j = 0; j < vocab; j++) {
        const float v = row[j];
        int64_t b = j < k ? j : k;
        if (b == k && !above(v, vals[k - 1])) continue;
        if (b == k) b = k - 1;
        while (b > 0 && above(v, vals[b - 1])) { vals[b] = vals[b - 1]; ids[b] = ids[b - 1]; b--; }
        vals[b] = v; ids[b] = j;
    }
}

// The ids of the k largest entries of row[0..vocab) into ids[0..k) (unordered); gmax is scratch
// of (vocab + GROUP - 1) / GROUP floats.
static void row_topk(const float *row, int64_t vocab, int64_t k, int64_t *ids, float *gmax) {
    const int64_t full = vocab / GROUP, n_groups = (vocab + GROUP - 1) / GROUP;
    int32_t nan = 0;
    for (int64_t g = 0; g < full; g++) gmax[g] = group_max(row + g * GROUP, &nan);
    if (full < n_groups) {
        float m = row[full * GROUP];
        for (int64_t j = full * GROUP; j < vocab; j++) { m = row[j] > m ? row[j] : m; nan |= row[j] != row[j]; }
        gmax[full] = m;
    }
    if (nan) { row_topk_with_nan(row, vocab, k, ids); return; }
    float bound = -__builtin_inff();
    if (k <= n_groups) {
        float kth[MAX_K];
        for (int64_t j = 0; j < k; j++) kth[j] = -__builtin_inff();
        for (int64_t g = 0; g < n_groups; g++) {
            const float v = gmax[g];
            if (v > kth[k - 1]) {
                int64_t j = k - 1;
                while (j > 0 && kth[j - 1] < v) { kth[j] = kth[j - 1]; j--; }
                kth[j] = v;
            }
        }
        bound = kth[k - 1];
    }
    // Seeding with the first k entries keeps every id valid whatever the values (all -inf, say).
    float vals[MAX_K];
    for (int64_t a = 0; a < k; a++) {
        const float v = row[a];
        int64_t b = a;
        while (b > 0 && vals[b - 1] < v) { vals[b] = vals[b - 1]; ids[b] = ids[b - 1]; b--; }
        vals[b] = v; ids[b] = a;
    }
    float thr = vals[k - 1];
    for (int64_t g = 0; g < n_groups; g++) {
        if (!(gmax[g] >= bound) || !(gmax[g] > thr)) continue;
        const int64_t end = (g + 1) * GROUP < vocab ? (g + 1) * GROUP : vocab;
        int64_t j = g * GROUP > k ? g * GROUP : k;
        for (; j < end && (j & 15); j++)
            if (row[j] > thr) { insert(vals, ids, k, row[j], j); thr = vals[k - 1]; }
        for (; j + 16 <= end; j += 16) {  // whole vectors: look at their entries only on a hit
            const v16 v = load16(row + j);
            float m = v[0];
            for (int l = 1; l < 16; l++) m = v[l] > m ? v[l] : m;
            if (m > thr)
                for (int l = 0; l < 16; l++)
                    if (v[l] > thr) { insert(vals, ids, k, v[l], j + l); thr = vals[k - 1]; }
        }
        for (; j < end; j++)
            if (row[j] > thr) { insert(vals, ids, k, row[j], j); thr = vals[k - 1]; }
    }
}

extern "C" {

int64_t rlkd_topk_max_k(void) { return MAX_K; }

// student, teacher: rows x vocab with row strides ld_s, ld_t (unit column stride).
// Outputs, [rows, 2k] row-major unless noted: ids (the teacher's k ids, then the student's k),
// valid (1 unless a student id repeats a teacher id), s_at and t_at (the two models' logits at
// ids), overlap [rows] (|top-k_T & top-k_S|). gmax: scratch of (vocab + 255) / 256 floats.
void rlkd_topk_pair_f32(const float *student, int64_t ld_s, const float *teacher, int64_t ld_t, int64_t rows,
                        int64_t vocab, int64_t k, int64_t *ids, uint8_t *valid, float *s_at, float *t_at,
                        int64_t *overlap, float *gmax) {
    for (int64_t r = 0; r < rows; r++) {
        const float *s = student + r * ld_s, *t = teacher + r * ld_t;
        int64_t *row_ids = ids + r * 2 * k;
        row_topk(t, vocab, k, row_ids, gmax);
        row_topk(s, vocab, k, row_ids + k, gmax);
        int64_t shared = 0;
        for (int64_t j = 0; j < 2 * k; j++) {
            const int64_t id = row_ids[j];
            uint8_t ok = 1;
            if (j >= k)
                for (int64_t a = 0; a < k; a++) ok &= row_ids[a] != id;
            shared += !ok;
            valid[r * 2 * k + j] = ok;
            s_at[r * 2 * k + j] = s[id];
            t_at[r * 2 * k + j] = t[id];
        }
        overlap[r] = shared;
    }
}

}  // extern "C"
