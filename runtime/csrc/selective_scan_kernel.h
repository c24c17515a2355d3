// The fused selective scan's row kernels, free of torch: included by the torch extension
// (selective_scan_cpu.cpp, forward and backward for training and eager inference) and by the edge runtime's
// ONNX Runtime op (runtime/csrc/selective_scan_op.cpp, forward only), so both run the same arithmetic.
// Each (batch, channel) row is one task; the callers spread rows over their threads.
//
// The chunked scan in eager PyTorch makes ~40 passes over (b, d, K, n) temporaries per token step;
// here each row keeps its n-vector state in registers and walks the sequence once (forward) or twice
// (backward: recompute a chunk's states from its checkpoint, then the adjoint in reverse), so the cost
// is the arithmetic, not the memory traffic. Same maths as evim3/ops/scan_backward.py:
//
//   h_t = a_t h_{t-1} + delta_t u_t B_t,   a_t = exp(delta_t A),   y_t = <C_t, h_t>
//   g_t = gy_t C_t + a_{t+1} g_{t+1}
//   dA += g_t h_{t-1} a_t delta_t,  d(delta_t) = <g_t h_{t-1} a_t, A> + u_t <g_t, B_t>,
//   du_t = delta_t <g_t, B_t>,      dB_t += g_t delta_t u_t,   dC_t += gy_t h_t
//
// Around the recurrence, as mamba-ssm's kernel, the elementwise steps that would otherwise be a dozen eager
// passes over (b, d, L) tensors: delta = softplus(delta_raw + delta_bias), out = (y + D u) * silu(z), and
// their gradients. They run as vectorisable loops over a row (a chunk in the backward), not per token.
//
// Layouts (all contiguous): u, delta, z, out, gout: (b, d, L); A: (d, n); D, delta_bias: (d);
// B, C and their gradients: (b, L, n)
// (token-major, so a token's n-vector is contiguous); checkpoints: (b, d, K, n), the state entering
// each chunk of T tokens. dA, dB and dC are summed over rows, so each thread accumulates into its own
// slice and the slices are added at the end (no atomics, deterministic for a fixed thread count).
// The `omp simd` reductions let the compiler reorder the n-term sums so that they vectorise.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace evim3_scan {

// exp(x) for x <= 0 as a loop the compiler can vectorise (std::exp is a library call it will not):
// x = k ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial, 2^k by building the exponent bits.
// Relative error ~2e-7 (float) -- the scan's inputs are float32 at best. Below -87 it returns 0.
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  // Round to nearest by adding and removing 1.5 * 2^23 (vectorises on plain SSE2, unlike nearbyint).
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;  // ln2 split in two for accuracy
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x <= -87.0f ? 0.0f : p * scale;
}

inline double fast_exp(double x) { return std::exp(x); }  // float64 is for tests: exactness first

// log(1 + e) for e in [0, 1] as a vectorisable polynomial: 2 atanh(s), s = e / (2 + e) <= 1/3, to s^13
// (relative error < 2e-8).
inline float log1p_unit(float e) {
  const float s = e / (2.0f + e), s2 = s * s;
  float p = 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

// softplus and its derivative exactly as torch's (beta 1, threshold 20: above it, x and 1).
inline float softplus(float x) {
  return x > 20.0f ? x : (x > 0.0f ? x : 0.0f) + log1p_unit(fast_exp(-std::fabs(x)));
}
inline double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

inline float sigmoid(float x) {
  const float e = fast_exp(-std::fabs(x));  // in (0, 1]: no overflow either side
  return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

template <typename T>
inline T softplus_grad(T x) { return x > T(20) ? T(1) : sigmoid(x); }

// What a row needs beyond the scan's own inputs; absent pieces are null / zero / false.
template <typename T>
struct RowExtras {
  T D = 0;               // skip connection weight of this channel
  T bias = 0;            // delta bias of this channel
  bool softplus = false;
  const T* z = nullptr;  // gate (L)
};

// dt[t] = softplus(delta_raw[t] + bias), or without softplus.
template <typename T>
void discretize_row(const T* delta_raw, const RowExtras<T>& ex, int64_t L, T* dt) {
  if (ex.softplus) {
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) dt[t] = softplus(delta_raw[t] + ex.bias);
  } else {
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) dt[t] = delta_raw[t] + ex.bias;
  }
}

// One token of the recurrence: a = exp(dt A), h = a * h_prev + dt u B, returns y = <C, h>. `h` may be
// `h_prev` (the forward updates in place; the backward keeps each chunk's states).
template <typename T>
inline T scan_step(T dt, T u, const T* A, const T* Bt, const T* Ct, const T* h_prev, T* h, T* a, int64_t n) {
  const T drive = dt * u;
  for (int64_t i = 0; i < n; ++i) a[i] = fast_exp(dt * A[i]);
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    h[i] = a[i] * h_prev[i] + drive * Bt[i];
    acc += Ct[i] * h[i];
  }
  return acc;
}

