// torch.ops.autotp_kernels.* on the CUDA dispatch key: argument checks, outputs allocated on the
// tensors' device, and the launchers of csrc/kernels.cu on the current stream.  The schemas are
// defined by the CPU extension (csrc/kernels.cpp, autotp._C), which autotp imports first.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include "kernels_cuda.h"

namespace {

int dtype_code(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return autotp_cuda::kFloat;
    case at::kDouble: return autotp_cuda::kDouble;
    case at::kHalf: return autotp_cuda::kHalf;
    case at::kBFloat16: return autotp_cuda::kBFloat16;
    default: TORCH_CHECK(false, "autotp_kernels::", op, ": a floating tensor is needed, got ", t.scalar_type());
  }
}

void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check(int err, const char* op) {
  TORCH_CHECK(err == 0, "autotp_kernels::", op, " (CUDA): the kernel launch failed with cudaError ", err);
}

at::Tensor bias_arg(const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t n, const char* op) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "autotp_kernels::", op, ": bias must have shape [", n,
              "] (x's last dim), got ", bias->sizes());
  return bias->to(x.scalar_type()).contiguous();
}

bool tanh_form_of(c10::string_view approximate) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh",
              "autotp_kernels::bias_gelu: approximate must be 'none' or 'tanh', got '", std::string(approximate), "'");
  return approximate == "tanh";
}

at::Tensor bias_gelu(const at::Tensor& x_, const c10::optional<at::Tensor>& bias_, c10::string_view approximate) {
  c10::cuda::CUDAGuard guard(x_.device());
  at::Tensor x = x_.contiguous();
  const int64_t n = x.dim() ? x.size(-1) : 1;
  at::Tensor b = bias_arg(bias_, x, n, "bias_gelu"), y = at::empty_like(x);
  check(autotp_cuda::bias_gelu(dtype_code(x, "bias_gelu"), x.data_ptr(), b.defined() ? b.data_ptr() : nullptr,
                               y.data_ptr(), n ? x.numel() / n : 0, n, tanh_form_of(approximate), stream()),
        "bias_gelu");
  return y;
}

at::Tensor bias_gelu_backward(const at::Tensor& grad, const at::Tensor& x_, const c10::optional<at::Tensor>& bias_,
                              c10::string_view approximate) {
  c10::cuda::CUDAGuard guard(x_.device());
  TORCH_CHECK(grad.sizes() == x_.sizes(), "autotp_kernels::bias_gelu_backward: grad ", grad.sizes(), " and x ",
              x_.sizes(), " differ");
  at::Tensor x = x_.contiguous(), g = grad.to(x.scalar_type()).contiguous();
  const int64_t n = x.dim() ? x.size(-1) : 1;
  at::Tensor b = bias_arg(bias_, x, n, "bias_gelu_backward"), dx = at::empty_like(x);
  check(autotp_cuda::bias_gelu_backward(dtype_code(x, "bias_gelu_backward"), g.data_ptr(), x.data_ptr(),
                                        b.defined() ? b.data_ptr() : nullptr, dx.data_ptr(), n ? x.numel() / n : 0, n,
                                        tanh_form_of(approximate), stream()),
        "bias_gelu_backward");
  return dx;
}

at::Tensor silu_mul(const at::Tensor& gate_, const at::Tensor& up_) {
  c10::cuda::CUDAGuard guard(gate_.device());
  TORCH_CHECK(gate_.sizes() == up_.sizes(), "autotp_kernels::silu_mul: gate ", gate_.sizes(), " and up ", up_.sizes(),
              " must have the same shape");
  at::Tensor gate = gate_.contiguous(), up = up_.to(gate.scalar_type()).contiguous(), y = at::empty_like(gate);
  check(autotp_cuda::silu_mul(dtype_code(gate, "silu_mul"), gate.data_ptr(), up.data_ptr(), y.data_ptr(), gate.numel(),
                              stream()),
        "silu_mul");
  return y;
}

std::tuple<at::Tensor, at::Tensor> silu_mul_backward(const at::Tensor& grad, const at::Tensor& gate_,
                                                     const at::Tensor& up_) {
  c10::cuda::CUDAGuard guard(gate_.device());
  at::Tensor gate = gate_.contiguous(), up = up_.to(gate.scalar_type()).contiguous();
  at::Tensor g = grad.to(gate.scalar_type()).contiguous();
  TORCH_CHECK(g.sizes() == gate.sizes() && up.sizes() == gate.sizes(), "autotp_kernels::silu_mul_backward: grad ",
              g.sizes(), ", gate ", gate.sizes(), " and up ", up.sizes(), " must have the same shape");
  at::Tensor dgate = at::empty_like(gate), dup = at::empty_like(gate);
  check(autotp_cuda::silu_mul_backward(dtype_code(gate, "silu_mul_backward"), g.data_ptr(), gate.data_ptr(),
                                       up.data_ptr(), dgate.data_ptr(), dup.data_ptr(), gate.numel(), stream()),
        "silu_mul_backward");
  return {dgate, dup};
}

