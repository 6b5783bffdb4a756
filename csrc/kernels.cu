// autotp's CUDA kernels: the same ops as csrc/kernels.cpp (see there for the math), on device
// pointers.  Half types are computed in float and rounded once; float64 in double.  No torch
// headers: kernels_cuda.cpp binds the launchers below to torch.ops.autotp_kernels.
#include "kernels_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>

namespace autotp_cuda {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type load(const T* p, int64_t i) {
  return static_cast<typename Acc<T>::type>(p[i]);
}
template <> __device__ __forceinline__ float load<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

template <typename T> __device__ __forceinline__ void store(T* p, int64_t i, typename Acc<T>::type v) { p[i] = static_cast<T>(v); }
template <> __device__ __forceinline__ void store<__half>(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
template <> __device__ __forceinline__ void store<__nv_bfloat16>(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ float ex(float v) { return expf(v); }
__device__ __forceinline__ double ex(double v) { return exp(v); }
__device__ __forceinline__ float erfc_(float v) { return erfcf(v); }
__device__ __forceinline__ double erfc_(double v) { return erfc(v); }

// gelu'(u) and gelu(u) = u * cdf(u); the tanh form as the logistic 1 / (1 + exp(-2 k (u + c u^3)))
template <typename A> __device__ __forceinline__ A cdf(A u, bool tanh_form) {
  if (tanh_form) return A(1) / (A(1) + ex(A(-2) * A(0.79788456080286535588) * (u + A(0.044715) * u * u * u)));
  return A(0.5) * erfc_(-u * A(0.70710678118654752440));
}

template <typename A> __device__ __forceinline__ A dgelu(A u, bool tanh_form) {
  if (tanh_form) {
    A v = A(2) * A(0.79788456080286535588) * (u + A(0.044715) * u * u * u);
    A s = A(1) / (A(1) + ex(-v)), one_minus_s = A(1) / (A(1) + ex(v));  // no cancellation
    return s + u * A(2) * s * one_minus_s * A(0.79788456080286535588) * (A(1) + A(3) * A(0.044715) * u * u);
  }
  return cdf(u, false) + u * A(0.39894228040143267794) * ex(A(-0.5) * u * u);
}

#define GRID_STRIDE(i, n) for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

template <typename T>
__global__ void bias_gelu_k(const T* x, const T* b, T* y, int64_t numel, int64_t n, bool tanh_form) {
  using A = typename Acc<T>::type;
  GRID_STRIDE(i, numel) {
    A u = load(x, i) + (b ? load(b, i % n) : A(0));
    store(y, i, u * cdf(u, tanh_form));
  }
}

template <typename T>
__global__ void bias_gelu_bwd_k(const T* g, const T* x, const T* b, T* dx, int64_t numel, int64_t n, bool tanh_form) {
  using A = typename Acc<T>::type;
  GRID_STRIDE(i, numel) {
    A u = load(x, i) + (b ? load(b, i % n) : A(0));
    store(dx, i, load(g, i) * dgelu(u, tanh_form));
  }
}

template <typename T>
__global__ void silu_mul_k(const T* gate, const T* up, T* y, int64_t numel) {
  using A = typename Acc<T>::type;
  GRID_STRIDE(i, numel) {
    A a = load(gate, i);
    store(y, i, a / (A(1) + ex(-a)) * load(up, i));
  }
}

template <typename T>
__global__ void silu_mul_bwd_k(const T* g, const T* gate, const T* up, T* dgate, T* dup, int64_t numel) {
  using A = typename Acc<T>::type;
  GRID_STRIDE(i, numel) {
    A a = load(gate, i), gi = load(g, i);
    A s = A(1) / (A(1) + ex(-a)), one_minus_s = A(1) / (A(1) + ex(a));
    store(dup, i, gi * a * s);
    store(dgate, i, gi * load(up, i) * s * (A(1) + a * one_minus_s));
  }
}

constexpr int kThreads = 256;

template <typename A> __device__ A block_reduce(A v, bool is_max, A* shared) {
  for (int o = 16; o > 0; o >>= 1) {
    A w = __shfl_down_sync(0xffffffffu, v, o);
    v = is_max ? (w > v ? w : v) : v + w;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? shared[lane] : (is_max ? A(-INFINITY) : A(0));
    for (int o = 16; o > 0; o >>= 1) {
      A w = __shfl_down_sync(0xffffffffu, v, o);
      v = is_max ? (w > v ? w : v) : v + w;
    }
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  A out = shared[0];
  __syncthreads();
  return out;
}

// one block per row
template <typename T>
__global__ void ce_stats_k(const T* x, const int64_t* t, int64_t n, int64_t valid, bool smoothing,
                           typename Acc<T>::type* out) {
  using A = typename Acc<T>::type;
  __shared__ A shared[kThreads / 32];
  const int64_t r = blockIdx.x;
  const T* xr = x + r * n;
  A m = A(-INFINITY);
  for (int64_t j = threadIdx.x; j < valid; j += blockDim.x) m = fmax(m, load(xr, j));
  m = block_reduce(m, true, shared);
  A s = 0, sx = 0;
  if (m > A(-INFINITY))
    for (int64_t j = threadIdx.x; j < valid; j += blockDim.x) s += ex(load(xr, j) - m);
  s = block_reduce(s, false, shared);
  if (smoothing) {
    for (int64_t j = threadIdx.x; j < valid; j += blockDim.x) sx += load(xr, j);
    sx = block_reduce(sx, false, shared);
  }
  if (threadIdx.x == 0) {
    const int64_t tr = t[r];
    out[r * 4 + 0] = m;
    out[r * 4 + 1] = s;
    out[r * 4 + 2] = (tr >= 0 && tr < valid) ? load(xr, tr) : A(0);
    out[r * 4 + 3] = sx;
  }
}

template <typename T>
__global__ void ce_grad_k(const T* x, const int64_t* t, int64_t n, int64_t valid, const typename Acc<T>::type* coef,
                          T* dx) {
  using A = typename Acc<T>::type;
  const int64_t r = blockIdx.x;
  const A M = coef[r * 4], a = coef[r * 4 + 1], b = coef[r * 4 + 2], c = coef[r * 4 + 3];
  const int64_t tr = t[r];
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    A v = j < valid ? a * ex(load(x, r * n + j) - M) - c : A(0);
    if (j == tr && j < valid) v -= b;
    store(dx, r * n + j, v);
  }
}

// one block per token: copy the row's bytes or zero them (all-zero bits are +0 in every float type)
__global__ void masked_embedding_k(const char* w, const int64_t* ids, char* out, int64_t rows, int64_t row_bytes,
                                   int64_t start) {
  const int64_t i = blockIdx.x, l = ids[i] - start;
  const bool in = l >= 0 && l < rows;
  char* o = out + i * row_bytes;
  const char* src = w + (in ? l : 0) * row_bytes;
  for (int64_t k = threadIdx.x; k < row_bytes; k += blockDim.x) o[k] = in ? src[k] : 0;
}

template <typename T>
__global__ void masked_embedding_bwd_k(const T* g, const int64_t* ids, typename Acc<T>::type* acc, int64_t dim,
                                       int64_t start, int64_t rows, int64_t padding_idx) {
  const int64_t i = blockIdx.x, l = ids[i] - start;
  if (l < 0 || l >= rows || l == padding_idx) return;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) atomicAdd(acc + l * dim + c, load(g, i * dim + c));
}

inline unsigned blocks_for(int64_t numel) {
  int64_t b = (numel + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 * 8 ? 65535 * 8 : b));
}

// dispatch one DType to the kernel template instantiated for its C++ type
#define AUTOTP_DISPATCH(dtype, ...)                                  \
  switch (dtype) {                                                   \
    case kFloat: { using T = float; __VA_ARGS__; break; }            \
    case kDouble: { using T = double; __VA_ARGS__; break; }          \
    case kHalf: { using T = __half; __VA_ARGS__; break; }            \
    case kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return static_cast<int>(cudaErrorInvalidValue);         \
  }

inline int launched() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

int bias_gelu(int dtype, const void* x, const void* bias, void* y, int64_t rows, int64_t n, bool tanh_form, void* stream) {
  const int64_t numel = rows * n;
  if (numel == 0) return 0;
  AUTOTP_DISPATCH(dtype, bias_gelu_k<T><<<blocks_for(numel), kThreads, 0, (cudaStream_t)stream>>>(
      (const T*)x, (const T*)bias, (T*)y, numel, n, tanh_form));
  return launched();
}

int bias_gelu_backward(int dtype, const void* grad, const void* x, const void* bias, void* dx, int64_t rows, int64_t n,
                       bool tanh_form, void* stream) {
  const int64_t numel = rows * n;
  if (numel == 0) return 0;
  AUTOTP_DISPATCH(dtype, bias_gelu_bwd_k<T><<<blocks_for(numel), kThreads, 0, (cudaStream_t)stream>>>(
      (const T*)grad, (const T*)x, (const T*)bias, (T*)dx, numel, n, tanh_form));
  return launched();
}

int silu_mul(int dtype, const void* gate, const void* up, void* y, int64_t numel, void* stream) {
  if (numel == 0) return 0;
  AUTOTP_DISPATCH(dtype, silu_mul_k<T><<<blocks_for(numel), kThreads, 0, (cudaStream_t)stream>>>(
      (const T*)gate, (const T*)up, (T*)y, numel));
  return launched();
}

int silu_mul_backward(int dtype, const void* grad, const void* gate, const void* up, void* dgate, void* dup,
                      int64_t numel, void* stream) {
  if (numel == 0) return 0;
  AUTOTP_DISPATCH(dtype, silu_mul_bwd_k<T><<<blocks_for(numel), kThreads, 0, (cudaStream_t)stream>>>(
      (const T*)grad, (const T*)gate, (const T*)up, (T*)dgate, (T*)dup, numel));
  return launched();
}

int ce_stats(int dtype, const void* logits, const int64_t* target, int64_t rows, int64_t n, int64_t valid,
             bool smoothing, void* out, void* stream) {
  if (rows == 0) return 0;
  AUTOTP_DISPATCH(dtype, ce_stats_k<T><<<(unsigned)rows, kThreads, 0, (cudaStream_t)stream>>>(
      (const T*)logits, target, n, valid, smoothing, (typename Acc<T>::type*)out));
  return launched();
}

int ce_grad(int dtype, const void* logits, const int64_t* target, int64_t rows, int64_t n, int64_t valid,
            const void* coef, void* dx, void* stream) {
  if (rows == 0) return 0;
  AUTOTP_DISPATCH(dtype, ce_grad_k<T><<<(unsigned)rows, kThreads, 0, (cudaStream_t)stream>>>(
      (const T*)logits, target, n, valid, (const typename Acc<T>::type*)coef, (T*)dx));
  return launched();
}

int masked_embedding(const void* weight, const int64_t* ids, void* out, int64_t tokens, int64_t rows,
                     int64_t row_bytes, int64_t start, void* stream) {
  if (tokens == 0) return 0;
  masked_embedding_k<<<(unsigned)tokens, kThreads, 0, (cudaStream_t)stream>>>(
      (const char*)weight, ids, (char*)out, rows, row_bytes, start);
  return launched();
}

int masked_embedding_backward(int dtype, const void* grad, const int64_t* ids, void* acc, int64_t tokens, int64_t dim,
                              int64_t start, int64_t rows, int64_t padding_idx, void* stream) {
  if (tokens == 0) return 0;
  AUTOTP_DISPATCH(dtype, masked_embedding_bwd_k<T><<<(unsigned)tokens, kThreads, 0, (cudaStream_t)stream>>>(
      (const T*)grad, ids, (typename Acc<T>::type*)acc, dim, start, rows, padding_idx));
  return launched();
}

}  // namespace autotp_cuda
