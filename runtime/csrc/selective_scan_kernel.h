// The fused selective scan's kernels, free of torch: included by the torch extension
// (selective_scan_cpu.cpp, forward and backward for training and eager inference) and by the edge runtime's
// ONNX Runtime op (runtime/csrc/selective_scan_op.cpp, forward only), so both run the same arithmetic.
//
// The chunked scan in eager PyTorch makes ~40 passes over (b, d, K, n) temporaries per token step;
// here each channel keeps its n-vector state in cache and walks the sequence once (forward) or twice
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
// their gradients.
//
// Vectorised across channels: a task is a *group* of kLanes channels of one batch element, and every
// inner loop runs over those lanes (a compile-time width, so it becomes whole SIMD registers on any x86
// level). An earlier version vectorised over the n states of one channel: with n = 16 each token then
// needed a horizontal sum for y and two in the backward, and the loops had a run-time trip count; it
// ran at ~55 cycles a channel-token forward and ~220 backward on an AVX-512 EPYC, this layout at a
// fraction of that (BENCHMARKS.md "step"). The group reads its channels' (L)-rows a chunk at a time into
// token-major scratch ([token][lane]), so the outside layouts stay those of mamba-ssm.
//
// Layouts: u, delta, z, out, gout and du, ddelta, dz: (b, d, L) with any strides (struct Rows); A: (d, n); D,
// delta_bias: (d); B, C: (b, L, n) with a token's n-vector contiguous; dB, dC: (b, L, n) contiguous; checkpoints:
// (b, d, K, n), the state entering each chunk of `chunk` tokens. dA, dB and dC are summed over channels,
// so each thread accumulates into its own slice and the slices are added at the end (no atomics,
// deterministic for a fixed thread count).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace evim3_scan {

constexpr int64_t kLanes = 16;  // channels per group: one AVX-512 register of floats, two of AVX2
// Groups per backward task. dB and dC sum over channels, i.e. across the lanes: each group of a block adds its
// lane contributions into one buffer per chunk, and the horizontal sums run once per block, not once per group
// (one per group cost a quarter of the backward; blocks of 4 groups still a tenth). So a block is as large as
// the thread count allows: every batch element's groups in one block while that leaves two tasks a thread.
inline int64_t backward_block(int64_t batch, int64_t groups_per_batch, int64_t threads) {
  const int64_t tasks_wanted = 2 * std::max<int64_t>(threads, 1);
  const int64_t blocks_per_batch = std::max<int64_t>(1, (tasks_wanted + batch - 1) / batch);
  return std::max<int64_t>(1, groups_per_batch / blocks_per_batch);
}

// exp(x) for x <= 0 as a loop the compiler can vectorise (std::exp is a library call it will not):
// x = k ln2 + r with |r| <= ln2/2, e^r by a degree-5 minimax polynomial (fitted for relative error: 1.1e-7, 1.7e-7
// evaluated in float; the degree-6 Taylor polynomial it replaced: 2.3e-7, one FMA more), 2^k by building the
// exponent bits. Below -87 it returns exactly 0: e^-87 (~1.6e-38, what the clamped polynomial gives there) sits
// at the edge of the normal range, and its products -- softplus's log1p of it, the backward's decay gradients --
// are denormals, which x86 computes ~100x slower. The scan's inputs are float32 at best.
// These float helpers compute every value unconditionally and select only between computed values, so the
// loops that call them if-convert into blends on any x86 level (built with -fno-trapping-math: see
// runtime/fused_scan.py VECTOR_FLAGS).
inline float fast_exp(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  // Round to nearest by adding and removing 1.5 * 2^23 (vectorises on plain SSE2, unlike nearbyint).
  const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = xc - k * 0.693359375f + k * 2.12194440e-4f;  // ln2 split in two for accuracy
  float p = 8.31374083e-3f;
  p = p * r + 4.19040811e-2f;
  p = p * r + 1.66672805e-1f;
  p = p * r + 4.99990963e-1f;
  p = p * r + 9.99999829e-1f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float inside = x > -87.0f ? 1.0f : 0.0f;
  return p * scale * inside;
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
  const float soft = (x > 0.0f ? x : 0.0f) + log1p_unit(fast_exp(-std::fabs(x)));
  return x > 20.0f ? x : soft;
}
inline double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

