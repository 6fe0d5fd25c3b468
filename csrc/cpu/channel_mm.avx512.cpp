// ahnet_fast::channel_mm_'s tile loop for AVX-512 (chosen at run time by channel_mm.cpp on CPUs that have
// it). Empty elsewhere than x86-64 with GCC.
//
// Why a kernel of our own: AH-Net's convolutions on CPU are matrix products with few rows (20 to 512 output
// channels) and long rows (every voxel of a band), and torch.mm sends them to MKL, which on the AMD CPUs
// this was measured on runs its AVX2 code at about half the AVX-512 rate; benchmarks/bench_channel_mm.py
// compares the two. The register block is 8 output rows x 48 columns (24 accumulators of 16 floats); the
// columns' K x 48 panel of x is copied once per column block into a buffer that stays in L1 (with the
// BatchNorm-ReLU applied on the way, so the activation is never written out), and every block of 8 rows
// of w streams over it. Each output is a sum over k in increasing order, whatever the threads: results
// do not depend on the thread count. A convolution (channel_mm_conv_) is the same loop over a panel whose
// rows are the taps' shifted reads of x (pack_taps).
#include "channel_mm.h"

// Every header before the target pragma: an inline function a header defines (std::vector's, ATen's
// parallel helpers) compiled here for AVX-512 could be the one copy the linker keeps for the whole
// library, and then run on a CPU without AVX-512.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")

