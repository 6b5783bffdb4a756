// autotp's CPU kernels, registered with the dispatcher as torch.ops.autotp_kernels.*
//
// Each op is the fused form of a composite that autotp's lowered graphs run after every
// column-parallel linear or around the vocab-parallel layers:
//
//   ce_stats / ce_grad            the vocab-parallel cross-entropy: one read of the local logits
//                                 shard for max, sum of exp, target logit (and sum of logits for
//                                 label smoothing); the gradient written in one pass from the
//                                 logits themselves, so no [N, V/P] softmax copy is kept
//   masked_embedding(_backward)   range mask + lookup + zero rows, in one pass
//   bias_gelu(_backward)          gelu(x + b), erf and tanh forms
//   silu_mul(_backward)           silu(gate) * up (gated MLPs)
//
// Fake (meta) implementations and autograd are registered from Python (autotp/ops.py); the
// collectives between ce_stats and ce_grad stay in Python (autotp/loss.py).
//
// float32 loops are compiled for AVX-512, AVX2 and baseline x86-64 (gcc target_clones picks one
// at load time) and use exp/erfc written as plain arithmetic so that they vectorise; float64
// uses the C library's exp/erfc (exact enough for gradcheck); half types convert to float in
// blocks and round once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AUTOTP_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define AUTOTP_CLONES
#endif

namespace autotp {
namespace {

// ---------------------------------------------------------------------------------------------
// float math written as arithmetic (vectorisable); about 1 ulp for exp, 1.2e-7 relative for erfc

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

// exp(x): x = n ln2 + r, |r| <= ln2/2; exp(r) by a degree-6 polynomial (Cephes' expf
// coefficients); 2^n assembled in the exponent bits.  Below -87.33 it returns FLT_MIN's
// neighbourhood instead of denormals (never 0 for finite x; see the callers), NaN stays NaN.
inline float exp_f(float x) {
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  x = x < -87.3365447505531f ? -87.3365447505531f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  return p * bits_to_float(e);
}

// 0.5 * erfc(z) for z >= 0: Chebyshev fit of erfc (fractional error below 1.2e-7 everywhere,
// Numerical Recipes' erfcc), so Phi(-x) keeps its relative accuracy far into the tail.
inline float half_erfc_f(float z) {
  float t = 1.0f / (1.0f + 0.5f * z);
  float q = 0.17087277f;
  q = q * t - 0.82215223f;
  q = q * t + 1.48851587f;
  q = q * t - 1.13520398f;
  q = q * t + 0.27886807f;
  q = q * t - 0.18628806f;
  q = q * t + 0.09678418f;
  q = q * t + 0.37409196f;
  q = q * t + 1.00002368f;
  q = q * t - 1.26551223f;
  return 0.5f * t * exp_f(q - z * z);
}

constexpr float kInvSqrt2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kTanhK = 0.79788456080286535588f;  // sqrt(2 / pi)
constexpr float kTanhC = 0.044715f;

// Phi(u) for the erf form; the tanh form is written as a logistic:
//   0.5 * (1 + tanh(k (u + c u^3))) = 1 / (1 + exp(-2 k (u + c u^3)))
// (the same function, without the cancellation of 1 + tanh for negative u)
inline float cdf_erf_f(float u) {
  float e = half_erfc_f((u < 0.0f ? -u : u) * kInvSqrt2);
  return u < 0.0f ? e : 1.0f - e;
}

inline float cdf_tanh_f(float u) {
  return 1.0f / (1.0f + exp_f(-2.0f * kTanhK * (u + kTanhC * u * u * u)));
}

// ---------------------------------------------------------------------------------------------
// float32 row loops (one instance per ISA)

AUTOTP_CLONES void gelu_row_f(const float* x, const float* b, float* y, int64_t n, bool tanh_form) {
  if (tanh_form) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float u = x[j] + (b ? b[j] : 0.0f);
      y[j] = u * cdf_tanh_f(u);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float u = x[j] + (b ? b[j] : 0.0f);
      y[j] = u * cdf_erf_f(u);
    }
  }
}

