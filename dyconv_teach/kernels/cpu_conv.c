/* The fused strategy on a CPU: dynamic convolution's three products (output, input gradient,
   weight gradient) as GEMMs over im2col rows that mix each sample's kernel tile from the bank in
   cache, so the per-sample kernels [B, O, C/g, kh, kw] are never written to memory; the weight
   gradient's two reductions (attention and bank gradients) are done on each tile as it is made.

   Compiled at first use by cpu_conv.py beside it, with -DREAL=float or -DREAL=double, for the
   CPU it runs on (-march=native). Deterministic: every output element is summed in a fixed
   order by one thread, whatever the number of threads. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* Vectors of the widest registers the build targets, and as many rows of a tile as keep its
   accumulators (2 vectors a row) in registers: 32 of them with AVX-512, 16 below. */
#if defined(__AVX512F__)
#define VBYTES 64
#define ROWS 8
#elif defined(__AVX__)
#define VBYTES 32
#define ROWS 6
#else
#define VBYTES 16
#define ROWS 6
#endif
typedef REAL real;
typedef real vec __attribute__((vector_size(VBYTES), aligned(sizeof(real))));
#define VL ((long)(VBYTES / sizeof(real)))
#define NR (2 * VL) /* the width of a tile: two vectors */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define KC 256 /* reduction rows of a tile of mixed kernels */
#define NC 64  /* columns of a tile of mixed kernels */
#define MIN(a, b) ((a) < (b) ? (a) : (b))

static inline vec ld(const real *p) { return *(const vec *)p; }
static inline void st(real *p, vec v) { *(vec *)p = v; }
static inline vec bc(real s) { return (vec){0} + s; }
static inline real hsum(vec v) { real s = 0; for (long i = 0; i < VL; i++) s += v[i]; return s; }

/* A buffer on a cache line's boundary (aligned_alloc wants a size that is a multiple of it). */
static void *alloc(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

typedef struct { long next, items; } Work; /* items handed out in order */
static long take(Work *w) { return __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED); }

/* fn(args) on nthreads threads: OpenMP's, which are torch's own where the library shares torch's
   OpenMP runtime (no second set of threads competing for the cores), else POSIX threads. */
static void run_threads(void *(*fn)(void *), void *args, long nthreads) {
  long n = nthreads < 1 ? 1 : nthreads > 64 ? 64 : nthreads;
#ifdef _OPENMP
#pragma omp parallel num_threads(n)
  fn(args);
#else
  pthread_t th[64];
  long started = 1;
  for (long t = 1; t < n; t++, started++)
    if (pthread_create(&th[t], NULL, fn, args) != 0) break; /* fewer threads: the others do it */
  fn(args);
  for (long t = 1; t < started; t++) pthread_join(th[t], NULL);
#endif
}

/* ---- im2col and col2im between [B, H, W, C] images and rows [B, P, C*kh*kw] ------------------ */
typedef struct {
  real *img, *col; long B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo; int to_col; Work w;
} ColArgs;

static void *col_worker(void *arg) {
  ColArgs *a = arg;
  long R = a->C * a->kh * a->kw, T = a->kh * a->kw;
  for (long it; (it = take(&a->w)) < a->w.items;) { /* one item: one output row of one sample */
    long rows = a->to_col ? a->Ho : a->H, b = it / rows, oh = it % rows;
    const real *img = a->img + b * a->H * a->W * a->C;
    if (a->to_col) {
      for (long ow = 0; ow < a->Wo; ow++) {
        real *dst = a->col + ((b * a->Ho + oh) * a->Wo + ow) * R;
        for (long t = 0; t < T; t++) {
          long ih = oh * a->sh - a->ph + (t / a->kw) * a->dh, iw = ow * a->sw - a->pw + (t % a->kw) * a->dw;
          if (ih < 0 || ih >= a->H || iw < 0 || iw >= a->W) { for (long c = 0; c < a->C; c++) dst[c * T + t] = 0; continue; }
          const real *src = img + (ih * a->W + iw) * a->C;
          for (long c = 0; c < a->C; c++) dst[c * T + t] = src[c];
        }
      }
    } else { /* col2im: one input row ih of one sample gathers from every row that read it */
      long ih = oh; /* items run over input rows here */
      real *out = a->img + (b * a->H + ih) * a->W * a->C;
      memset(out, 0, sizeof(real) * a->W * a->C);
      for (long i = 0; i < a->kh; i++) {
        long num = ih + a->ph - i * a->dh;
        if (num < 0 || num % a->sh) continue;
        long oh2 = num / a->sh;
        if (oh2 >= a->Ho) continue;
        for (long iw = 0; iw < a->W; iw++)
          for (long j = 0; j < a->kw; j++) {
            long numw = iw + a->pw - j * a->dw;
            if (numw < 0 || numw % a->sw) continue;
            long ow = numw / a->sw;
            if (ow >= a->Wo) continue;
            const real *src = a->col + ((b * a->Ho + oh2) * a->Wo + ow) * R + i * a->kw + j;
            real *d = out + iw * a->C;
            for (long c = 0; c < a->C; c++) d[c] += src[c * T];
          }
      }
    }
  }
  return NULL;
}

