// Fused CPU ops for the model's forward pass: the work between the matmuls.
//
// Eager torch spends a few microseconds of dispatch on each of ~20 small ops per layer; at batch
// 1 that is a third of a decode step. Each function here does one fused pass over its data in
// float32 (bfloat16 inputs are widened on load and rounded once on store), parallel over rows.
// Built at first use for the CPU it runs on (-march=native) by smallm/kernels/cpu/build.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <memory>
#include <optional>
#include <vector>

#include <pybind11/stl.h>

namespace {

inline float to_f(float x) { return x; }
inline float to_f(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
inline T from_f(float x);
template <>
inline float from_f<float>(float x) { return x; }
template <>
inline c10::BFloat16 from_f<c10::BFloat16>(float x) {
  // Round to nearest even, as torch's float -> bfloat16 cast does (inputs here are finite).
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  c10::BFloat16 out;
  out.x = static_cast<uint16_t>(bits >> 16);
  return out;
}

// exp(x) in a form gcc vectorises: 2^n * e^r with |r| <= ln2/2 and a degree-7 Taylor series
// (relative error ~1e-7, below float32's resolution of the results it feeds).
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Round to nearest by adding and subtracting 1.5 * 2^23 (std::nearbyint is a library call
  // gcc does not vectorise; this is two adds).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Calls fn with a null pointer of the element type: the kernels' loops carry OpenMP pragmas,
// which may not appear inside a macro argument such as AT_DISPATCH's.
template <typename Fn>
void dispatch(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kFloat) {
    fn(static_cast<float*>(nullptr));
  } else if (dtype == at::kBFloat16) {
    fn(static_cast<c10::BFloat16*>(nullptr));
  } else {
    TORCH_CHECK(false, "unsupported dtype ", dtype);
  }
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), name, " must be a contiguous 2-D tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16");
}

// out = weight * round(x / rms(x)), the HF order of rounding (normalise in float32, cast to the
// model dtype, then scale).
template <typename T>
void rms_norm_row(const T* __restrict x, const T* __restrict w, T* __restrict out, int64_t n,
                  float eps) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < n; ++j) {
    const float v = to_f(x[j]);
    ss += v * v;
  }
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    out[j] = from_f<T>(to_f(w[j]) * to_f(from_f<T>(to_f(x[j]) * r)));
  }
}


// AVX-512 forms of paged attention's two inner loops, for head dims of 64 and 128 (NV = D / 16
// vectors, a template argument so everything stays in registers). The plain loops reduced a
// 64-long dot product per key and head and widened each key once per query head; here a key is
// widened once and the reductions are the only horizontal work. Measured at batch 64 with 140
// cached tokens: 0.81 ms a layer before. Both return false where they do not apply.
#if defined(__AVX512F__)
// Keys of a request lie wherever the allocator put them: fetch rows a few keys ahead, since
// the hardware prefetcher cannot guess the next slot.
constexpr int64_t kAhead = 8;
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <int NV, typename T>
void key_scores_nv(const float* qf, const T* kp, const int64_t* row, int64_t h, int64_t hk,
                   int64_t g, int64_t len, float* scores) {
  constexpr int64_t d = NV * 16;
  for (int64_t j = 0; j < len; ++j) {
    const T* key = kp + (row[j] * hk + h) * d;
    if (j + kAhead < len) prefetch_row(kp + (row[j + kAhead] * hk + h) * d, d * sizeof(T));
    __m512 kv[NV];
    for (int v = 0; v < NV; ++v) kv[v] = load16(key + 16 * v);
    for (int64_t x = 0; x < g; ++x) {
      const float* qx = qf + x * d;
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qx), kv[0]);
      for (int v = 1; v < NV; ++v) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qx + 16 * v), kv[v], acc);
      scores[x * len + j] = _mm512_reduce_add_ps(acc);
    }
  }
}

template <int NV, typename T>
void weighted_values_nv(const T* vp, const int64_t* row, int64_t h, int64_t hk, int64_t g,
                        int64_t len, const float* scores, float* out) {
  constexpr int64_t d = NV * 16;
  for (int64_t x = 0; x < g; ++x) {
    const float* p = scores + x * len;
    __m512 acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; ++j) {
      const T* val = vp + (row[j] * hk + h) * d;
      if (j + kAhead < len) prefetch_row(vp + (row[j + kAhead] * hk + h) * d, d * sizeof(T));
      const __m512 pj = _mm512_set1_ps(p[j]);
      for (int v = 0; v < NV; ++v) acc[v] = _mm512_fmadd_ps(pj, load16(val + 16 * v), acc[v]);
    }
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + x * d + 16 * v, acc[v]);
  }
}
#endif