namespace ahnet_fast {
namespace channel_mm_kernels {
namespace isa_avx512 {
namespace {

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

// Output rows [0, R) x columns [0, ncols) of the block: acc = w's R rows (w[r, k] at w + r * sm + k * sk)
// @ panel (K x 48). The weights are read in place, not packed: packing costs as much as the products where
// the map is short (a transposed convolution's 16-voxel input against an 8192 x 1024 weight), and a
// block's R weights of one k are either R contiguous floats (a transposed weight) or R streams.
template <int R>
inline void block(const float* __restrict w, int64_t sm, int64_t sk, const float* __restrict panel, int64_t K,
                  float* __restrict y, int64_t ldy, int ncols, const __mmask16 (&masks)[3], bool accumulate) {
  __m512 acc[R][3];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 x0 = _mm512_load_ps(panel + k * kColumns);
    const __m512 x1 = _mm512_load_ps(panel + k * kColumns + 16);
    const __m512 x2 = _mm512_load_ps(panel + k * kColumns + 32);
    const float* wk = w + k * sk;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_set1_ps(wk[r * sm]);
      acc[r][0] = _mm512_fmadd_ps(wv, x0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(wv, x1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(wv, x2, acc[r][2]);
    }
  }
  if (ncols == kColumns && !accumulate) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 3; ++j) _mm512_storeu_ps(y + r * ldy + 16 * j, acc[r][j]);
    return;
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) {
      if (!masks[j]) continue;
      float* p = y + r * ldy + 16 * j;
      __m512 v = acc[r][j];
      if (accumulate) v = _mm512_add_ps(_mm512_maskz_loadu_ps(masks[j], p), v);
      _mm512_mask_storeu_ps(p, masks[j], v);
    }
}

// The panel rows of a plain product: x's K x ncols block (zero beyond ncols), activated. max(0, v) written
// as max_ps(0, v), which returns its second operand when either is NaN: a NaN input stays NaN, as in
// torch.relu.
template <bool Act>
inline void pack_row(const float* xr, const float* scale, const float* shift, int64_t k, float* dst,
                     const __mmask16 (&masks)[3]) {
  if (Act) {
    const __m512 zero = _mm512_setzero_ps();
    const __m512 s = _mm512_set1_ps(scale[k]), b = _mm512_set1_ps(shift[k]);
    for (int j = 0; j < 3; ++j) {
      const __m512 v = _mm512_maskz_loadu_ps(masks[j], xr + 16 * j);
      // v * scale + shift rounded twice, not fused: bn_relu_apply_'s arithmetic (csrc/cpu/batch_norm.h),
      // so that an activation made here equals the one a recomputation writes out, bit for bit (what
      // activation checkpointing promises). Masked lanes stay zero (a zero input past the end would
      // otherwise become max(0, shift); for a convolution tap they are the zero padding).
      const __m512 pre = _mm512_add_ps(_mm512_mul_ps(v, s), b);
      _mm512_store_ps(dst + 16 * j, _mm512_maskz_max_ps(masks[j], zero, pre));
    }
  } else {
    for (int j = 0; j < 3; ++j) _mm512_store_ps(dst + 16 * j, _mm512_maskz_loadu_ps(masks[j], xr + 16 * j));
  }
}

// A voxel's coordinates along the map's three axes, stepped through the voxels in row-major order (the
// convolution kernels' masks: pack_taps, tap_masks).
struct VoxelCursor {
  int32_t at[3];
  const int32_t* size;
  VoxelCursor(const ChannelConvTaps& taps, int64_t voxel) : size(taps.size) {
    const int64_t plane = int64_t{size[1]} * size[2];
    at[0] = static_cast<int32_t>(voxel / plane);
    at[1] = static_cast<int32_t>((voxel % plane) / size[2]);
    at[2] = static_cast<int32_t>(voxel % size[2]);
  }
  void next() {
    if (++at[2] == size[2]) {
      at[2] = 0;
      if (++at[1] == size[1]) {
        at[1] = 0;
        ++at[0];
      }
    }
  }
};

// A convolution's panel (channel_mm_conv_): row c * T + t holds act(x[c]) at tap t's offset from each of the
// block's columns, zero where that voxel is outside the map. No tap map is ever written: the shifted rows
// exist only here, in cache (the alternative, every tap's product written out and added back shifted, is 9
// output-sized maps for a 3x3x1 kernel, each faulted in fresh where no scratch buffer is kept).
template <bool Act>
void pack_taps(const ChannelMmJob& job, float* panel, int64_t n0, const __mmask16 (&masks)[3]) {
  const ChannelConvTaps& taps = *job.taps;
  const int64_t T = taps.count, channels = job.K / T;
  // the block's columns' coordinates along the three axes (columns past the end get coordinates too;
  // their lanes are masked off by `masks`)
  alignas(64) int32_t coord[3][kColumns];
  VoxelCursor voxel(taps, n0);
  for (int j = 0; j < kColumns; ++j, voxel.next())
    for (int axis = 0; axis < 3; ++axis) coord[axis][j] = voxel.at[axis];
  for (int64_t t = 0; t < T; ++t) {
    // lanes whose tap voxel is inside the map: 0 <= coord + offset < size on every axis the tap moves
    // along, tested as one unsigned comparison (a negative sum wraps to a large value)
    __mmask16 tap_masks[3];
    for (int j = 0; j < 3; ++j) {
      __mmask16 m = masks[j];
      for (int axis = 0; axis < 3; ++axis) {
        if (taps.offset[t][axis] == 0) continue;
        const __m512i moved = _mm512_add_epi32(_mm512_load_si512(coord[axis] + 16 * j),
                                               _mm512_set1_epi32(taps.offset[t][axis]));
        m &= _mm512_cmplt_epu32_mask(moved, _mm512_set1_epi32(taps.size[axis]));
      }
      tap_masks[j] = m;
    }
    // lanes outside the map are never loaded (masked loads do not touch them), so the row pointer may
    // point before the row's start or past its end
    const float* base = job.x + n0 + taps.flat[t];
    for (int64_t c = 0; c < channels; ++c)
      pack_row<Act>(base + c * job.ldx, job.scale, job.shift, c, panel + (c * T + t) * kColumns, tap_masks);
  }
}

// One task: output rows [m_begin, m_end) of column block `tile`.
template <bool Act, bool Conv>
void task(const ChannelMmJob& job, float* panel, int64_t tile, int64_t m_begin, int64_t m_end) {
  const int64_t K = job.K;
  const int64_t n0 = tile * kColumns;
  const int ncols = static_cast<int>(std::min<int64_t>(kColumns, job.N - n0));
  __mmask16 masks[3];
  for (int j = 0; j < 3; ++j) {
    const int c = ncols - 16 * j;
    masks[j] = c >= 16 ? static_cast<__mmask16>(0xFFFF) : c <= 0 ? 0 : static_cast<__mmask16>((1u << c) - 1);
  }
  if (Conv) {
    pack_taps<Act>(job, panel, n0, masks);
  } else {
    for (int64_t k = 0; k < K; ++k)
      pack_row<Act>(job.x + k * job.ldx + n0, job.scale, job.shift, k, panel + k * kColumns, masks);
  }
  float* y = job.y + n0;
  int64_t m = m_begin;
  for (; m + kRows <= m_end; m += kRows)
    block<kRows>(job.w + m * job.w_sm, job.w_sm, job.w_sk, panel, K, y + m * job.ldy, job.ldy, ncols, masks,
                 job.accumulate);
  const float* w = job.w + m * job.w_sm;
  float* yr = y + m * job.ldy;
  switch (m_end - m) {
    case 1: block<1>(w, job.w_sm, job.w_sk, panel, K, yr, job.ldy, ncols, masks, job.accumulate); break;
    case 2: block<2>(w, job.w_sm, job.w_sk, panel, K, yr, job.ldy, ncols, masks, job.accumulate); break;
    case 3: block<3>(w, job.w_sm, job.w_sk, panel, K, yr, job.ldy, ncols, masks, job.accumulate); break;
    case 4: block<4>(w, job.w_sm, job.w_sk, panel, K, yr, job.ldy, ncols, masks, job.accumulate); break;
    case 5: block<5>(w, job.w_sm, job.w_sk, panel, K, yr, job.ldy, ncols, masks, job.accumulate); break;
    case 6: block<6>(w, job.w_sm, job.w_sk, panel, K, yr, job.ldy, ncols, masks, job.accumulate); break;
    case 7: block<7>(w, job.w_sm, job.w_sk, panel, K, yr, job.ldy, ncols, masks, job.accumulate); break;
    default: break;
  }
}

}  // namespace

void run(const ChannelMmJob& job) {
  const int64_t tiles = (job.N + kColumns - 1) / kColumns;
  // Tasks are column blocks; with few of them (a short map, e.g. a transposed convolution's 16-voxel
  // input) each block's rows are split in groups as well (a group of kRows-multiples, at least 32 rows),
  // so that every thread has work. Rows are never split inside a register block, and every output's sum
  // still runs over k in order.
  const int64_t threads = at::get_num_threads();
  int64_t groups = 1;
  if (tiles < 4 * threads) groups = std::min((4 * threads + tiles - 1) / tiles, (job.M + 31) / 32);
  groups = std::max<int64_t>(groups, 1);
  const int64_t rows = ((job.M + groups - 1) / groups + kRows - 1) / kRows * kRows;
  groups = (job.M + rows - 1) / rows;
  const int64_t tasks = tiles * groups;
  // about 2^18 multiply-adds per task range at least: below that a thread's start costs more than it saves
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, rows * job.K * kColumns));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    std::unique_ptr<float, FreeDeleter> owned(
        static_cast<float*>(std::aligned_alloc(64, sizeof(float) * std::max<int64_t>(job.K, 1) * kColumns)));
    TORCH_CHECK(owned != nullptr, "channel_mm_: out of memory for a ", job.K, " x ", kColumns, " panel");
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t tile = t / groups, m_begin = (t % groups) * rows, m_end = std::min(job.M, m_begin + rows);
      const bool act = job.scale != nullptr, conv = job.taps != nullptr;
      if (act && conv)
        task<true, true>(job, owned.get(), tile, m_begin, m_end);
      else if (conv)
        task<false, true>(job, owned.get(), tile, m_begin, m_end);
      else if (act)
        task<true, false>(job, owned.get(), tile, m_begin, m_end);
      else
        task<false, false>(job, owned.get(), tile, m_begin, m_end);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// channel_mm_nt_: out = a @ b^T, both operands read along their contiguous rows (the voxels). The
