// The tile loop of the focal loss, included once per instruction-set variant inside
// ahnet_fast::focal_loss_kernels, with AHNET_FAST_ISA_NS naming the variant's namespace: by
// focal_loss.cpp (baseline), focal_loss.avx2.cpp (under `#pragma GCC target("avx2,fma")`) and
// focal_loss.avx512.cpp (AVX-512), so the hot loops get 8- or 16-wide vectors with FMA where the CPU
// has them (chosen at run time). No include guard on purpose. The kernels have internal linkage;
// only the variant's run_tiles (declared in focal_loss.h) is seen from outside.
// AHNET_FAST_ISA_DOUBLE: 1 where this variant also compiles double logits.
namespace AHNET_FAST_ISA_NS {
namespace {

// ---------------------------------------------------------------------------------------------
// Elementary functions. Float: vectorisable approximations; double: the standard library.

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// exp(x) for float: x = n*ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n from the
// exponent bits. Inputs below -87 give ~1e-38 instead of a smaller value or 0, harmless where
// exp feeds sums that contain a term of order 1.
inline float fexp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // round to nearest by adding and removing 1.5 * 2^23 (no floor call: keeps the loop vectorisable)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.3888949e-3f;
  p = p * r + 8.3333607e-3f;
  p = p * r + 4.1666638e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

// log(x) for float, x > 0 normal: x = m * 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by the
// Cephes polynomial. x <= 0 (and subnormals) give -inf.
inline float flog(float x) {
  const int32_t bits = float_to_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float fe = static_cast<float>(e);
  float result = y - 0.5f * z + f + fe * 0.693147180559945f;
  const bool bad = !(x >= std::numeric_limits<float>::min());
  return bad ? -std::numeric_limits<float>::infinity() : result;
}

inline double fexp(double x) { return std::exp(x); }
inline double flog(double x) { return std::log(x); }

// log(1 + y) for y in [0, 1] (softplus); the series keeps tiny y exact.
template <typename T>
inline T flog1p_small(T y) {
  return y < T(1e-4) ? y * (T(1) - T(0.5) * y) : flog(T(1) + y);
}
inline double flog1p_small(double y) { return std::log1p(y); }

// 1 - p for p = exp(lp), lp <= 0, accurate near lp = 0 (p close to 1), where 1 - p cancels.
template <typename T>
inline T one_minus_exp(T lp, T p) {
  const T series = -lp * (T(1) + lp * (T(0.5) + lp * T(1.0 / 6.0)));
  return lp > T(-1e-3) ? series : T(1) - p;
}
inline double one_minus_exp(double lp, double) { return -std::expm1(lp); }

// u^gamma for u in [0, 1].
template <typename T>
inline T pow_unit(T u, T gamma, bool gamma_is_two) {
  if (gamma_is_two) return u * u;
  const T general = fexp(gamma * flog(u));
  return u > T(0) ? general : (gamma == T(0) ? T(1) : T(0));
}

template <typename T>
inline T softplus(T x) {  // log(1 + exp(x)), stable for any x
  return std::max(x, T(0)) + flog1p_small(fexp(-std::abs(x)));
}

template <typename T>
inline T sigmoid(T x) {  // stable for any x
  const T e = fexp(-std::abs(x));
  const T s = T(1) / (T(1) + e);
  return x >= T(0) ? s : e * s;
}


// M = sigmoid(u)^gamma, u = -x (2t - 1); dL/dx = A [(sigmoid(x) - t) M - B M gamma sigmoid(-u) (2t - 1)].
template <bool kGammaTwo, bool kAlphaLinear, typename scalar_t, typename acc_t>
inline void sigmoid_focal(const scalar_t* xc, int64_t ss, const acc_t* tv, int64_t n, acc_t pos, acc_t neg,
                          acc_t gamma, acc_t* vloss, acc_t* d) {
  for (int64_t t = 0; t < n; ++t) {
    const acc_t xv = static_cast<acc_t>(xc[t * ss]);
    const acc_t tt = tv[t];
    const acc_t A = kAlphaLinear ? tt * pos + (acc_t(1) - tt) * neg : (tt == acc_t(1) ? pos : neg);
    const acc_t bce = softplus(xv) - xv * tt;
    const acc_t two_t_minus_1 = acc_t(2) * tt - acc_t(1);
    const acc_t u = -xv * two_t_minus_1;
    const acc_t sig_u = sigmoid(u);
    const acc_t M = kGammaTwo ? sig_u * sig_u : fexp(-gamma * softplus(-u));
    vloss[t] += A * bce * M;
    d[t] = A * ((sigmoid(xv) - tt) * M - bce * M * gamma * (acc_t(1) - sig_u) * two_t_minus_1);
  }
}

// kUnit: voxels are adjacent in memory (channel-first), so the per-class loops over a tile of
// voxels are unit-stride and vectorise; channels-last tiles are read with stride C.
template <typename scalar_t, typename target_t, bool kUnit>
void focal_tiles(const Layout& L, const scalar_t* x, const target_t* tgt, int64_t tgt_sb, int64_t tgt_sc, int64_t tgt_ss,
                 scalar_t* grad, const double* fpos_d, const double* fneg_d, const double* scale_d,
                 const Options& o, std::vector<Partial>& partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t tiles_per_sample = (L.S + kTile - 1) / kTile;
  const int64_t Cu = L.C - o.first;  // channels that enter the loss
  const acc_t gamma = static_cast<acc_t>(o.gamma);
  const bool gamma_is_two = o.gamma == 2.0;
  std::vector<acc_t> fpos(Cu), fneg(Cu);
  for (int64_t c = 0; c < Cu; ++c) {
    fpos[c] = static_cast<acc_t>(fpos_d[c]);
    fneg[c] = static_cast<acc_t>(fneg_d[c]);
  }
  const bool labels = o.label_target;
  const bool binary_labels = labels && L.C == 1;  // sigmoid with one channel: labels are 0/1
  const int64_t ss = kUnit ? 1 : L.ss;
  const int64_t tss = kUnit ? 1 : tgt_ss;

  // The loops below are written branch-free (selects, masks, counters) so that they vectorise.
  at::parallel_for(0, L.B * tiles_per_sample, 4, [&](int64_t begin, int64_t end) {
    Partial& part = partials[at::get_thread_num()];
    // per-tile scratch: exp(z - max) per class; G_c per class (dense softmax)
    std::vector<acc_t> ez(static_cast<size_t>(std::max<int64_t>(Cu, 1)) * kTile);
    std::vector<acc_t> gbuf(labels || !o.softmax ? 0 : ez.size());
    acc_t zmax[kTile], se[kTile], lse[kTile], gy[kTile], gsum[kTile], vloss[kTile], vmask[kTile], tv[kTile], d[kTile];
    int32_t cls[kTile];
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / tiles_per_sample;
      const int64_t s0 = (w % tiles_per_sample) * kTile;
      const int64_t n = std::min(kTile, L.S - s0);
      const scalar_t* xb = x + b * L.sb + s0 * ss;
      scalar_t* gb = o.compute_grad ? grad + b * L.sb + s0 * ss : nullptr;
      const acc_t scale = static_cast<acc_t>(scale_d[b]);
      int64_t bad_count = 0;

      // Which voxels count (vmask 1/0) and, for label maps, their class relative to `first`
      // (negative: the background, excluded from the loss).
      if (labels) {
        const target_t* lb = tgt + b * tgt_sb + s0 * tss;
        for (int64_t t = 0; t < n; ++t) {
          const int64_t v = static_cast<int64_t>(lb[t * tss]);
          const bool ignored = o.has_ignore && v == o.ignore_index;
          const bool out_of_range = binary_labels ? (v != 0 && v != 1) : (v < 0 || v >= L.C);
          const bool bad = !ignored && out_of_range;
          bad_count += bad;
          vmask[t] = (ignored || bad) ? acc_t(0) : acc_t(1);
          cls[t] = (ignored || bad) ? int32_t(-1) : static_cast<int32_t>(binary_labels ? v : v - o.first);
        }
      } else {
        for (int64_t t = 0; t < n; ++t) vmask[t] = acc_t(1);
      }
      for (int64_t t = 0; t < n; ++t) vloss[t] = 0;

      if (o.softmax) {
        for (int64_t t = 0; t < n; ++t) zmax[t] = -std::numeric_limits<acc_t>::infinity();
        for (int64_t c = 0; c < Cu; ++c) {
          const scalar_t* xc = xb + (c + o.first) * L.sc;
          for (int64_t t = 0; t < n; ++t) zmax[t] = std::max(zmax[t], static_cast<acc_t>(xc[t * ss]));
        }
        // exp(z - max) per class; for label maps also pick, by selects rather than a gather, each
        // voxel's own-class z - max (tv), exp (gy) and factor (d)
        for (int64_t t = 0; t < n; ++t) {
          se[t] = 0;
          tv[t] = 0;
          gy[t] = 0;
          d[t] = 0;
        }
        for (int64_t c = 0; c < Cu; ++c) {
          const scalar_t* xc = xb + (c + o.first) * L.sc;
          acc_t* e = ez.data() + c * kTile;
          const int32_t c32 = static_cast<int32_t>(c);
          const acc_t fc = fpos[c];
          for (int64_t t = 0; t < n; ++t) {
            const acc_t zc = static_cast<acc_t>(xc[t * ss]) - zmax[t];
            e[t] = fexp(zc);
            se[t] += e[t];
            if (labels) {
              const bool own = cls[t] == c32;
              tv[t] = own ? zc : tv[t];
              gy[t] = own ? e[t] : gy[t];
              d[t] = own ? fc : d[t];
            }
          }
        }
        // log p = (z - max) - log(sum): never forms max + log(sum), which loses digits at large logits
        for (int64_t t = 0; t < n; ++t) {
          lse[t] = flog(se[t]);
          se[t] = acc_t(1) / se[t];  // from here on: the reciprocal, so p = e * se
        }

        // G_c = A_c t_c F_c, F = (1-p)^g [1 - g p log(p) / (1-p)]; loss_c = -A_c t_c (1-p)^g log p;
        // dL/dz_j = -G_j + p_j * sum_c G_c.
        auto focal_terms = [&](acc_t lp, acc_t p, acc_t& loss_term) -> acc_t {
          const acc_t u = one_minus_exp(lp, p);
          const acc_t mod = pow_unit(u, gamma, gamma_is_two);
          const acc_t ratio = u > acc_t(0) ? lp / u : acc_t(-1);
          loss_term = -mod * lp;
          return mod * (acc_t(1) - gamma * p * ratio);
        };
        if (labels) {
          for (int64_t t = 0; t < n; ++t) {  // own class: log p = (z - max) - lse, p = e / sum
            acc_t loss_term;
            const acc_t F = focal_terms(tv[t] - lse[t], gy[t] * se[t], loss_term);
            vloss[t] = d[t] * loss_term;
            gy[t] = d[t] * F;
          }
          if (o.compute_grad) {
            for (int64_t c = 0; c < Cu; ++c) {
              const acc_t* e = ez.data() + c * kTile;
              scalar_t* gc = gb + (c + o.first) * L.sc;
              const int32_t c32 = static_cast<int32_t>(c);
              for (int64_t t = 0; t < n; ++t) {
                const acc_t dd = e[t] * se[t] * gy[t] - (cls[t] == c32 ? gy[t] : acc_t(0));
                gc[t * ss] = static_cast<scalar_t>(scale * dd * vmask[t]);
              }
            }
          }
        } else {
          for (int64_t t = 0; t < n; ++t) gsum[t] = 0;
          for (int64_t c = 0; c < Cu; ++c) {
            const target_t* tc = tgt + b * tgt_sb + (c + o.first) * tgt_sc + s0 * tss;
            const scalar_t* xc = xb + (c + o.first) * L.sc;
            acc_t* Gc = gbuf.data() + c * kTile;
            const acc_t* e = ez.data() + c * kTile;
            const acc_t A = fpos[c];
            for (int64_t t = 0; t < n; ++t) {
              const acc_t tval = static_cast<acc_t>(tc[t * tss]);
              const bool bad = !(tval >= acc_t(0) && tval <= acc_t(1));
              bad_count += bad;
              vmask[t] = bad ? acc_t(0) : vmask[t];
              acc_t loss_term;
              const acc_t F = focal_terms((static_cast<acc_t>(xc[t * ss]) - zmax[t]) - lse[t], e[t] * se[t], loss_term);
              const acc_t G = A * tval * F;
              vloss[t] += A * tval * loss_term;
              gsum[t] += G;
              Gc[t] = G;
            }
          }
          if (o.compute_grad) {
            for (int64_t c = 0; c < Cu; ++c) {
              const acc_t* G = gbuf.data() + c * kTile;
              const acc_t* e = ez.data() + c * kTile;
              scalar_t* gc = gb + (c + o.first) * L.sc;
              for (int64_t t = 0; t < n; ++t) {
                const acc_t dd = e[t] * se[t] * gsum[t] - G[t];
                gc[t * ss] = static_cast<scalar_t>(scale * dd * vmask[t]);
              }
            }
          }
        }
      } else {
        // Sigmoid, per element (see sigmoid_focal).
        for (int64_t c = 0; c < Cu; ++c) {
          const scalar_t* xc = xb + (c + o.first) * L.sc;
          const acc_t pos = fpos[c], neg = fneg[c];
          if (labels) {
            const int32_t hit_class = binary_labels ? 1 : static_cast<int32_t>(c);
            for (int64_t t = 0; t < n; ++t) tv[t] = cls[t] == hit_class ? acc_t(1) : acc_t(0);
          } else {
            const target_t* tc = tgt + b * tgt_sb + (c + o.first) * tgt_sc + s0 * tss;
            for (int64_t t = 0; t < n; ++t) {
              const acc_t tval = static_cast<acc_t>(tc[t * tss]);
              const bool bad = !(tval >= acc_t(0) && tval <= acc_t(1));
              bad_count += bad;
              vmask[t] = bad ? acc_t(0) : vmask[t];
              tv[t] = bad ? acc_t(0) : tval;
            }
          }
          // loop-invariant choices as template arguments: GCC does not vectorise loops with them inside
          if (gamma_is_two) {
            if (o.alpha_linear) sigmoid_focal<true, true>(xc, ss, tv, n, pos, neg, gamma, vloss, d);
            else sigmoid_focal<true, false>(xc, ss, tv, n, pos, neg, gamma, vloss, d);
          } else {
            if (o.alpha_linear) sigmoid_focal<false, true>(xc, ss, tv, n, pos, neg, gamma, vloss, d);
            else sigmoid_focal<false, false>(xc, ss, tv, n, pos, neg, gamma, vloss, d);
          }
          if (o.compute_grad) {
            scalar_t* gc = gb + (c + o.first) * L.sc;
            for (int64_t t = 0; t < n; ++t) gc[t * ss] = static_cast<scalar_t>(scale * d[t] * vmask[t]);
          }
        }
      }
      if (gb != nullptr) {
        for (int64_t c = 0; c < o.first; ++c) {  // channels excluded from the loss get no gradient
          scalar_t* gc = gb + c * L.sc;
          for (int64_t t = 0; t < n; ++t) gc[t * ss] = scalar_t(0);
        }
      }
      acc_t tile_loss = 0, tile_count = 0;
      for (int64_t t = 0; t < n; ++t) {
        tile_loss += vloss[t] * vmask[t];
        tile_count += vmask[t];
      }
      part.loss[b] += static_cast<double>(tile_loss);
      part.count[b] += static_cast<double>(tile_count);
      part.invalid += bad_count;
    }
  });
}

}  // namespace