void dyconv_im2col(real *img, real *col, long B, long C, long H, long W, long kh, long kw, long sh, long sw,
                   long ph, long pw, long dh, long dw, long Ho, long Wo, long to_col, long nthreads) {
  ColArgs a = {img, col, B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, (int)to_col, {0, B * (to_col ? Ho : H)}};
  run_threads(col_worker, &a, nthreads);
}

/* ---- mixgemm: C[b][p][g*N + n] = sum_m X[b][p][g*M + m] * sum_k att[b][k] * A[k][g*ag + m*lda + n] ----
   The output (A = the bank transposed, [K, C/g*kh*kw, O]) and the input gradient (A = the bank,
   [K, O, C/g*kh*kw]) are both this product. */
typedef struct {
  const real *X, *A, *att; real *C;
  long B, K, M, N, P, G, xs, ldx, as, lda, ag, cs, ldc, nblocks, bchunk, nbchunks;
  Work w;
} MixArgs;

#define MICRO(PR)                                                                                  \
  static void micro_##PR(const real *ap, const real *x, long ldx, long mb, real *c, long ldc,        \
                         int first, long nvalid) {                                                  \
    vec acc[PR][2];                                                                                \
    for (int j = 0; j < PR; j++) acc[j][0] = acc[j][1] = bc(0);                                    \
    for (long mm = 0; mm < mb; mm++) {                                                             \
      vec a0 = ld(ap + mm * NR), a1 = ld(ap + mm * NR + VL);                                       \
      for (int j = 0; j < PR; j++) {                                                               \
        vec xv = bc(x[j * ldx + mm]);                                                              \
        acc[j][0] += xv * a0;                                                                      \
        acc[j][1] += xv * a1;                                                                      \
      }                                                                                            \
    }                                                                                              \
    for (int j = 0; j < PR; j++) {                                                                 \
      real *cj = c + j * ldc;                                                                      \
      if (nvalid == NR) {                                                                          \
        if (first) { st(cj, acc[j][0]); st(cj + VL, acc[j][1]); }                                  \
        else { st(cj, ld(cj) + acc[j][0]); st(cj + VL, ld(cj + VL) + acc[j][1]); }                 \
      } else {                                                                                     \
        real t[NR];                                                                                \
        st(t, acc[j][0]); st(t + VL, acc[j][1]);                                                   \
        for (long i = 0; i < nvalid; i++) cj[i] = first ? t[i] : cj[i] + t[i];                     \
      }                                                                                            \
    }                                                                                              \
  }
#define MICRO_ROWS(PR) MICRO(PR) /* expands ROWS before MICRO pastes it */
MICRO_ROWS(ROWS)
MICRO(4)
MICRO(2)
MICRO(1)

