// autotp._samehost: the same-host collectives' shared-memory transport, and the fused
// all-reduce + residual add + RMSNorm/LayerNorm.
//
// Python (autotp/samehost.py) owns the file mapping and hands this module raw addresses:
// the mapping's base, and each tensor's data_ptr() with its byte count and a dtype code.
// No torch header is included (pybind11 only), so the module compiles in seconds.
//
// Layout of the mapping (shared with the Python fallback, which speaks the same protocol):
//
//     int64 written[world]; int64 read[world];      // the flags
//     char  slot[2][world][slot_bytes];               // two sets of slots, alternating by seq % 2
//
// One collective, sequence number seq, on rank r:
//
//     wait until read[*] >= seq - 2     (acquire)   // nobody still reads this set of slots
//     copy x into slot[seq % 2][r];
//     written[r] = seq                  (release)   // publishes the copy
//     wait until written[*] >= seq      (acquire)   // everyone's copy is visible
//     combine the slots in rank order (every rank the same way: bitwise-identical results)
//     read[r] = seq                     (release)   // our reads happen before anyone reuses the set
//
// The release store / acquire load pairs order the data with its flag on any architecture
// (the Python fallback relies on x86-64's store ordering instead).  A wait spins for 50 us, then
// yields (ranks may outnumber cores), and raises `Timeout` naming the late ranks after
// timeout_s; the GIL is released while a rank waits or copies.  An all-reduce, gather or
// reduce-scatter larger than a slot goes through the slots in pieces, pipelined over the two sets
// (piece k + 1 is posted before piece k is read; `pipelined`).  The reduce-scatter publishes every
// rank's rows of a piece and reads only its own rows from each slot.
//
// Half types (bfloat16, float16) are summed in float and rounded once per element.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sched.h>
#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if !defined(__FLT16_MAX__)
#error "autotp._samehost needs the compiler's _Float16 (GCC >= 12 or clang on x86-64 / aarch64)"
#endif

namespace py = pybind11;

namespace {

enum Dtype : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3, I32 = 4, I64 = 5 };

int64_t dtype_size(int dtype) {
  switch (dtype) {
    case F32: case I32: return 4;
    case F64: case I64: return 8;
    case BF16: case F16: return 2;
  }
  throw std::invalid_argument("autotp._samehost: unknown dtype code " + std::to_string(dtype) +
                              " (0 float32, 1 float64, 2 bfloat16, 3 float16, 4 int32, 5 int64)");
}

struct Timeout : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---- element conversions for the half types -------------------------------------------------

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as c10::BFloat16 does
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}

inline uint16_t float_to_f16(float f) {
  _Float16 v = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}

struct BF16Conv {
  static float load(uint16_t h) { return bf16_to_float(h); }
  static uint16_t store(float f) { return float_to_bf16(f); }
};
struct F16Conv {
  static float load(uint16_t h) { return f16_to_float(h); }
  static uint16_t store(float f) { return float_to_f16(f); }
};

constexpr int64_t kBlock = 1024;  // elements per float accumulator block (half types)

// out[i] = ((p0[i] + p1[i]) + p2[i]) + ...   (rank order)
template <typename T>
void sum_parts(T* __restrict__ out, const std::vector<const char*>& parts, int64_t off, int64_t n) {
  const T* __restrict__ a = reinterpret_cast<const T*>(parts[0]) + off;
  const T* __restrict__ b = reinterpret_cast<const T*>(parts[1]) + off;
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
  for (size_t k = 2; k < parts.size(); ++k) {
    const T* __restrict__ p = reinterpret_cast<const T*>(parts[k]) + off;
    for (int64_t i = 0; i < n; ++i) out[i] += p[i];
  }
}