template <typename T>
bool key_scores_simd(const float* qf, const T* kp, const int64_t* row, int64_t h, int64_t hk,
                     int64_t g, int64_t d, int64_t len, float* scores) {
#if defined(__AVX512F__)
  if (d == 64) return key_scores_nv<4>(qf, kp, row, h, hk, g, len, scores), true;
  if (d == 128) return key_scores_nv<8>(qf, kp, row, h, hk, g, len, scores), true;
#endif
  return false;
}

template <typename T>
bool weighted_values_simd(const T* vp, const int64_t* row, int64_t h, int64_t hk, int64_t g,
                          int64_t d, int64_t len, const float* scores, float* out) {
#if defined(__AVX512F__)
  if (d == 64) return weighted_values_nv<4>(vp, row, h, hk, g, len, scores, out), true;
  if (d == 128) return weighted_values_nv<8>(vp, row, h, hk, g, len, scores, out), true;
#endif
  return false;
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(1),
              "weight must match x's dtype and width");
  auto out = at::empty_like(x);
  const int64_t n = x.size(1);
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0), 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) rms_norm_row(xp + i * n, wp, op + i * n, n, (float)eps);
    });
  });
  return out;
}

// residual += x (rounded to the dtype, as HF's `residual + x`); returns rms_norm(residual).
at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                        double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type(),
              "x and residual must have one shape and dtype");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(1),
              "weight must match x's dtype and width");
  auto out = at::empty_like(x);
  const int64_t n = x.size(1);
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0), 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        scalar_t* r = rp + i * n;
        const scalar_t* xi = xp + i * n;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) r[j] = from_f<scalar_t>(to_f(r[j]) + to_f(xi[j]));
        rms_norm_row(r, wp, op + i * n, n, (float)eps);
      }
    });
  });
  return out;
}

// [T, 2I] (gate | up) -> silu(gate) * up [T, I], each rounded to the dtype as HF rounds them.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t inter = gate_up.size(1) / 2;
  auto out = at::empty({gate_up.size(0), inter}, gate_up.options());
  dispatch(gate_up.scalar_type(), [&](auto tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, gate_up.size(0), 4, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t* g = gp + i * 2 * inter;
        const scalar_t* u = g + inter;
        scalar_t* o = op + i * inter;
#pragma omp simd
        for (int64_t j = 0; j < inter; ++j) {
          const float gv = to_f(g[j]);
          const float s = to_f(from_f<scalar_t>(gv / (1.0f + fast_exp(-gv))));
          o[j] = from_f<scalar_t>(s * to_f(u[j]));
        }
      }
    });
  });
  return out;
}