static void *mix_worker(void *arg) {
  MixArgs *a = arg;
  real *apack = alloc(sizeof(real) * KC * ((NC + NR - 1) / NR) * NR);
  for (long it; (it = take(&a->w)) < a->w.items;) {
    long bi = it % a->nbchunks, rest = it / a->nbchunks, nbi = rest % a->nblocks, g = rest / a->nblocks;
    long n0 = nbi * NC, nb = MIN(a->N - n0, NC), npanels = (nb + NR - 1) / NR;
    long b0 = bi * a->bchunk, b1 = MIN(b0 + a->bchunk, a->B);
    for (long m0 = 0; m0 < a->M; m0 += KC) {
      long mb = MIN(a->M - m0, KC);
      for (long b = b0; b < b1; b++) {
        const real *att = a->att + b * a->K;
        for (long pn = 0; pn < npanels; pn++) { /* this sample's kernel tile, panel by panel */
          long nv = MIN(nb - pn * NR, NR);
          for (long mm = 0; mm < mb; mm++) {
            const real *src = a->A + g * a->ag + (m0 + mm) * a->lda + n0 + pn * NR;
            real *dst = apack + (pn * mb + mm) * NR;
            if (nv == NR) {
              vec s0 = bc(0), s1 = bc(0);
              for (long k = 0; k < a->K; k++) {
                s0 += att[k] * ld(src + k * a->as);
                s1 += att[k] * ld(src + k * a->as + VL);
              }
              st(dst, s0); st(dst + VL, s1);
            } else {
              for (long i = 0; i < NR; i++) {
                real s = 0;
                for (long k = 0; i < nv && k < a->K; k++) s += att[k] * src[k * a->as + i];
                dst[i] = s;
              }
            }
          }
        }
        const real *x = a->X + b * a->xs + g * a->M + m0;
        real *c = a->C + b * a->cs + g * a->N + n0;
        for (long p = 0, rows; p < a->P; p += rows) {
          rows = a->P - p >= ROWS ? ROWS : a->P - p >= 4 ? 4 : a->P - p >= 2 ? 2 : 1;
          for (long pn = 0; pn < npanels; pn++) {
            const real *ap = apack + pn * mb * NR, *xp = x + p * a->ldx;
            real *cp = c + p * a->ldc + pn * NR;
            long nv = MIN(nb - pn * NR, NR);
            if (rows == ROWS) CAT(micro_, ROWS)(ap, xp, a->ldx, mb, cp, a->ldc, m0 == 0, nv);
            else if (rows == 4) micro_4(ap, xp, a->ldx, mb, cp, a->ldc, m0 == 0, nv);
            else if (rows == 2) micro_2(ap, xp, a->ldx, mb, cp, a->ldc, m0 == 0, nv);
            else micro_1(ap, xp, a->ldx, mb, cp, a->ldc, m0 == 0, nv);
          }
        }
      }
    }
  }
  free(apack);
  return NULL;
}

void dyconv_mixgemm(const real *X, const real *A, const real *att, real *C, long B, long K, long M, long N, long P,
                    long G, long xs, long ldx, long as, long lda, long ag, long cs, long ldc, long nthreads) {
  MixArgs a = {X, A, att, C, B, K, M, N, P, G, xs, ldx, as, lda, ag, cs, ldc};
  a.nblocks = (N + NC - 1) / NC;
  long base = G * a.nblocks, want = 4 * (nthreads < 1 ? 1 : nthreads);
  a.nbchunks = base >= want ? 1 : MIN((want + base - 1) / base, B);
  a.bchunk = (B + a.nbchunks - 1) / a.nbchunks;
  a.nbchunks = (B + a.bchunk - 1) / a.bchunk;
  a.w.items = base * a.nbchunks;
  run_threads(mix_worker, &a, nthreads);
}

/* ---- the weight gradient, reduced on the fly -----------------------------------------------------
   G_b[o][r] = sum_p Y[b][p][g*O + o] * X[b][p][g*R + r]   (o < O, r < R: one group's block)
   dpi[b][k] = sum_{g,o,r} G_b[o][r] * A[k][g*O + o][r]      dA[k][g*O + o][r] = sum_b att[b][k] * G_b[o][r]
   An item owns a tile of dA; each item's share of dpi is summed in item order at the end. */
#define MC_W 128 /* output channels of a tile of the bank gradient */
#define NC_W 128 /* reduction columns of a tile of the bank gradient */
typedef struct {
  const real *Y, *X, *A, *att; real *dA, *part;
  long B, K, O, R, P, G, ys, ldy, xs, ldx, oblocks, rblocks;
  Work w;
} WArgs;

#define WMICRO(PR)                                                                                    \
  static void wmicro_##PR(const WArgs *a, long b, long g, long o, long r, const real *xp, const real *yp, \
                          vec *dpv) {                                                                \
    vec acc[PR][2];                                                                                    \
    for (int j = 0; j < PR; j++) acc[j][0] = acc[j][1] = bc(0);                                        \
    for (long p = 0; p < a->P; p++) {                                                                  \
      vec x0 = ld(xp + p * NR), x1 = ld(xp + p * NR + VL);                                             \
      for (int j = 0; j < PR; j++) {                                                                   \
        vec yv = bc(yp[p * MC_W + j]);                                                                 \
        acc[j][0] += yv * x0;                                                                          \
        acc[j][1] += yv * x1;                                                                          \
      }                                                                                                \
    }                                                                                                  \
    const real *att = a->att + b * a->K;                                                               \
    for (long k = 0; k < a->K; k++) {                                                                  \
      vec dp = dpv[k];                                                                                 \
      for (int j = 0; j < PR; j++) {                                                                   \
        long off = (k * a->G * a->O + g * a->O + o + j) * a->R + r;                                    \
        const real *w = a->A + off;                                                                    \
        real *d = a->dA + off;                                                                         \
        dp += acc[j][0] * ld(w) + acc[j][1] * ld(w + VL);                                              \
        if (b == 0) { st(d, att[k] * acc[j][0]); st(d + VL, att[k] * acc[j][1]); }                     \
        else { st(d, ld(d) + att[k] * acc[j][0]); st(d + VL, ld(d + VL) + att[k] * acc[j][1]); }       \
      }                                                                                                \
      dpv[k] = dp;                                                                                     \
    }                                                                                                  \
  }
