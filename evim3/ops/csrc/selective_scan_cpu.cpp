// Torch binding of the fused selective scan (and of Mamba's causal conv1d, causal_conv1d_cpu.h) for CPU tensors:
// forward and backward, groups of channels of one batch element as tasks over torch's threads.
// The kernels and their maths: runtime/csrc/selective_scan_kernel.h.
//
// u, delta, z (b, d, L) may have any strides: mamba-ssm's layout (contiguous along L) or channel-last views of
// (b, L, d) memory, which evim3's Mamba block passes so that no transpose is copied. Outputs and gradients take
// u's (z's for dz) layout. B and C (b, L, n) need only a token's n-vector contiguous.

// ATen's tensor and the operators used, one header each, and torch/library.h for the registration: built on the
// whole C++ API (torch/extension.h, a pybind11 module) the first-use build took 36 s instead of 14 (2 cores).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "causal_conv1d_cpu.h"
#include "selective_scan_kernel.h"

namespace {

using namespace evim3_scan;

void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                  const at::Tensor& B, const at::Tensor& C) {
  TORCH_CHECK(u.device().is_cpu(), "selective_scan_cpu: CPU tensors only");
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u, delta: (batch, d, L)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1) && A.is_contiguous(), "A: contiguous (d, n)");
  TORCH_CHECK(B.dim() == 3 && B.size(0) == u.size(0) && B.size(1) == u.size(2) && B.size(2) == A.size(1),
              "B: (batch, L, n)");
  TORCH_CHECK(C.sizes() == B.sizes() && C.strides() == B.strides(), "C: (batch, L, n), B's strides");
  TORCH_CHECK(B.stride(2) == 1, "B, C: a token's n-vector contiguous");
  for (const auto* t : {&u, &delta, &A, &B, &C}) {
    TORCH_CHECK(t->scalar_type() == u.scalar_type(), "selective_scan_cpu: tensors of one dtype");
  }
}

void check_extras(const at::Tensor& u, const c10::optional<at::Tensor>& D,
                  const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias) {
  for (const auto* v : {&D, &delta_bias}) {
    if (v->has_value()) {
      TORCH_CHECK((*v)->dim() == 1 && (*v)->size(0) == u.size(1) && (*v)->is_contiguous() &&
                      (*v)->scalar_type() == u.scalar_type(),
                  "D, delta_bias: contiguous (d,) of u's dtype");
    }
  }
  if (z.has_value()) {
    TORCH_CHECK(z->sizes() == u.sizes() && z->scalar_type() == u.scalar_type(), "z: (batch, d, L) of u's dtype");
  }
}

template <typename T, typename P>
Rows<P> rows_of(const at::Tensor& t) {
  return Rows<P>{t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// An empty (batch, d, L) tensor laid out as `like`: channel-last when `like` is, else contiguous along L.
at::Tensor empty_as(const at::Tensor& like) {
  if (like.stride(1) == 1 && like.size(1) > 1) {
    return at::empty({like.size(0), like.size(2), like.size(1)}, like.options()).transpose(1, 2);
  }
  return at::empty(like.sizes(), like.options());
}

template <typename T>
Group<T> problem(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                 const c10::optional<at::Tensor>& delta_bias, bool softplus) {
  Group<T> g{};
  g.u = rows_of<T, const T>(u);
  g.delta_raw = rows_of<T, const T>(delta);
  if (z.has_value()) g.z = rows_of<T, const T>(*z);
  g.A = A.data_ptr<T>();
  g.B = B.data_ptr<T>();
  g.C = C.data_ptr<T>();
  g.sbB = B.stride(0);
  g.stB = B.stride(1);
  g.D = D.has_value() ? D->data_ptr<T>() : nullptr;
  g.bias = delta_bias.has_value() ? delta_bias->data_ptr<T>() : nullptr;
  g.softplus = softplus;
  g.d = u.size(1);
  g.L = u.size(2);
  g.n = A.size(1);
  return g;
}

}  // namespace

// -> (out (b, d, L), last state (b, d, n), checkpoints (b, d, K, n) or an empty tensor)
std::vector<at::Tensor> forward(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B,
                                at::Tensor C, c10::optional<at::Tensor> D, c10::optional<at::Tensor> z,
                                c10::optional<at::Tensor> delta_bias, bool softplus, int64_t chunk,
                                bool keep_checkpoints) {
  check_inputs(u, delta, A, B, C);
  check_extras(u, D, z, delta_bias);
  const int64_t batch = u.size(0), d = u.size(1), L = u.size(2), n = A.size(1);
  const int64_t num_chunks = (L + chunk - 1) / chunk;
  auto out = empty_as(u);
  auto last = at::empty({batch, d, n}, u.options());
  auto checkpoints = keep_checkpoints ? at::empty({batch, d, num_chunks, n}, u.options()) : at::Tensor();
  const int64_t tasks = batch * groups_per_batch(d);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_forward", [&] {
    const auto proto = problem<scalar_t>(u, delta, A, B, C, D, z, delta_bias, softplus);
    const auto out_rows = rows_of<scalar_t, scalar_t>(out);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> scratch(chunk, n, /*backward_block=*/0);
      for (int64_t task = begin; task < end; ++task) {
        scan_forward_group<scalar_t>(group_of(proto, task), chunk, out_rows, last.data_ptr<scalar_t>(),
                                     keep_checkpoints ? checkpoints.data_ptr<scalar_t>() : nullptr, scratch);
      }
    });
  });
  return {out, last, checkpoints};
}

