// The focal-loss tile loop compiled for AVX-512: 16-wide float vectors and mask registers (chosen at run time by
// focal_loss.cpp on CPUs that have it). Its own translation unit so the build compiles the variants
// in parallel. Empty elsewhere than x86-64 with GCC.
#include "focal_loss.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512")
namespace ahnet_fast {
namespace focal_loss_kernels {
#define AHNET_FAST_ISA_NS isa_avx512
#define AHNET_FAST_ISA_DOUBLE 0
#include "focal_loss_kernel.h"
#undef AHNET_FAST_ISA_DOUBLE
#undef AHNET_FAST_ISA_NS
}  // namespace focal_loss_kernels
}  // namespace ahnet_fast
#pragma GCC pop_options
#endif