// register block is R rows of a x C rows of b, each of the R x C sums kept as 16 partial sums in one
// vector (24 vectors for 4 x 6), reduced to scalars at the end of each chunk of kChunk voxels; the
// chunk's rows of a (R x kChunk) stay in L1 and b's rows in L2 while every block passes over them.
namespace {

constexpr int kNtRows = 4, kNtCols = 6;
constexpr int64_t kChunk = 2048;

// A chunk's tap masks (channel_mm_nt_conv_): bit j of masks[t * vectors + v] says whether voxel q = l0 + 16 v + j
// is inside the chunk and q - offset_t inside the map (the output voxel whose tap t reads q). Worked out per
// voxel in scalar code: T x 2048 tests against the chunk's M x K x 2048 multiply-adds.
void tap_masks(const ChannelConvTaps& taps, int64_t l0, int64_t l1, int64_t vectors, uint16_t* masks) {
  std::fill(masks, masks + taps.count * vectors, uint16_t{0});
  VoxelCursor voxel(taps, l0);
  for (int64_t l = l0; l < l1; ++l, voxel.next()) {
    const int64_t v = (l - l0) / 16;
    const uint16_t bit = static_cast<uint16_t>(1u << ((l - l0) % 16));
    for (int64_t t = 0; t < taps.count; ++t) {
      bool inside = true;
      for (int axis = 0; axis < 3; ++axis) {
        const int32_t source = voxel.at[axis] - taps.offset[t][axis];
        inside = inside && source >= 0 && source < taps.size[axis];
      }
      if (inside) masks[t * vectors + v] |= bit;
    }
  }
}

// R rows of a x C rows of b over voxels [l0, l1), added to the partial sums. Plain: rows m0.. of a and k0.. of b,
// partial (M, K). Over taps (channel_mm_nt_conv_): a's rows are virtual, i = t * M + m: the output gradient's
// row m read at voxel q - offset_t (zero where that is no voxel of the map), so that
// sum_q g[m, q - offset_t] x[c, q] = sum_p g[m, p] x[c, p + offset_t] lands in partial[m, c * T + t]. The
// shifted operand is the gradient's few rows (M * T virtual rows against the input's channels: the shape
// of the product the shift path made on copies, whose blocks of a stay in L1 while b's chunk sits in L2).
// A masked 16-float load (lanes off in `mask` are zero and their memory is not touched, so p may point
// outside the buffer where they are), written as the instruction itself: with _mm512_maskz_loadu_ps (or an asm
// declaring the memory it reads) GCC 12 kept nt_block's accumulators in memory, storing all 24 for every
// vector (half the speed); a plain load followed by a masked move would only be safe where the compiler
// happens to fuse the two. The asm names only the address, not the memory: correct because nothing writes
// the operands while a kernel runs (they are inputs, written before the call).
inline __m512 load_masked(__mmask16 mask, const float* p) {
  __m512 v;
  asm("vmovups (%1), %0%{%2%}%{z%}" : "=v"(v) : "r"(p), "Yk"(mask));
  return v;
}

template <int R, int C, bool Taps>
void nt_block(const ChannelMmNtJob& job, int64_t i0, int64_t k0, int64_t l0, int64_t l1, float* partial,
              const uint16_t* masks) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const float* a[R];
  const float* b[C];
  // Over taps a block's rows share their tap (nt_chunk never lets a block straddle two), so one mask per
  // vector serves them all (fewer live pointers: with one per row the compiler spilled accumulators).
  const int64_t T = Taps ? job.taps->count : 1;
  const int64_t t = Taps ? i0 / job.M : 0, m0 = Taps ? i0 % job.M : i0;
  const int64_t vectors = (l1 - l0 + 15) / 16;
  const uint16_t* tmask = Taps ? masks + t * vectors : nullptr;
  // lanes outside the map are masked off and never loaded, so the pointers may lie outside their rows
  for (int r = 0; r < R; ++r) a[r] = job.a + (m0 + r) * job.lda - (Taps ? job.taps->flat[t] : 0);
  for (int c = 0; c < C; ++c) b[c] = job.b + (k0 + c) * job.ldb;
  int64_t l = l0;
  for (int64_t v = 0; l + 16 <= l1; l += 16, ++v) {
    __m512 av[R];
    if (Taps) {
      // lanes whose source voxel is outside the map stay unloaded, zero (one code path: a branch between
      // plain and masked loads made the compiler keep the accumulators in memory)
      const __mmask16 m = static_cast<__mmask16>(tmask[v]);
      for (int r = 0; r < R; ++r) av[r] = load_masked(m, a[r] + l);
    } else {
      for (int r = 0; r < R; ++r) av[r] = _mm512_loadu_ps(a[r] + l);
    }
    for (int c = 0; c < C; ++c) {
      const __m512 bv = _mm512_loadu_ps(b[c] + l);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(av[r], bv, acc[r][c]);
    }
  }
  if (l < l1) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (l1 - l)) - 1);
    const int64_t v = (l - l0) / 16;
    __m512 av[R];
    for (int r = 0; r < R; ++r)
      av[r] = _mm512_maskz_loadu_ps(Taps ? static_cast<__mmask16>(tmask[v] & mask) : mask, a[r] + l);
    for (int c = 0; c < C; ++c) {
      const __m512 bv = _mm512_maskz_loadu_ps(mask, b[c] + l);
      for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(av[r], bv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      partial[(m0 + r) * job.K + (k0 + c) * T + t] += _mm512_reduce_add_ps(acc[r][c]);
}

template <int R, bool Taps>
void nt_block_cols(int c, const ChannelMmNtJob& job, int64_t m0, int64_t k0, int64_t l0, int64_t l1, float* p,
                   const uint16_t* masks) {
  switch (c) {
    case 1: return nt_block<R, 1, Taps>(job, m0, k0, l0, l1, p, masks);
    case 2: return nt_block<R, 2, Taps>(job, m0, k0, l0, l1, p, masks);
    case 3: return nt_block<R, 3, Taps>(job, m0, k0, l0, l1, p, masks);
    case 4: return nt_block<R, 4, Taps>(job, m0, k0, l0, l1, p, masks);
    case 5: return nt_block<R, 5, Taps>(job, m0, k0, l0, l1, p, masks);
    default: return nt_block<R, kNtCols, Taps>(job, m0, k0, l0, l1, p, masks);
  }
}

template <bool Taps>
void nt_any_block(int r, int c, const ChannelMmNtJob& job, int64_t m0, int64_t k0, int64_t l0, int64_t l1, float* p,
                  const uint16_t* masks) {
  switch (r) {
    case 1: return nt_block_cols<1, Taps>(c, job, m0, k0, l0, l1, p, masks);
    case 2: return nt_block_cols<2, Taps>(c, job, m0, k0, l0, l1, p, masks);
    case 3: return nt_block_cols<3, Taps>(c, job, m0, k0, l0, l1, p, masks);
    default: return nt_block_cols<kNtRows, Taps>(c, job, m0, k0, l0, l1, p, masks);
  }
}

// A chunk's blocks: each block of a's rows (L1) against every block of b's (the chunk of b in L2). Over taps
// a's rows are the M * T virtual rows and b's the input's channels (K / T).
template <bool Taps>
void nt_chunk(const ChannelMmNtJob& job, int64_t l0, int64_t l1, float* partial, const uint16_t* masks) {
  const int64_t T = Taps ? job.taps->count : 1, columns = job.K / T;
  for (int64_t t = 0; t < T; ++t)  // (Taps: a block's rows within one tap)
    for (int64_t m0 = 0; m0 < job.M; m0 += kNtRows)
      for (int64_t k0 = 0; k0 < columns; k0 += kNtCols)
        nt_any_block<Taps>(static_cast<int>(std::min<int64_t>(kNtRows, job.M - m0)),
                           static_cast<int>(std::min<int64_t>(kNtCols, columns - k0)), job, t * job.M + m0, k0, l0, l1,
                           partial, masks);
}

}  // namespace

