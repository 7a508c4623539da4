/* Fused CPU kernels of MLLA at inference (see cpu_kernels.py): the attention core's element-wise
 * work, and a GEMM epilogue and a LayerNorm that write into reused buffers.
 *
 * Plain C, no Python or torch headers: cpu_kernels.py compiles this file once per machine
 * (cc -O3 -march=native) into a cache folder and calls it through ctypes on tensors' memory.
 * Tensors are contiguous; "bf16" says whether a tensor holds bfloat16 (else float32). Float
 * semantics are IEEE (no -ffast-math): NaN and inf propagate as in ATen.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Threads: OpenMP where compiled with -fopenmp. The library then runs on the OpenMP runtime
 * torch has loaded (same soname, libgomp.so.1), so its threads are torch's own, already awake
 * after the ATen op before; a second pool of threads would compete with them for the cores. */
#ifdef _OPENMP
#include <omp.h>
static inline int omp_thread(void) { return omp_get_thread_num(); }
#else
static inline int omp_thread(void) { return 0; }
#endif

/* glibc's libmvec has SIMD versions of expf for SSE/AVX/AVX2/AVX-512; declaring them lets
 * the vectoriser call them without -ffast-math (glibc declares them only under fast-math). */
#ifndef MLLA_NO_LIBMVEC
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
float erff(float);
#endif

static inline float bf16_to_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* round to nearest even, NaN stays NaN (as c10::BFloat16) */
static inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return ((u & 0x7FFFFFFFu) > 0x7F800000u) ? (uint16_t)((u >> 16) | 0x40u) : (uint16_t)rounded;
}

/* ELU(x) + 1 = exp(min(x, 0)) + max(x, 0); NaN propagates through the exp */
static inline float elu_plus_one(float x) {
  float negative = x > 0.0f ? 0.0f : x;
  float positive = x > 0.0f ? x : 0.0f;
  return expf(negative) + positive;
}

static inline void load_features(const void *src, int bf16, long offset, long c, float *dst) {
  if (bf16) {
    const uint16_t *s = (const uint16_t *)src + offset;
#pragma omp simd
    for (long i = 0; i < c; i++) dst[i] = elu_plus_one(bf16_to_float(s[i]));
  } else {
    const float *s = (const float *)src + offset;
#pragma omp simd
    for (long i = 0; i < c; i++) dst[i] = elu_plus_one(s[i]);
  }
}

/* RoPE: channel pairs (2i, 2i + 1) times the complex number (cos, sin) of the table, then
 * times scale[channel] when scale is given */
static inline void rotate(const float *e, const float *table, const float *scale, long c,
                          float *out) {
#pragma omp simd
  for (long i = 0; i < c; i += 2) {
    float a = e[i], b = e[i + 1], cs = table[i], sn = table[i + 1];
    float re = a * cs - b * sn, im = a * sn + b * cs;
    out[i] = scale ? re * scale[i] : re;
    out[i + 1] = scale ? im * scale[i + 1] : im;
  }
}

/* Keys: k = ELU(qk[t, 1]) + 1; ksum += k (double, one row of C per thread, summed by the
 * caller); out[t, 1] = RoPE(k). qk and out are (N, 2, C) (out may be qk when both are
 * float32), table is (N, C / 2, 2). */
void mlla_keys(const void *qk, int bf16, float *out, const float *table, double *ksum, long n,
               long c, int threads) {
#pragma omp parallel num_threads(threads)
  {
    float e[c];
    double *sum = ksum + c * omp_thread();
#pragma omp for schedule(static)
    for (long t = 0; t < n; t++) {
      load_features(qk, bf16, (2 * t + 1) * c, c, e);
#pragma omp simd
      for (long i = 0; i < c; i++) sum[i] += e[i];
      rotate(e, table + t * c, 0, c, out + (2 * t + 1) * c);
    }
  }
}

/* Queries: q = ELU(qk[t, 0]) + 1, per head z = 1 / (q . kmean + 1e-6), out[t, 0] = RoPE(q) * z
 * (the normaliser uses the un-rotated q and k). */