// the same for bfloat16 / float16: summed in float, rounded once per element
template <typename Conv>
void sum_parts_half(uint16_t* __restrict__ out, const std::vector<const char*>& parts, int64_t off, int64_t n) {
  float acc[kBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t m = std::min(kBlock, n - i0);
    const uint16_t* __restrict__ a = reinterpret_cast<const uint16_t*>(parts[0]) + off + i0;
    const uint16_t* __restrict__ b = reinterpret_cast<const uint16_t*>(parts[1]) + off + i0;
    for (int64_t i = 0; i < m; ++i) acc[i] = Conv::load(a[i]) + Conv::load(b[i]);
    for (size_t k = 2; k < parts.size(); ++k) {
      const uint16_t* __restrict__ p = reinterpret_cast<const uint16_t*>(parts[k]) + off + i0;
      for (int64_t i = 0; i < m; ++i) acc[i] += Conv::load(p[i]);
    }
    for (int64_t i = 0; i < m; ++i) out[i0 + i] = Conv::store(acc[i]);
  }
}

void sum_dispatch(void* out, const std::vector<const char*>& parts, int64_t off, int64_t n, int dtype) {
  switch (dtype) {
    case F32: return sum_parts(static_cast<float*>(out), parts, off, n);
    case F64: return sum_parts(static_cast<double*>(out), parts, off, n);
    case I32: return sum_parts(static_cast<int32_t*>(out), parts, off, n);
    case I64: return sum_parts(static_cast<int64_t*>(out), parts, off, n);
    case BF16: return sum_parts_half<BF16Conv>(static_cast<uint16_t*>(out), parts, off, n);
    case F16: return sum_parts_half<F16Conv>(static_cast<uint16_t*>(out), parts, off, n);
  }
}

// ---- fused s = r + sum(x); y = norm(s) over one row ------------------------------------------

// The contribution a rank publishes: x, or x + r where the residual joins the partial sum
// (rank 0 adds r, every other rank adds +0.0, exactly as the composite's add with the zeros
// of OneRankShare rounds: -0.0 + 0.0 is +0.0).
template <typename T>
void contribute(T* __restrict__ dst, const T* __restrict__ x, const T* __restrict__ r, bool join, int64_t n) {
  if (r != nullptr) {
    for (int64_t i = 0; i < n; ++i) dst[i] = x[i] + r[i];
  } else if (join) {
    for (int64_t i = 0; i < n; ++i) dst[i] = x[i] + T(0);
  } else {
    std::memcpy(dst, x, n * sizeof(T));
  }
}

template <typename Conv>
void contribute_half(uint16_t* __restrict__ dst, const uint16_t* __restrict__ x, const uint16_t* __restrict__ r,
                     bool join, int64_t n) {
  if (r != nullptr) {
    for (int64_t i = 0; i < n; ++i) dst[i] = Conv::store(Conv::load(x[i]) + Conv::load(r[i]));
  } else if (join) {
    for (int64_t i = 0; i < n; ++i) dst[i] = Conv::store(Conv::load(x[i]) + 0.0f);
  } else {
    std::memcpy(dst, x, n * 2);
  }
}

// sum and sum of squares of a row, in double, over 8 independent lanes (so the loop vectorises
// without reassociating anything: the order is fixed, the same on every rank and every run)
template <typename Load, typename T>
inline void row_stats(const T* __restrict__ s, int64_t n, double& sum, double& sq) {
  double a[8] = {0, 0, 0, 0, 0, 0, 0, 0}, q[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int k = 0; k < 8; ++k) {
      const double v = Load::load(s[j + k]);
      a[k] += v;
      q[k] += v * v;
    }
  sum = sq = 0.0;
  for (int k = 0; k < 8; ++k) {
    sum += a[k];
    sq += q[k];
  }
  for (; j < n; ++j) {
    const double v = Load::load(s[j]);
    sum += v;
    sq += v * v;
  }
}

template <typename T>
struct Plain {
  static double load(T v) { return v; }
};