inline float sigmoid(float x) {
  const float e = fast_exp(-std::fabs(x));  // in (0, 1]: no overflow either side
  const float r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

template <typename T>
inline T softplus_grad(T x) {
  const T s = sigmoid(x);
  return x > T(20) ? T(1) : s;
}

// A (batch, d, L) tensor of any strides: element (b, c, t) at p[b * sb + c * sc + t * st]. Mamba's own layout is
// contiguous along L (st = 1); a model that keeps tokens channel-last, (b, L, d) in memory, passes sc = 1, and
// then its views (the two halves of in_proj's output, a transposed matmul result) need no copy.
template <typename T>
struct Rows {
  T* p = nullptr;
  int64_t sb = 0, sc = 0, st = 0;
  T& at(int64_t b, int64_t c, int64_t t) const { return p[b * sb + c * sc + t * st]; }
};

// One group's inputs: batch element b's channels c0 .. c0 + lanes - 1 (lanes <= kLanes; the remaining lanes
// compute on zeros and are never written). Absent pieces are null.
template <typename T>
struct Group {
  Rows<const T> u, delta_raw, z;  // z.p null: no gate
  const T* A;                     // (d, n)
  const T* B;                     // B(b, t, i) at B[b * sbB + t * stB + i]; C the same
  const T* C;
  int64_t sbB, stB;
  const T* D;     // (d) or null
  const T* bias;  // (d) or null
  bool softplus;
  int64_t d, L, n;
  int64_t b, c0, lanes;

  const T* B_at(int64_t t) const { return B + b * sbB + t * stB; }
  const T* C_at(int64_t t) const { return C + b * sbB + t * stB; }
};

// Per-thread scratch, reused across groups: token-major [token][lane] tiles of a chunk, and the state.
template <typename T>
struct Scratch {
  std::vector<T> A_t, D, bias, h;                 // (n | 1) x kLanes
  std::vector<T> u, delta_raw, dt, z, y, gy;      // chunk x kLanes
  std::vector<T> states, decays;                  // chunk x n x kLanes (the backward's recomputed chunk)
  std::vector<T> lane_dB, lane_dC;                // chunk x n x kLanes, summed over lanes per chunk
  std::vector<T> du, ddelta, dz;                  // chunk x kLanes: a chunk's gradients before they are written
  std::vector<T> block_g, block_dA, block_dD, block_dbias;  // per group of a backward block
  // backward_block: groups per backward block (backward_block above); 0 for a forward-only scratch
  Scratch(int64_t chunk_, int64_t n_, int64_t backward_block)
      : A_t(n_ * kLanes), D(kLanes), bias(kLanes), h(n_ * kLanes),
        u(chunk_ * kLanes), delta_raw(chunk_ * kLanes), dt(chunk_ * kLanes), z(chunk_ * kLanes),
        y(chunk_ * kLanes), gy(chunk_ * kLanes) {
    if (backward_block > 0) {
      for (auto* v : {&states, &decays, &lane_dB, &lane_dC}) v->resize(chunk_ * n_ * kLanes);
      for (auto* v : {&du, &ddelta, &dz}) v->resize(chunk_ * kLanes);
      for (auto* v : {&block_g, &block_dA}) v->resize(backward_block * n_ * kLanes);
      for (auto* v : {&block_dD, &block_dbias}) v->resize(backward_block * kLanes);
    }
  }
};

// Copy tokens [t0, t0 + len) of the group's channels of `src` into `dst` [token][lane]; padding lanes 0.
// The loop order follows the source's contiguous axis, so both layouts read memory in order.
template <typename T, typename S>
void load_tile(const Group<T>& grp, const Rows<S>& src, int64_t t0, int64_t len, T* dst) {
  if (grp.lanes < kLanes) std::fill(dst, dst + len * kLanes, T(0));
  if (src.sc == 1 && grp.lanes == kLanes) {  // a full group: one vector a token (fixed trip count)
    for (int64_t j = 0; j < len; ++j) {
      const S* x = &src.at(grp.b, grp.c0, t0 + j);
#pragma omp simd
      for (int64_t w = 0; w < kLanes; ++w) dst[j * kLanes + w] = x[w];
    }
  } else if (src.sc == 1) {
    for (int64_t j = 0; j < len; ++j) {
      const S* x = &src.at(grp.b, grp.c0, t0 + j);
      for (int64_t w = 0; w < grp.lanes; ++w) dst[j * kLanes + w] = x[w];
    }
  } else {
    for (int64_t w = 0; w < grp.lanes; ++w)
      for (int64_t j = 0; j < len; ++j) dst[j * kLanes + w] = src.at(grp.b, grp.c0 + w, t0 + j);
  }
}

// The inverse: `src` [token][lane] -> tokens [t0, t0 + len) of the group's channels of `dst`.
template <typename T>
void store_tile(const Group<T>& grp, const T* src, int64_t t0, int64_t len, const Rows<T>& dst) {
  if (dst.sc == 1 && grp.lanes == kLanes) {
    for (int64_t j = 0; j < len; ++j) {
      T* x = &dst.at(grp.b, grp.c0, t0 + j);
#pragma omp simd
      for (int64_t w = 0; w < kLanes; ++w) x[w] = src[j * kLanes + w];
    }
  } else if (dst.sc == 1) {
    for (int64_t j = 0; j < len; ++j) {
      T* x = &dst.at(grp.b, grp.c0, t0 + j);
      for (int64_t w = 0; w < grp.lanes; ++w) x[w] = src[j * kLanes + w];
    }
  } else {
    for (int64_t w = 0; w < grp.lanes; ++w)
      for (int64_t j = 0; j < len; ++j) dst.at(grp.b, grp.c0 + w, t0 + j) = src[j * kLanes + w];
  }
}

// The group's per-channel constants: A transposed to [state][lane], D and the delta bias.
template <typename T>
void load_constants(const Group<T>& grp, Scratch<T>& s) {
  std::fill(s.A_t.begin(), s.A_t.end(), T(0));  // a padding lane decays by exp(0) = 1 with zero input: stays 0
  std::fill(s.D.begin(), s.D.end(), T(0));
  std::fill(s.bias.begin(), s.bias.end(), T(0));
  for (int64_t w = 0; w < grp.lanes; ++w) {
    const int64_t c = grp.c0 + w;
    for (int64_t i = 0; i < grp.n; ++i) s.A_t[i * kLanes + w] = grp.A[c * grp.n + i];
    s.D[w] = grp.D != nullptr ? grp.D[c] : T(0);
    s.bias[w] = grp.bias != nullptr ? grp.bias[c] : T(0);
  }
}

// Read a chunk's u, delta (discretised) and z into the scratch tiles.
template <typename T>
void load_chunk(const Group<T>& grp, Scratch<T>& s, int64_t t0, int64_t len) {
  load_tile(grp, grp.u, t0, len, s.u.data());
  load_tile(grp, grp.delta_raw, t0, len, s.delta_raw.data());
  if (grp.z.p != nullptr) load_tile(grp, grp.z, t0, len, s.z.data());
  for (int64_t j = 0; j < len; ++j) {
    const T* raw = s.delta_raw.data() + j * kLanes;
    T* dt = s.dt.data() + j * kLanes;
    if (grp.softplus) {
#pragma omp simd
      for (int64_t w = 0; w < kLanes; ++w) dt[w] = softplus(raw[w] + s.bias[w]);
    } else {
#pragma omp simd
      for (int64_t w = 0; w < kLanes; ++w) dt[w] = raw[w] + s.bias[w];
    }
  }
}

// One token of the recurrence for the group: a = exp(dt A), h = a * h_prev + dt u B, y = <C, h> per lane.
// `h` may be `h_prev` (the forward updates in place). kRecompute (the backward's recompute of a chunk): also write
// the decays (n x kLanes) and add the lane contributions gy h to dC into lane_dC while h is in a register.
template <typename T, bool kRecompute>
inline void scan_token(const T* dt, const T* u, const T* A_t, const T* Bt, const T* Ct, const T* h_prev, T* h,
                       T* y, int64_t n, T* decays = nullptr, const T* gy = nullptr, T* lane_dC = nullptr) {
  T drive[kLanes], acc[kLanes];
#pragma omp simd
  for (int64_t w = 0; w < kLanes; ++w) {
    drive[w] = dt[w] * u[w];
    acc[w] = T(0);
  }
  for (int64_t i = 0; i < n; ++i) {
    const T b = Bt[i], c = Ct[i];
    const T* Ai = A_t + i * kLanes;
    const T* hp = h_prev + i * kLanes;
    T* hi = h + i * kLanes;
#pragma omp simd
    for (int64_t w = 0; w < kLanes; ++w) {
      const T a = fast_exp(dt[w] * Ai[w]);
      const T next = a * hp[w] + drive[w] * b;
      hi[w] = next;
      acc[w] += c * next;
      if constexpr (kRecompute) {
        decays[i * kLanes + w] = a;
        lane_dC[i * kLanes + w] += gy[w] * next;
      }
    }
  }
#pragma omp simd
  for (int64_t w = 0; w < kLanes; ++w) y[w] = acc[w];
}

// out = (y + D u) * silu(z) (or y + D u) over a chunk's tile, in place in `y`.
template <typename T>
void gate_chunk(const Group<T>& grp, Scratch<T>& s, int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    T* y = s.y.data() + j * kLanes;
    const T* u = s.u.data() + j * kLanes;
    const T* z = s.z.data() + j * kLanes;
    if (grp.z.p != nullptr) {
#pragma omp simd
      for (int64_t w = 0; w < kLanes; ++w) y[w] = (y[w] + s.D[w] * u[w]) * z[w] * sigmoid(z[w]);
    } else {
#pragma omp simd
      for (int64_t w = 0; w < kLanes; ++w) y[w] += s.D[w] * u[w];
    }
  }
}