AUTOTP_CLONES void gelu_bwd_row_f(const float* g, const float* x, const float* b, float* dx, int64_t n,
                                  bool tanh_form) {
  if (tanh_form) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float u = x[j] + (b ? b[j] : 0.0f);
      // s = sigma(2t), t = k (u + c u^3); d s/du = 2 s (1 - s) t', with 1 - s = e s (e = exp(-2t))
      // rather than 1 - s, which cancels where s is near 1
      float e = exp_f(-2.0f * kTanhK * (u + kTanhC * u * u * u));
      float s = 1.0f / (1.0f + e);
      float dt = kTanhK * (1.0f + 3.0f * kTanhC * u * u);
      dx[j] = g[j] * (s + u * 2.0f * ((e * s) * s) * dt);  // e s <= 1: no overflow
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float u = x[j] + (b ? b[j] : 0.0f);
      float pdf = kInvSqrt2Pi * exp_f(-0.5f * u * u);
      dx[j] = g[j] * (cdf_erf_f(u) + u * pdf);
    }
  }
}

AUTOTP_CLONES void silu_mul_row_f(const float* gate, const float* up, float* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float a = gate[j];
    y[j] = a / (1.0f + exp_f(-a)) * up[j];
  }
}

AUTOTP_CLONES void silu_mul_bwd_row_f(const float* g, const float* gate, const float* up, float* dgate,
                                      float* dup, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float a = gate[j];
    float e = exp_f(-a);
    float s = 1.0f / (1.0f + e);  // 1 - s = e s, without cancellation
    dup[j] = g[j] * a * s;
    dgate[j] = g[j] * up[j] * s * (1.0f + a * (e * s));
  }
}

// max, sum of exp(x - max), and (smoothing) the sum over the first `valid` columns
AUTOTP_CLONES void ce_stats_row_f(const float* x, int64_t valid, bool smoothing, float* out) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < valid; ++j) m = x[j] > m ? x[j] : m;
  // the sums accumulate in double: a float sum over a vocabulary's worth of terms drifts by ~sqrt(V)
  // ulps (2e-6 relative at V = 1000 in AVX2's 8 lanes), more than the 1e-6 promised
  double s = 0.0;
  if (m > -std::numeric_limits<float>::infinity()) {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < valid; ++j) s += static_cast<double>(exp_f(x[j] - m));
  }
  double sx = 0.0;
  if (smoothing) {
#pragma omp simd reduction(+ : sx)
    for (int64_t j = 0; j < valid; ++j) sx += static_cast<double>(x[j]);
  }
  out[0] = m;
  out[1] = static_cast<float>(s);
  out[3] = static_cast<float>(sx);
}

// dx = a * exp(x - M) - c on the first `valid` columns, 0 on the padding
AUTOTP_CLONES void ce_grad_row_f(const float* x, int64_t valid, int64_t n, float M, float a, float c, float* dx) {
#pragma omp simd
  for (int64_t j = 0; j < valid; ++j) dx[j] = a * exp_f(x[j] - M) - c;
  for (int64_t j = valid; j < n; ++j) dx[j] = 0.0f;
}

// ---------------------------------------------------------------------------------------------
// float64: the C library's functions (gradcheck needs better than float accuracy)

inline double cdf_erf_d(double u) { return 0.5 * std::erfc(-u * 0.70710678118654752440); }
inline double cdf_tanh_d(double u) { return 1.0 / (1.0 + std::exp(-2.0 * 0.79788456080286535588 * (u + 0.044715 * u * u * u))); }

void gelu_row_d(const double* x, const double* b, double* y, int64_t n, bool tanh_form) {
  for (int64_t j = 0; j < n; ++j) {
    double u = x[j] + (b ? b[j] : 0.0);
    y[j] = u * (tanh_form ? cdf_tanh_d(u) : cdf_erf_d(u));
  }
}