// One row of the float types: s = the rank-ordered sum of the slots (rounded as the composite's
// all-reduce rounds it), y = norm(s) with the statistics accumulated in double.
//   rms:   y = w * (s * rstd),            rstd = 1 / sqrt(mean(s^2) + eps)
//   layer: y = (s - mean) * rstd * w + b, rstd = 1 / sqrt(var(s) + eps)   (biased variance)
template <typename T>
void norm_row(const std::vector<const char*>& parts, int64_t off, const T* __restrict__ w, const T* __restrict__ b,
              T* __restrict__ s, T* __restrict__ y, int64_t cols, double eps, bool rms) {
  sum_parts(s, parts, off, cols);
  double sum, sq;
  row_stats<Plain<T>>(s, cols, sum, sq);
  if (rms) {
    const T rstd = static_cast<T>(1.0 / std::sqrt(sq / cols + eps));
    for (int64_t j = 0; j < cols; ++j) y[j] = w[j] * (s[j] * rstd);
  } else {
    const double mean = sum / cols;
    const double var = std::max(0.0, sq / cols - mean * mean);
    const T m = static_cast<T>(mean), rstd = static_cast<T>(1.0 / std::sqrt(var + eps));
    if (b != nullptr) {
      for (int64_t j = 0; j < cols; ++j) y[j] = (s[j] - m) * rstd * w[j] + b[j];
    } else {
      for (int64_t j = 0; j < cols; ++j) y[j] = (s[j] - m) * rstd * w[j];
    }
  }
}

// One row of the half types: s is summed in float and rounded once (as the all-reduce does); the
// norm is computed in float from s.  RMSNorm rounds s * rstd to the type before the weight
// multiplies it (the Hugging Face convention: weight * hidden.to(input_dtype)); LayerNorm rounds once.
template <typename Conv>
void norm_row_half(const std::vector<const char*>& parts, int64_t off, const uint16_t* __restrict__ w,
                   const uint16_t* __restrict__ b, uint16_t* __restrict__ s, uint16_t* __restrict__ y, int64_t cols,
                   double eps, bool rms) {
  sum_parts_half<Conv>(s, parts, off, cols);
  double sum, sq;
  row_stats<Conv>(s, cols, sum, sq);
  if (rms) {
    const float rstd = static_cast<float>(1.0 / std::sqrt(sq / cols + eps));
    for (int64_t j = 0; j < cols; ++j)
      y[j] = Conv::store(Conv::load(w[j]) * Conv::load(Conv::store(Conv::load(s[j]) * rstd)));
  } else {
    const double mean = sum / cols;
    const double var = std::max(0.0, sq / cols - mean * mean);
    const float m = static_cast<float>(mean), rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
    for (int64_t j = 0; j < cols; ++j) {
      const float v = (Conv::load(s[j]) - m) * rstd * Conv::load(w[j]);
      y[j] = Conv::store(b != nullptr ? v + Conv::load(b[j]) : v);
    }
  }
}

constexpr double kSpinSeconds = 50e-6;  // how long a wait spins before it starts yielding the core

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

double now_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

class Transport {
 public:
  Transport(uintptr_t base, int64_t map_bytes, int world, int rank, int64_t slot_bytes, double timeout_s)
      : world_(world), rank_(rank), slot_bytes_(slot_bytes), timeout_s_(timeout_s) {
    if (world < 2 || rank < 0 || rank >= world)
      throw std::invalid_argument("autotp._samehost: rank " + std::to_string(rank) + " of world size " +
                                  std::to_string(world) + " (need 0 <= rank < world, world >= 2)");
    if (slot_bytes < 64 || slot_bytes % 64 != 0)
      throw std::invalid_argument("autotp._samehost: slot_bytes " + std::to_string(slot_bytes) +
                                  " must be a positive multiple of 64");
    const int64_t need = 2 * world * 8 + 2 * world * slot_bytes;
    if (map_bytes < need)
      throw std::invalid_argument("autotp._samehost: the mapping has " + std::to_string(map_bytes) +
                                  " bytes; world " + std::to_string(world) + " with " + std::to_string(slot_bytes) +
                                  "-byte slots needs " + std::to_string(need));
    if (base % 8 != 0) throw std::invalid_argument("autotp._samehost: the mapping's base is not 8-byte aligned");
    flags_ = reinterpret_cast<int64_t*>(base);
    slots_ = reinterpret_cast<char*>(base) + 2 * world * 8;
  }

  int64_t seq() const { return seq_; }
  int64_t slot_bytes() const { return slot_bytes_; }