void mlla_queries(const void *qk, int bf16, float *out, const float *table, const float *kmean,
                  long n, long c, long heads, int threads) {
  long d = c / heads;
#pragma omp parallel num_threads(threads)
  {
    float e[c], z[c];
#pragma omp for schedule(static)
    for (long t = 0; t < n; t++) {
      load_features(qk, bf16, 2 * t * c, c, e);
      for (long h = 0; h < heads; h++) {
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (long i = h * d; i < (h + 1) * d; i++) dot += e[i] * kmean[i];
        float inv = 1.0f / (dot + 1e-6f);
        for (long i = h * d; i < (h + 1) * d; i++) z[i] = inv;
      }
      rotate(e, table + t * c, z, c, out + 2 * t * c);
    }
  }
}

/* g = g * y over n elements, in g's dtype (rounded once), y float32 */
void mlla_gate(const float *y, void *g, int bf16, long n, int threads) {
  if (bf16) {
    uint16_t *p = (uint16_t *)g;
#pragma omp parallel for simd num_threads(threads) schedule(static)
    for (long i = 0; i < n; i++) p[i] = float_to_bf16(bf16_to_float(p[i]) * y[i]);
  } else {
    float *p = (float *)g;
#pragma omp parallel for simd num_threads(threads) schedule(static)
    for (long i = 0; i < n; i++) p[i] *= y[i];
  }
}

static inline void load_row(const void *src, int bf16, long offset, long c, float *dst) {
  if (bf16) {
    const uint16_t *p = (const uint16_t *)src + offset;
#pragma omp simd
    for (long i = 0; i < c; i++) dst[i] = bf16_to_float(p[i]);
  } else {
    memcpy(dst, (const float *)src + offset, c * sizeof(float));
  }
}

static inline void store_row(void *dst, int bf16, long offset, long c, const float *src) {
  if (bf16) {
    uint16_t *p = (uint16_t *)dst + offset;
#pragma omp simd
    for (long i = 0; i < c; i++) p[i] = float_to_bf16(src[i]);
  } else {
    memcpy((float *)dst + offset, src, c * sizeof(float));
  }
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }
static inline float gelu(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

enum { ACT_NONE = 0, ACT_SILU = 1, ACT_GELU = 2 };

/* y = act(y + bias) in place, y (rows, C) in float32 or bf16: the epilogue of a GEMM that
 * wrote into a reused buffer (GELU exact, with erf). */
void mlla_bias_act(void *y, int bf16, const float *bias, long rows, long c, int act,
                   int threads) {
#pragma omp parallel num_threads(threads)
  {
    float v[c];
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
      load_row(y, bf16, r * c, c, v);
      if (act == ACT_SILU) {
#pragma omp simd
        for (long i = 0; i < c; i++) v[i] = silu(v[i] + bias[i]);
      } else if (act == ACT_GELU) {
#pragma omp simd
        for (long i = 0; i < c; i++) v[i] = gelu(v[i] + bias[i]);
      } else {
#pragma omp simd
        for (long i = 0; i < c; i++) v[i] += bias[i];
      }
      store_row(y, bf16, r * c, c, v);
    }
  }
}

/* out = LayerNorm(x) over the last dimension C of (rows, C), biased variance, float32 maths;
 * x and out float32 or bf16, weight and bias float32. */
void mlla_layer_norm(const void *x, int x_bf16, const float *weight, const float *bias, float eps,
                     void *out, int out_bf16, long rows, long c, int threads) {
#pragma omp parallel num_threads(threads)
  {
    float v[c];
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
      load_row(x, x_bf16, r * c, c, v);
      float mean = 0.0f, var = 0.0f;
#pragma omp simd reduction(+ : mean)
      for (long i = 0; i < c; i++) mean += v[i];
      mean /= (float)c;
#pragma omp simd reduction(+ : var)
      for (long i = 0; i < c; i++) var += (v[i] - mean) * (v[i] - mean);
      float rstd = 1.0f / sqrtf(var / (float)c + eps);
#pragma omp simd
      for (long i = 0; i < c; i++) v[i] = (v[i] - mean) * rstd * weight[i] + bias[i];
      store_row(out, out_bf16, r * c, c, v);
    }
  }
}

