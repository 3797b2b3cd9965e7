// Per-row far-region sums of a causal softmax, one pass of exp per visible score (CPU).
//
// scores (N, R, C) float32: scaled logits of R query rows against keys 0..C-1 (C >= max position + 1).
// positions (R,) int64: absolute position n of each row; key i is visible to row n iff i <= n.
// distances (T,) int64: thresholds k; key i is far for row n iff i <= n - k.
// Returns (mass, square), each (N, T, R) float64:
//   mass[t, r]   = Σ_{i <= n-k_t} p_i,   square[t, r] = Σ_{i <= n-k_t} p_i²,
// with p the row's causal softmax, p_i = exp(s_i - m) / Z, m = max_{i<=n} s_i, Z = Σ_{i<=n} exp(s_i - m).
//
// Each row reads its visible scores twice (max, then exp and sums) and computes one exp per
// visible score. Far keys form the prefix [0, n-k_t], so the thresholds split the row into
// segments and no element needs a mask. Sums are float32 vector lanes within a segment,
// float64 across segments; every row is reduced by one thread in a fixed order, so the
// result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// Lanes of a vector, summed (op = +) or maxed, in lane order.
template <typename Op>
float reduce_lanes(const Vec& value, float init, Op op) {
  alignas(64) float lanes[Vec::size()];
  value.store(lanes);
  for (float lane : lanes) init = op(init, lane);
  return init;
}

float row_max(const float* row, int64_t count) {
  const int64_t width = Vec::size();
  int64_t i = 0;
  float best = -std::numeric_limits<float>::infinity();
  if (count >= width) {
    Vec acc = Vec::loadu(row);
    for (i = width; i + width <= count; i += width) acc = at::vec::maximum(acc, Vec::loadu(row + i));
    best = reduce_lanes(acc, best, [](float a, float b) { return std::max(a, b); });
  }
  for (; i < count; ++i) best = std::max(best, row[i]);
  return best;
}

// Σ exp(s - shift) and Σ exp(s - shift)² over row[begin, end).
void exp_sums(const float* row, int64_t begin, int64_t end, float shift, double& sum, double& square) {
  const int64_t width = Vec::size();
  const Vec shift_vec(shift);
  Vec acc_sum(0.0f), acc_square(0.0f);
  int64_t i = begin;
  for (; i + width <= end; i += width) {
    Vec weight = (Vec::loadu(row + i) - shift_vec).exp();
    acc_sum = acc_sum + weight;
    acc_square = at::vec::fmadd(weight, weight, acc_square);
  }
  float tail_sum = 0.0f, tail_square = 0.0f;
  for (; i < end; ++i) {
    float weight = std::exp(row[i] - shift);
    tail_sum += weight;
    tail_square += weight * weight;
  }
  auto add = [](float a, float b) { return a + b; };
  sum += static_cast<double>(reduce_lanes(acc_sum, tail_sum, add));
  square += static_cast<double>(reduce_lanes(acc_square, tail_square, add));
}

std::tuple<at::Tensor, at::Tensor> far_row_sums(const at::Tensor& scores, const at::Tensor& positions,
                                                const at::Tensor& distances) {
  TORCH_CHECK(scores.dim() == 3 && scores.scalar_type() == at::kFloat && scores.device().is_cpu(),
              "scores must be a (N, R, C) float32 CPU tensor");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == scores.size(1) && positions.scalar_type() == at::kLong,
              "positions must be (R,) int64");
  TORCH_CHECK(distances.dim() == 1 && distances.scalar_type() == at::kLong, "distances must be (T,) int64");
  const auto contiguous = scores.contiguous();
  const auto rows_pos = positions.contiguous();
  const auto thresholds = distances.contiguous();
  const int64_t n_blocks = contiguous.size(0), rows = contiguous.size(1), columns = contiguous.size(2);
  const int64_t n_thresholds = thresholds.size(0);
  const int64_t* pos = rows_pos.data_ptr<int64_t>();
  const int64_t* dist = thresholds.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(pos[r] >= 0 && pos[r] < columns, "row position ", pos[r], " outside the ", columns, " score columns");
  for (int64_t t = 0; t < n_thresholds; ++t) TORCH_CHECK(dist[t] >= 1, "distances must be >= 1");
  // Thresholds from the largest k (shortest far prefix) to the smallest.
  std::vector<int64_t> order(n_thresholds);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return dist[a] > dist[b]; });

  auto options = contiguous.options().dtype(at::kDouble);
  at::Tensor mass = at::zeros({n_blocks, n_thresholds, rows}, options);
  at::Tensor square = at::zeros({n_blocks, n_thresholds, rows}, options);
  const float* data = contiguous.data_ptr<float>();
  double* mass_out = mass.data_ptr<double>();
  double* square_out = square.data_ptr<double>();

  at::parallel_for(0, n_blocks * rows, 1, [&](int64_t first, int64_t last) {
    for (int64_t index = first; index < last; ++index) {
      const int64_t block = index / rows, r = index % rows;
      const float* row = data + index * columns;
      const int64_t visible = pos[r] + 1;
      const float shift = row_max(row, visible);
      double prefix_sum = 0.0, prefix_square = 0.0;
      int64_t done = 0;
      for (int64_t t : order) {
        const int64_t far_end = std::max<int64_t>(0, std::min(visible, visible - dist[t]));  // keys [0, n-k]
        if (far_end > done) {
          exp_sums(row, done, far_end, shift, prefix_sum, prefix_square);
          done = far_end;
        }
        mass_out[(block * n_thresholds + t) * rows + r] = prefix_sum;
        square_out[(block * n_thresholds + t) * rows + r] = prefix_square;
      }
      double normaliser = prefix_sum, unused = 0.0;
      exp_sums(row, done, visible, shift, normaliser, unused);
      const double inverse = 1.0 / normaliser;
      for (int64_t t = 0; t < n_thresholds; ++t) {
        mass_out[(block * n_thresholds + t) * rows + r] *= inverse;
        square_out[(block * n_thresholds + t) * rows + r] *= inverse * inverse;
      }
    }
  });
  return {mass, square};
}

}  // namespace

TORCH_LIBRARY(hf_longattn, m) {
  m.def("far_row_sums(Tensor scores, Tensor positions, Tensor distances) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(hf_longattn, CPU, m) { m.impl("far_row_sums", far_row_sums); }