  // in-place sum of n contiguous elements at ptr over the ranks; messages larger than a slot go
  // through the slots in pieces (one collective each)
  int64_t all_reduce(uintptr_t ptr, int64_t numel, int dtype) {
    const int64_t es = dtype_size(dtype);
    const int64_t per = slot_bytes_ / es;
    char* data = reinterpret_cast<char*>(ptr);
    py::gil_scoped_release nogil;
    return pipelined(numel, per, [&](int64_t q0, int64_t m) { return post(data + q0 * es, m * es); },
                     [&](int64_t s, int64_t q0, int64_t q1) { sum_dispatch(data + q0 * es, slot_set(s), 0, q1 - q0, dtype); });
  }

  // the all-gather of Shard(dim, chunks) pieces straight into the global layout.  This rank's
  // piece is [outer, n, inner_bytes] (n along the sharded dim); the output is
  // [outer, global_size, inner_bytes]; rank r's chunk c lands at (c * world + r) * (n / chunks)
  // along that dim, trimmed at global_size (padding).  A piece larger than a slot goes through
  // the slots in whole rows (one collective each, pipelined as all_reduce's); one row of
  // inner_bytes must fit a slot.  Returns the number of collectives.
  int64_t gather(uintptr_t out_ptr, uintptr_t in_ptr, int64_t outer, int64_t n, int64_t inner_bytes, int64_t chunks,
                 int64_t global_size) {
    if (chunks < 1 || n % chunks != 0)
      throw std::invalid_argument("autotp._samehost.gather: " + std::to_string(n) + " rows do not split into " +
                                  std::to_string(chunks) + " chunks");
    if (inner_bytes > slot_bytes_)
      throw std::invalid_argument("autotp._samehost.gather: a row of " + std::to_string(inner_bytes) +
                                  " bytes exceeds the " + std::to_string(slot_bytes_) +
                                  "-byte slot (gather through the process group)");
    char* out = reinterpret_cast<char*>(out_ptr);
    const char* in = reinterpret_cast<const char*>(in_ptr);
    const int64_t rows = outer * n, block = n / chunks;
    const int64_t per = inner_bytes == 0 ? std::max<int64_t>(rows, 1) : slot_bytes_ / inner_bytes;
    py::gil_scoped_release nogil;
    // rows [q0, q1) of every rank's piece, from the slots into the global layout, in runs that stay
    // within one outer index and one chunk (contiguous on both sides)
    auto place = [&](int64_t s, int64_t q0, int64_t q1) {
      const auto parts = slot_set(s);
      for (int r = 0; r < world_; ++r) {
        for (int64_t q = q0; q < q1;) {
          const int64_t o = q / n, i = q % n, c = i / block, j = i % block;
          const int64_t run = std::min({q1 - q, block - j});
          const int64_t at = (c * world_ + r) * block + j;
          const int64_t take = std::max<int64_t>(0, std::min(run, global_size - at));
          if (take > 0)
            std::memcpy(out + (o * global_size + at) * inner_bytes, parts[r] + (q - q0) * inner_bytes,
                        take * inner_bytes);
          q += run;
        }
      }
    };
    return pipelined(rows, per, [&](int64_t q0, int64_t m) {
      return post(in + q0 * inner_bytes, m * inner_bytes);
    }, place);
  }