// qkv [T, (Hq + 2 Hk) * D] straight from the fused projection: rotates q and k (rotate-half
// layout) by the float32 tables cos/sin [P, D/2] at `positions`, writes k and v into the
// pool's layer buffers [S, Hk, D] at `slots`, and returns the rotated q [T, Hq, D].
at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos,
                      const at::Tensor& sin, at::Tensor& k_pool, at::Tensor& v_pool,
                      const at::Tensor& slots, int64_t hq, int64_t hk) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong,
              "positions and slots must be int64");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous(),
              "cos/sin tables must be contiguous float32");
  TORCH_CHECK(k_pool.scalar_type() == qkv.scalar_type() && v_pool.scalar_type() == qkv.scalar_type(),
              "the KV pool must have the activations' dtype");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "pool buffers must be contiguous");
  const int64_t t = qkv.size(0);
  const int64_t d = k_pool.size(2);
  const int64_t half = d / 2;
  TORCH_CHECK(qkv.size(1) == (hq + 2 * hk) * d && k_pool.size(1) == hk, "qkv width mismatch");
  TORCH_CHECK(cos.size(1) == half, "cos/sin must be [positions, head_dim / 2]");
  auto q_out = at::empty({t, hq, d}, qkv.options());
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t max_pos = cos.size(0);
  for (int64_t i = 0; i < t; ++i) {
    TORCH_CHECK(pos[i] >= 0 && pos[i] < max_pos, "position out of the rotary table");
    TORCH_CHECK(sl[i] >= 0 && sl[i] < k_pool.size(0), "KV slot out of the pool");
  }
  dispatch(qkv.scalar_type(), [&](auto tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* src = qkv.data_ptr<scalar_t>();
    scalar_t* qo = q_out.data_ptr<scalar_t>();
    scalar_t* kp = k_pool.data_ptr<scalar_t>();
    scalar_t* vp = v_pool.data_ptr<scalar_t>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    const int64_t width = (hq + 2 * hk) * d;
    at::parallel_for(0, t, 8, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t* row = src + i * width;
        const float* c = cp + pos[i] * half;
        const float* s = sp + pos[i] * half;
        auto rotate = [&](const scalar_t* x, scalar_t* y) {
#pragma omp simd
          for (int64_t j = 0; j < half; ++j) {
            const float x1 = to_f(x[j]), x2 = to_f(x[j + half]);
            y[j] = from_f<scalar_t>(x1 * c[j] - x2 * s[j]);
            y[j + half] = from_f<scalar_t>(x2 * c[j] + x1 * s[j]);
          }
        };
        for (int64_t h = 0; h < hq; ++h) rotate(row + h * d, qo + (i * hq + h) * d);
        for (int64_t h = 0; h < hk; ++h) rotate(row + (hq + h) * d, kp + (sl[i] * hk + h) * d);
        std::memcpy(vp + sl[i] * hk * d, row + (hq + hk) * d, hk * d * sizeof(scalar_t));
      }
    });
  });
  return q_out;
}

// Attention of query tokens over the paged pool, read in place. Query token i (q [T, Hq, D])
// belongs to request row req_rows[i] of `table` [R, C] (KV slot of each token) and sees that
// request's first kv_lens[i] tokens. One task per (token, KV head): the Hq / Hk query heads that
// share a KV head read its keys and values once.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& table, const at::Tensor& req_rows,
                           const at::Tensor& kv_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be contiguous [T, Hq, D]");
  TORCH_CHECK(k_pool.scalar_type() == q.scalar_type() && v_pool.scalar_type() == q.scalar_type(),
              "q and the pool must share a dtype");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.is_contiguous(), "table must be int64");
  TORCH_CHECK(req_rows.scalar_type() == at::kLong && kv_lens.scalar_type() == at::kLong,
              "req_rows and kv_lens must be int64");
  const int64_t t = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t hk = k_pool.size(1);
  TORCH_CHECK(hq % hk == 0 && k_pool.size(2) == d, "head shapes do not match");
  const int64_t g = hq / hk;
  const int64_t cols = table.size(1);
  const int64_t* rows = req_rows.data_ptr<int64_t>();
  const int64_t* lens = kv_lens.data_ptr<int64_t>();
  const int64_t* tab = table.data_ptr<int64_t>();
  const int64_t slots = k_pool.size(0);
  for (int64_t i = 0; i < t; ++i) {
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= cols && rows[i] >= 0 && rows[i] < table.size(0),
                "kv length or request row out of range");
  }
  auto out = at::empty_like(q);
  dispatch(q.scalar_type(), [&](auto tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_pool.data_ptr<scalar_t>();
    const scalar_t* vp = v_pool.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, t * hk, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> qf(g * d), acc(g * d), scores;
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t i = task / hk, h = task % hk;
        const int64_t len = lens[i];
        const int64_t* row = tab + rows[i] * cols;
        scores.resize(g * len);
        for (int64_t x = 0; x < g; ++x) {
          const scalar_t* src = qp + (i * hq + h * g + x) * d;
          for (int64_t j = 0; j < d; ++j) qf[x * d + j] = to_f(src[j]) * (float)scale;
        }
        for (int64_t j = 0; j < len; ++j) {
          TORCH_CHECK(row[j] >= 0 && row[j] < slots, "KV slot out of the pool");
        }
        if (!key_scores_simd(qf.data(), kp, row, h, hk, g, d, len, scores.data())) {
          for (int64_t j = 0; j < len; ++j) {
            const scalar_t* key = kp + (row[j] * hk + h) * d;
            for (int64_t x = 0; x < g; ++x) {
              const float* qx = qf.data() + x * d;
              float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
              for (int64_t e = 0; e < d; ++e) dot += qx[e] * to_f(key[e]);
              scores[x * len + j] = dot;
            }
          }
        }
        for (int64_t x = 0; x < g; ++x) {
          float* s = scores.data() + x * len;
          float m = s[0];
          for (int64_t j = 1; j < len; ++j) m = s[j] > m ? s[j] : m;
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < len; ++j) {
            s[j] = fast_exp(s[j] - m);
            sum += s[j];
          }
          const float inv = 1.0f / sum;
          for (int64_t j = 0; j < len; ++j) s[j] *= inv;
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        if (!weighted_values_simd(vp, row, h, hk, g, d, len, scores.data(), acc.data())) {
          for (int64_t j = 0; j < len; ++j) {
            const scalar_t* val = vp + (row[j] * hk + h) * d;
            for (int64_t x = 0; x < g; ++x) {
              const float p = scores[x * len + j];
              float* a = acc.data() + x * d;
#pragma omp simd
              for (int64_t e = 0; e < d; ++e) a[e] += p * to_f(val[e]);
            }
          }
        }
        for (int64_t x = 0; x < g; ++x) {
          scalar_t* dst = op + (i * hq + h * g + x) * d;
          for (int64_t e = 0; e < d; ++e) dst[e] = from_f<scalar_t>(acc[x * d + e]);
        }
      }
    });
  });
  return out;
}