void gelu_bwd_row_d(const double* g, const double* x, const double* b, double* dx, int64_t n, bool tanh_form) {
  for (int64_t j = 0; j < n; ++j) {
    double u = x[j] + (b ? b[j] : 0.0);
    if (tanh_form) {
      double v = 2.0 * 0.79788456080286535588 * (u + 0.044715 * u * u * u);
      double s = 1.0 / (1.0 + std::exp(-v)), one_minus_s = 1.0 / (1.0 + std::exp(v));  // each without cancellation
      dx[j] = g[j] * (s + u * 2.0 * s * one_minus_s * 0.79788456080286535588 * (1.0 + 3.0 * 0.044715 * u * u));
    } else {
      dx[j] = g[j] * (cdf_erf_d(u) + u * 0.39894228040143267794 * std::exp(-0.5 * u * u));
    }
  }
}

void silu_mul_row_d(const double* gate, const double* up, double* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = gate[j] / (1.0 + std::exp(-gate[j])) * up[j];
}

void silu_mul_bwd_row_d(const double* g, const double* gate, const double* up, double* dgate, double* dup,
                        int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    double a = gate[j], s = 1.0 / (1.0 + std::exp(-a)), one_minus_s = 1.0 / (1.0 + std::exp(a));
    dup[j] = g[j] * a * s;
    dgate[j] = g[j] * up[j] * s * (1.0 + a * one_minus_s);
  }
}

void ce_stats_row_d(const double* x, int64_t valid, bool smoothing, double* out) {
  double m = -std::numeric_limits<double>::infinity(), s = 0.0, sx = 0.0;
  for (int64_t j = 0; j < valid; ++j) m = x[j] > m ? x[j] : m;
  if (m > -std::numeric_limits<double>::infinity())
    for (int64_t j = 0; j < valid; ++j) s += std::exp(x[j] - m);
  if (smoothing)
    for (int64_t j = 0; j < valid; ++j) sx += x[j];
  out[0] = m;
  out[1] = s;
  out[3] = sx;
}

void ce_grad_row_d(const double* x, int64_t valid, int64_t n, double M, double a, double c, double* dx) {
  for (int64_t j = 0; j < valid; ++j) dx[j] = a * std::exp(x[j] - M) - c;
  for (int64_t j = valid; j < n; ++j) dx[j] = 0.0;
}

// ---------------------------------------------------------------------------------------------
// dtype plumbing: run a float row function over any floating dtype, a block of columns at a time

constexpr int64_t kBlock = 1024;

template <typename T>
inline void load_f(const T* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename T>
inline void store_f(const float* src, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

void check_float_dtype(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "autotp_kernels::", op, ": ", what,
              " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "autotp_kernels::", op, ": ", what, " must be on the CPU here, got ", t.device());
}

bool tanh_form_of(c10::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "autotp_kernels::bias_gelu: approximate must be 'none' or 'tanh', got '", std::string(approximate), "'");
  return approximate == "tanh";
}

// Row-wise elementwise op over [rows, n] with up to three inputs and two outputs; `bias`
// (length n, nullptr for none) is shared by every row.  fn_f / fn_d: the float / double kernels.
template <typename scalar_t, typename FnF, typename FnD>
void rowwise_typed(int64_t rows, int64_t n, const std::vector<const at::Tensor*>& ins, const at::Tensor* bias,
                   const std::vector<at::Tensor*>& outs, FnF fn_f, FnD fn_d) {
  std::vector<const scalar_t*> in_ptr;
  for (auto* t : ins) in_ptr.push_back(t->data_ptr<scalar_t>());
  std::vector<scalar_t*> out_ptr;
  for (auto* t : outs) out_ptr.push_back(t->data_ptr<scalar_t>());
  const scalar_t* bp = bias ? bias->data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* a[3] = {nullptr, nullptr, nullptr};
        scalar_t* o[2] = {nullptr, nullptr};
        for (size_t k = 0; k < in_ptr.size(); ++k) a[k] = in_ptr[k] + r * n;
        for (size_t k = 0; k < out_ptr.size(); ++k) o[k] = out_ptr[k] + r * n;
        if constexpr (std::is_same_v<scalar_t, float>) fn_f(a, bp, o, n);
        else fn_d(a, bp, o, n);
      }
    } else {  // half types: blocks of kBlock columns converted to float, computed, rounded once
      std::vector<float> buf(6 * kBlock);
      float* buf_in[3] = {buf.data(), buf.data() + kBlock, buf.data() + 2 * kBlock};
      float* buf_b = buf.data() + 3 * kBlock;
      float* buf_out[2] = {buf.data() + 4 * kBlock, buf.data() + 5 * kBlock};
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
          const int64_t m = std::min(kBlock, n - j0);
          const float* a[3] = {buf_in[0], buf_in[1], buf_in[2]};
          for (size_t k = 0; k < in_ptr.size(); ++k) load_f(in_ptr[k] + r * n + j0, buf_in[k], m);
          if (bp) load_f(bp + j0, buf_b, m);
          fn_f(a, bp ? buf_b : nullptr, buf_out, m);
          for (size_t k = 0; k < out_ptr.size(); ++k) store_f(buf_out[k], out_ptr[k] + r * n + j0, m);
        }
      }
    }
  });
}