void run_nt(const ChannelMmNtJob& job) {
  const int64_t M = job.M, K = job.K;
  const int64_t chunks = std::max<int64_t>(1, (job.L + kChunk - 1) / kChunk);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks));
  // One M x K float32 partial per thread slot, summed in slot order at the end: the result depends
  // on the thread count (where the voxels are split), not on scheduling.
  std::vector<float> partials(static_cast<size_t>(threads * M * K), 0.f);
  const int64_t per = (chunks + threads - 1) / threads;
  constexpr int64_t kVectors = kChunk / 16;
  at::parallel_for(0, threads, 1, [&](int64_t s0, int64_t s1) {
    std::vector<uint16_t> masks(job.taps != nullptr ? static_cast<size_t>(job.taps->count * kVectors) : 0);
    for (int64_t slot = s0; slot < s1; ++slot) {
      float* partial = partials.data() + slot * M * K;
      for (int64_t ch = slot * per; ch < std::min(chunks, (slot + 1) * per); ++ch) {
        const int64_t l0 = ch * kChunk, l1 = std::min(job.L, l0 + kChunk);
        if (job.taps != nullptr) {
          tap_masks(*job.taps, l0, l1, (l1 - l0 + 15) / 16, masks.data());
          nt_chunk<true>(job, l0, l1, partial, masks.data());
        } else {
          nt_chunk<false>(job, l0, l1, partial, nullptr);
        }
      }
    }
  });
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      float sum = 0.f;
      for (int64_t slot = 0; slot < threads; ++slot) sum += partials[(slot * M + m) * K + k];
      float* o = job.out + m * job.ldo + k;
      *o = job.accumulate ? *o + sum : sum;
    }
}

}  // namespace isa_avx512
}  // namespace channel_mm_kernels
}  // namespace ahnet_fast
#pragma GCC pop_options
#endif