/* Training (the backward of a block's attention, see train_path.py) --------------------------
 * Features: feat[t, j] = ELU(qk[t, j]) + 1 and rot[t, j] = RoPE(feat[t, j]) for q (j = 0) and
 * k (j = 1); ksum += k (double, one row of C per thread, summed by the caller). qk is (N, 2, C)
 * float32 or bf16, feat and rot (N, 2, C) float32, table (N, C / 2, 2). */
void mlla_features(const void *qk, int bf16, float *feat, float *rot, const float *table,
                   double *ksum, long n, long c, int threads) {
#pragma omp parallel num_threads(threads)
  {
    double *sum = ksum + c * omp_thread();
#pragma omp for schedule(static)
    for (long t = 0; t < n; t++) {
      for (long j = 0; j < 2; j++) {
        float *e = feat + (2 * t + j) * c;
        load_features(qk, bf16, (2 * t + j) * c, c, e);
        rotate(e, table + t * c, 0, c, rot + (2 * t + j) * c);
      }
      const float *k = feat + (2 * t + 1) * c;
#pragma omp simd
      for (long i = 0; i < c; i++) sum[i] += k[i];
    }
  }
}

/* The gradient of qk from those of the rotated features grad_rot (N, 2, C) float32: RoPE's
 * transpose (the rotation by -angle), plus the normaliser's terms (q: gs[t, head] * kmean; k:
 * kconst, the same for every token), times ELU's derivative, which is min(feature, 1) (1 above
 * 0, else exp(x), the feature there); out (N, 2, C) float32 or bf16 (rounded once). */
void mlla_features_grad(const float *grad_rot, const float *feat, const float *table,
                        const float *gs, const float *kmean, const float *kconst, void *out,
                        int out_bf16, long n, long c, long heads, int threads) {
  long d = c / heads;
#pragma omp parallel num_threads(threads)
  {
    float g[c];
#pragma omp for schedule(static)
    for (long t = 0; t < n; t++) {
      for (long j = 0; j < 2; j++) {
        const float *gr = grad_rot + (2 * t + j) * c, *tab = table + t * c;
        const float *e = feat + (2 * t + j) * c;
#pragma omp simd
        for (long i = 0; i < c; i += 2) {
          float a = gr[i], b = gr[i + 1], cs = tab[i], sn = tab[i + 1];
          g[i] = a * cs + b * sn;
          g[i + 1] = b * cs - a * sn;
        }
        if (j == 0) {
          for (long h = 0; h < heads; h++) {
            float s = gs[t * heads + h];
#pragma omp simd
            for (long i = h * d; i < (h + 1) * d; i++) g[i] += s * kmean[i];
          }
        } else {
#pragma omp simd
          for (long i = 0; i < c; i++) g[i] += kconst[i];
        }
#pragma omp simd
        for (long i = 0; i < c; i++) g[i] *= e[i] > 1.0f ? 1.0f : e[i]; /* NaN stays */
        store_row(out, out_bf16, (2 * t + j) * c, c, g);
      }
    }
  }
}

/* The block's gate, float32: out = y * SiLU(a) over n elements (out may be y). */
void mlla_silu_gate(const float *y, const float *a, float *out, long n, int threads) {
#pragma omp parallel for simd num_threads(threads) schedule(static)
  for (long i = 0; i < n; i++) out[i] = y[i] * silu(a[i]);
}

/* Its backward, float32, in place: given g, the gradient of m = y * SiLU(a), writes m into y
 * and the gradient of a, g * y * SiLU'(a), into g (SiLU'(a) = s (1 + a (1 - s)), s =
 * sigmoid(a), as ATen's silu_backward); y's gradient is the gate of g (mlla_silu_gate). */
void mlla_silu_gate_backward(float *g, float *y, const float *a, long n, int threads) {
#pragma omp parallel for simd num_threads(threads) schedule(static)
  for (long i = 0; i < n; i++) {
    float x = a[i], s = 1.0f / (1.0f + expf(-x)), yi = y[i];
    y[i] = yi * (x * s);
    g[i] *= yi * (s * (1.0f + x * (1.0f - s)));
  }
}