// Forward of one group: out (b, d, L, any strides), last state (b, d, n), and the state entering each chunk
// (checkpoints (b, d, K, n), null when not training).
template <typename T>
void scan_forward_group(const Group<T>& grp, int64_t chunk, const Rows<T>& out, T* last, T* checkpoints,
                        Scratch<T>& s) {
  const int64_t L = grp.L, n = grp.n, num_chunks = (L + chunk - 1) / chunk;
  load_constants(grp, s);
  std::fill(s.h.begin(), s.h.end(), T(0));
  for (int64_t k = 0; k < num_chunks; ++k) {
    const int64_t t0 = k * chunk, len = std::min(L, t0 + chunk) - t0;
    if (checkpoints != nullptr) {
      for (int64_t w = 0; w < grp.lanes; ++w)
        for (int64_t i = 0; i < n; ++i)
          checkpoints[((grp.b * grp.d + grp.c0 + w) * num_chunks + k) * n + i] = s.h[i * kLanes + w];
    }
    load_chunk(grp, s, t0, len);
    for (int64_t j = 0; j < len; ++j) {
      scan_token<T, false>(s.dt.data() + j * kLanes, s.u.data() + j * kLanes, s.A_t.data(), grp.B_at(t0 + j),
                           grp.C_at(t0 + j), s.h.data(), s.h.data(), s.y.data() + j * kLanes, n);
    }
    gate_chunk(grp, s, len);
    store_tile(grp, s.y.data(), t0, len, out);
  }
  for (int64_t w = 0; w < grp.lanes; ++w)
    for (int64_t i = 0; i < n; ++i) last[(grp.b * grp.d + grp.c0 + w) * n + i] = s.h[i * kLanes + w];
}

