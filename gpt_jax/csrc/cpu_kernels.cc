// gpt_jax's CPU kernels (float32), called from JAX through the XLA FFI: causal self-attention and LayerNorm.
//
// gpt_jax.kernels compiles this file with the system C++ compiler on first use and registers the handlers
// below. Attention: one work unit is one (sequence, head) pair: its queries, keys and values are read straight
// out of the (N, T, 3D) input projection and its output is written straight into (N, T, D), so the head
// split/merge transposes and the separate score, mask and softmax passes of the XLA path never touch memory.
// Units are shared among XLA's intra-op threads.
//
//   GptJaxAttention(qkv (N, T, 3D); n_head) -> y (N, T, D)
//   GptJaxAttentionTrain(qkv; n_head) -> y, probs (N, H, T, T)     (the probabilities, for the backward)
//   GptJaxAttentionBwd(qkv, probs, dy; n_head) -> dqkv (N, T, 3D)
//
// T and the head size K must be multiples of 8 (checked in Python). Only the causal (lower) half of each
// T x T block is computed; the upper half of probs is zero.
//
//   GptJaxLayerNorm(x (N.., D), scale (D), bias (D); eps) -> y (N.., D), mean (N), rstd (N)
//   GptJaxLayerNormBwd(x, scale, mean, rstd, dy) -> dx (N.., D), dscale, dbias (blocks, D): per-block sums
//
// D must be a multiple of 8.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// C[r][c] = sum_{p in [p0, p1)} a(r, p) * B[p * ldb + c] for r < R, c < ncols (a multiple of 8), where
// a(r, p) = A[r * lda + p], or A[p * lda + r] with TransA: a register block of R rows by 16 (or 8) columns.
template <int R, bool TransA>
void matmul_rows(const float* A, int lda, const float* B, int ldb, float* C, int ldc, int p0, int p1, int ncols) {
  auto a = [&](int r, int p) { return TransA ? A[p * lda + r] : A[r * lda + p]; };
  int c = 0;
  for (; c + 16 <= ncols; c += 16) {
    v8 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = splat(0.0f);
    for (int p = p0; p < p1; ++p) {
      const v8 b0 = load8(B + p * ldb + c), b1 = load8(B + p * ldb + c + 8);
      for (int r = 0; r < R; ++r) {
        const v8 ar = splat(a(r, p));
        acc0[r] += ar * b0;
        acc1[r] += ar * b1;
      }
    }
    for (int r = 0; r < R; ++r) {
      store8(C + r * ldc + c, acc0[r]);
      store8(C + r * ldc + c + 8, acc1[r]);
    }
  }
  if (c < ncols) {  // one group of 8 left
    v8 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = splat(0.0f);
    for (int p = p0; p < p1; ++p) {
      const v8 b = load8(B + p * ldb + c);
      for (int r = 0; r < R; ++r) acc[r] += splat(a(r, p)) * b;
    }
    for (int r = 0; r < R; ++r) store8(C + r * ldc + c, acc[r]);
  }
}

// Rows per register block: 8 rows x 16 columns of accumulators need 16 of the 32 vector registers AVX-512
// provides; with 16 registers (AVX2 and others) 4 rows avoid spilling.
#if defined(__AVX512VL__)
constexpr int kRows = 8;
#else
constexpr int kRows = 4;
#endif

// Which half of a (T, T) operand is zero (skipped) or not needed.
enum class Tri { kLowerA, kUpperA, kLowerC };

// C (rows, ncols) = A (rows, P) @ B (P, ncols), or A^T @ B for an A stored (P, rows) with TransA, in blocks
// of kRows rows. kLowerA: A is lower-triangular (row i reads p <= i); kUpperA: upper-triangular (p >= i);
// kLowerC: only C's columns c <= row are wanted (the rest of a block's last 8-column group may hold anything).
template <bool TransA = false>
void matmul(const float* A, int lda, const float* B, int ldb, float* C, int ldc, int rows, int P, int ncols,
            Tri tri) {
  for (int r0 = 0; r0 < rows; r0 += kRows) {
    const int R = std::min(kRows, rows - r0);
    int p0 = 0, p1 = P, nc = ncols;
    if (tri == Tri::kLowerA) p1 = std::min(P, r0 + R);
    if (tri == Tri::kUpperA) p0 = r0;
    if (tri == Tri::kLowerC) nc = std::min(ncols, (r0 + R + 7) / 8 * 8);
    const float* a = TransA ? A + r0 : A + r0 * lda;
    float* c = C + r0 * ldc;
    switch (R) {
      case 8: matmul_rows<8, TransA>(a, lda, B, ldb, c, ldc, p0, p1, nc); break;
      case 7: matmul_rows<7, TransA>(a, lda, B, ldb, c, ldc, p0, p1, nc); break;
      case 6: matmul_rows<6, TransA>(a, lda, B, ldb, c, ldc, p0, p1, nc); break;
      case 5: matmul_rows<5, TransA>(a, lda, B, ldb, c, ldc, p0, p1, nc); break;
      case 4: matmul_rows<4, TransA>(a, lda, B, ldb, c, ldc, p0, p1, nc); break;
      case 3: matmul_rows<3, TransA>(a, lda, B, ldb, c, ldc, p0, p1, nc); break;
      case 2: matmul_rows<2, TransA>(a, lda, B, ldb, c, ldc, p0, p1, nc); break;
      default: matmul_rows<1, TransA>(a, lda, B, ldb, c, ldc, p0, p1, nc); break;
    }
  }
}