/* Row `row` (image n's row y, row = n * h + y) of channels-last tokens (B, H, W, C) as float32
 * (len = W * C): a pointer into src when it is float32, else converted into one of three
 * per-thread slots (row % 3, so that rows y - 1, y and y + 1 stay converted together), which
 * are converted again only when they held another row. */
static const float *token_row(const void *src, int bf16, long row, long len, float *slots,
                              long *tags) {
  if (!bf16) return (const float *)src + row * len;
  long s = row % 3;
  float *buf = slots + s * len;
  if (tags[s] != row) {
    load_row(src, bf16, row * len, len, buf);
    tags[s] = row;
  }
  return buf;
}

/* Channel blocks of DW3_LANES (one AVX-512 register of float32) keep a block's taps and sums
 * in registers over a whole row; the last block of a C that is not a multiple takes the rest.
 * The zero padding is multiplied as ATen multiplies it (0 * NaN is NaN): a row or column
 * outside the image is read from a buffer of zeros (a literal zero the compiler would fold). */
#define DW3_LANES 16

/* The input gradient of a row, channels [i0, i0 + lanes): out[x] = sum over taps of
 * g[2 - ky][x + 1 - kx] * taps[ky, kx], g[k] the gradient's row y + k - 1. */
static inline void dw3_input_grad(const float *const g[3], const float *taps, const float *zeros,
                                  float *out, long w, long c, long i0, long lanes) {
  for (long xx = 0; xx < w; xx++) {
    float a[DW3_LANES] = {0};
    for (long ky = 0; ky < 3; ky++) {
      for (long kx = 0; kx < 3; kx++) {
        long xs = xx + 1 - kx;
        const float *p = (xs >= 0 && xs < w ? g[2 - ky] + xs * c : zeros) + i0;
        const float *t = taps + (ky * 3 + kx) * c + i0;
        for (long j = 0; j < lanes; j++) a[j] += p[j] * t[j];
      }
    }
    for (long j = 0; j < lanes; j++) out[xx * c + i0 + j] = a[j];
  }
}

/* A row's sums of the taps' and the bias's gradients, channels [i0, i0 + lanes), into part
 * (10, C): gy the gradient's row y, xr[k] the input's row y + k - 1. */
static inline void dw3_taps_grad(const float *gy, const float *const xr[3], const float *zeros,
                                 float *part, long w, long c, long i0, long lanes) {
  float s[10][DW3_LANES] = {{0}};
  for (long xx = 0; xx < w; xx++) {
    const float *gp = gy + xx * c + i0;
    for (long ky = 0; ky < 3; ky++) {
      for (long kx = 0; kx < 3; kx++) {
        long xs = xx + kx - 1;
        const float *p = (xs >= 0 && xs < w ? xr[ky] + xs * c : zeros) + i0;
        for (long j = 0; j < lanes; j++) s[ky * 3 + kx][j] += gp[j] * p[j];
      }
    }
    for (long j = 0; j < lanes; j++) s[9][j] += gp[j];
  }
  for (long k = 0; k < 10; k++)
    for (long j = 0; j < lanes; j++) part[k * c + i0 + j] = s[k][j];
}

/* The same for a full block of DW3_LANES channels in GCC/Clang vector types (whatever the
 * target's registers: one AVX-512 register, two AVX ones, four SSE ones), so that the taps
 * and sums stay in registers; products are added in the same order as above. */
typedef float dw3_vec __attribute__((vector_size(4 * DW3_LANES), aligned(4)));

static inline dw3_vec dw3_load(const float *p) { return *(const dw3_vec *)p; }

static void dw3_input_grad_block(const float *const g[3], const float *taps, const float *zeros,
                                 float *out, long w, long c, long i0) {
  dw3_vec t[9];
  for (long k = 0; k < 9; k++) t[k] = dw3_load(taps + k * c + i0);
  for (long xx = 0; xx < w; xx++) {
    dw3_vec a = {0};
    for (long ky = 0; ky < 3; ky++) {
      const float *src = g[2 - ky];
      a += dw3_load((xx + 1 < w ? src + (xx + 1) * c : zeros) + i0) * t[ky * 3];
      a += dw3_load(src + xx * c + i0) * t[ky * 3 + 1];
      a += dw3_load((xx > 0 ? src + (xx - 1) * c : zeros) + i0) * t[ky * 3 + 2];
    }
    *(dw3_vec *)(out + xx * c + i0) = a;
  }
}

