// Torch binding of the fused selective scan for CPU tensors: forward and backward, one (batch, channel) row
// per task over torch's threads. The row kernels and their maths: runtime/csrc/selective_scan_kernel.h.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

#include "selective_scan_kernel.h"

namespace {

using namespace evim3_scan;

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