  // Sum over the ranks of their [outer, world * n, inner] inputs (n rows per rank along the
  // middle dim, inner elements each), keeping this rank's rows: out is [outer, n, inner], rank r
  // gets rows [r * n, (r + 1) * n) summed in rank order.  Each rank publishes every rank's rows of
  // a piece and reads only its own from every slot: half an all-reduce's reads at world 2.  In
  // pieces of whole rows, pipelined; world rows of inner elements must fit a slot.  Returns the
  // number of collectives.
  int64_t reduce_scatter(uintptr_t out_ptr, uintptr_t in_ptr, int64_t outer, int64_t n, int64_t inner, int dtype) {
    const int64_t es = dtype_size(dtype);
    const int64_t row_bytes = inner * es;
    if (row_bytes * world_ > slot_bytes_)
      throw std::invalid_argument("autotp._samehost.reduce_scatter: " + std::to_string(world_) + " rows of " +
                                  std::to_string(row_bytes) + " bytes exceed the " + std::to_string(slot_bytes_) +
                                  "-byte slot (reduce-scatter through the process group)");
    char* out = reinterpret_cast<char*>(out_ptr);
    const char* in = reinterpret_cast<const char*>(in_ptr);
    const int64_t rows = outer * n;
    const int64_t per = row_bytes == 0 ? std::max<int64_t>(rows, 1) : slot_bytes_ / (row_bytes * world_);
    py::gil_scoped_release nogil;
    // a piece's slot holds [rank c's rows q0..q0+m) for c = 0..world-1, each run within one outer index
    auto publish_piece = [&](int64_t q0, int64_t m) {
      return post_with([&](char* dst) {
        for (int c = 0; c < world_; ++c) {
          char* d = dst + c * m * row_bytes;
          for (int64_t q = q0; q < q0 + m;) {
            const int64_t o = q / n, i = q % n, run = std::min(q0 + m - q, n - i);
            std::memcpy(d + (q - q0) * row_bytes, in + ((o * world_ + c) * n + i) * row_bytes, run * row_bytes);
            q += run;
          }
        }
      });
    };
    auto sum_piece = [&](int64_t s, int64_t q0, int64_t q1) {
      const int64_t m = q1 - q0;
      sum_dispatch(out + q0 * row_bytes, slot_set(s), rank_ * m * inner, m * inner, dtype);
    };
    return pipelined(rows, per, publish_piece, sum_piece);
  }

  // The fused all-reduce + residual add + norm over the last dim (cols) of rows x cols contiguous
  // tensors, in one pass over the shared slots:
  //     published = x (+ r where this rank adds the residual; + 0.0 on the others when join)
  //     s = published[0] + published[1] + ...   (rank order)
  //     y = norm(s)   (rms: RMSNorm with weight w; else LayerNorm with weight w and bias b, b may be 0)
  // so s equals the composite AllReduce(x + OneRankShare(r)) bit for bit.  Rows go through the
  // slots in as many collectives as they need; returns that number.
  int64_t add_norm(uintptr_t x, uintptr_t r, bool join, uintptr_t w, uintptr_t b, uintptr_t s_out, uintptr_t y_out,
                   int64_t rows, int64_t cols, int dtype, double eps, bool rms) {
    const int64_t es = dtype_size(dtype);
    if (dtype == I32 || dtype == I64) throw std::invalid_argument("autotp._samehost.add_norm: a float dtype is needed");
    const int64_t row_bytes = cols * es;
    if (cols < 1 || row_bytes > slot_bytes_)
      throw std::invalid_argument("autotp._samehost.add_norm: a row of " + std::to_string(cols) + " elements (" +
                                  std::to_string(row_bytes) + " bytes) does not fit the " +
                                  std::to_string(slot_bytes_) + "-byte slot");
    const int64_t per = slot_bytes_ / row_bytes;
    py::gil_scoped_release nogil;
    int64_t pieces = 0;
    for (int64_t r0 = 0; r0 < rows || (rows == 0 && pieces == 0); r0 += per) {
      const int64_t m = std::min(per, rows - r0), at = r0 * cols, n = m * cols;
      int64_t s;
      switch (dtype) {
        case F32: s = fused_piece<float>(x, r, join, w, b, s_out, y_out, at, n, m, cols, eps, rms); break;
        case F64: s = fused_piece<double>(x, r, join, w, b, s_out, y_out, at, n, m, cols, eps, rms); break;
        case BF16: s = fused_piece_half<BF16Conv>(x, r, join, w, b, s_out, y_out, at, n, m, cols, eps, rms); break;
        default: s = fused_piece_half<F16Conv>(x, r, join, w, b, s_out, y_out, at, n, m, cols, eps, rms); break;
      }
      done(s);
      ++pieces;
    }
    return pieces;
  }