static void dw3_taps_grad_block(const float *gy, const float *const xr[3], const float *zeros,
                                float *part, long w, long c, long i0) {
  dw3_vec s[10];
  for (long k = 0; k < 10; k++) s[k] = (dw3_vec){0};
  for (long xx = 0; xx < w; xx++) {
    dw3_vec gp = dw3_load(gy + xx * c + i0);
    for (long ky = 0; ky < 3; ky++) {
      const float *src = xr[ky];
      s[ky * 3] += gp * dw3_load((xx > 0 ? src + (xx - 1) * c : zeros) + i0);
      s[ky * 3 + 1] += gp * dw3_load(src + xx * c + i0);
      s[ky * 3 + 2] += gp * dw3_load((xx + 1 < w ? src + (xx + 1) * c : zeros) + i0);
    }
    s[9] += gp;
  }
  for (long k = 0; k < 10; k++) *(dw3_vec *)(part + k * c + i0) = s[k];
}

/* The backward of a depthwise 3x3 conv with stride 1 and zero padding 1 on channels-last
 * tokens x (B, H, W, C), float32 or bf16 (bf16 = both grad and x, and gx), with taps (9, C)
 * float32 (tap ky * 3 + kx of channel c at [ky * 3 + kx, c]):
 *   gx[n, y, x] = sum over taps of grad[n, y + 1 - ky, x + 1 - kx] * taps[ky, kx]
 *                 (NULL: not needed; float32 sums rounded once);
 *   sums[thread] (10, C) float64, rows 0-8 += the taps' gradients
 *                 sum grad[n, y, x] * x[n, y + ky - 1, x + kx - 1], row 9 += sum grad
 *                 (NULL: not needed; the caller adds the threads' rows).
 * Each row's sums are float32 over its W tokens, then added in float64. */
void mlla_dw3_backward(const void *grad, const void *x, int bf16, const float *taps, void *gx,
                       double *sums, long b, long h, long w, long c, int threads) {
  long len = w * c, full = c - c % DW3_LANES;
#pragma omp parallel num_threads(threads)
  {
    float *work = malloc(sizeof(float) * (8 * len + 10 * c));
    float *gslots = work, *xslots = work + 3 * len, *out = work + 6 * len, *zeros = out + len;
    float *part = zeros + len;
    memset(zeros, 0, sizeof(float) * len);
    long gtags[3] = {-1, -1, -1}, xtags[3] = {-1, -1, -1};
    double *sum = sums ? sums + 10 * c * omp_thread() : 0;
#pragma omp for schedule(static)
    for (long row = 0; row < b * h; row++) {
      long y = row % h;
      const float *g[3], *xr[3] = {0}; /* rows y - 1, y, y + 1 (zeros outside the image) */
      for (long k = 0; k < 3; k++) {
        int inside = y + k - 1 >= 0 && y + k - 1 < h;
        g[k] = inside ? token_row(grad, bf16, row + k - 1, len, gslots, gtags) : zeros;
        if (sums) xr[k] = inside ? token_row(x, bf16, row + k - 1, len, xslots, xtags) : zeros;
      }
      if (gx) { /* float32: straight into gx; bf16: a float32 row, rounded once */
        float *dst = bf16 ? out : (float *)gx + row * len;
        for (long i0 = 0; i0 < full; i0 += DW3_LANES)
          dw3_input_grad_block(g, taps, zeros, dst, w, c, i0);
        if (full < c) dw3_input_grad(g, taps, zeros, dst, w, c, full, c - full);
        if (bf16) store_row(gx, 1, row * len, len, out);
      }
      if (sums) {
        for (long i0 = 0; i0 < full; i0 += DW3_LANES)
          dw3_taps_grad_block(g[1], xr, zeros, part, w, c, i0);
        if (full < c) dw3_taps_grad(g[1], xr, zeros, part, w, c, full, c - full);
#pragma omp simd
        for (long i = 0; i < 10 * c; i++) sum[i] += part[i];
      }
    }
    free(work);
  }
}

