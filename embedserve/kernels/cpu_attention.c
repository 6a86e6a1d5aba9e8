/* Attention over a packed, unpadded batch on the CPU: one (sequence, head) pair at a time, in float32.
 *
 * q [T, H, D], k and v [T, Hkv, D], out [T, H, D] contiguous: every sequence's tokens concatenated,
 * cu_seqlens [B + 1] its boundaries. q, k and v may be strided views (a fused qkv projection's output):
 * each has its own token and head strides, in elements; head_dim is contiguous. A work item is one
 * (sequence, head): its keys are copied once, transposed, into a float32 scratch [D, L] and its values
 * into [L, D], so that every query row reads them from cache with unit stride, the score loop
 * vectorised over keys and the output loop over head_dim, eight query rows at a time (eight
 * independent sums per loaded vector: enough to keep both FMA pipes busy).
 * Rows are read from q, k and v a vector at a time and converted from bfloat16 a vector at a time.
 * NOTE: measured, reading them one element at a time (a branch on the dtype per element) took a third
 * of the kernel's time in fp32; vector reads made the kernel 1.4-1.6x faster in fp32 and 1.1-1.2x in bf16
 * (bench/attention_kernel.py), with bit-identical results.
 * Items are split between threads by their cost (L^2), each thread a contiguous run of items.
 *
 * Built at run time by embedserve/kernels/cpu_attention.py with the host's compiler (-O3
 * -march=native); called through ctypes, which releases the GIL. No Python or torch headers.
 * The hot loops use GCC/Clang vector types (VL floats), not auto-vectorisation, which missed them;
 * head_dim must be a multiple of VL (cpu_attention.py checks). No -ffast-math: IEEE arithmetic. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1 };

typedef struct {
    const void *q, *k, *v;
    void *out;
    const int64_t *cu_seqlens;
    const int64_t *strides; /* q token, q head, k token, k head, v token, v head */
    int64_t heads, kv_heads, dim;
    float scale;
    int causal, dtype;
    int64_t item_begin, item_end; /* items are seq * heads + head */
    int status;
} Job;

#define VL 16   /* floats per vector: one AVX-512 register (two AVX2 ones elsewhere) */
#define ROWS 8  /* query rows computed together: each key and value vector loaded once serves all eight */

/* GCC/Clang vector extensions: explicit vectors, whatever SIMD -march=native offers, no intrinsics. */
typedef float v16 __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t v16i __attribute__((vector_size(VL * sizeof(int32_t))));