typedef int32_t v8i __attribute__((vector_size(32)));

// exp(x) for x <= 0 to about 2 ulp (Cephes' expf polynomial), on 8 floats at a time; NaN stays NaN.
inline v8 exp8(v8 x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const v8 y = x * 1.44269504088896341f + 0.5f;
  const v8i t = __builtin_convertvector(y, v8i);  // truncates toward zero
  const v8i n = t - (y < __builtin_convertvector(t, v8) ? 1 : 0);  // floor(y)
  const v8 nf = __builtin_convertvector(n, v8);
  const v8 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  v8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v8i bits = (n + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float hsum(v8 v) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

inline float hmax(v8 v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, v[i]);
  return m;
}

struct Shape {
  int64_t N, T, H, K;
  int64_t D() const { return H * K; }
};

// Scratch of one worker thread: k^T and v^T (K, T), and (T, T) probabilities and their gradient.
struct Scratch {
  int64_t T, K;
  std::vector<float> buf;
  float *kt, *vt, *p, *ds;
  explicit Scratch(const Shape& sh) : T(sh.T), K(sh.K) {
    const int64_t TK = sh.T * sh.K, TT = sh.T * sh.T;
    buf.assign(2 * TK + 2 * TT, 0.0f);
    kt = buf.data();
    vt = kt + TK;
    p = vt + TK;
    ds = p + TT;
  }
};

// One unit's slices: q, k, v (T, K) with row stride 3D in the input; y or dy (T, K) with row stride D.
struct Unit {
  const float *q, *k, *v;
  int64_t qkv_offset, y_offset;
};

Unit unit_of(const float* qkv, const Shape& sh, int64_t unit) {
  const int64_t n = unit / sh.H, h = unit % sh.H, D = sh.D();
  const int64_t qkv_offset = n * sh.T * 3 * D + h * sh.K;
  const float* q = qkv + qkv_offset;
  return {q, q + D, q + 2 * D, qkv_offset, n * sh.T * D + h * sh.K};
}

// At (K, T) = A (T, K)^T for A with row stride lda.
void transpose(const float* __restrict__ A, int lda, int T, int K, float* __restrict__ At) {
  for (int c = 0; c < K; ++c)
    for (int t = 0; t < T; ++t) At[c * T + t] = A[t * lda + c];
}

// The forward pass of one unit: P = softmax(q k^T / sqrt(K)) (T, T), lower half, into p; y = P v.
void forward_unit(const Unit& u, const Shape& sh, float* p, float* y, Scratch& w) {
  const int T = sh.T, K = sh.K, D = sh.D();
  const float scale = 1.0f / std::sqrt(static_cast<float>(K));
  transpose(u.k, 3 * D, T, K, w.kt);
  matmul(u.q, 3 * D, w.kt, T, p, T, T, K, T, Tri::kLowerC);  // scores q k^T, lower half
  for (int i = 0; i < T; ++i) {
    float* row = p + i * T;
    const int n8 = i / 8 * 8 + 8;  // whole 8-groups covering columns 0..i
    const v8i cols = v8i{0, 1, 2, 3, 4, 5, 6, 7};
    v8 m = splat(-INFINITY);
    for (int j = 0; j < n8; j += 8) {
      const v8 x = (cols + j) <= i ? load8(row + j) : splat(-INFINITY);
      m = x > m ? x : m;
    }
    const float shift = hmax(m) * scale;
    v8 sum = splat(0.0f);
    for (int j = 0; j < n8; j += 8) {
      v8 e = exp8(load8(row + j) * scale - shift);
      e = (cols + j) <= i ? e : splat(0.0f);  // causal mask
      store8(row + j, e);
      sum += e;
    }
    const float inv = 1.0f / hsum(sum);
    for (int j = 0; j < n8; j += 8) store8(row + j, load8(row + j) * inv);
    for (int j = n8; j < T; ++j) row[j] = 0.0f;
  }
  matmul(p, T, u.v, 3 * D, y + u.y_offset, D, T, T, K, Tri::kLowerA);  // y = P v
}

// The backward pass of one unit from its probabilities p and output gradient dy, into dqkv.
void backward_unit(const Unit& u, const Shape& sh, const float* p, const float* dy, float* dqkv, Scratch& w) {
  const int T = sh.T, K = sh.K, D = sh.D();
  const float scale = 1.0f / std::sqrt(static_cast<float>(K));
  const float* g = dy + u.y_offset;  // dO (T, K), row stride D
  float* dq = dqkv + u.qkv_offset;
  float *dk = dq + D, *dv = dq + 2 * D;  // (T, K), row stride 3D
  matmul<true>(p, T, g, D, dv, 3 * D, T, T, K, Tri::kUpperA);  // dV = P^T dO (P^T is upper-triangular)
  transpose(u.v, 3 * D, T, K, w.vt);
  matmul(g, D, w.vt, T, w.ds, T, T, K, T, Tri::kLowerC);  // dP = dO v^T, lower half
  for (int i = 0; i < T; ++i) {  // dS = P (dP - delta) / sqrt(K), delta_i = sum_j P[i, j] dP[i, j]
    float* ds = w.ds + i * T;
    const float* pr = p + i * T;
    const int n8 = i / 8 * 8 + 8;
    v8 acc = splat(0.0f);
    for (int j = 0; j < n8; j += 8) acc += load8(pr + j) * load8(ds + j);  // P is 0 past i
    const float delta = hsum(acc);
    for (int j = 0; j < n8; j += 8) store8(ds + j, load8(pr + j) * (load8(ds + j) - delta) * scale);
    for (int j = n8; j < T; ++j) ds[j] = 0.0f;
  }
  matmul(w.ds, T, u.k, 3 * D, dq, 3 * D, T, T, K, Tri::kLowerA);        // dQ = dS k
  matmul<true>(w.ds, T, u.q, 3 * D, dk, 3 * D, T, T, K, Tri::kUpperA);  // dK = dS^T q
}

// Runs fn(unit) for unit in [0, units) on the calling thread and on the pool's threads. The caller claims
// units too and waits only for claimed units to finish, never for a pool task to start, so a busy pool cannot
// deadlock it; a task that starts after the work is done touches nothing.
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t units, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto worker = [state, units, fn]() {
    for (int64_t u; (u = state->next.fetch_add(1)) < units;) {
      fn(u);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, units - 1);  // the caller is one of them
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(std::function<void()>(worker));
  worker();
  while (state->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

// parallel_for over the (sequence, head) units of an attention call, each thread with its own scratch.
template <typename Fn>
void parallel_units(ffi::ThreadPool& pool, const Shape& sh, Fn fn) {
  parallel_for(pool, sh.N * sh.H, [sh, fn](int64_t u) {
    thread_local std::unique_ptr<Scratch> w;  // kept between calls: reallocated when T or K changes
    if (!w || w->T != sh.T || w->K != sh.K) w = std::make_unique<Scratch>(sh);
    fn(u, *w);
  });
}

Shape shape_of(ffi::AnyBuffer::Dimensions dims, int64_t n_head) {
  const int64_t rank = dims.size();
  Shape sh{1, dims[rank - 2], n_head, dims[rank - 1] / 3 / n_head};
  for (int64_t i = 0; i < rank - 2; ++i) sh.N *= dims[i];
  return sh;
}

// The forward pass; each unit's probabilities go to `probs` (training) or, with nullptr, to scratch.
ffi::Error attention_forward(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& qkv, int64_t n_head, float* y,
                             float* probs) {
  const Shape sh = shape_of(qkv.dimensions(), n_head);
  const float* in = qkv.typed_data();
  parallel_units(pool, sh, [=](int64_t u, Scratch& w) {
    forward_unit(unit_of(in, sh, u), sh, probs ? probs + u * sh.T * sh.T : w.p, y, w);
  });
  return ffi::Error::Success();
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, int64_t n_head,
                     ffi::ResultBuffer<ffi::F32> y) {
  return attention_forward(pool, qkv, n_head, y->typed_data(), nullptr);
}

ffi::Error AttentionTrain(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, int64_t n_head,
                          ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> probs) {
  return attention_forward(pool, qkv, n_head, y->typed_data(), probs->typed_data());
}

ffi::Error AttentionBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> probs,
                        ffi::Buffer<ffi::F32> dy, int64_t n_head, ffi::ResultBuffer<ffi::F32> dqkv) {
  const Shape sh = shape_of(qkv.dimensions(), n_head);
  const float *in = qkv.typed_data(), *p = probs.typed_data(), *g = dy.typed_data();
  float* out = dqkv->typed_data();
  parallel_units(pool, sh, [=](int64_t u, Scratch& w) {
    backward_unit(unit_of(in, sh, u), sh, p + u * sh.T * sh.T, g, out, w);
  });
  return ffi::Error::Success();
}

// ---- LayerNorm -------------------------------------------------------------------------------------------
// One pass over each row forward and one backward (XLA:CPU makes several), on blocks of rows shared among
// the threads. The parameter gradients are summed per block of rows; JAX adds the blocks' partial sums.

// Row b of `blocks` blocks of N rows starts at block_start(b, N, blocks). The forward pass splits the rows
// for the threads only; the backward pass splits them as its partial-sum outputs say (their first axis, set
// in Python), so the gradients do not depend on the thread count.
constexpr int64_t kForwardBlocks = 64;
inline int64_t block_start(int64_t b, int64_t N, int64_t blocks) { return b * N / blocks; }

int64_t rows_of(ffi::AnyBuffer::Dimensions dims) {
  int64_t n = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) n *= dims[i];
  return n;
}

// y = (x - mean) * rstd * scale + bias over the last axis (D a multiple of 8); mean and rstd kept per row.
ffi::Error LayerNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                     ffi::Buffer<ffi::F32> bias, float eps, ffi::ResultBuffer<ffi::F32> y,
                     ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd) {
  const int64_t D = x.dimensions().back(), N = rows_of(x.dimensions());
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *bp = bias.typed_data();
  float *yp = y->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  const int64_t blocks = std::min(N, kForwardBlocks);
  parallel_for(pool, blocks, [=](int64_t b) {
    for (int64_t n = block_start(b, N, blocks); n < block_start(b + 1, N, blocks); ++n) {
      const float* row = xp + n * D;
      v8 s = splat(0.0f);
      for (int64_t c = 0; c < D; c += 8) s += load8(row + c);
      const float mu = hsum(s) / D;
      v8 q = splat(0.0f);
      for (int64_t c = 0; c < D; c += 8) {
        const v8 d = load8(row + c) - mu;
        q += d * d;
      }
      const float r = 1.0f / std::sqrt(hsum(q) / D + eps);
      for (int64_t c = 0; c < D; c += 8)
        store8(yp + n * D + c, (load8(row + c) - mu) * r * load8(sp + c) + load8(bp + c));
      mp[n] = mu;
      rp[n] = r;
    }
  });
  return ffi::Error::Success();
}

