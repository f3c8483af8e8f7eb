// XLA:CPU kernels (XLA FFI) for the tile loop of flax_minrnn.ops.gated.
//
// One tile of the recurrence h_t = a_t * h_{t-1} + b_t with the gates of
// MinGRU / MinLSTM computed from the pre-activations, forward and adjoint, in
// one pass over the tile (the pure-JAX tile loop in ops/gated.py runs the gates,
// the recurrence, the copies into the whole-sequence buffers and the gates'
// gradient as separate passes).  backends/native.py calls these and
// compiles this file on first use; the pure-JAX
// path (impl="chunked") is the reference the tests compare against.
//
// Layout (row-major; the projections and their cotangents float32 or
// bfloat16, everything else float32):
//   pre      (B, L, n*D)  the tile's projection x @ W, unbiased; column block
//                         c in [0, n) holds gate c for the D features
//   bias     (n*D)        added to pre before the gates
//   h_buf    (B, T, D)    every state of the sequence
//   pre_buf  (B, T, n*D)  every projection of the sequence (kept for the
//                         backward pass)
// Gate kinds (attribute `kind`):
//   0  MinGRU:  [k, p]       z = sigmoid(k), a = 1 - z, b = z * c(p)
//   1  MinLSTM: [kf, ki, p]  u = exp(-kf), v = exp(-ki), a = (1+v)/(2+u+v),
//                            b = (1+u)/(2+u+v) * c(p), evaluated with all three
//                            terms scaled by exp(-m), m = max(0, -kf, -ki)
//                            (no overflow; as nn.gates.normalized_gates)
//   2  MinLSTM without normalisation: a = sigmoid(kf), b = sigmoid(ki) * c(p)
// Candidate (attribute `cand`): 0 identity, 1 g(p) = p + 0.5 (p >= 0),
// sigmoid(p) (p < 0).
//
// The work is split over contiguous ranges of the D features (independent
// recurrences), run by the calling thread and XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// exp(x) for x in [-86, 88.5] (callers clamp): Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2 / 2, and a degree-6 polynomial for exp(r)
// (Cephes' expf coefficients); about 1 ulp.  Branch-free, so loops over it
// vectorise.
inline float exp_approx(float x) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float fn = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t n = static_cast<int32_t>(fn);
  int32_t bits = __builtin_bit_cast(int32_t, p) + (n << 23);
  return __builtin_bit_cast(float, bits);
}

constexpr float kExpMin = -86.0f;

// exp(x) for x <= 0, and 0 below kExpMin: sigmoid(-inf) is then 0, so
// 0 * inf is NaN as in the Python gate equations.  (XLA:CPU's exp is below
// 4.4e-38 there and flushes to zero from about -87.3.)
inline float exp_nonpositive(float x) {
  float e = exp_approx(std::max(x, kExpMin));
  return x < kExpMin ? 0.0f : e;
}

// Projections are float32 or bfloat16 (its 16 high bits); computing is float32.
inline float load(const float* p) { return *p; }
inline float load(const uint16_t* p) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(*p) << 16);
}
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) {  // round to nearest even (finite v)
  uint32_t bits = __builtin_bit_cast(uint32_t, v);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  *p = static_cast<uint16_t>(bits >> 16);
}

// minLSTM's normalised gates (a, i) = (f, i) / (f + i), and the scaled terms
// u' = u e^-m, v' = v e^-m and r = 1 / (2 e^-m + u' + v') of their gradient.
inline void normalized(float kf, float ki, float& a, float& i, float& u, float& v,
                       float& r) {
  float m = std::max(0.0f, std::max(-kf, -ki));
  float e0 = exp_nonpositive(-m);
  u = exp_nonpositive(-kf - m);
  v = exp_nonpositive(-ki - m);
  r = 1.0f / (2.0f * e0 + u + v);
  a = (e0 + v) * r;
  i = (e0 + u) * r;
}

