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
