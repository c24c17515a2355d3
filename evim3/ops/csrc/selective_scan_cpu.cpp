// Fused selective scan for CPU tensors: forward and backward, one (batch, channel) row per task.
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

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

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

void check_inputs(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A,
                  const torch::Tensor& B, const torch::Tensor& C) {
  TORCH_CHECK(u.device().is_cpu(), "selective_scan_cpu: CPU tensors only");
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u, delta: (batch, d, L)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1), "A: (d, n)");
  TORCH_CHECK(B.dim() == 3 && B.size(0) == u.size(0) && B.size(1) == u.size(2) && B.size(2) == A.size(1),
              "B: (batch, L, n)");
  TORCH_CHECK(C.sizes() == B.sizes(), "C: (batch, L, n)");
  for (const auto* t : {&u, &delta, &A, &B, &C}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == u.scalar_type(),
                "selective_scan_cpu: contiguous tensors of one dtype");
  }
}

void check_extras(const torch::Tensor& u, const c10::optional<torch::Tensor>& D,
                  const c10::optional<torch::Tensor>& z, const c10::optional<torch::Tensor>& delta_bias) {
  for (const auto* v : {&D, &delta_bias}) {
    if (v->has_value()) {
      TORCH_CHECK((*v)->dim() == 1 && (*v)->size(0) == u.size(1) && (*v)->is_contiguous() &&
                      (*v)->scalar_type() == u.scalar_type(),
                  "D, delta_bias: contiguous (d,) of u's dtype");
    }
  }
  if (z.has_value()) {
    TORCH_CHECK(z->sizes() == u.sizes() && z->is_contiguous() && z->scalar_type() == u.scalar_type(),
                "z: contiguous (batch, d, L) of u's dtype");
  }
}

template <typename T>
RowExtras<T> row_extras(const c10::optional<torch::Tensor>& D, const c10::optional<torch::Tensor>& z,
                        const c10::optional<torch::Tensor>& delta_bias, bool softplus, int64_t row, int64_t c,
                        int64_t L) {
  RowExtras<T> ex;
  ex.D = D.has_value() ? D->data_ptr<T>()[c] : T(0);
  ex.bias = delta_bias.has_value() ? delta_bias->data_ptr<T>()[c] : T(0);
  ex.softplus = softplus;
  ex.z = z.has_value() ? z->data_ptr<T>() + row * L : nullptr;
  return ex;
}

}  // namespace

// -> (out (b, d, L), last state (b, d, n), checkpoints (b, d, K, n) or an empty tensor)
std::vector<torch::Tensor> forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B,
                                   torch::Tensor C, c10::optional<torch::Tensor> D, c10::optional<torch::Tensor> z,
                                   c10::optional<torch::Tensor> delta_bias, bool softplus, int64_t chunk,
                                   bool keep_checkpoints) {
  check_inputs(u, delta, A, B, C);
  check_extras(u, D, z, delta_bias);
  const int64_t batch = u.size(0), d = u.size(1), L = u.size(2), n = A.size(1);
  const int64_t num_chunks = (L + chunk - 1) / chunk;
  auto out = torch::empty_like(u);
  auto last = torch::empty({batch, d, n}, u.options());
  auto checkpoints = keep_checkpoints ? torch::empty({batch, d, num_chunks, n}, u.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_forward", [&] {
    at::parallel_for(0, batch * d, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> h(n), a(n), dt(L);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / d, c = row % d;
        scan_forward_row<scalar_t>(
            u.data_ptr<scalar_t>() + row * L, delta.data_ptr<scalar_t>() + row * L,
            A.data_ptr<scalar_t>() + c * n, B.data_ptr<scalar_t>() + b * L * n,
            C.data_ptr<scalar_t>() + b * L * n, row_extras<scalar_t>(D, z, delta_bias, softplus, row, c, L), L, n,
            chunk, out.data_ptr<scalar_t>() + row * L, last.data_ptr<scalar_t>() + row * n,
            keep_checkpoints ? checkpoints.data_ptr<scalar_t>() + row * num_chunks * n : nullptr, h.data(),
            a.data(), dt.data());
      }
    });
  });
  return {out, last, checkpoints};
}