// (sigmoid(k), sigmoid(-k)) from one exp, without cancellation.
inline void sigmoid_pair(float k, float& pos, float& neg) {
  float e = exp_nonpositive(k >= 0.0f ? -k : k);
  float big = 1.0f / (1.0f + e);
  float small = e * big;
  pos = k >= 0.0f ? big : small;
  neg = k >= 0.0f ? small : big;
}

// The candidate c(p) and its derivative.
template <int CAND>
inline void candidate(float p, float& c, float& dc) {
  if (CAND == 0) {
    c = p;
    dc = 1.0f;
  } else {
    float e = exp_nonpositive(std::min(p, 0.0f));
    float s = e / (1.0f + e);
    c = p >= 0.0f ? p + 0.5f : s;
    dc = p >= 0.0f ? 1.0f : s * (1.0f - s);
  }
}

struct Shape {
  int64_t B, L, T, D, n;  // batch, tile steps, sequence steps, features, gate blocks
};

// One step for features [d0, d1) of one batch row.  pre points at the row's
// n*D biased-to-be columns, h holds the running state (updated), out gets it.
template <int KIND, int CAND, typename P>
inline void step_forward(const P* __restrict pre, const float* __restrict bias,
                         float* __restrict h, float* __restrict out, int64_t D,
                         int64_t d0, int64_t d1) {
  if (KIND == 0) {
    const P* pk = pre;
    const P* pp = pre + D;
#pragma GCC ivdep
    for (int64_t d = d0; d < d1; ++d) {
      float z, a, c, dc;
      sigmoid_pair(load(pk + d) + bias[d], z, a);
      candidate<CAND>(load(pp + d) + bias[D + d], c, dc);
      h[d] = a * h[d] + z * c;
      out[d] = h[d];
    }
  } else {
    const P* pf = pre;
    const P* pi = pre + D;
    const P* pp = pre + 2 * D;
#pragma GCC ivdep
    for (int64_t d = d0; d < d1; ++d) {
      float kf = load(pf + d) + bias[d], ki = load(pi + d) + bias[D + d];
      float a, i, c, dc;
      if (KIND == 1) {
        float u, v, r;
        normalized(kf, ki, a, i, u, v, r);
      } else {
        float na, ni;
        sigmoid_pair(kf, a, na);
        sigmoid_pair(ki, i, ni);
      }
      candidate<CAND>(load(pp + d) + bias[2 * D + d], c, dc);
      h[d] = a * h[d] + i * c;
      out[d] = h[d];
    }
  }
}

// The adjoint of one step for features [d0, d1): s is the cotangent of the
// state after this step's successor (updated to a_t * lam_t), g the output
// cotangent, hp the previous state; dpre gets the pre-activation cotangents,
// dbias accumulates them.
template <int KIND, int CAND, typename P>
inline void step_backward(const P* __restrict pre, const float* __restrict bias,
                          const float* __restrict g, const float* __restrict hp,
                          float* __restrict s, P* __restrict dpre,
                          float* __restrict dbias, int64_t D, int64_t d0, int64_t d1) {
  if (KIND == 0) {
#pragma GCC ivdep
    for (int64_t d = d0; d < d1; ++d) {
      float z, a, c, dc;
      sigmoid_pair(load(pre + d) + bias[d], z, a);
      candidate<CAND>(load(pre + D + d) + bias[D + d], c, dc);
      float lam = g[d] + s[d];
      float dk = lam * (z * a) * (c - hp[d]);
      float dp = lam * z * dc;
      s[d] = a * lam;
      store(dpre + d, dk);
      store(dpre + D + d, dp);
      dbias[d] += dk;
      dbias[D + d] += dp;
    }
  } else {
#pragma GCC ivdep
    for (int64_t d = d0; d < d1; ++d) {
      float kf = load(pre + d) + bias[d], ki = load(pre + D + d) + bias[D + d];
      float c, dc;
      candidate<CAND>(load(pre + 2 * D + d) + bias[2 * D + d], c, dc);
      float lam = g[d] + s[d];
      float da = lam * hp[d];  // cotangent of a
      float di = lam * c;      // cotangent of the input gate
      float a, i, dkf, dki;
      if (KIND == 1) {
        float u, v, r;
        normalized(kf, ki, a, i, u, v, r);
        // With m held fixed (the gates do not depend on it): d a / d u = -a r,
        // d a / d v = i r, d i / d u = a r, d i / d v = -i r, and
        // d u / d kf = -u, d v / d ki = -v.
        dkf = -u * (a * r * (di - da));
        dki = -v * (i * r * (da - di));
      } else {
        float na, ni;
        sigmoid_pair(kf, a, na);
        sigmoid_pair(ki, i, ni);
        dkf = da * (a * na);
        dki = di * (i * ni);
      }
      float dp = lam * i * dc;
      s[d] = a * lam;
      store(dpre + d, dkf);
      store(dpre + D + d, dki);
      store(dpre + 2 * D + d, dp);
      dbias[d] += dkf;
      dbias[D + d] += dki;
      dbias[2 * D + d] += dp;
    }
  }
}

