// The cases of the two cross-entropy short-row loop benches (ce_short_rows.cpp: AVX-512, checked bitwise against
// a row-at-a-time kernel; ce_short_rows_avx2.cpp: AVX2, checked against float64 math): one builder, so that both
// check the kernels on the same kind of input.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

#include "../../csrc/cpu/cross_entropy_short_rows.h"

namespace ce_cases {

using mmops::cpu::CEArgs;

struct Case {
  std::vector<float> x, grad, loss;
  std::vector<int64_t> y;
  CEArgs<float> args;
};

// N rows of C logits (normal, scale 3), every 7th target ignored when `ignored`; with `specials`, a -inf, a large
// one and a NaN at fixed places (their rows' losses and gradients are inf or NaN, and so is a "mean" total). Every
// buffer has `guard` floats after it (random logits; the outputs filled with `fill`, as their values are).
inline Case make_case(int64_t N, int64_t C, bool none, bool ignored, bool specials, bool inplace, unsigned seed,
                      int64_t guard, float fill) {
  Case k;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  k.x.resize(N * C + guard);
  for (auto& v : k.x) v = normal(rng);
  if (specials && N * C > 40) k.x[13] = -__builtin_inff(), k.x[29] = 80.0f;
  if (specials && N * C > 60) k.x[57] = __builtin_nanf("");
  k.y.resize(N);
  for (int64_t i = 0; i < N; ++i) k.y[i] = ignored && i % 7 == 3 ? -100 : static_cast<int64_t>(rng() % C);
  k.grad.assign(N * C + guard, fill);
  k.loss.assign(N + guard, fill);
  k.args.x = k.x.data();
  k.args.C = C;
  k.args.y = k.y.data();
  k.args.grad_scale = none ? 1.0f : 1.0f / static_cast<float>(N);
  k.args.grad = inplace ? k.x.data() : k.grad.data();
  k.args.loss_rows = none ? k.loss.data() : nullptr;
  return k;
}

}  // namespace ce_cases