// y [M, N] = x [M, K] @ W.T for int8 codes q [N, K] with a float32 scale per group of `group`
// inputs (scale [N, K / group]; group = K is one scale per row). Meant for the few rows of a
// decode step: each weight row is read once and used for every row of x; the result is float32.
// torch's own int8
// kernel re-reads the weights every 4 rows and ran at ~5 GB/s on the LM head at batch 1.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       int64_t group) {
  check_rows(x, "x");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar,
              "q must be contiguous int8 [N, K]");
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0);
  TORCH_CHECK(q.size(1) == k && group > 0 && k % group == 0, "shape mismatch");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() == n * (k / group),
              "scale must be contiguous float32 [N, K / group]");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  auto out = at::empty({m, n}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t blocks = k / group;
  at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) {
    std::vector<float> w(group);
    std::vector<float> acc(m);
    for (int64_t row = lo; row < hi; ++row) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t b = 0; b < blocks; ++b) {
        const int8_t* src = qp + row * k + b * group;
        float* wp = w.data();
#pragma omp simd
        for (int64_t j = 0; j < group; ++j) wp[j] = static_cast<float>(src[j]);
        const float s = sp[row * blocks + b];
        for (int64_t r = 0; r < m; ++r) {
          const float* xr = xp + r * k + b * group;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j < group; ++j) dot += xr[j] * wp[j];
          acc[r] += dot * s;
        }
      }
      for (int64_t r = 0; r < m; ++r) op[r * n + row] = acc[r];
    }
  });
  return out;  // float32: the caller rounds it (or keeps it, for the LM head's logits)
}

// ---- a whole decode pass in one call ----------------------------------------------------------
//
// With the ops above a batch-1 decode step still made ~10 Python -> C++ calls a layer, ~100 us
// of dispatch per layer (a third of the step's non-matmul time). For passes whose attention the
// paged kernel covers (decodes and short extends) the layer loop runs here instead.

// One linear layer's multiply, as linear_kernels.py chose it.
struct LinearSpec {
  enum Kind : int64_t { kDense = 0, kPrepacked = 1, kInt4 = 2, kInt8 = 3 };
  int64_t kind;
  at::Tensor w;  // weight [N, K] / prepacked weight / packed int4 codes / int8 codes
  at::Tensor s;  // int4: scale_zero; int8: float32 scales [N, K / group]; else undefined
  int64_t group;
  std::optional<at::Tensor> bias;
  int64_t max_rows;  // rows above this run `dense`
  std::shared_ptr<LinearSpec> dense;