template <typename P>
struct ForwardArgs {
  Shape sh;
  bool reverse;
  const P* pre;
  const float* bias;
  const float* h0;
  float* h_last;
  float* h;
};

template <int KIND, int CAND, typename P>
void forward_range(const ForwardArgs<P>& A, int64_t d0, int64_t d1) {
  const Shape& S = A.sh;
  const int64_t nD = S.n * S.D;
  for (int64_t b = 0; b < S.B; ++b) {
    float* h = A.h_last + b * S.D;
    std::copy(A.h0 + b * S.D + d0, A.h0 + b * S.D + d1, h + d0);
    for (int64_t i = 0; i < S.T; ++i) {
      const int64_t row = b * S.T + (A.reverse ? S.T - 1 - i : i);
      step_forward<KIND, CAND, P>(A.pre + row * nD, A.bias, h, A.h + row * S.D, S.D, d0, d1);
    }
  }
}

template <typename P>
struct BackwardArgs {
  Shape sh;
  int64_t start;
  bool reverse;
  const P* pre_buf;
  const float* bias;
  const float* h_buf;
  const float* h0;
  const float* g;
  const float* dh;
  P* dpre;
  float* dh_out;
  float* dbias;
};

template <int KIND, int CAND, typename P>
void backward_range(const BackwardArgs<P>& A, int64_t d0, int64_t d1) {
  const Shape& S = A.sh;
  const int64_t nD = S.n * S.D;
  std::fill(A.dbias + d0, A.dbias + d1, 0.0f);
  for (int64_t c = 1; c < S.n; ++c) {
    std::fill(A.dbias + c * S.D + d0, A.dbias + c * S.D + d1, 0.0f);
  }
  for (int64_t b = 0; b < S.B; ++b) {
    float* s = A.dh_out + b * S.D;
    std::copy(A.dh + b * S.D + d0, A.dh + b * S.D + d1, s + d0);
    // Against scan order: the forward scan's last step of the tile first.
    for (int64_t i = 0; i < S.L; ++i) {
      const int64_t t = A.reverse ? i : S.L - 1 - i;
      const int64_t gt = A.start + t;  // step in the sequence
      const int64_t row = b * S.T + gt;
      const int64_t prev = A.reverse ? gt + 1 : gt - 1;
      const float* hp = (prev < 0 || prev >= S.T) ? A.h0 + b * S.D
                                                  : A.h_buf + (b * S.T + prev) * S.D;
      step_backward<KIND, CAND, P>(A.pre_buf + row * nD, A.bias, A.g + row * S.D, hp, s,
                                A.dpre + (b * S.L + t) * nD, A.dbias, S.D, d0, d1);
    }
  }
}

