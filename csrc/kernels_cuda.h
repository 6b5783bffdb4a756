// Launchers of autotp's CUDA kernels (csrc/kernels.cu), callable without CUDA or torch headers.
//
// kernels.cu depends on the CUDA toolkit only, so `nvcc -c` checks it on machines without a GPU
// or a CUDA build of torch; csrc/kernels_cuda.cpp binds these to the dispatcher's CUDA key.
// Pointers are device pointers; `stream` is a cudaStream_t; `dtype` a DType below.  Each
// launcher returns the cudaError_t of its launch as an int (0: success).
#pragma once

#include <cstdint>

namespace autotp_cuda {

enum DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

int bias_gelu(int dtype, const void* x, const void* bias, void* y, int64_t rows, int64_t n, bool tanh_form,
              void* stream);
int bias_gelu_backward(int dtype, const void* grad, const void* x, const void* bias, void* dx, int64_t rows,
                       int64_t n, bool tanh_form, void* stream);
int silu_mul(int dtype, const void* gate, const void* up, void* y, int64_t numel, void* stream);
int silu_mul_backward(int dtype, const void* grad, const void* gate, const void* up, void* dgate, void* dup,
                      int64_t numel, void* stream);
// out: [rows, 4] float (double for kDouble logits): local max, sum exp(x - max), target logit, sum x
int ce_stats(int dtype, const void* logits, const int64_t* target, int64_t rows, int64_t n, int64_t valid,
             bool smoothing, void* out, void* stream);
// coef: [rows, 4] float (double for kDouble): M, a, b, c; dx in the logits' dtype
int ce_grad(int dtype, const void* logits, const int64_t* target, int64_t rows, int64_t n, int64_t valid,
            const void* coef, void* dx, void* stream);
int masked_embedding(const void* weight, const int64_t* ids, void* out, int64_t tokens, int64_t rows,
                     int64_t row_bytes, int64_t start, void* stream);
// acc: [rows, dim] float (double for kDouble grads), zeroed by the caller; atomics, so the order of
// the sums (not their terms) varies from run to run
int masked_embedding_backward(int dtype, const void* grad, const int64_t* ids, void* acc, int64_t tokens,
                              int64_t dim, int64_t start, int64_t rows, int64_t padding_idx, void* stream);

}  // namespace autotp_cuda