/* The products of a block's attention backward for one image (core_backward in mlla.py), per
 * head h of d = C / heads channels, with q, k the features and q_rot, k_rot their rotations
 * (feat and rot, (N, 2, C) float32, token-major), v the values, go the output's gradient:
 *   kv = k_rot^T v / N;  z = 1 / (q . kmean + 1e-6);  att = q_rot kv;  y = att z + lepe
 *   gs = -z^2 (go . att);  g = go z;  grad_kv = q_rot^T g / N;  gkmean = gs^T q / N
 *   grad q_rot = g kv^T;  grad k_rot = v grad_kv^T;  grad v = k_rot grad_kv
 * in three passes over the tokens (kv; the queries' side; the keys' side) where ATen makes
 * nine products and seven element-wise passes. v, go, lepe, y and gv are (N, C) in float32 or
 * bf16 ("bf16"; y and gv rounded once; y may be lepe); the rotations' gradients overwrite rot;
 * gs (N, heads) and gkmean (C) float32 out. The d x d sums run in float32 over blocks of
 * ATT_BLOCK tokens, then in float64 per thread, added by thread in a fixed order. */
#define ATT_BLOCK 64

static void sum_blocks(double *parts, int threads, long size, float scale, float *out) {
  for (long i = 0; i < size; i++) {
    double s = 0.0;
    for (int t = 0; t < threads; t++) s += parts[t * size + i];
    out[i] = (float)s * scale;
  }
}

static void transpose_heads(const float *m, long heads, long d, float *mt) {
  for (long h = 0; h < heads; h++)
    for (long i = 0; i < d; i++)
      for (long j = 0; j < d; j++) mt[(h * d + j) * d + i] = m[(h * d + i) * d + j];
}

/* The d x d products over a block of token rows. Heads of 32 channels (MLLA's) take
 * register-blocked 16-lane vectors (GCC/Clang vector extensions; the compiler maps them onto
 * AVX-512, AVX2 or SSE registers): a row times a head's matrix four rows at a time, and the
 * sums of outer products four matrix rows at a time; other head widths a plain loop. */
typedef float vf16 __attribute__((vector_size(64), aligned(4)));
#define VLOAD(p) (*(const vf16 *)(p))
#define VSTORE(p, x) (*(vf16 *)(p) = (x))

/* out[t, :] = a[t, :] m (32 x 32) for t < rows; a and out with row strides lda, ldo */
static inline void rows_times_32(long rows, const float *a, long lda, const float *m, float *out,
                                 long ldo) {
  long t = 0;
  for (; t + 4 <= rows; t += 4) {
    vf16 o00 = {0}, o01 = {0}, o10 = {0}, o11 = {0}, o20 = {0}, o21 = {0}, o30 = {0}, o31 = {0};
    const float *a0 = a + t * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
    for (int i = 0; i < 32; i++) {
      vf16 m0 = VLOAD(m + 32 * i), m1 = VLOAD(m + 32 * i + 16);
      o00 += a0[i] * m0, o01 += a0[i] * m1, o10 += a1[i] * m0, o11 += a1[i] * m1;
      o20 += a2[i] * m0, o21 += a2[i] * m1, o30 += a3[i] * m0, o31 += a3[i] * m1;
    }
    float *r = out + t * ldo;
    VSTORE(r, o00), VSTORE(r + 16, o01), VSTORE(r + ldo, o10), VSTORE(r + ldo + 16, o11);
    VSTORE(r + 2 * ldo, o20), VSTORE(r + 2 * ldo + 16, o21);
    VSTORE(r + 3 * ldo, o30), VSTORE(r + 3 * ldo + 16, o31);
  }
  for (; t < rows; t++) {
    vf16 o0 = {0}, o1 = {0};
    const float *a0 = a + t * lda;
    for (int i = 0; i < 32; i++) o0 += a0[i] * VLOAD(m + 32 * i), o1 += a0[i] * VLOAD(m + 32 * i + 16);
    VSTORE(out + t * ldo, o0), VSTORE(out + t * ldo + 16, o1);
  }
}