template <typename FnF, typename FnD>
void rowwise(const at::Tensor& x, int64_t n, std::vector<const at::Tensor*> ins, const at::Tensor* bias,
             std::vector<at::Tensor*> outs, FnF fn_f, FnD fn_d) {
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "autotp_rowwise", [&] {
    rowwise_typed<scalar_t>(rows, n, ins, bias, outs, fn_f, fn_d);
  });
}

// ---------------------------------------------------------------------------------------------
// the ops

at::Tensor bias_gelu(const at::Tensor& x_, const c10::optional<at::Tensor>& bias_, c10::string_view approximate) {
  check_float_dtype(x_, "bias_gelu", "x");
  const bool th = tanh_form_of(approximate);
  at::Tensor x = x_.contiguous();
  const int64_t n = x.dim() ? x.size(-1) : 1;
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == n, "autotp_kernels::bias_gelu: bias must have shape [", n,
                "] (x's last dim), got ", bias_->sizes());
    bias = bias_->to(x.scalar_type()).contiguous();
  }
  at::Tensor y = at::empty_like(x);
  rowwise(x, n, {&x}, bias.defined() ? &bias : nullptr, {&y},
          [th](const float** a, const float* b, float** o, int64_t m) { gelu_row_f(a[0], b, o[0], m, th); },
          [th](const double** a, const double* b, double** o, int64_t m) { gelu_row_d(a[0], b, o[0], m, th); });
  return y;
}

at::Tensor bias_gelu_backward(const at::Tensor& grad_, const at::Tensor& x_, const c10::optional<at::Tensor>& bias_,
                              c10::string_view approximate) {
  check_float_dtype(x_, "bias_gelu_backward", "x");
  TORCH_CHECK(grad_.sizes() == x_.sizes(), "autotp_kernels::bias_gelu_backward: grad ", grad_.sizes(),
              " and x ", x_.sizes(), " differ");
  const bool th = tanh_form_of(approximate);
  at::Tensor x = x_.contiguous(), g = grad_.to(x.scalar_type()).contiguous();
  const int64_t n = x.dim() ? x.size(-1) : 1;
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) bias = bias_->to(x.scalar_type()).contiguous();
  at::Tensor dx = at::empty_like(x);
  rowwise(x, n, {&g, &x}, bias.defined() ? &bias : nullptr, {&dx},
          [th](const float** a, const float* b, float** o, int64_t m) { gelu_bwd_row_f(a[0], a[1], b, o[0], m, th); },
          [th](const double** a, const double* b, double** o, int64_t m) { gelu_bwd_row_d(a[0], a[1], b, o[0], m, th); });
  return dx;
}

at::Tensor silu_mul(const at::Tensor& gate_, const at::Tensor& up_) {
  check_float_dtype(gate_, "silu_mul", "gate");
  TORCH_CHECK(gate_.sizes() == up_.sizes(), "autotp_kernels::silu_mul: gate ", gate_.sizes(), " and up ",
              up_.sizes(), " must have the same shape");
  at::Tensor gate = gate_.contiguous(), up = up_.to(gate.scalar_type()).contiguous();
  const int64_t n = gate.dim() ? gate.size(-1) : 1;
  at::Tensor y = at::empty_like(gate);
  rowwise(gate, n, {&gate, &up}, nullptr, {&y},
          [](const float** a, const float*, float** o, int64_t m) { silu_mul_row_f(a[0], a[1], o[0], m); },
          [](const double** a, const double*, double** o, int64_t m) { silu_mul_row_d(a[0], a[1], o[0], m); });
  return y;
}

