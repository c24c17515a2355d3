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
// Layouts (all contiguous): u, delta, y, gy: (b, d, L); A: (d, n); B, C and their gradients: (b, L, n)
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

template <typename T>
void scan_forward_row(const T* u, const T* delta, const T* A, const T* B, const T* C, int64_t L, int64_t n,
                      int64_t chunk, T* y, T* last, T* checkpoints, T* h, T* a) {
  std::fill(h, h + n, T(0));
  for (int64_t t = 0; t < L; ++t) {
    if (checkpoints != nullptr && t % chunk == 0) std::copy(h, h + n, checkpoints + (t / chunk) * n);
    const T dt = delta[t], drive = dt * u[t];
    const T* Bt = B + t * n;
    const T* Ct = C + t * n;
    for (int64_t i = 0; i < n; ++i) a[i] = fast_exp(dt * A[i]);
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) {
      h[i] = a[i] * h[i] + drive * Bt[i];
      acc += Ct[i] * h[i];
    }
    y[t] = acc;
  }
  std::copy(h, h + n, last);
}

template <typename T>
void scan_backward_row(const T* u, const T* delta, const T* A, const T* B, const T* C, const T* gy,
                       const T* glast, const T* checkpoints, int64_t L, int64_t n, int64_t chunk, T* du,
                       T* ddelta, T* dA, T* dB, T* dC, std::vector<T>& states, std::vector<T>& decays,
                       std::vector<T>& g) {
  if (glast != nullptr) {
    std::copy(glast, glast + n, g.begin());
  } else {
    std::fill(g.begin(), g.end(), T(0));
  }
  const int64_t num_chunks = (L + chunk - 1) / chunk;
  for (int64_t k = num_chunks - 1; k >= 0; --k) {
    const int64_t t0 = k * chunk, t1 = std::min(L, t0 + chunk);
    // Recompute this chunk's states and decays from the state entering it.
    const T* h_prev = checkpoints + k * n;
    for (int64_t t = t0; t < t1; ++t) {
      const T dt = delta[t], drive = dt * u[t];
      T* h = states.data() + (t - t0) * n;
      T* a = decays.data() + (t - t0) * n;
      const T* Bt = B + t * n;
      for (int64_t i = 0; i < n; ++i) a[i] = fast_exp(dt * A[i]);
      for (int64_t i = 0; i < n; ++i) h[i] = a[i] * h_prev[i] + drive * Bt[i];
      h_prev = h;
    }
    // The adjoint, token by token in reverse; g holds a_{t+1} g_{t+1} on entry.
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const T dt = delta[t], ut = u[t], gyt = gy[t];
      const T* h = states.data() + (t - t0) * n;
      const T* hp = t > t0 ? h - n : checkpoints + k * n;
      const T* a = decays.data() + (t - t0) * n;
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
        dA[i] += g_decay * dt;
        dBt[i] += gt * dt * ut;
        dCt[i] += gyt * h[i];
        g[i] = a[i] * gt;
      }
      ddelta[t] = sum_gdecay + ut * sum_gB;
      du[t] = dt * sum_gB;
    }
  }
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

}  // namespace

// -> (y (b, d, L), last state (b, d, n), checkpoints (b, d, K, n) or an empty tensor)
std::vector<torch::Tensor> forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B,
                                   torch::Tensor C, int64_t chunk, bool keep_checkpoints) {
  check_inputs(u, delta, A, B, C);
  const int64_t batch = u.size(0), d = u.size(1), L = u.size(2), n = A.size(1);
  const int64_t num_chunks = (L + chunk - 1) / chunk;
  auto y = torch::empty_like(u);
  auto last = torch::empty({batch, d, n}, u.options());
  auto checkpoints = keep_checkpoints ? torch::empty({batch, d, num_chunks, n}, u.options()) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_forward", [&] {
    at::parallel_for(0, batch * d, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> h(n), a(n);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / d, c = row % d;
        scan_forward_row<scalar_t>(
            u.data_ptr<scalar_t>() + row * L, delta.data_ptr<scalar_t>() + row * L,
            A.data_ptr<scalar_t>() + c * n, B.data_ptr<scalar_t>() + b * L * n,
            C.data_ptr<scalar_t>() + b * L * n, L, n, chunk, y.data_ptr<scalar_t>() + row * L,
            last.data_ptr<scalar_t>() + row * n,
            keep_checkpoints ? checkpoints.data_ptr<scalar_t>() + row * num_chunks * n : nullptr, h.data(),
            a.data());
      }
    });
  });
  return {y, last, checkpoints};
}

// -> (du, ddelta (b, d, L), dA (d, n), dB, dC (b, L, n))
std::vector<torch::Tensor> backward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B,
                                    torch::Tensor C, torch::Tensor checkpoints, torch::Tensor gy,
                                    c10::optional<torch::Tensor> glast, int64_t chunk) {
  check_inputs(u, delta, A, B, C);
  const int64_t batch = u.size(0), d = u.size(1), L = u.size(2), n = A.size(1);
  const int64_t num_chunks = (L + chunk - 1) / chunk;
  TORCH_CHECK(gy.sizes() == u.sizes() && gy.is_contiguous(), "grad_y: contiguous (batch, d, L)");
  TORCH_CHECK(checkpoints.is_contiguous() && checkpoints.numel() == batch * d * num_chunks * n,
              "checkpoints: (batch, d, K, n) from forward with the same chunk");
  const bool has_glast = glast.has_value() && glast->defined();
  torch::Tensor glast_c = has_glast ? glast->contiguous() : torch::Tensor();
  auto du = torch::empty_like(u);
  auto ddelta = torch::empty_like(u);
  // One accumulator slice per thread for the gradients summed over rows.
  const int64_t threads = at::get_num_threads();
  auto dA_parts = torch::zeros({threads, d, n}, u.options());
  auto dB_parts = torch::zeros({threads, batch, L, n}, u.options());
  auto dC_parts = torch::zeros({threads, batch, L, n}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_backward", [&] {
    at::parallel_for(0, batch * d, 1, [&](int64_t begin, int64_t end) {
      const int64_t slot = at::get_thread_num();
      TORCH_CHECK(slot < threads, "selective_scan_cpu: thread index beyond the accumulator slices");
      std::vector<scalar_t> states(chunk * n), decays(chunk * n), g(n);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / d, c = row % d;
        scan_backward_row<scalar_t>(
            u.data_ptr<scalar_t>() + row * L, delta.data_ptr<scalar_t>() + row * L,
            A.data_ptr<scalar_t>() + c * n, B.data_ptr<scalar_t>() + b * L * n,
            C.data_ptr<scalar_t>() + b * L * n, gy.data_ptr<scalar_t>() + row * L,
            has_glast ? glast_c.data_ptr<scalar_t>() + row * n : nullptr,
            checkpoints.data_ptr<scalar_t>() + row * num_chunks * n, L, n, chunk,
            du.data_ptr<scalar_t>() + row * L, ddelta.data_ptr<scalar_t>() + row * L,
            dA_parts.data_ptr<scalar_t>() + (slot * d + c) * n,
            dB_parts.data_ptr<scalar_t>() + (slot * batch + b) * L * n,
            dC_parts.data_ptr<scalar_t>() + (slot * batch + b) * L * n, states, decays, g);
      }
    });
  });
  return {du, ddelta, dA_parts.sum(0), dB_parts.sum(0), dC_parts.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "selective scan forward (CPU)");
  m.def("backward", &backward, "selective scan backward (CPU)");
}
