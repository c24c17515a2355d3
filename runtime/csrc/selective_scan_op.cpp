// The fused selective scan's forward as a C function for the edge runtime, without torch: ONNX Runtime's
// SelectiveScan op (runtime/fused_scan.py) calls it through ctypes. The row kernel is the one the torch
// extension runs (runtime/csrc/selective_scan_kernel.h); rows are spread over OpenMP threads.
//
// Layouts, float32, contiguous: u, delta_raw, z, out: (batch, d, L); A: (d, n); B, C: (batch, L, n), token-major;
// D, delta_bias: (d). delta = softplus(delta_raw + delta_bias), out = (scan + D u) * silu(z), as Mamba's block.

#include <cstdint>
#include <vector>

#include "selective_scan_kernel.h"

extern "C" void evim3_selective_scan_forward(const float* u, const float* delta_raw, const float* A,
                                             const float* B, const float* C, const float* D, const float* z,
                                             const float* delta_bias, int64_t batch, int64_t d, int64_t L,
                                             int64_t n, int threads, float* out) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> h(n), a(n), dt(L), last(n);  // per-thread scratch
#pragma omp for schedule(static)
    for (int64_t row = 0; row < batch * d; ++row) {
      const int64_t b = row / d, c = row % d;
      evim3_scan::RowExtras<float> ex;
      ex.D = D[c];
      ex.bias = delta_bias[c];
      ex.softplus = true;
      ex.z = z + row * L;
      evim3_scan::scan_forward_row<float>(u + row * L, delta_raw + row * L, A + c * n, B + b * L * n,
                                          C + b * L * n, ex, L, n, /*chunk=*/L, out + row * L, last.data(),
                                          /*checkpoints=*/nullptr, h.data(), a.data(), dt.data());
    }
  }
}