std::tuple<at::Tensor, at::Tensor> silu_mul_backward(const at::Tensor& grad_, const at::Tensor& gate_,
                                                     const at::Tensor& up_) {
  check_float_dtype(gate_, "silu_mul_backward", "gate");
  at::Tensor gate = gate_.contiguous(), up = up_.to(gate.scalar_type()).contiguous();
  at::Tensor g = grad_.to(gate.scalar_type()).contiguous();
  TORCH_CHECK(g.sizes() == gate.sizes() && up.sizes() == gate.sizes(),
              "autotp_kernels::silu_mul_backward: grad ", g.sizes(), ", gate ", gate.sizes(), " and up ", up.sizes(),
              " must have the same shape");
  const int64_t n = gate.dim() ? gate.size(-1) : 1;
  at::Tensor dgate = at::empty_like(gate), dup = at::empty_like(gate);
  rowwise(gate, n, {&g, &gate, &up}, nullptr, {&dgate, &dup},
          [](const float** a, const float*, float** o, int64_t m) { silu_mul_bwd_row_f(a[0], a[1], a[2], o[0], o[1], m); },
          [](const double** a, const double*, double** o, int64_t m) { silu_mul_bwd_row_d(a[0], a[1], a[2], o[0], o[1], m); });
  return {dgate, dup};
}

void check_ce_args(const at::Tensor& logits, const at::Tensor& target, int64_t valid, const char* op) {
  check_float_dtype(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 2, "autotp_kernels::", op, ": logits must be [rows, local vocab], got ", logits.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.scalar_type() == at::kLong,
              "autotp_kernels::", op, ": target must be int64 [", logits.size(0), "], got ", target.scalar_type(), " ",
              target.sizes());
  TORCH_CHECK(valid >= 0 && valid <= logits.size(1), "autotp_kernels::", op, ": valid (", valid,
              ") must be in [0, ", logits.size(1), "]");
}

template <typename scalar_t>
void ce_stats_typed(const at::Tensor& logits, const int64_t* t, int64_t valid, bool smoothing, at::Tensor& out) {
  const int64_t rows = logits.size(0), n = logits.size(1);
  const scalar_t* x = logits.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> row;
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = x + r * n;
      const int64_t tr = t[r];
      const bool owned = tr >= 0 && tr < valid;
      if constexpr (std::is_same_v<scalar_t, double>) {
        double* o = out.data_ptr<double>() + r * 4;
        ce_stats_row_d(xr, valid, smoothing, o);
        o[2] = owned ? xr[tr] : 0.0;
      } else {
        float* o = out.data_ptr<float>() + r * 4;
        const float* xf;
        if constexpr (std::is_same_v<scalar_t, float>) {
          xf = xr;
        } else {
          row.resize(valid);
          load_f(xr, row.data(), valid);
          xf = row.data();
        }
        ce_stats_row_f(xf, valid, smoothing, o);
        o[2] = owned ? static_cast<float>(xr[tr]) : 0.0f;
      }
    }
  });
}

// [rows, 4] in float (double for double logits): local max, sum exp(x - local max), the logit at
// target (0 where target is outside [0, valid): another rank owns it, or the row is ignored), and
// the sum of the valid logits (only when smoothing, else 0)
at::Tensor ce_stats(const at::Tensor& logits_, const at::Tensor& target_, int64_t valid, bool smoothing) {
  check_ce_args(logits_, target_, valid, "ce_stats");
  at::Tensor logits = logits_.contiguous(), target = target_.contiguous();
  const int64_t rows = logits.size(0);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({rows, 4}, logits.options().dtype(acc));
  const int64_t* t = target.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "autotp_ce_stats", [&] {
    ce_stats_typed<scalar_t>(logits, t, valid, smoothing, out);
  });
  return out;
}