 private:
  template <typename T>
  int64_t fused_piece(uintptr_t x, uintptr_t r, bool join, uintptr_t w, uintptr_t b, uintptr_t s_out, uintptr_t y_out,
                      int64_t at, int64_t n, int64_t m, int64_t cols, double eps, bool rms) {
    const T* xp = reinterpret_cast<const T*>(x) + at;
    const T* rp = r ? reinterpret_cast<const T*>(r) + at : nullptr;
    const int64_t s = publish_with([&](char* dst) { contribute<T>(reinterpret_cast<T*>(dst), xp, rp, join, n); });
    const auto parts = slot_set(s);
    for (int64_t i = 0; i < m; ++i)
      norm_row<T>(parts, i * cols, reinterpret_cast<const T*>(w), b ? reinterpret_cast<const T*>(b) : nullptr,
                  reinterpret_cast<T*>(s_out) + at + i * cols, reinterpret_cast<T*>(y_out) + at + i * cols, cols, eps,
                  rms);
    return s;
  }

  template <typename Conv>
  int64_t fused_piece_half(uintptr_t x, uintptr_t r, bool join, uintptr_t w, uintptr_t b, uintptr_t s_out,
                           uintptr_t y_out, int64_t at, int64_t n, int64_t m, int64_t cols, double eps, bool rms) {
    using H = uint16_t;
    const H* xp = reinterpret_cast<const H*>(x) + at;
    const H* rp = r ? reinterpret_cast<const H*>(r) + at : nullptr;
    const int64_t s = publish_with([&](char* dst) { contribute_half<Conv>(reinterpret_cast<H*>(dst), xp, rp, join, n); });
    const auto parts = slot_set(s);
    for (int64_t i = 0; i < m; ++i)
      norm_row_half<Conv>(parts, i * cols, reinterpret_cast<const H*>(w), b ? reinterpret_cast<const H*>(b) : nullptr,
                          reinterpret_cast<H*>(s_out) + at + i * cols, reinterpret_cast<H*>(y_out) + at + i * cols,
                          cols, eps, rms);
    return s;
  }

  // rows [0, rows) in pieces of at most per rows, one collective each, pipelined over the two sets
  // of slots: piece k + 1 is posted (post_piece(q0, m) -> its sequence number) before piece k is
  // read (read_piece(s, q0, q1)), so a rank copies while the others catch up.  At least one
  // collective, even for no rows, so the ranks' sequence numbers stay in step.
  template <typename Post, typename Read>
  int64_t pipelined(int64_t rows, int64_t per, Post&& post_piece, Read&& read_piece) {
    const int64_t pieces = rows == 0 ? 1 : (rows + per - 1) / per;
    auto start = [&](int64_t k) { return post_piece(k * per, std::min(per, rows - k * per)); };
    int64_t s = start(0);
    for (int64_t k = 0; k < pieces; ++k) {
      const int64_t next = k + 1 < pieces ? start(k + 1) : 0;
      wait_all(written(), s, s);
      read_piece(s, k * per, std::min(rows, (k + 1) * per));
      done(s);
      s = next;
    }
    return pieces;
  }

  int64_t* written() { return flags_; }
  int64_t* read() { return flags_ + world_; }
  char* slot(int64_t set, int r) { return slots_ + (set * world_ + r) * slot_bytes_; }

  std::vector<const char*> slot_set(int64_t s) {
    std::vector<const char*> parts(world_);
    for (int r = 0; r < world_; ++r) parts[r] = slot(s % 2, r);
    return parts;
  }

  bool all_at_least(int64_t* row, int64_t target) {
    for (int r = 0; r < world_; ++r)
      if (__atomic_load_n(row + r, __ATOMIC_ACQUIRE) < target) return false;
    return true;
  }

