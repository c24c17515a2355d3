// The fused selective scan's forward as a C function for the edge runtime, without torch: ONNX Runtime's
// SelectiveScan op (runtime/fused_scan.py) calls it through ctypes. The kernel is the one the torch
// extension runs (runtime/csrc/selective_scan_kernel.h); groups of channels are spread over OpenMP threads.
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
  const evim3_scan::Rows<const float> rows{nullptr, d * L, L, 1};  // contiguous (batch, d, L)
  evim3_scan::Group<float> proto{};
  proto.u = {u, rows.sb, rows.sc, rows.st};
  proto.delta_raw = {delta_raw, rows.sb, rows.sc, rows.st};
  proto.z = {z, rows.sb, rows.sc, rows.st};
  proto.A = A;
  proto.B = B;
  proto.C = C;
  proto.sbB = L * n;
  proto.stB = n;
  proto.D = D;
  proto.bias = delta_bias;
  proto.softplus = true;
  proto.d = d;
  proto.L = L;
  proto.n = n;
  const int64_t tasks = batch * evim3_scan::groups_per_batch(d), tile = 64;
  std::vector<float> last(batch * d * n);  // the final state: not an output of the op
#pragma omp parallel num_threads(threads)
  {
    evim3_scan::Scratch<float> scratch(tile, n, /*backward_block=*/0);  // per thread
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      evim3_scan::scan_forward_group<float>(evim3_scan::group_of(proto, task), tile, {out, rows.sb, rows.sc, rows.st},
                                            last.data(),
                                            /*checkpoints=*/nullptr, scratch);
    }
  }
}