// -> (du, ddelta (b, d, L), dA (d, n), dB, dC (b, L, n), dD, ddelta_bias (d), dz (b, d, L) or empty).
// dz_out: where to write dz (z's shape, any strides; Mamba's fused block passes the z half of its gradient
// buffer for in_proj's output), else a new tensor.
std::vector<at::Tensor> backward(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B,
                                 at::Tensor C, c10::optional<at::Tensor> D,
                                 c10::optional<at::Tensor> z, c10::optional<at::Tensor> delta_bias,
                                 bool softplus, at::Tensor checkpoints, at::Tensor gout,
                                 c10::optional<at::Tensor> glast, int64_t chunk,
                                 c10::optional<at::Tensor> dz_out) {
  check_inputs(u, delta, A, B, C);
  check_extras(u, D, z, delta_bias);
  const int64_t batch = u.size(0), d = u.size(1), L = u.size(2), n = A.size(1);
  const int64_t num_chunks = (L + chunk - 1) / chunk;
  TORCH_CHECK(gout.sizes() == u.sizes() && gout.scalar_type() == u.scalar_type(), "grad_out: (batch, d, L)");
  TORCH_CHECK(checkpoints.is_contiguous() && checkpoints.numel() == batch * d * num_chunks * n,
              "checkpoints: (batch, d, K, n) from forward with the same chunk");
  const bool has_glast = glast.has_value() && glast->defined();
  at::Tensor glast_c = has_glast ? glast->contiguous() : at::Tensor();
  auto du = empty_as(u);
  auto ddelta = empty_as(delta);
  if (dz_out.has_value()) {
    TORCH_CHECK(z.has_value() && dz_out->sizes() == z->sizes() && dz_out->scalar_type() == u.scalar_type(),
                "dz_out: z's shape and dtype");
  }
  auto dz = !z.has_value() ? at::Tensor() : dz_out.has_value() ? *dz_out : empty_as(*z);
  // One accumulator slice per thread for the gradients summed over channels.
  const int64_t threads = at::get_num_threads();
  auto dA_parts = at::zeros({threads, d, n}, u.options());
  auto dB_parts = at::zeros({threads, batch, L, n}, u.options());
  auto dC_parts = at::zeros({threads, batch, L, n}, u.options());
  auto dD_parts = at::zeros({threads, d}, u.options());
  auto dbias_parts = at::zeros({threads, d}, u.options());
  const int64_t block = backward_block(batch, groups_per_batch(d), threads);
  const int64_t tasks = batch * blocks_per_batch(d, block);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_backward", [&] {
    const auto proto = problem<scalar_t>(u, delta, A, B, C, D, z, delta_bias, softplus);
    const auto gout_rows = rows_of<scalar_t, const scalar_t>(gout);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      const int64_t slot = at::get_thread_num();
      TORCH_CHECK(slot < threads, "selective_scan_cpu: thread index beyond the accumulator slices");
      Scratch<scalar_t> scratch(chunk, n, block);
      Grads<scalar_t> grads{rows_of<scalar_t, scalar_t>(du), rows_of<scalar_t, scalar_t>(ddelta), Rows<scalar_t>{},
                            dA_parts.data_ptr<scalar_t>() + slot * d * n,
                            dB_parts.data_ptr<scalar_t>() + slot * batch * L * n,
                            dC_parts.data_ptr<scalar_t>() + slot * batch * L * n,
                            dD_parts.data_ptr<scalar_t>() + slot * d, dbias_parts.data_ptr<scalar_t>() + slot * d};
      if (z.has_value()) grads.dz = rows_of<scalar_t, scalar_t>(dz);
      for (int64_t task = begin; task < end; ++task) {
        scan_backward_block<scalar_t>(block_groups(proto, task, block), chunk, checkpoints.data_ptr<scalar_t>(), gout_rows,
                                      has_glast ? glast_c.data_ptr<scalar_t>() : nullptr, grads, scratch);
      }
    });
  });
  return {du, ddelta, dA_parts.sum(0), dB_parts.sum(0), dC_parts.sum(0), dD_parts.sum(0), dbias_parts.sum(0), dz};
}

// Operators in the namespace of this build's name (torch.ops.<name>.forward, ...): each build has its own, so two
// builds can be loaded in one process (benchmarks compare them side by side).
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);  // selective scan forward with softplus discretisation, D and z gate
  m.def("backward", &backward);
  m.def("causal_conv1d_forward", &causal_conv1d_forward);  // causal depthwise conv1d (+ SiLU), channel-last
  m.def("causal_conv1d_backward", &causal_conv1d_backward);
}