void check_ce(const at::Tensor& logits, const at::Tensor& target, int64_t valid, const char* op) {
  TORCH_CHECK(logits.dim() == 2, "autotp_kernels::", op, ": logits must be [rows, local vocab], got ", logits.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.scalar_type() == at::kLong,
              "autotp_kernels::", op, ": target must be int64 [", logits.size(0), "], got ", target.scalar_type(),
              " ", target.sizes());
  TORCH_CHECK(valid >= 0 && valid <= logits.size(1), "autotp_kernels::", op, ": valid (", valid, ") must be in [0, ",
              logits.size(1), "]");
}

at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor ce_stats(const at::Tensor& logits_, const at::Tensor& target_, int64_t valid, bool smoothing) {
  c10::cuda::CUDAGuard guard(logits_.device());
  check_ce(logits_, target_, valid, "ce_stats");
  at::Tensor logits = logits_.contiguous(), target = target_.contiguous();
  at::Tensor out = at::empty({logits.size(0), 4}, logits.options().dtype(acc_type(logits)));
  check(autotp_cuda::ce_stats(dtype_code(logits, "ce_stats"), logits.data_ptr(), target.data_ptr<int64_t>(),
                              logits.size(0), logits.size(1), valid, smoothing, out.data_ptr(), stream()),
        "ce_stats");
  return out;
}

at::Tensor ce_grad(const at::Tensor& logits_, const at::Tensor& target_, int64_t valid, const at::Tensor& coef_) {
  c10::cuda::CUDAGuard guard(logits_.device());
  check_ce(logits_, target_, valid, "ce_grad");
  TORCH_CHECK(coef_.dim() == 2 && coef_.size(0) == logits_.size(0) && coef_.size(1) == 4,
              "autotp_kernels::ce_grad: coef must be [", logits_.size(0), ", 4], got ", coef_.sizes());
  at::Tensor logits = logits_.contiguous(), target = target_.contiguous();
  at::Tensor coef = coef_.to(acc_type(logits)).contiguous(), dx = at::empty_like(logits);
  check(autotp_cuda::ce_grad(dtype_code(logits, "ce_grad"), logits.data_ptr(), target.data_ptr<int64_t>(),
                             logits.size(0), logits.size(1), valid, coef.data_ptr(), dx.data_ptr(), stream()),
        "ce_grad");
  return dx;
}

at::Tensor masked_embedding(const at::Tensor& weight_, const at::Tensor& ids_, int64_t start, int64_t /*padding_idx*/) {
  c10::cuda::CUDAGuard guard(weight_.device());
  TORCH_CHECK(weight_.dim() == 2, "autotp_kernels::masked_embedding: weight must be [rows, dim], got ", weight_.sizes());
  at::Tensor weight = weight_.contiguous(), ids = ids_.to(at::kLong).contiguous();
  auto sizes = ids.sizes().vec();
  sizes.push_back(weight.size(1));
  at::Tensor out = at::empty(sizes, weight.options());
  check(autotp_cuda::masked_embedding(weight.data_ptr(), ids.data_ptr<int64_t>(), out.data_ptr(), ids.numel(),
                                      weight.size(0), weight.size(1) * weight.element_size(), start, stream()),
        "masked_embedding");
  return out;
}

at::Tensor masked_embedding_backward(const at::Tensor& grad_, const at::Tensor& ids_, int64_t start, int64_t rows,
                                     int64_t padding_idx) {
  c10::cuda::CUDAGuard guard(grad_.device());
  at::Tensor grad = grad_.contiguous(), ids = ids_.to(at::kLong).contiguous();
  const int64_t dim = grad.size(-1);
  TORCH_CHECK(grad.numel() == ids.numel() * dim, "autotp_kernels::masked_embedding_backward: grad ", grad.sizes(),
              " does not fit ids ", ids_.sizes());
  at::Tensor acc = at::zeros({rows, dim}, grad.options().dtype(acc_type(grad)));
  check(autotp_cuda::masked_embedding_backward(dtype_code(grad, "masked_embedding_backward"), grad.data_ptr(),
                                               ids.data_ptr<int64_t>(), acc.data_ptr(), ids.numel(), dim, start, rows,
                                               padding_idx, stream()),
        "masked_embedding_backward");
  return acc.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(autotp_kernels, CUDA, m) {
  m.impl("bias_gelu", &bias_gelu);
  m.impl("bias_gelu_backward", &bias_gelu_backward);
  m.impl("silu_mul", &silu_mul);
  m.impl("silu_mul_backward", &silu_mul_backward);
  m.impl("ce_stats", &ce_stats);
  m.impl("ce_grad", &ce_grad);
  m.impl("masked_embedding", &masked_embedding);
  m.impl("masked_embedding_backward", &masked_embedding_backward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "autotp's CUDA kernels; importing this module (after autotp._C) registers their CUDA implementations";
}