// Where the backward writes: du, ddelta_raw, dz (b, d, L, any strides) are written; dA (d, n), dB, dC (b, L, n), dD and
// dbias (d) are accumulated (+=) into the calling thread's slices.
template <typename T>
struct Grads {
  Rows<T> du, ddelta_raw, dz;  // dz.p null without a gate
  T *dA, *dB, *dC, *dD, *dbias;
};

// One chunk of one group's backward: recompute the chunk's states from the state entering it, then the adjoint
// in reverse. g (the adjoint carried between chunks), dA, dD, dbias are the group's own (n x kLanes, kLanes);
// the lane contributions to dB and dC are added into s.lane_dB / s.lane_dC; du, ddelta, dz are written.
template <typename T>
void backward_chunk(const Group<T>& grp, int64_t k, int64_t chunk, const T* checkpoints, const Rows<const T>& gout,
                    const Grads<T>& out, Scratch<T>& s, T* g_state, T* dA, T* dD, T* dbias) {
  const int64_t L = grp.L, n = grp.n, num_chunks = (L + chunk - 1) / chunk, nl = n * kLanes;
  const int64_t t0 = k * chunk, len = std::min(L, t0 + chunk) - t0;
  load_chunk(grp, s, t0, len);
  std::fill(s.h.begin(), s.h.end(), T(0));
  for (int64_t w = 0; w < grp.lanes; ++w)
    for (int64_t i = 0; i < n; ++i)
      s.h[i * kLanes + w] = checkpoints[((grp.b * grp.d + grp.c0 + w) * num_chunks + k) * n + i];
  // Through the gate, out = (y + D u) * silu(z): gy = d out / d y needs only gout and z, so it comes first (the
  // recompute then adds gy h into lane_dC); dz needs y, after it.
  T* gout_tile = s.du.data();  // du is written only after the adjoint: its tile holds gout until then
  load_tile(grp, gout, t0, len, gout_tile);
  for (int64_t j = 0; j < len; ++j) {
    const T* go = gout_tile + j * kLanes;
    const T* z = s.z.data() + j * kLanes;
    T* gy = s.gy.data() + j * kLanes;
    if (grp.z.p != nullptr) {
#pragma omp simd
      for (int64_t w = 0; w < kLanes; ++w) gy[w] = go[w] * z[w] * sigmoid(z[w]);
    } else {
#pragma omp simd
      for (int64_t w = 0; w < kLanes; ++w) gy[w] = go[w];
    }
  }
  for (int64_t j = 0; j < len; ++j) {
    const T* h_prev = j > 0 ? s.states.data() + (j - 1) * nl : s.h.data();
    scan_token<T, true>(s.dt.data() + j * kLanes, s.u.data() + j * kLanes, s.A_t.data(), grp.B_at(t0 + j),
                        grp.C_at(t0 + j), h_prev, s.states.data() + j * nl, s.y.data() + j * kLanes, n,
                        s.decays.data() + j * nl, s.gy.data() + j * kLanes, s.lane_dC.data() + j * nl);
  }
  if (grp.z.p != nullptr) {
    for (int64_t j = 0; j < len; ++j) {
      const T* go = gout_tile + j * kLanes;
      const T* y = s.y.data() + j * kLanes;
      const T* u = s.u.data() + j * kLanes;
      const T* z = s.z.data() + j * kLanes;
      T* dz = s.dz.data() + j * kLanes;
#pragma omp simd
      for (int64_t w = 0; w < kLanes; ++w) {
        const T sig = sigmoid(z[w]);
        dz[w] = go[w] * (y[w] + s.D[w] * u[w]) * sig * (T(1) + z[w] * (T(1) - sig));
      }
    }
  }
  // The adjoint, token by token in reverse; g holds a_{t+1} g_{t+1} on entry.
  for (int64_t j = len - 1; j >= 0; --j) {
    const T* dt = s.dt.data() + j * kLanes;
    const T* u = s.u.data() + j * kLanes;
    const T* gy = s.gy.data() + j * kLanes;
    const T* hp = j > 0 ? s.states.data() + (j - 1) * nl : s.h.data();
    const T* a = s.decays.data() + j * nl;
    const T* Bt = grp.B_at(t0 + j);
    const T* Ct = grp.C_at(t0 + j);
    T* lane_dB = s.lane_dB.data() + j * nl;
    T drive[kLanes], sum_gB[kLanes], sum_gdecay[kLanes];
#pragma omp simd
    for (int64_t w = 0; w < kLanes; ++w) {
      drive[w] = dt[w] * u[w];
      sum_gB[w] = T(0);
      sum_gdecay[w] = T(0);
    }
    for (int64_t i = 0; i < n; ++i) {
      const T b = Bt[i], c = Ct[i];
      const int64_t o = i * kLanes;
      T* g = g_state + o;
      T* dAi = dA + o;
#pragma omp simd
      for (int64_t w = 0; w < kLanes; ++w) {
        const T gt = g[w] + gy[w] * c;
        const T g_decay = gt * hp[o + w] * a[o + w];  // dL/d(delta_t A_i)
        sum_gB[w] += gt * b;
        sum_gdecay[w] += g_decay * s.A_t[o + w];
        dAi[w] += g_decay * dt[w];
        lane_dB[o + w] += gt * drive[w];
        g[w] = a[o + w] * gt;
      }
    }
    T* ddelta = s.ddelta.data() + j * kLanes;
    T* du = s.du.data() + j * kLanes;
#pragma omp simd
    for (int64_t w = 0; w < kLanes; ++w) {
      ddelta[w] = sum_gdecay[w] + u[w] * sum_gB[w];  // d/d(dt) so far
      du[w] = dt[w] * sum_gB[w] + gy[w] * s.D[w];    // through the scan and the skip connection
    }
  }
  // The skip connection's weight and the discretisation, over the chunk.
  for (int64_t j = 0; j < len; ++j) {
    const T* gy = s.gy.data() + j * kLanes;
    const T* u = s.u.data() + j * kLanes;
    const T* raw = s.delta_raw.data() + j * kLanes;
    T* ddelta = s.ddelta.data() + j * kLanes;
#pragma omp simd
    for (int64_t w = 0; w < kLanes; ++w) dD[w] += gy[w] * u[w];
    if (grp.softplus) {  // two loops, not a branch inside one: a branch on the flag kept this one scalar
#pragma omp simd
      for (int64_t w = 0; w < kLanes; ++w) ddelta[w] *= softplus_grad(raw[w] + s.bias[w]);
    }
#pragma omp simd
    for (int64_t w = 0; w < kLanes; ++w) dbias[w] += ddelta[w];
  }
  store_tile(grp, s.du.data(), t0, len, out.du);
  store_tile(grp, s.ddelta.data(), t0, len, out.ddelta_raw);
  if (out.dz.p != nullptr) store_tile(grp, s.dz.data(), t0, len, out.dz);
}