/* m (32 x 32) += sum over t < rows of a[t, :]^T b[t, :]; a, b with row strides lda, ldb */
static inline void outer_sum_32(long rows, const float *a, long lda, const float *b, long ldb,
                                float *m) {
  for (int i = 0; i < 32; i += 4) {
    vf16 s00 = VLOAD(m + 32 * i), s01 = VLOAD(m + 32 * i + 16);
    vf16 s10 = VLOAD(m + 32 * i + 32), s11 = VLOAD(m + 32 * i + 48);
    vf16 s20 = VLOAD(m + 32 * i + 64), s21 = VLOAD(m + 32 * i + 80);
    vf16 s30 = VLOAD(m + 32 * i + 96), s31 = VLOAD(m + 32 * i + 112);
    for (long t = 0; t < rows; t++) {
      const float *at = a + t * lda + i;
      vf16 b0 = VLOAD(b + t * ldb), b1 = VLOAD(b + t * ldb + 16);
      s00 += at[0] * b0, s01 += at[0] * b1, s10 += at[1] * b0, s11 += at[1] * b1;
      s20 += at[2] * b0, s21 += at[2] * b1, s30 += at[3] * b0, s31 += at[3] * b1;
    }
    VSTORE(m + 32 * i, s00), VSTORE(m + 32 * i + 16, s01);
    VSTORE(m + 32 * i + 32, s10), VSTORE(m + 32 * i + 48, s11);
    VSTORE(m + 32 * i + 64, s20), VSTORE(m + 32 * i + 80, s21);
    VSTORE(m + 32 * i + 96, s30), VSTORE(m + 32 * i + 112, s31);
  }
}

/* out[t, :] = a[t, :] m (d x d) for t < rows */
static inline void rows_times(long d, long rows, const float *a, long lda, const float *m,
                              float *out, long ldo) {
  if (d == 32) {
    rows_times_32(rows, a, lda, m, out, ldo);
    return;
  }
  for (long t = 0; t < rows; t++) {
    float *o = out + t * ldo;
#pragma omp simd
    for (long j = 0; j < d; j++) o[j] = 0.0f;
    for (long i = 0; i < d; i++) {
      float ai = a[t * lda + i];
#pragma omp simd
      for (long j = 0; j < d; j++) o[j] += ai * m[i * d + j];
    }
  }
}

/* m (d x d) += sum over t < rows of a[t, :]^T b[t, :] */
static inline void outer_sum(long d, long rows, const float *a, long lda, const float *b,
                             long ldb, float *m) {
  if (d == 32) {
    outer_sum_32(rows, a, lda, b, ldb, m);
    return;
  }
  for (long t = 0; t < rows; t++)
    for (long i = 0; i < d; i++) {
      float ai = a[t * lda + i];
#pragma omp simd
      for (long j = 0; j < d; j++) m[i * d + j] += ai * b[t * ldb + j];
    }
}

static void load_rows(const void *src, int bf16, long t0, long rows, long c, float *dst) {
  for (long t = 0; t < rows; t++) load_row(src, bf16, (t0 + t) * c, c, dst + t * c);
}

static void store_rows(void *dst, int bf16, long t0, long rows, long c, const float *src) {
  for (long t = 0; t < rows; t++) store_row(dst, bf16, (t0 + t) * c, c, src + t * c);
}

