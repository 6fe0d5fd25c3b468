// Which instruction-set variant of a kernel runs: the widest the CPU has, unless AHNET_FAST_NO_AVX512=1
// (then AVX2 at most) or AHNET_FAST_NO_AVX2=1 (the baseline) says otherwise. Shared by every kernel
// compiled in several variants (focal_loss, channel_mm), so that one environment variable narrows them all.
#pragma once

#include <cstdlib>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AHNET_FAST_HAVE_AVX2_VARIANT 1  // the *.avx2.cpp / *.avx512.cpp translation units compile theirs
#endif

namespace ahnet_fast {

enum class Isa { baseline, avx2, avx512 };

inline Isa chosen_isa() {
#ifdef AHNET_FAST_HAVE_AVX2_VARIANT
  static const Isa isa = [] {
    if (std::getenv("AHNET_FAST_NO_AVX2") != nullptr) return Isa::baseline;
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return Isa::baseline;
    if (std::getenv("AHNET_FAST_NO_AVX512") == nullptr && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
      return Isa::avx512;
    return Isa::avx2;
  }();
  return isa;
#else
  return Isa::baseline;
#endif
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::avx512 ? "avx512" : isa == Isa::avx2 ? "avx2" : "baseline";
}

}  // namespace ahnet_fast
