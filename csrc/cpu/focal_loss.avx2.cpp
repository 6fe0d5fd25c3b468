// The focal-loss tile loop compiled for AVX2 with FMA: 8-wide float vectors (chosen at run time by
// focal_loss.cpp on CPUs that have it). Its own translation unit so the build compiles the variants
// in parallel. Empty elsewhere than x86-64 with GCC.
#include "focal_loss.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace ahnet_fast {
namespace focal_loss_kernels {
#define AHNET_FAST_ISA_NS isa_avx2
#define AHNET_FAST_ISA_DOUBLE 0
#include "focal_loss_kernel.h"
#undef AHNET_FAST_ISA_DOUBLE
#undef AHNET_FAST_ISA_NS
}  // namespace focal_loss_kernels
}  // namespace ahnet_fast
#pragma GCC pop_options
#endif
