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
#include <vector>

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
  const float n = std::nearbyint(x * 1.44269504088896341f);
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
          const int64_t slot = row[j];
          TORCH_CHECK(slot >= 0 && slot < slots, "KV slot out of the pool");
          const scalar_t* key = kp + (slot * hk + h) * d;
          for (int64_t x = 0; x < g; ++x) {
            const float* qx = qf.data() + x * d;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t e = 0; e < d; ++e) dot += qx[e] * to_f(key[e]);
            scores[x * len + j] = dot;
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
        for (int64_t j = 0; j < len; ++j) {
          const scalar_t* val = vp + (row[j] * hk + h) * d;
          for (int64_t x = 0; x < g; ++x) {
            const float p = scores[x * len + j];
            float* a = acc.data() + x * d;
#pragma omp simd
            for (int64_t e = 0; e < d; ++e) a[e] += p * to_f(val[e]);
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
// decode step: each weight row is read once and used for every row of x. torch's own int8
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
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// ---- int4 weights, a few rows at a time ------------------------------------------------------
//
// Codes in GGUF's Q4 nibble order: for each group of 32 inputs, 16 bytes whose low nibbles are
// inputs 0..15 and high nibbles 16..31; w = q * scale + offset (offset = zero - 8 * scale). A
// row's dot product is sum_g scale_g * (x_g . q_g) + sum_g offset_g * sum(x_g): the first part
// accumulates in vector lanes (one horizontal sum per output), the second is a short dot over
// groups with the input's group sums, computed once per pass. Each weight byte is read once per
// pass, so a decode step runs at memory speed (torch's int4 kernel reached ~12 GB/s here).

namespace {

constexpr int64_t kGroup = 32;

// Adds to out[r] (r < m) the dot products of one weight row's codes with m input rows.
inline void int4_row(const uint8_t* __restrict qs, const float* __restrict scale,
                     const float* __restrict offset, const float* __restrict x,
                     const float* __restrict xsum, int64_t m, int64_t k, float* out) {
  const int64_t groups = k / kGroup;
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k;
    float total = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    const __m128i mask = _mm_set1_epi8(0x0f);
    for (int64_t g = 0; g < groups; ++g) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + g * 16));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, mask)));
      const __m512 hi =
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)));
      __m512 t = _mm512_mul_ps(_mm512_loadu_ps(xr + g * kGroup), lo);
      t = _mm512_fmadd_ps(_mm512_loadu_ps(xr + g * kGroup + 16), hi, t);
      acc = _mm512_fmadd_ps(t, _mm512_set1_ps(scale[g]), acc);
    }
    total = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    const __m128i mask = _mm_set1_epi8(0x0f);
    for (int64_t g = 0; g < groups; ++g) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + g * 16));
      const __m128i l = _mm_and_si128(b, mask);
      const __m128i h = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
      const float* xg = xr + g * kGroup;
      __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xg), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(l)));
      t = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 8),
                          _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(l, 8))), t);
      t = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 16),
                          _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(h)), t);
      t = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 24),
                          _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(h, 8))), t);
      acc = _mm256_fmadd_ps(t, _mm256_set1_ps(scale[g]), acc);
    }
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s4 = _mm_hadd_ps(s4, s4);
    s4 = _mm_hadd_ps(s4, s4);
    total = _mm_cvtss_f32(s4);
#else
    for (int64_t g = 0; g < groups; ++g) {
      float dot = 0.0f;
      for (int64_t j = 0; j < 16; ++j) {
        const uint8_t b = qs[g * 16 + j];
        dot += xr[g * kGroup + j] * static_cast<float>(b & 0x0f) +
               xr[g * kGroup + 16 + j] * static_cast<float>(b >> 4);
      }
      total += dot * scale[g];
    }
#endif
    const float* xs = xsum + r * groups;
    float off = 0.0f;
    for (int64_t g = 0; g < groups; ++g) off += offset[g] * xs[g];
    out[r] = total + off;
  }
}

}  // namespace

// y [M, N] = x [M, K] @ W.T for int4 codes `qs` uint8 [N, K / 2] (layout above) with float32
// `scale` and `offset` [N, K / 32].
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scale,
                       const at::Tensor& offset) {
  check_rows(x, "x");
  const int64_t m = x.size(0), k = x.size(1), n = qs.size(0);
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.size(1) * 2 == k,
              "qs must be contiguous uint8 [N, K / 2]");
  TORCH_CHECK(k % kGroup == 0, "in-features must be a multiple of 32");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat &&
                  scale.is_contiguous() && offset.is_contiguous() &&
                  scale.numel() == n * (k / kGroup) && offset.numel() == n * (k / kGroup),
              "scale and offset must be contiguous float32 [N, K / 32]");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t groups = k / kGroup;
  const at::Tensor xsum = xf.view({m, groups, kGroup}).sum(-1).contiguous();
  auto out = at::empty({n, m}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const float* xsp = xsum.data_ptr<float>();
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* op = offset.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  at::parallel_for(0, n, 32, [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {
      int4_row(qp + row * (k / 2), sp + row * groups, op + row * groups, xp, xsp, m, k,
               yp + row * m);
    }
  });
  // [N, M] -> [M, N]: per-row outputs are written contiguously above (no false sharing).
  return out.t().to(x.scalar_type()).contiguous();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm of each row");
  m.def("add_rms_norm", &add_rms_norm, "residual += x; RMSNorm(residual)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("rope_store", &rope_store, "rotary on q/k, k/v into the pool; returns q");
  m.def("int4_linear", &int4_linear, "x @ W.T for int4 W in Q4 nibble order, few rows");
  m.def("int8_linear", &int8_linear, "x @ W.T for group-scaled int8 W, few rows");
  m.def("paged_attention", &paged_attention, "attention over the paged KV pool, in place");
}
