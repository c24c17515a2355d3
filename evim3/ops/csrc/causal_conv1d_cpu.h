// Mamba's causal depthwise conv1d followed by SiLU, forward and backward, for channel-last CPU tensors:
//
//   pre[b, t, c] = bias[c] + sum_j w[c, j] x[b, t - (k - 1) + j, c]   (x = 0 before the sequence starts)
//   out = silu(pre)                                                   (or pre, without the activation)
//
// The same maths as F.silu(F.conv1d(x, w, bias, padding=k - 1, groups=d)[..., :L]) (evim3/ops/causal_conv1d.py,
// causal_conv1d_ref), which on CPU runs oneDNN's grouped convolution on a (b, d, L) copy of the input and takes
// ~5x the forward's time for its backward; here every loop runs over the channels of one token, which are
// contiguous, so each is a vectorised pass over memory in order. x is (b, L, d) with any token and batch
// strides (Mamba's x is a view of in_proj's (b, L, 2d) output); out, dx and the gradients are contiguous.

#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "selective_scan_kernel.h"  // the vectorisable sigmoid

namespace evim3_conv {

using evim3_scan::sigmoid;

// pre-activations of token t of batch element b into `pre` (d values); w is (k, d): a tap's d weights together
template <typename T>
inline void conv_token(const T* x, int64_t sxb, int64_t sxt, const T* w, const T* bias, int64_t b, int64_t t,
                       int64_t d, int64_t k, T* pre) {
  for (int64_t c = 0; c < d; ++c) pre[c] = bias != nullptr ? bias[c] : T(0);
  for (int64_t j = 0; j < k; ++j) {
    const int64_t s = t - (k - 1) + j;
    if (s < 0) continue;
    const T* xs = x + b * sxb + s * sxt;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) pre[c] += w[j * d + c] * xs[c];
  }
}

template <typename T>
void forward_impl(const T* x, int64_t sxb, int64_t sxt, const T* w, const T* bias, int64_t batch, int64_t L,
                  int64_t d, int64_t k, bool silu, T* out) {
  at::parallel_for(0, batch * L, 64, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      T* o = out + bt * d;
      conv_token(x, sxb, sxt, w, bias, bt / L, bt % L, d, k, o);
      if (silu) {
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] = o[c] * sigmoid(o[c]);
      }
    }
  });
}

// Gradients of batch elements [begin, end): dx (token stride sdt, batch stride sdb, channels contiguous) written
// once per element, dw (k, d) and db (d) accumulated. Two passes per batch element: the pre-activation gradients
// of all its tokens into `gpre` (L x d), then dx[s] = sum_j w[j] gpre[s + k - 1 - j] -- so dx needs no zeroing
// beforehand and may be a view into a larger buffer (the fused Mamba block's gradient for in_proj's output).
template <typename T>
void backward_impl(const T* x, int64_t sxb, int64_t sxt, const T* w, const T* bias, const T* gout, int64_t sgb,
                   int64_t sgt, int64_t begin, int64_t end, int64_t L, int64_t d, int64_t k, bool silu, T* dx,
                   int64_t sdb, int64_t sdt, T* dw, T* db) {
  std::vector<T> gpre(L * d);
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t t = 0; t < L; ++t) {
      const T* g = gout + b * sgb + t * sgt;
      T* gp = gpre.data() + t * d;
      if (silu) {  // through SiLU: d silu(p) / dp = s (1 + p (1 - s)), s = sigmoid(p), p recomputed
        conv_token(x, sxb, sxt, w, bias, b, t, d, k, gp);
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) {
          const T p = gp[c], s = sigmoid(p);
          gp[c] = g[c] * s * (T(1) + p * (T(1) - s));
        }
      } else {
        std::copy(g, g + d, gp);
      }
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) db[c] += gp[c];
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = t - (k - 1) + j;
        if (s < 0) continue;
        const T* xs = x + b * sxb + s * sxt;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) dw[j * d + c] += gp[c] * xs[c];
      }
    }
    for (int64_t s = 0; s < L; ++s) {
      T* dxs = dx + b * sdb + s * sdt;
      std::fill(dxs, dxs + d, T(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t t = s + (k - 1) - j;
        if (t >= L) continue;
        const T* gp = gpre.data() + t * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) dxs[c] += w[j * d + c] * gp[c];
      }
    }
  }
}

}  // namespace evim3_conv

// x (b, L, d) channel-last, weight (k, d) contiguous (the module's (d, 1, k) transposed), bias (d) or none
// -> out (b, L, d) contiguous
inline at::Tensor causal_conv1d_forward(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias,
                                        bool silu) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "causal_conv1d: x (batch, L, d) with channels contiguous");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(2) && weight.is_contiguous(), "weight: contiguous (k, d)");
  const int64_t batch = x.size(0), L = x.size(1), d = x.size(2), k = weight.size(0);
  auto out = at::empty({batch, L, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_forward", [&] {
    evim3_conv::forward_impl<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), weight.data_ptr<scalar_t>(),
                                       bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, batch, L, d, k, silu,
                                       out.data_ptr<scalar_t>());
  });
  return out;
}

// -> (dx (b, L, d), dweight (k, d), dbias (d) or empty); gout (b, L, d) with channels contiguous.
// dx_out: where to write dx ((b, L, d), channels contiguous, any token and batch strides), else a new tensor.
inline std::vector<at::Tensor> causal_conv1d_backward(at::Tensor x, at::Tensor weight,
                                                      c10::optional<at::Tensor> bias, at::Tensor gout,
                                                      bool silu, c10::optional<at::Tensor> dx_out) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "causal_conv1d: x (batch, L, d) with channels contiguous");
  TORCH_CHECK(gout.sizes() == x.sizes() && gout.stride(2) == 1, "grad_out: (batch, L, d), channels contiguous");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(2) && weight.is_contiguous(), "weight: contiguous (k, d)");
  const int64_t batch = x.size(0), L = x.size(1), d = x.size(2), k = weight.size(0);
  if (dx_out.has_value()) {
    TORCH_CHECK(dx_out->sizes() == x.sizes() && dx_out->stride(2) == 1 && dx_out->scalar_type() == x.scalar_type(),
                "dx_out: x's shape and dtype, channels contiguous");
  }
  auto dx = dx_out.has_value() ? *dx_out : at::empty({batch, L, d}, x.options());
  const int64_t threads = at::get_num_threads();
  auto dw_parts = at::zeros({threads, k, d}, x.options());  // summed over batch and tokens: a slice per thread
  auto db_parts = at::zeros({threads, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_backward", [&] {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      const int64_t slot = at::get_thread_num();
      TORCH_CHECK(slot < threads, "causal_conv1d: thread index beyond the accumulator slices");
      evim3_conv::backward_impl<scalar_t>(
          x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), weight.data_ptr<scalar_t>(),
          bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, gout.data_ptr<scalar_t>(), gout.stride(0),
          gout.stride(1), begin, end, L, d, k, silu, dx.data_ptr<scalar_t>(), dx.stride(0), dx.stride(1),
          dw_parts.data_ptr<scalar_t>() + slot * k * d, db_parts.data_ptr<scalar_t>() + slot * d);
    });
  });
  return {dx, dw_parts.sum(0), bias.has_value() ? db_parts.sum(0) : at::Tensor()};
}