// dx, and per block of rows the partial sums of dscale = sum dy * xhat and dbias = sum dy.
ffi::Error LayerNormBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dbias) {
  const int64_t D = x.dimensions().back(), N = rows_of(x.dimensions());
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *mp = mean.typed_data(), *rp = rstd.typed_data();
  const float* gp = dy.typed_data();
  float *dxp = dx->typed_data(), *dsp = dscale->typed_data(), *dbp = dbias->typed_data();
  const int64_t blocks = dscale->dimensions()[0];
  parallel_for(pool, blocks, [=](int64_t b) {
    float* ds = dsp + b * D;
    float* db = dbp + b * D;
    for (int64_t c = 0; c < D; ++c) ds[c] = db[c] = 0.0f;
    for (int64_t n = block_start(b, N, blocks); n < block_start(b + 1, N, blocks); ++n) {
      const float *row = xp + n * D, *g = gp + n * D;
      const float mu = mp[n], r = rp[n];
      v8 a = splat(0.0f), bsum = splat(0.0f);  // sums of g*scale and g*scale*xhat
      for (int64_t c = 0; c < D; c += 8) {
        const v8 xhat = (load8(row + c) - mu) * r, gs = load8(g + c) * load8(sp + c);
        a += gs;
        bsum += gs * xhat;
        store8(ds + c, load8(ds + c) + load8(g + c) * xhat);
        store8(db + c, load8(db + c) + load8(g + c));
      }
      const float mean_gs = hsum(a) / D, mean_gsx = hsum(bsum) / D;
      for (int64_t c = 0; c < D; c += 8) {
        const v8 xhat = (load8(row + c) - mu) * r;
        store8(dxp + n * D + c, (load8(g + c) * load8(sp + c) - mean_gs - xhat * mean_gsx) * r);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n_head")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxAttentionTrain, AttentionTrain,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n_head")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxAttentionBwd, AttentionBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n_head")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxLayerNorm, LayerNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptJaxLayerNormBwd, LayerNormBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