  // wait until row[*] >= target, for collective #collective (named in the timeout's message)
  void wait_all(int64_t* row, int64_t target, int64_t collective) {
    if (all_at_least(row, target)) return;
    const double start = now_s();
    bool yielding = false;
    for (uint64_t spins = 1;; ++spins) {
      if (all_at_least(row, target)) return;
      // spin a little first (a peer on another core is about to arrive); then yield, since ranks
      // may outnumber free cores and the one we wait for needs ours to run
      if (yielding) {
        sched_yield();
      } else {
        cpu_relax();
      }
      if (spins % 64 == 0) {
        const double t = now_s();
        yielding = yielding || t - start > kSpinSeconds;
        if (t - start > timeout_s_) {
          std::ostringstream late;
          late << "[";
          bool first = true;
          for (int r = 0; r < world_; ++r)
            if (__atomic_load_n(row + r, __ATOMIC_ACQUIRE) < target) {
              late << (first ? "" : ", ") << r;
              first = false;
            }
          late << "]";
          std::ostringstream msg;
          msg << "autotp same-host collective #" << collective << " on rank " << rank_ << " of " << world_
              << ": rank(s) " << late.str() << " did not arrive within " << timeout_s_
              << " s (did a rank die, stall, or take another code path?)";
          throw Timeout(msg.str());
        }
      }
    }
  }

  // fill(this rank's slot), then publish it; returns the collective's sequence number
  template <typename Fill>
  int64_t publish_with(Fill&& fill) {
    const int64_t s = post_with(fill);
    wait_all(written(), s, s);
    return s;
  }

  // the first half of publish: fill this rank's slot of the next set and raise its flag, without
  // waiting for the others' (the caller does, before it reads their slots)
  template <typename Fill>
  int64_t post_with(Fill&& fill) {
    const int64_t s = ++seq_;
    wait_all(read(), s - 2, s);  // nobody still reads this set of slots
    fill(slot(s % 2, rank_));
    __atomic_store_n(written() + rank_, s, __ATOMIC_RELEASE);
    return s;
  }

  int64_t post(const char* src, int64_t nbytes) {
    return post_with([&](char* dst) { std::memcpy(dst, src, nbytes); });
  }

  void done(int64_t s) { __atomic_store_n(read() + rank_, s, __ATOMIC_RELEASE); }

  int world_, rank_;
  int64_t slot_bytes_;
  double timeout_s_;
  int64_t* flags_ = nullptr;
  char* slots_ = nullptr;
  int64_t seq_ = 0;
};

}  // namespace

PYBIND11_MODULE(_samehost, m) {
  m.doc() = "autotp's same-host collectives: shared-memory transport with acquire/release flags, "
            "and the fused all-reduce + residual add + RMSNorm/LayerNorm";
  py::register_exception<Timeout>(m, "Timeout", PyExc_RuntimeError);
  m.attr("F32") = static_cast<int>(F32);
  m.attr("F64") = static_cast<int>(F64);
  m.attr("BF16") = static_cast<int>(BF16);
  m.attr("F16") = static_cast<int>(F16);
  m.attr("I32") = static_cast<int>(I32);
  m.attr("I64") = static_cast<int>(I64);
  py::class_<Transport>(m, "Transport")
      .def(py::init<uintptr_t, int64_t, int, int, int64_t, double>(), py::arg("base"), py::arg("map_bytes"),
           py::arg("world"), py::arg("rank"), py::arg("slot_bytes"), py::arg("timeout_s"))
      .def_property_readonly("seq", &Transport::seq)
      .def_property_readonly("slot_bytes", &Transport::slot_bytes)
      .def("all_reduce", &Transport::all_reduce, py::arg("ptr"), py::arg("numel"), py::arg("dtype"))
      .def("gather", &Transport::gather, py::arg("out"), py::arg("x"), py::arg("outer"), py::arg("n"),
           py::arg("inner_bytes"), py::arg("chunks"), py::arg("global_size"))
      .def("reduce_scatter", &Transport::reduce_scatter, py::arg("out"), py::arg("x"), py::arg("outer"), py::arg("n"),
           py::arg("inner"), py::arg("dtype"))
      .def("add_norm", &Transport::add_norm, py::arg("x"), py::arg("r"), py::arg("join"), py::arg("w"), py::arg("b"),
           py::arg("s"), py::arg("y"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("eps"),
           py::arg("rms"));
}