// Gradients of a block of groups of one batch element (`groups`, from block_groups), chunk by
// chunk from the last.
template <typename T>
void scan_backward_block(const std::vector<Group<T>>& groups, int64_t chunk, const T* checkpoints,
                         const Rows<const T>& gout, const T* glast, const Grads<T>& out, Scratch<T>& s) {
  const Group<T>& first = groups.front();
  const int64_t L = first.L, n = first.n, nl = n * kLanes, num_chunks = (L + chunk - 1) / chunk;
  std::fill(s.block_g.begin(), s.block_g.end(), T(0));
  std::fill(s.block_dA.begin(), s.block_dA.end(), T(0));
  std::fill(s.block_dD.begin(), s.block_dD.end(), T(0));
  std::fill(s.block_dbias.begin(), s.block_dbias.end(), T(0));
  if (glast != nullptr) {
    for (size_t gi = 0; gi < groups.size(); ++gi)
      for (int64_t w = 0; w < groups[gi].lanes; ++w)
        for (int64_t i = 0; i < n; ++i)
          s.block_g[gi * nl + i * kLanes + w] = glast[(first.b * first.d + groups[gi].c0 + w) * n + i];
  }
  for (int64_t k = num_chunks - 1; k >= 0; --k) {
    const int64_t t0 = k * chunk, len = std::min(L, t0 + chunk) - t0;
    std::fill(s.lane_dB.begin(), s.lane_dB.begin() + len * nl, T(0));
    std::fill(s.lane_dC.begin(), s.lane_dC.begin() + len * nl, T(0));
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      load_constants(groups[gi], s);
      backward_chunk(groups[gi], k, chunk, checkpoints, gout, out, s, s.block_g.data() + gi * nl,
                     s.block_dA.data() + gi * nl, s.block_dD.data() + gi * kLanes, s.block_dbias.data() + gi * kLanes);
    }
    // dB and dC: the lane contributions summed over the block's channels (padding lanes hold zeros).
    for (int64_t j = 0; j < len; ++j) {
      T* dBt = out.dB + (first.b * L + t0 + j) * n;
      T* dCt = out.dC + (first.b * L + t0 + j) * n;
      for (int64_t i = 0; i < n; ++i) {
        const T* lb = s.lane_dB.data() + j * nl + i * kLanes;
        const T* lc = s.lane_dC.data() + j * nl + i * kLanes;
        T sb = 0, sc = 0;
#pragma omp simd reduction(+ : sb, sc)
        for (int64_t w = 0; w < kLanes; ++w) {
          sb += lb[w];
          sc += lc[w];
        }
        dBt[i] += sb;
        dCt[i] += sc;
      }
    }
  }
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const Group<T>& grp = groups[gi];
    for (int64_t w = 0; w < grp.lanes; ++w) {
      const int64_t c = grp.c0 + w;
      for (int64_t i = 0; i < n; ++i) out.dA[c * n + i] += s.block_dA[gi * nl + i * kLanes + w];
      out.dD[c] += s.block_dD[gi * kLanes + w];
      out.dbias[c] += s.block_dbias[gi * kLanes + w];
    }
  }
}

// The groups of a (batch, d) problem: task -> (b, c0, lanes).
inline int64_t groups_per_batch(int64_t d) { return (d + kLanes - 1) / kLanes; }

template <typename T>
Group<T> group_of(Group<T> proto, int64_t task) {
  const int64_t per = groups_per_batch(proto.d);
  proto.b = task / per;
  proto.c0 = (task % per) * kLanes;
  proto.lanes = std::min(kLanes, proto.d - proto.c0);
  return proto;
}

// The backward's blocks: task -> the groups of block (task % blocks per batch) of batch element task / (that).
inline int64_t blocks_per_batch(int64_t d, int64_t block) { return (groups_per_batch(d) + block - 1) / block; }

template <typename T>
std::vector<Group<T>> block_groups(const Group<T>& proto, int64_t task, int64_t block) {
  const int64_t per = blocks_per_batch(proto.d, block), b = task / per, first = (task % per) * block;
  const int64_t count = std::min(block, groups_per_batch(proto.d) - first);
  std::vector<Group<T>> groups;
  for (int64_t gi = 0; gi < count; ++gi) groups.push_back(group_of(proto, b * groups_per_batch(proto.d) + first + gi));
  return groups;
}

}  // namespace evim3_scan