// -> (du, ddelta (b, d, L), dA (d, n), dB, dC (b, L, n), dD, ddelta_bias (d), dz (b, d, L) or empty)
std::vector<torch::Tensor> backward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B,
                                    torch::Tensor C, c10::optional<torch::Tensor> D,
                                    c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> delta_bias,
                                    bool softplus, torch::Tensor checkpoints, torch::Tensor gout,
                                    c10::optional<torch::Tensor> glast, int64_t chunk) {
  check_inputs(u, delta, A, B, C);
  check_extras(u, D, z, delta_bias);
  const int64_t batch = u.size(0), d = u.size(1), L = u.size(2), n = A.size(1);
  const int64_t num_chunks = (L + chunk - 1) / chunk;
  TORCH_CHECK(gout.sizes() == u.sizes() && gout.is_contiguous(), "grad_out: contiguous (batch, d, L)");
  TORCH_CHECK(checkpoints.is_contiguous() && checkpoints.numel() == batch * d * num_chunks * n,
              "checkpoints: (batch, d, K, n) from forward with the same chunk");
  const bool has_glast = glast.has_value() && glast->defined();
  torch::Tensor glast_c = has_glast ? glast->contiguous() : torch::Tensor();
  auto du = torch::empty_like(u);
  auto ddelta = torch::empty_like(u);
  auto dz = z.has_value() ? torch::empty_like(u) : torch::Tensor();
  // One accumulator slice per thread for the gradients summed over rows.
  const int64_t threads = at::get_num_threads();
  auto dA_parts = torch::zeros({threads, d, n}, u.options());
  auto dB_parts = torch::zeros({threads, batch, L, n}, u.options());
  auto dC_parts = torch::zeros({threads, batch, L, n}, u.options());
  auto dD_parts = torch::zeros({threads, d}, u.options());
  auto dbias_parts = torch::zeros({threads, d}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_backward", [&] {
    at::parallel_for(0, batch * d, 1, [&](int64_t begin, int64_t end) {
      const int64_t slot = at::get_thread_num();
      TORCH_CHECK(slot < threads, "selective_scan_cpu: thread index beyond the accumulator slices");
      BackwardBuffers<scalar_t> buf(L, n, chunk);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / d, c = row % d;
        scan_backward_row<scalar_t>(
            u.data_ptr<scalar_t>() + row * L, delta.data_ptr<scalar_t>() + row * L,
            A.data_ptr<scalar_t>() + c * n, B.data_ptr<scalar_t>() + b * L * n,
            C.data_ptr<scalar_t>() + b * L * n, row_extras<scalar_t>(D, z, delta_bias, softplus, row, c, L),
            gout.data_ptr<scalar_t>() + row * L, has_glast ? glast_c.data_ptr<scalar_t>() + row * n : nullptr,
            checkpoints.data_ptr<scalar_t>() + row * num_chunks * n, L, n, chunk,
            du.data_ptr<scalar_t>() + row * L, ddelta.data_ptr<scalar_t>() + row * L,
            dA_parts.data_ptr<scalar_t>() + (slot * d + c) * n,
            dB_parts.data_ptr<scalar_t>() + (slot * batch + b) * L * n,
            dC_parts.data_ptr<scalar_t>() + (slot * batch + b) * L * n, dD_parts.data_ptr<scalar_t>() + slot * d + c,
            dbias_parts.data_ptr<scalar_t>() + slot * d + c,
            z.has_value() ? dz.data_ptr<scalar_t>() + row * L : nullptr, buf);
      }
    });
  });
  return {du, ddelta, dA_parts.sum(0), dB_parts.sum(0), dC_parts.sum(0), dD_parts.sum(0), dbias_parts.sum(0), dz};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "selective scan forward with softplus discretisation, D and z gate (CPU)");
  m.def("backward", &backward, "its backward (CPU)");
}