static inline v16 ld(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void st(float *p, v16 v) { memcpy(p, &v, sizeof v); }

typedef uint32_t v16u __attribute__((vector_size(VL * sizeof(uint32_t))));
typedef uint16_t v16h __attribute__((vector_size(VL * sizeof(uint16_t))));

/* VL elements of a q, k or v row as float32 (a bfloat16 is the top half of a float32). */
static inline v16 ld_elems(const void *base, int dtype, int64_t i) {
    if (dtype == F32) return ld((const float *)base + i);
    v16h h;
    memcpy(&h, (const uint16_t *)base + i, sizeof h);
    return (v16)(__builtin_convertvector(h, v16u) << 16);
}

static inline void st_elems(void *base, int dtype, int64_t i, v16 f) {
    if (dtype == F32) {
        st((float *)base + i, f);
        return;
    }
    v16u bits = (v16u)f;
    bits += 0x7FFFu + ((bits >> 16) & 1u); /* round to nearest even (outputs are finite) */
    const v16h h = __builtin_convertvector(bits >> 16, v16h);
    memcpy((uint16_t *)base + i, &h, sizeof h);
}

/* e^x for x <= 0 (a score minus its row's max), ~2e-7 relative: 2^n times a degree-6 polynomial on
 * r = x - n ln2 in [-ln2/2, ln2/2]; n = -trunc(0.5 - x log2 e), a floor of a positive number. */
static inline v16 exp_nonpositive(v16 x) {
    const v16 lo = x - x - 87.0f;
    x = (v16)(((v16i)x & (x >= lo)) | ((v16i)lo & (x < lo))); /* max(x, -87): no denormals */
    const v16i ni = -__builtin_convertvector(0.5f - x * 1.44269504088896341f, v16i);
    const v16 n = __builtin_convertvector(ni, v16);
    const v16 r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
    v16 p = r * (1.0f / 720.0f) + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * (v16)((ni + 127) << 23);
}

/* One (sequence, head). Scratch: kt [D][Lp] keys transposed and zero-padded to Lp (a multiple of VL),
 * vv [L][D] values, sc [ROWS][Lp] scores, qb [ROWS][D] scaled queries. D is a compile-time constant
 * in the common cases (see run_item), so the loops over it unroll into registers. */
static inline __attribute__((always_inline)) void attend(const Job *job, int64_t s, int64_t h, const int64_t D,
                                                         float *kt, float *vv, float *sc, float *qb) {
    const int64_t H = job->heads, group = H / job->kv_heads, hk = h / group;
    const int64_t start = job->cu_seqlens[s], L = job->cu_seqlens[s + 1] - start;
    const int64_t Lp = (L + VL - 1) / VL * VL;
    const int64_t *st_ = job->strides;
    for (int64_t j = 0; j < L; j++) {
        const int64_t krow = (start + j) * st_[2] + hk * st_[3], vrow = (start + j) * st_[4] + hk * st_[5];
        for (int64_t d0 = 0; d0 < D; d0 += VL) {
            const v16 kv = ld_elems(job->k, job->dtype, krow + d0);
            st(vv + j * D + d0, ld_elems(job->v, job->dtype, vrow + d0));
            for (int jj = 0; jj < VL; jj++) kt[(d0 + jj) * Lp + j] = kv[jj];
        }
    }
    for (int64_t d = 0; d < D; d++)
        for (int64_t j = L; j < Lp; j++) kt[d * Lp + j] = 0.0f;

    for (int64_t i0 = 0; i0 < L; i0 += ROWS) {
        const int64_t rows = L - i0 < ROWS ? L - i0 : ROWS;
        for (int64_t r = 0; r < ROWS; r++)
            for (int64_t d0 = 0; d0 < D; d0 += VL)
                st(qb + r * D + d0,
                   r < rows ? ld_elems(job->q, job->dtype, (start + i0 + r) * st_[0] + h * st_[1] + d0) * job->scale
                            : (v16){0});
        const int64_t n = job->causal ? i0 + rows : L; /* keys that some row of this block sees */
        const int64_t np = (n + VL - 1) / VL * VL;
        for (int64_t j0 = 0; j0 < np; j0 += VL) {
            v16 a[ROWS] = {{0}};
            for (int64_t d = 0; d < D; d++) {
                const v16 k = ld(kt + d * Lp + j0);
                for (int r = 0; r < ROWS; r++) a[r] += qb[r * D + d] * k;
            }
            for (int r = 0; r < ROWS; r++) st(sc + r * Lp + j0, a[r]);
        }
        float inv[ROWS];
        for (int r = 0; r < ROWS; r++) {
            float *p = sc + r * Lp;
            const int64_t valid = r >= rows ? 0 : job->causal ? i0 + r + 1 : L;
            for (int64_t j = valid; j < np; j++) p[j] = -INFINITY; /* masked and padding keys: e^-inf = 0 */
            v16 mv = ld(p);
            for (int64_t j0 = VL; j0 < np; j0 += VL) {
                const v16 x = ld(p + j0);
                mv = (v16)(((v16i)x & (x > mv)) | ((v16i)mv & (x <= mv)));
            }
            float m = mv[0];
            for (int jj = 1; jj < VL; jj++) m = mv[jj] > m ? mv[jj] : m;
            m = m == -INFINITY ? 0.0f : m; /* a row past the sequence's end: all masked */
            v16 sum = {0};
            for (int64_t j0 = 0; j0 < np; j0 += VL) {
                v16 e = exp_nonpositive(ld(p + j0) - m);
                e = (v16)((v16i)e & (ld(p + j0) > -INFINITY)); /* exactly 0 where masked */
                st(p + j0, e);
                sum += e;
            }
            float total = 0.0f;
            for (int jj = 0; jj < VL; jj++) total += sum[jj];
            inv[r] = valid ? 1.0f / total : 0.0f;
        }
        for (int64_t d0 = 0; d0 < D; d0 += VL) {
            v16 o[ROWS] = {{0}};
            for (int64_t j = 0; j < n; j++) {
                const v16 v = ld(vv + j * D + d0);
                for (int r = 0; r < ROWS; r++) o[r] += sc[r * Lp + j] * v;
            }
            for (int r = 0; r < ROWS; r++) o[r] *= inv[r];
            for (int64_t r = 0; r < rows; r++) {
                const int64_t orow = ((start + i0 + r) * H + h) * D + d0;
                st_elems(job->out, job->dtype, orow, o[r]);
            }
        }
    }
}

static void run_item(const Job *job, int64_t s, int64_t h, float *kt, float *vv, float *sc, float *qb) {
    switch (job->dim) { /* constant head sizes let the compiler unroll the loops over head_dim */
    case 32: attend(job, s, h, 32, kt, vv, sc, qb); break;
    case 64: attend(job, s, h, 64, kt, vv, sc, qb); break;
    case 128: attend(job, s, h, 128, kt, vv, sc, qb); break;
    default: attend(job, s, h, job->dim, kt, vv, sc, qb); break;
    }
}

static int run_items(Job *job) {
    const int64_t H = job->heads, D = job->dim;
    int64_t max_len = 0;
    for (int64_t it = job->item_begin; it < job->item_end; it++) {
        int64_t s = it / H, len = job->cu_seqlens[s + 1] - job->cu_seqlens[s];
        if (len > max_len) max_len = len;
    }
    const int64_t Lp = (max_len + VL - 1) / VL * VL;
    float *kt = malloc(sizeof(float) * (size_t)(D * Lp + Lp * D + ROWS * Lp + ROWS * D));
    if (kt == NULL) return 1;
    float *vv = kt + D * Lp, *sc = vv + Lp * D, *qb = sc + ROWS * Lp;
    for (int64_t it = job->item_begin; it < job->item_end; it++) run_item(job, it / H, it % H, kt, vv, sc, qb);
    free(kt);
    return 0;
}

static void *thread_main(void *arg) {
    Job *job = arg;
    job->status = run_items(job);
    return NULL;
}

/* Returns 0 on success, 1 if scratch memory could not be allocated, 2 if a thread could not start. */
int embedserve_attention(const void *q, const void *k, const void *v, void *out, const int64_t *cu_seqlens,
                         const int64_t *strides, int64_t num_seqs, int64_t heads, int64_t kv_heads, int64_t dim, float scale,
                         int causal, int dtype, int num_threads) {
    if (num_seqs <= 0) return 0;
    const int64_t items = num_seqs * heads;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > 64) num_threads = 64;
    if (num_threads > items) num_threads = (int)items;

    /* cost of each sequence: L^2 per head; split items so each thread gets about total / threads */
    double total = 0.0;
    for (int64_t s = 0; s < num_seqs; s++) {
        const double len = (double)(cu_seqlens[s + 1] - cu_seqlens[s]);
        total += len * len * (double)heads;
    }
    /* NOTE: a second thread costs its start plus, right after a GEMM, a core still held by the
     * OpenMP worker spinning there: measured, a 10-token query took 2.8 ms longer with two threads.
     * Small batches stay on the calling thread. */
    const double min_work_per_thread = 2.0e5; /* query-key pairs x heads: ~0.5 ms of one core at D = 32 */
    if (total < min_work_per_thread * num_threads) {
        const double fit = total / min_work_per_thread;
        num_threads = fit < 1.0 ? 1 : (int)fit;
    }
    Job jobs[64];
    pthread_t tids[64];
    int started[64] = {0};
    int64_t item = 0;
    double done = 0.0;
    for (int t = 0; t < num_threads; t++) {
        const double target = total * (double)(t + 1) / (double)num_threads;
        const int64_t begin = item;
        while (item < items && (t == num_threads - 1 || done < target)) {
            const double len = (double)(cu_seqlens[item / heads + 1] - cu_seqlens[item / heads]);
            done += len * len;
            item++;
        }
        jobs[t] = (Job){q, k, v, out, cu_seqlens, strides, heads, kv_heads, dim, scale, causal, dtype, begin, item, 0};
    }
    for (int t = 1; t < num_threads; t++) {
        if (jobs[t].item_begin == jobs[t].item_end) continue;
        started[t] = pthread_create(&tids[t], NULL, thread_main, &jobs[t]) == 0;
        if (!started[t]) jobs[t].status = run_items(&jobs[t]); /* no thread: run it here */
    }
    jobs[0].status = run_items(&jobs[0]);
    int status = jobs[0].status;
    for (int t = 1; t < num_threads; t++) {
        if (started[t]) pthread_join(tids[t], NULL);
        if (jobs[t].status) status = jobs[t].status;
    }
    return status;
}