// Runs fn(d0, d1) over [0, D) in chunks, on the calling thread and the pool.
// The pool's tasks and the caller claim chunks from a shared counter, so the
// call finishes even if no pool thread ever runs (no waiting on a task that
// has not started); the shared state outlives tasks that start late.
template <typename Fn>
void parallel_features(ffi::ThreadPool& pool, int64_t D, Fn fn) {
  constexpr int64_t kMinChunk = 64;
  int64_t workers = std::max<int64_t>(1, pool.num_threads());
  int64_t chunks = std::min<int64_t>(std::max<int64_t>(workers, 1), D / kMinChunk);
  if (chunks <= 1) {
    fn(0, D);
    return;
  }
  // Chunk boundaries on multiples of 16 floats (whole vectors).
  auto bound = [D, chunks](int64_t c) {
    return c == chunks ? D : std::min(D, (D * c / chunks) / 16 * 16);
  };
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, chunks, bound, fn]() {
    int64_t c;
    while ((c = state->next.fetch_add(1)) < chunks) {
      fn(bound(c), bound(c + 1));
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t w = 1; w < chunks; ++w) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

template <typename Args, template <int, int> class Runner>
ffi::Error dispatch(int32_t kind, int32_t cand, ffi::ThreadPool& pool, const Args& args) {
  auto run = [&](auto fn) {
    parallel_features(pool, args.sh.D, [&args, fn](int64_t d0, int64_t d1) { fn(args, d0, d1); });
  };
  switch (kind * 2 + cand) {
    case 0: run(Runner<0, 0>::fn); break;
    case 1: run(Runner<0, 1>::fn); break;
    case 2: run(Runner<1, 0>::fn); break;
    case 3: run(Runner<1, 1>::fn); break;
    case 4: run(Runner<2, 0>::fn); break;
    case 5: run(Runner<2, 1>::fn); break;
    default:
      return ffi::Error::InvalidArgument("gates kernel: kind must be 0..2 and cand 0..1");
  }
  return ffi::Error::Success();
}

template <typename P>
struct ForwardRunners {
  template <int KIND, int CAND>
  struct Runner {
    static void fn(const ForwardArgs<P>& a, int64_t d0, int64_t d1) {
      forward_range<KIND, CAND, P>(a, d0, d1);
    }
  };
};

template <typename P>
struct BackwardRunners {
  template <int KIND, int CAND>
  struct Runner {
    static void fn(const BackwardArgs<P>& a, int64_t d0, int64_t d1) {
      backward_range<KIND, CAND, P>(a, d0, d1);
    }
  };
};

int64_t gate_blocks(int32_t kind) { return kind == 0 ? 2 : 3; }

ffi::Error check_start(int64_t start, int64_t L, int64_t T) {
  if (start < 0 || start + L > T) {
    return ffi::Error::InvalidArgument("gates kernel: tile [" + std::to_string(start) + ", " +
                                       std::to_string(start + L) + ") outside [0, " +
                                       std::to_string(T) + ")");
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using Start = ffi::Buffer<ffi::S32, 0>;

template <typename P>
ffi::Error forward_typed(ffi::ThreadPool& pool, ffi::AnyBuffer pre, F32 bias, F32 h0,
                         ffi::Result<F32> h_last, ffi::Result<F32> h, int32_t kind,
                         int32_t cand, int32_t reverse) {
  auto pd = pre.dimensions();
  auto hd = h->dimensions();
  if (pd.size() != 3 || hd.size() != 3) {
    return ffi::Error::InvalidArgument("gates_forward: pre and h must be rank 3");
  }
  Shape sh{pd[0], pd[1], pd[1], hd[2], gate_blocks(kind)};
  if (pd[2] != sh.n * sh.D || hd[0] != sh.B || hd[1] != sh.T ||
      bias.element_count() != size_t(sh.n * sh.D) ||
      h0.element_count() != size_t(sh.B * sh.D)) {
    return ffi::Error::InvalidArgument("gates_forward: shapes do not match");
  }
  ForwardArgs<P> args{sh, reverse != 0, reinterpret_cast<const P*>(pre.untyped_data()),
                      bias.typed_data(), h0.typed_data(), h_last->typed_data(),
                      h->typed_data()};
  return dispatch<ForwardArgs<P>, ForwardRunners<P>::template Runner>(kind, cand, pool, args);
}

ffi::Error GatesForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer pre, F32 bias, F32 h0,
                            ffi::Result<F32> h_last, ffi::Result<F32> h, int32_t kind,
                            int32_t cand, int32_t reverse) {
  switch (pre.element_type()) {
    case ffi::DataType::F32:
      return forward_typed<float>(pool, pre, bias, h0, h_last, h, kind, cand, reverse);
    case ffi::DataType::BF16:
      return forward_typed<uint16_t>(pool, pre, bias, h0, h_last, h, kind, cand, reverse);
    default:
      return ffi::Error::InvalidArgument("gates_forward: pre must be float32 or bfloat16");
  }
}

template <typename P>
ffi::Error backward_typed(ffi::ThreadPool& pool, ffi::AnyBuffer pre_buf, F32 bias, F32 h_buf,
                          F32 h0, F32 g, F32 dh, Start start, ffi::Result<ffi::AnyBuffer> dpre,
                          ffi::Result<F32> dh_out, ffi::Result<F32> dbias, int32_t kind,
                          int32_t cand, int32_t reverse) {
  auto hd = h_buf.dimensions();
  auto dd = dpre->dimensions();
  if (dd.size() != 3 || hd.size() != 3) {
    return ffi::Error::InvalidArgument("gates_backward: dpre and h_buf must be rank 3");
  }
  Shape sh{dd[0], dd[1], hd[1], hd[2], gate_blocks(kind)};
  if (dd[2] != sh.n * sh.D || hd[0] != sh.B ||
      pre_buf.element_count() != size_t(sh.B * sh.T * sh.n * sh.D) ||
      g.element_count() != h_buf.element_count() ||
      bias.element_count() != size_t(sh.n * sh.D)) {
    return ffi::Error::InvalidArgument("gates_backward: shapes do not match");
  }
  int64_t s0 = static_cast<int64_t>(*start.typed_data());
  if (auto e = check_start(s0, sh.L, sh.T); !e.success()) return e;
  BackwardArgs<P> args{sh, s0, reverse != 0,
                       reinterpret_cast<const P*>(pre_buf.untyped_data()), bias.typed_data(),
                       h_buf.typed_data(), h0.typed_data(), g.typed_data(), dh.typed_data(),
                       reinterpret_cast<P*>(dpre->untyped_data()), dh_out->typed_data(),
                       dbias->typed_data()};
  return dispatch<BackwardArgs<P>, BackwardRunners<P>::template Runner>(kind, cand, pool,
                                                                         args);
}

ffi::Error GatesBackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer pre_buf, F32 bias,
                             F32 h_buf, F32 h0, F32 g, F32 dh, Start start,
                             ffi::Result<ffi::AnyBuffer> dpre, ffi::Result<F32> dh_out,
                             ffi::Result<F32> dbias, int32_t kind, int32_t cand,
                             int32_t reverse) {
  if (pre_buf.element_type() != dpre->element_type()) {
    return ffi::Error::InvalidArgument("gates_backward: pre_buf and dpre types differ");
  }
  switch (pre_buf.element_type()) {
    case ffi::DataType::F32:
      return backward_typed<float>(pool, pre_buf, bias, h_buf, h0, g, dh, start, dpre, dh_out,
                                   dbias, kind, cand, reverse);
    case ffi::DataType::BF16:
      return backward_typed<uint16_t>(pool, pre_buf, bias, h_buf, h0, g, dh, start, dpre,
                                      dh_out, dbias, kind, cand, reverse);
    default:
      return ffi::Error::InvalidArgument("gates_backward: pre_buf must be float32 or bfloat16");
  }
}

// A buffer the caller fills completely: XLA allocates it, nothing writes it
// (the zero-fill of jnp.zeros is a full pass over memory).
ffi::Error EmptyImpl(ffi::Result<ffi::AnyBuffer> out) {
  (void)out;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmrGatesForward, GatesForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<int32_t>("kind")
                                  .Attr<int32_t>("cand")
                                  .Attr<int32_t>("reverse"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmrGatesBackward, GatesBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<Start>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<int32_t>("kind")
                                  .Attr<int32_t>("cand")
                                  .Attr<int32_t>("reverse"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FmrEmpty, EmptyImpl, ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());