template <typename scalar_t>
void ce_grad_typed(const at::Tensor& logits, const int64_t* t, int64_t valid, const at::Tensor& coef, at::Tensor& dx) {
  const int64_t rows = logits.size(0), n = logits.size(1);
  const scalar_t* x = logits.data_ptr<scalar_t>();
  scalar_t* d = dx.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> xin, dout;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t tr = t[r];
      const bool owned = tr >= 0 && tr < valid;
      if constexpr (std::is_same_v<scalar_t, double>) {
        const double* k = coef.data_ptr<double>() + r * 4;
        ce_grad_row_d(x + r * n, valid, n, k[0], k[1], k[3], d + r * n);
        if (owned) d[r * n + tr] -= k[2];
      } else {
        const float* k = coef.data_ptr<float>() + r * 4;
        if constexpr (std::is_same_v<scalar_t, float>) {
          ce_grad_row_f(x + r * n, valid, n, k[0], k[1], k[3], d + r * n);
          if (owned) d[r * n + tr] -= k[2];
        } else {
          xin.resize(n);
          dout.resize(n);
          load_f(x + r * n, xin.data(), valid);
          ce_grad_row_f(xin.data(), valid, n, k[0], k[1], k[3], dout.data());
          if (owned) dout[tr] -= k[2];
          store_f(dout.data(), d + r * n, n);
        }
      }
    }
  });
}

// The gradient of the vocab-parallel cross-entropy on the local columns, in logits' dtype:
//   dx[r, c] = a_r * exp(x[r, c] - M_r) - c_r - b_r * [c == target_r]   (c < valid; 0 beyond)
// with coef[r] = (M_r, a_r, b_r, c_r): the global max, g_r / Z_r, g_r (1 - eps), g_r eps / V.
at::Tensor ce_grad(const at::Tensor& logits_, const at::Tensor& target_, int64_t valid, const at::Tensor& coef_) {
  check_ce_args(logits_, target_, valid, "ce_grad");
  const int64_t rows = logits_.size(0);
  const auto acc = logits_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coef_.dim() == 2 && coef_.size(0) == rows && coef_.size(1) == 4,
              "autotp_kernels::ce_grad: coef must be [", rows, ", 4], got ", coef_.sizes());
  at::Tensor logits = logits_.contiguous(), target = target_.contiguous(), coef = coef_.to(acc).contiguous();
  at::Tensor dx = at::empty_like(logits);
  const int64_t* t = target.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "autotp_ce_grad", [&] {
    ce_grad_typed<scalar_t>(logits, t, valid, coef, dx);
  });
  return dx;
}

// weight[ids - start] where 0 <= ids - start < weight.size(0), zero rows elsewhere (padding_idx,
// local or -1, matters to the backward only; it is in the schema so that autograd has it)
at::Tensor masked_embedding(const at::Tensor& weight_, const at::Tensor& ids_, int64_t start, int64_t /*padding_idx*/) {
  TORCH_CHECK(weight_.dim() == 2, "autotp_kernels::masked_embedding: weight must be [rows, dim], got ", weight_.sizes());
  TORCH_CHECK(ids_.scalar_type() == at::kLong || ids_.scalar_type() == at::kInt,
              "autotp_kernels::masked_embedding: ids must be int64 or int32, got ", ids_.scalar_type());
  TORCH_CHECK(weight_.device().is_cpu(), "autotp_kernels::masked_embedding: weight must be on the CPU here");
  at::Tensor weight = weight_.contiguous(), ids = ids_.to(at::kLong).contiguous();
  const int64_t rows = weight.size(0), dim = weight.size(1), n = ids.numel();
  auto sizes = ids.sizes().vec();
  sizes.push_back(dim);
  at::Tensor out = at::empty(sizes, weight.options());
  const int64_t* id = ids.data_ptr<int64_t>();
  const size_t row_bytes = dim * weight.element_size();
  const char* w = static_cast<const char*>(weight.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t l = id[i] - start;
      if (l >= 0 && l < rows) std::memcpy(o + i * row_bytes, w + l * row_bytes, row_bytes);
      else std::memset(o + i * row_bytes, 0, row_bytes);  // all-zero bits: +0.0 in every floating dtype
    }
  });
  return out;
}

