// The one threading scheme of the reduce-then-elementwise kernels (BatchNorm, SyncBatchNorm): the rows are split
// once across the threads, each thread reduces its rows into its own partial sums, one thread combines them, and
// each thread then runs the elementwise pass over the same rows it has just read (from its own cache): one
// fork/join per call instead of one per pass.
#pragma once
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "cpu/scratch.h"
#include "cpu/simd.h"

namespace mmops::cpu {

// Threads for `elements` values of work: one below 2 * kGrainElements (a fork/join costs more than the work),
// and none nested inside another parallel region.
inline int threads_for(int64_t elements) {
  if (elements < 2 * simd::kGrainElements || at::in_parallel_region()) return 1;
  return static_cast<int>(std::min<int64_t>(at::get_num_threads(), elements / simd::kGrainElements));
}

// Runs reduce(n0, n1, partial) on each thread's rows, then combine(S1, S2) once with the per-channel totals of the
// two sums (partial[0:C] and partial[C:2C] of every thread, added up), then elementwise(n0, n1) on the same rows.
// Rows have `row_elements` values each; a phase with nothing to do is a lambda that does nothing.
template <typename Reduce, typename Combine, typename Elementwise>
void reduce_then_elementwise(int64_t N, int64_t C, int64_t row_elements, Reduce&& reduce, Combine&& combine,
                             Elementwise&& elementwise) {
  const int nt = threads_for(N * row_elements);
  if (nt == 1) {  // below the threshold: no parallel region at all (entering one costs a microsecond at batch 32)
    Scratch<double> sums(2 * C, 0.0);
    reduce(0, N, sums.data());
    combine(sums.data(), sums.data() + C);
    elementwise(0, N);
    return;
  }
  // each thread's partial sums, then the totals (the last 2C)
  Scratch<double> part(static_cast<size_t>(nt + 1) * 2 * C, 0.0);
  double* const S1 = part.data() + static_cast<size_t>(nt) * 2 * C;
  double* const S2 = S1 + C;
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t chunk = (N + T - 1) / T, n0 = std::min<int64_t>(N, t * chunk), n1 = std::min<int64_t>(N, n0 + chunk);
    if (n0 < n1) reduce(n0, n1, part.data() + static_cast<size_t>(t) * 2 * C);
#pragma omp barrier
#pragma omp single
    {
      for (int u = 0; u < T; ++u)
        for (int64_t c = 0; c < C; ++c) {
          S1[c] += part[u * 2 * C + c];
          S2[c] += part[u * 2 * C + C + c];
        }
      combine(static_cast<const double*>(S1), static_cast<const double*>(S2));
    }
    if (n0 < n1) elementwise(n0, n1);
  }
}

}  // namespace mmops::cpu