template <typename T>
void scan_forward_row(const T* u, const T* delta_raw, const T* A, const T* B, const T* C, const RowExtras<T>& ex,
                      int64_t L, int64_t n, int64_t chunk, T* out, T* last, T* checkpoints, T* h, T* a, T* dt) {
  discretize_row(delta_raw, ex, L, dt);
  std::fill(h, h + n, T(0));
  for (int64_t t = 0; t < L; ++t) {
    if (checkpoints != nullptr && t % chunk == 0) std::copy(h, h + n, checkpoints + (t / chunk) * n);
    out[t] = scan_step(dt[t], u[t], A, B + t * n, C + t * n, h, h, a, n);
  }
  std::copy(h, h + n, last);
  if (ex.z != nullptr) {
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) out[t] = (out[t] + ex.D * u[t]) * ex.z[t] * sigmoid(ex.z[t]);
  } else {
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) out[t] += ex.D * u[t];
  }
}

// Per-thread scratch of the backward.
template <typename T>
struct BackwardBuffers {
  std::vector<T> states, decays, g, dt, y, gy;
  BackwardBuffers(int64_t L, int64_t n, int64_t chunk)
      : states(chunk * n), decays(chunk * n), g(n), dt(L), y(chunk), gy(chunk) {}
};

// Gradients of one row. dA, dB, dC, dD, dbias are accumulated (+=); du, ddelta_raw, dz are written.
template <typename T>
void scan_backward_row(const T* u, const T* delta_raw, const T* A, const T* B, const T* C, const RowExtras<T>& ex,
                       const T* gout, const T* glast, const T* checkpoints, int64_t L, int64_t n, int64_t chunk,
                       T* du, T* ddelta_raw, T* dA, T* dB, T* dC, T* dD, T* dbias, T* dz, BackwardBuffers<T>& buf) {
  discretize_row(delta_raw, ex, L, buf.dt.data());
  const T* dt = buf.dt.data();
  T* g = buf.g.data();
  if (glast != nullptr) {
    std::copy(glast, glast + n, g);
  } else {
    std::fill(g, g + n, T(0));
  }
  T dD_row = 0, dbias_row = 0;
  const int64_t num_chunks = (L + chunk - 1) / chunk;
  for (int64_t k = num_chunks - 1; k >= 0; --k) {
    const int64_t t0 = k * chunk, t1 = std::min(L, t0 + chunk), len = t1 - t0;
    // Recompute this chunk's states, decays and scan outputs from the state entering it.
    const T* h_prev = checkpoints + k * n;
    for (int64_t t = t0; t < t1; ++t) {
      T* h = buf.states.data() + (t - t0) * n;
      buf.y[t - t0] = scan_step(dt[t], u[t], A, B + t * n, C + t * n, h_prev, h, buf.decays.data() + (t - t0) * n, n);
      h_prev = h;
    }
    // Through the gate: gy = d out / d y, dz; out = (y + D u) * silu(z).
    T* gy = buf.gy.data();
    if (ex.z != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const T zt = ex.z[t0 + j], sig = sigmoid(zt);
        gy[j] = gout[t0 + j] * zt * sig;
        dz[t0 + j] = gout[t0 + j] * (buf.y[j] + ex.D * u[t0 + j]) * sig * (T(1) + zt * (T(1) - sig));
      }
    } else {
      std::copy(gout + t0, gout + t1, gy);
    }
    // The adjoint, token by token in reverse; g holds a_{t+1} g_{t+1} on entry.
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const T dtt = dt[t], ut = u[t], gyt = gy[t - t0];
      const T* h = buf.states.data() + (t - t0) * n;
      const T* hp = t > t0 ? h - n : checkpoints + k * n;
      const T* a = buf.decays.data() + (t - t0) * n;
      const T* Bt = B + t * n;
      const T* Ct = C + t * n;
      T* dBt = dB + t * n;
      T* dCt = dC + t * n;
      T sum_gB = 0, sum_gdecay = 0;
#pragma omp simd reduction(+ : sum_gB, sum_gdecay)
      for (int64_t i = 0; i < n; ++i) {
        const T gt = g[i] + gyt * Ct[i];
        const T g_decay = gt * hp[i] * a[i];  // dL/d(delta_t A_i)
        sum_gB += gt * Bt[i];
        sum_gdecay += g_decay * A[i];
        dA[i] += g_decay * dtt;
        dBt[i] += gt * dtt * ut;
        dCt[i] += gyt * h[i];
        g[i] = a[i] * gt;
      }
      ddelta_raw[t] = sum_gdecay + ut * sum_gB;  // d/d(dt) so far
      du[t] = dtt * sum_gB;
    }
    // The skip connection and the discretisation, over the chunk.
#pragma omp simd reduction(+ : dD_row, dbias_row)
    for (int64_t t = t0; t < t1; ++t) {
      const T gyt = gy[t - t0];
      du[t] += gyt * ex.D;
      dD_row += gyt * u[t];
      const T dx = ex.softplus ? ddelta_raw[t] * softplus_grad(delta_raw[t] + ex.bias) : ddelta_raw[t];
      ddelta_raw[t] = dx;
      dbias_row += dx;
    }
  }
  *dD += dD_row;
  *dbias += dbias_row;
}

}  // namespace evim3_scan