namespace {
template <typename scalar_t>
void run_for_logits(const TileJob& j) {
  const auto* x = static_cast<const scalar_t*>(j.x);
  auto* grad = static_cast<scalar_t*>(j.grad);
  auto go = [&](auto* typed_target) {
    using target_t = std::remove_const_t<std::remove_pointer_t<decltype(typed_target)>>;
    const auto* t = static_cast<const target_t*>(j.target);
    if (j.unit) focal_tiles<scalar_t, target_t, true>(j.L, x, t, j.tgt_sb, j.tgt_sc, j.tgt_ss, grad, j.fpos, j.fneg, j.scale, j.o, *j.partials);
    else focal_tiles<scalar_t, target_t, false>(j.L, x, t, j.tgt_sb, j.tgt_sc, j.tgt_ss, grad, j.fpos, j.fneg, j.scale, j.o, *j.partials);
  };
  const auto tdt = j.target_dtype;
  if (j.o.label_target) {
    if (tdt == at::kLong) go(static_cast<const int64_t*>(nullptr));
    else if (tdt == at::kInt) go(static_cast<const int32_t*>(nullptr));
    else if (tdt == at::kByte) go(static_cast<const uint8_t*>(nullptr));
    else TORCH_CHECK(false, "focal_loss: label maps must be uint8, int32 or int64, got ", tdt);
  } else {
    if (tdt == j.x_dtype) go(static_cast<const scalar_t*>(nullptr));
    else if (tdt == at::kFloat) go(static_cast<const float*>(nullptr));
    else TORCH_CHECK(false, "focal_loss: a dense target must be float32 or the logits' dtype, got ", tdt);
  }
}
}  // namespace

void run_tiles(const TileJob& job) {
  switch (job.x_dtype) {
    case at::kFloat: return run_for_logits<float>(job);
    case at::kHalf: return run_for_logits<at::Half>(job);
    case at::kBFloat16: return run_for_logits<at::BFloat16>(job);
#if AHNET_FAST_ISA_DOUBLE
    case at::kDouble: return run_for_logits<double>(job);
#endif
    default: TORCH_CHECK(false, "focal_loss: no CPU kernel variant for logits of ", job.x_dtype);
  }
}

}  // namespace AHNET_FAST_ISA_NS