  at::Tensor operator()(const at::Tensor& x) const {
    if (dense && x.size(0) > max_rows) return (*dense)(x);
    at::Tensor out;
    switch (kind) {
      case kDense:
        out = at::matmul(x, w.t());
        break;
      case kPrepacked: {
        static auto op =
            c10::Dispatcher::singleton()
                .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                  const std::optional<at::Tensor>&, c10::string_view,
                                  c10::List<std::optional<at::Scalar>>,
                                  std::optional<c10::string_view>)>();
        return op.call(x, w, bias, "none", c10::List<std::optional<at::Scalar>>(),
                       std::optional<c10::string_view>(""));
      }
      case kInt4:
        out = at::_weight_int4pack_mm_for_cpu(x.to(at::kBFloat16), w, group, s).to(x.scalar_type());
        break;
      case kInt8:
        out = int8_linear(x, w, s, group).to(x.scalar_type());
        break;
      default:
        TORCH_CHECK(false, "unknown linear kind ", kind);
    }
    if (bias) out.add_(*bias);
    return out;
  }
};

struct LayerSpec {
  at::Tensor input_norm, post_norm;
  std::shared_ptr<LinearSpec> qkv, o, gate_up, down;
};

// The model body for a pass whose every token's attention the paged kernel computes: returns
// the final normed hidden states [T, H]. `residual` holds the token embeddings and is updated
// in place; `kv` is the pool's buffer [layers, 2, slots, Hk, D].
at::Tensor paged_forward(at::Tensor residual, const std::vector<LayerSpec>& layers,
                         const at::Tensor& final_norm, double eps, const at::Tensor& positions,
                         const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kv,
                         const at::Tensor& slots, const at::Tensor& table,
                         const at::Tensor& req_rows, const at::Tensor& kv_lens, double scale,
                         int64_t hq, int64_t hk) {
  TORCH_CHECK(!layers.empty() && kv.dim() == 5 && kv.size(0) == (int64_t)layers.size(),
              "kv must be [layers, 2, slots, Hk, D]");
  const int64_t t = residual.size(0);
  at::Tensor x = rms_norm(residual, layers[0].input_norm, eps);
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerSpec& layer = layers[i];
    at::Tensor k_pool = kv.select(0, i).select(0, 0);
    at::Tensor v_pool = kv.select(0, i).select(0, 1);
    at::Tensor q = rope_store((*layer.qkv)(x), positions, cos, sin, k_pool, v_pool, slots, hq, hk);
    at::Tensor attn = paged_attention(q, k_pool, v_pool, table, req_rows, kv_lens, scale);
    x = add_rms_norm((*layer.o)(attn.view({t, -1})), residual, layer.post_norm, eps);
    at::Tensor down = (*layer.down)(silu_mul((*layer.gate_up)(x)));
    x = add_rms_norm(down, residual, i + 1 < layers.size() ? layers[i + 1].input_norm : final_norm,
                     eps);
  }
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<LinearSpec, std::shared_ptr<LinearSpec>>(m, "LinearSpec")
      .def(py::init([](int64_t kind, at::Tensor w, std::optional<at::Tensor> s, int64_t group,
                       std::optional<at::Tensor> bias, int64_t max_rows,
                       std::shared_ptr<LinearSpec> dense) {
             return std::make_shared<LinearSpec>(LinearSpec{
                 kind, std::move(w), s ? *s : at::Tensor(), group, std::move(bias), max_rows,
                 std::move(dense)});
           }),
           py::arg("kind"), py::arg("w"), py::arg("s"), py::arg("group"), py::arg("bias"),
           py::arg("max_rows"), py::arg("dense"))
      .def("__call__", &LinearSpec::operator());
  py::class_<LayerSpec>(m, "LayerSpec")
      .def(py::init([](at::Tensor input_norm, at::Tensor post_norm,
                       std::shared_ptr<LinearSpec> qkv, std::shared_ptr<LinearSpec> o,
                       std::shared_ptr<LinearSpec> gate_up, std::shared_ptr<LinearSpec> down) {
        return LayerSpec{std::move(input_norm), std::move(post_norm), std::move(qkv),
                         std::move(o), std::move(gate_up), std::move(down)};
      }));
  m.def("paged_forward", &paged_forward, "the model body of a decode pass, in one call");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row");
  m.def("add_rms_norm", &add_rms_norm, "residual += x; RMSNorm(residual)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("rope_store", &rope_store, "rotary on q/k, k/v into the pool; returns q");
  m.def("int8_linear", &int8_linear, "x @ W.T for group-scaled int8 W, few rows");
  m.def("paged_attention", &paged_attention, "attention over the paged KV pool, in place");
}