#define WMICRO_ROWS(PR) WMICRO(PR)
WMICRO_ROWS(ROWS)
WMICRO(4)
WMICRO(2)
WMICRO(1)

static void *w_worker(void *arg) {
  WArgs *a = arg;
  real *xp = alloc(sizeof(real) * a->P * NR), *yp = alloc(sizeof(real) * a->P * MC_W);
  vec *dpv = alloc(sizeof(vec) * a->K);
  for (long it; (it = take(&a->w)) < a->w.items;) {
    long rb = it % a->rblocks, rest = it / a->rblocks, ob = rest % a->oblocks, g = rest / a->oblocks;
    long o0 = ob * MC_W, o1 = MIN(o0 + MC_W, a->O), r0 = rb * NC_W, r1 = MIN(r0 + NC_W, a->R);
    real *part = a->part + it * a->B * a->K;
    for (long b = 0; b < a->B; b++) {
      const real *y = a->Y + b * a->ys + g * a->O, *x = a->X + b * a->xs + g * a->R;
      for (long k = 0; k < a->K; k++) dpv[k] = bc(0);
      for (long p = 0; p < a->P; p++) /* this sample's gradient rows for the item's channels */
        for (long o = o0; o < o1; o++) yp[p * MC_W + o - o0] = y[p * a->ldy + o];
      long r = r0;
      for (; r + NR <= r1; r += NR) {
        for (long p = 0; p < a->P; p++) memcpy(xp + p * NR, x + p * a->ldx + r, sizeof(real) * NR);
        for (long o = o0, rows; o < o1; o += rows) {
          rows = o1 - o >= ROWS ? ROWS : o1 - o >= 4 ? 4 : o1 - o >= 2 ? 2 : 1;
          if (rows == ROWS) CAT(wmicro_, ROWS)(a, b, g, o, r, xp, yp + o - o0, dpv);
          else if (rows == 4) wmicro_4(a, b, g, o, r, xp, yp + o - o0, dpv);
          else if (rows == 2) wmicro_2(a, b, g, o, r, xp, yp + o - o0, dpv);
          else wmicro_1(a, b, g, o, r, xp, yp + o - o0, dpv);
        }
      }
      for (; r < r1; r++) /* columns past the last full tile, one at a time */
        for (long o = o0; o < o1; o++) {
          real s = 0;
          for (long p = 0; p < a->P; p++) s += yp[p * MC_W + o - o0] * x[p * a->ldx + r];
          for (long k = 0; k < a->K; k++) {
            long off = (k * a->G * a->O + g * a->O + o) * a->R + r;
            part[b * a->K + k] += s * a->A[off];
            a->dA[off] = (b == 0 ? 0 : a->dA[off]) + a->att[b * a->K + k] * s;
          }
        }
      for (long k = 0; k < a->K; k++) part[b * a->K + k] += hsum(dpv[k]);
    }
  }
  free(xp);
  free(yp);
  free(dpv);
  return NULL;
}

void dyconv_weightgrad(const real *Y, const real *X, const real *A, const real *att, real *dA, real *dpi, long B,
                       long K, long O, long R, long P, long G, long ys, long ldy, long xs, long ldx, long nthreads) {
  WArgs a = {Y, X, A, att, dA, NULL, B, K, O, R, P, G, ys, ldy, xs, ldx};
  a.oblocks = (O + MC_W - 1) / MC_W;
  a.rblocks = (R + NC_W - 1) / NC_W;
  a.w.items = G * a.oblocks * a.rblocks;
  a.part = calloc((size_t)(a.w.items * B * K), sizeof(real));
  run_threads(w_worker, &a, nthreads);
  for (long i = 0; i < B * K; i++) dpi[i] = 0;
  for (long it = 0; it < a.w.items; it++)
    for (long i = 0; i < B * K; i++) dpi[i] += a.part[it * B * K + i];
  free(a.part);
}