template <typename scalar_t>
void embedding_backward_typed(const at::Tensor& grad, const int64_t* id, int64_t n, int64_t start, int64_t rows,
                              int64_t padding_idx, at::Tensor& acc) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t dim = acc.size(1);
  const scalar_t* g = grad.data_ptr<scalar_t>();
  acc_t* a = acc.data_ptr<acc_t>();
  at::parallel_for(0, dim, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t l = id[i] - start;
      if (l < 0 || l >= rows || l == padding_idx) continue;
      acc_t* ar = a + l * dim;
      const scalar_t* gr = g + i * dim;
      for (int64_t c = c0; c < c1; ++c) ar[c] += static_cast<acc_t>(gr[c]);
    }
  });
}

// d weight [rows, dim]: the rows of grad summed by local id (ids outside the range and
// padding_idx (local; -1 for none) contribute nothing); each thread owns a block of columns,
// so the sums run in token order on every run
at::Tensor masked_embedding_backward(const at::Tensor& grad_, const at::Tensor& ids_, int64_t start, int64_t rows,
                                     int64_t padding_idx) {
  check_float_dtype(grad_, "masked_embedding_backward", "grad");
  at::Tensor ids = ids_.to(at::kLong).contiguous();
  const int64_t n = ids.numel();
  TORCH_CHECK(grad_.numel() % std::max<int64_t>(n, 1) == 0 && grad_.dim() >= 1,
              "autotp_kernels::masked_embedding_backward: grad ", grad_.sizes(), " does not fit ids ", ids_.sizes());
  const int64_t dim = grad_.size(-1);
  at::Tensor grad = grad_.contiguous();
  const bool half = grad.scalar_type() == at::kHalf || grad.scalar_type() == at::kBFloat16;
  at::Tensor acc = at::zeros({rows, dim}, grad.options().dtype(half ? at::kFloat : grad.scalar_type()));
  const int64_t* id = ids.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "autotp_embedding_backward", [&] {
    embedding_backward_typed<scalar_t>(grad, id, n, start, rows, padding_idx, acc);
  });
  return half ? acc.to(grad.scalar_type()) : acc;
}

}  // namespace
}  // namespace autotp

TORCH_LIBRARY(autotp_kernels, m) {
  m.def("bias_gelu(Tensor x, Tensor? bias, str approximate) -> Tensor");
  m.def("bias_gelu_backward(Tensor grad, Tensor x, Tensor? bias, str approximate) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("silu_mul_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("ce_stats(Tensor logits, Tensor target, int valid, bool smoothing) -> Tensor");
  m.def("ce_grad(Tensor logits, Tensor target, int valid, Tensor coef) -> Tensor");
  m.def("masked_embedding(Tensor weight, Tensor ids, int start, int padding_idx) -> Tensor");
  m.def("masked_embedding_backward(Tensor grad, Tensor ids, int start, int rows, int padding_idx) -> Tensor");
}

TORCH_LIBRARY_IMPL(autotp_kernels, CPU, m) {
  m.impl("bias_gelu", &autotp::bias_gelu);
  m.impl("bias_gelu_backward", &autotp::bias_gelu_backward);
  m.impl("silu_mul", &autotp::silu_mul);
  m.impl("silu_mul_backward", &autotp::silu_mul_backward);
  m.impl("ce_stats", &autotp::ce_stats);
  m.impl("ce_grad", &autotp::ce_grad);
  m.impl("masked_embedding", &autotp::masked_embedding);
  m.impl("masked_embedding_backward", &autotp::masked_embedding_backward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "autotp's CPU kernels; importing this module registers torch.ops.autotp_kernels.*";
  m.def("isa", [] {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return "avx512f";
    if (__builtin_cpu_supports("avx2")) return "avx2";
#endif
    return "baseline";
  }, "the instruction set the float32 loops run with on this CPU");
}