void mlla_attention_core_backward(const float *feat, float *rot, const void *v, const void *go,
                                  const void *lepe, void *y, void *gv, int bf16,
                                  const float *kmean, float *gs, float *gkmean, long n, long c,
                                  long heads, int threads) {
  const long d = c / heads, hdd = c * d, B = ATT_BLOCK;
  float *kv = malloc((4 * hdd + c) * sizeof(float)), *kvt = kv + hdd, *gkv = kv + 2 * hdd;
  float *gkvt = gkv + hdd + c; /* gkv holds grad_kv, then gkmean's c sums */
  double *parts = calloc((size_t)threads * (hdd + c), sizeof(double));
  float inv_n = 1.0f / (float)n;
  /* kv = k_rot^T v / N */
#pragma omp parallel num_threads(threads)
  {
    double *part = parts + omp_thread() * hdd;
    float *blk = malloc((hdd + B * c) * sizeof(float)), *vb = blk + hdd;
#pragma omp for schedule(static)
    for (long t0 = 0; t0 < n; t0 += B) {
      long rows = n - t0 < B ? n - t0 : B;
      memset(blk, 0, hdd * sizeof(float));
      load_rows(v, bf16, t0, rows, c, vb);
      for (long h = 0; h < heads; h++)
        outer_sum(d, rows, rot + (2 * t0 + 1) * c + h * d, 2 * c, vb + h * d, c, blk + h * d * d);
      for (long i = 0; i < hdd; i++) part[i] += blk[i];
    }
    free(blk);
  }
  sum_blocks(parts, threads, hdd, inv_n, kv);
  transpose_heads(kv, heads, d, kvt);
  memset(parts, 0, (size_t)threads * (hdd + c) * sizeof(double));
  /* the queries' side */
#pragma omp parallel num_threads(threads)
  {
    double *part = parts + omp_thread() * (hdd + c);
    float *blk = malloc((hdd + c + 4 * B * c) * sizeof(float)), *bkm = blk + hdd;
    float *gob = bkm + c, *yb = gob + B * c, *gb = yb + B * c, *lb = gb + B * c;
#pragma omp for schedule(static)
    for (long t0 = 0; t0 < n; t0 += B) {
      long rows = n - t0 < B ? n - t0 : B;
      memset(blk, 0, (hdd + c) * sizeof(float));
      load_rows(go, bf16, t0, rows, c, gob);
      load_rows(lepe, bf16, t0, rows, c, lb);
      for (long h = 0; h < heads; h++) {
        float *qr = rot + 2 * t0 * c + h * d;
        rows_times(d, rows, qr, 2 * c, kv + h * d * d, yb + h * d, c); /* att */
        for (long t = 0; t < rows; t++) {
          const float *q = feat + 2 * (t0 + t) * c + h * d, *km = kmean + h * d;
          float *att = yb + t * c + h * d, *g = gb + t * c + h * d;
          const float *goh = gob + t * c + h * d, *lr = lb + t * c + h * d;
          float s = 0.0f, dot = 0.0f;
#pragma omp simd reduction(+ : s)
          for (long i = 0; i < d; i++) s += q[i] * km[i];
          float z = 1.0f / (s + 1e-6f);
#pragma omp simd reduction(+ : dot)
          for (long j = 0; j < d; j++) dot += goh[j] * att[j];
          float grad_s = -(dot * z * z);
          gs[(t0 + t) * heads + h] = grad_s;
#pragma omp simd
          for (long j = 0; j < d; j++) {
            g[j] = goh[j] * z;
            att[j] = att[j] * z + lr[j];
            bkm[h * d + j] += grad_s * q[j];
          }
        }
        outer_sum(d, rows, qr, 2 * c, gb + h * d, c, blk + h * d * d); /* grad_kv */
        rows_times(d, rows, gb + h * d, c, kvt + h * d * d, qr, 2 * c); /* grad q_rot */
      }
      store_rows(y, bf16, t0, rows, c, yb);
      for (long i = 0; i < hdd + c; i++) part[i] += blk[i];
    }
    free(blk);
  }
  sum_blocks(parts, threads, hdd + c, inv_n, gkv); /* grad_kv, then gkmean */
  memcpy(gkmean, gkv + hdd, c * sizeof(float));
  transpose_heads(gkv, heads, d, gkvt);
  /* the keys' side */
#pragma omp parallel num_threads(threads)
  {
    float *vb = malloc(2 * B * c * sizeof(float)), *gvb = vb + B * c;
#pragma omp for schedule(static)
    for (long t0 = 0; t0 < n; t0 += B) {
      long rows = n - t0 < B ? n - t0 : B;
      load_rows(v, bf16, t0, rows, c, vb);
      for (long h = 0; h < heads; h++) {
        float *kr = rot + (2 * t0 + 1) * c + h * d;
        rows_times(d, rows, kr, 2 * c, gkv + h * d * d, gvb + h * d, c);
        rows_times(d, rows, vb + h * d, c, gkvt + h * d * d, kr, 2 * c);
      }
      store_rows(gv, bf16, t0, rows, c, gvb);
    }
    free(vb);
  }
  free(parts);
  free(kv);
}
