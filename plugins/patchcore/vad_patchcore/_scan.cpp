// Fused CPU scan of vad_patchcore.pruned.PrunedExactSearch (optional; the torch scan is the fallback).
//
// The torch scan runs each (cell, queries) pair as its own small matrix product, and about 190
// of them per block of queries reach half of the CPU's GEMM speed. This scan walks one query
// at a time through the cells its bounds cannot exclude and, inside a cell, through blocks of
// LANES items, so nothing is materialised and every bound is applied as soon as it can be:
//
//   1. cell: skipped when its lower bound (from Python: ball and bisector bounds, squared) is
//      above the k-th distance found so far plus the rounding tolerance (the limit);
//   2. block: skipped when the ball around the block's centre in the augmented space (leading
//      coordinates and the norm of the rest, see pruned.py) lies beyond the limit; items within
//      a cell are ordered so that blocks are tight (pruned.py, _block_order);
//   3. distance: the bank is stored rotated into its principal axes, each block as a panel
//      [coordinate][LANES], so the LANES squared distances of a block accumulate in difference
//      form, one coordinate for all items at a time. The leading coordinates carry most of each
//      distance: after every LANES coordinates, the partial sum plus (|q_rest| - |x_rest|)^2 (a
//      lower bound of the rest) is compared with the limit; a lane that fails stays out, and
//      the block stops when no lane is left (most stop after one to three of the ten chunks).
//
// Partial sums of squares only grow, so every bound is a lower bound of the distance computed
// at the end, and each comparison carries the tolerance of pruned._native_tolerance: the
// neighbours are those of brute force (ties within float32 rounding aside). Vectors use GCC's
// vector extension; on x86-64 the kernel is compiled for v4 (AVX-512), v3 (AVX2) and baseline and
// picked at load time. Queries are shared among OpenMP threads: the same runtime (libgomp) as
// torch's, so its pool is reused and torch's idle threads do not compete with ours.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int LANES = 16;  // items per block (one AVX-512 register of float32)
constexpr int64_t QUERY_CHUNK = 64;

typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef int32_t vint __attribute__((vector_size(LANES * 4)));
typedef float vfloat_unaligned __attribute__((vector_size(LANES * 4), aligned(4)));
#define LOAD(pointer) (*(const vfloat_unaligned *)(pointer))

const vint LANE_BITS = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768};

// Sum of the lanes (a shuffle tree: ~8 instructions instead of 16 dependent scalar adds).
#define FOLD(vector, type)                                                                      \
  ({                                                                                            \
    type folded_ = (vector);                                                                    \
    folded_ += __builtin_shufflevector(folded_, folded_, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, \
                                       3, 4, 5, 6, 7);                                          \
    folded_ += __builtin_shufflevector(folded_, folded_, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14,    \
                                       15, 8, 9, 10, 11);                                       \
    folded_ += __builtin_shufflevector(folded_, folded_, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9,  \
                                       14, 15, 12, 13);                                         \
    folded_ += __builtin_shufflevector(folded_, folded_, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10,  \
                                       13, 12, 15, 14);                                         \
    folded_[0];                                                                                 \
  })
// Bit i set where lane i of the comparison holds.
#define LANE_MASK(comparison) ((unsigned)FOLD((comparison) & LANE_BITS, vint))

struct Bank {
  const float *panels;        // [blocks, row, LANES] centred, rotated items, zero-padded to `row`
                              // coordinates; NaN in the lanes of padding slots
  const float *suffix_norms;  // [blocks, row / LANES - 1, LANES] norm of each item past 1, 2, ... chunks
  const float *centres;       // [ceil(blocks / LANES), head, LANES] block centres, LANES blocks per panel
  const float *centre_norms;  // [ceil(blocks / LANES) * LANES]
  const float *radii;         // [ceil(blocks / LANES) * LANES] block radii (augmented space)
  const int64_t *cell_first;  // [cells] first block of each cell
  const int64_t *cell_blocks; // [cells] number of blocks of each cell
  int64_t row, head, cells, max_blocks;
};

struct Queries {
  const float *rows;       // [n, row] centred, rotated, zero-padded
  const float *augmented;  // [n, head]
  const float *augmented_norms;
  const float *cell_lower;  // [n, cells] squared lower bounds
  const float *tolerance;   // [n]
  const int64_t *home;      // [n] nearest cell
  int64_t count, k;
  float *distances;    // [n, k] out
  int64_t *positions;  // [n, k] out: padded positions, -1 where fewer than k items exist
};

#if defined(__x86_64__)
#define SCAN_TARGETS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SCAN_TARGETS
#endif

SCAN_TARGETS int64_t scan_range(const Bank &bank, const Queries &queries, int64_t begin, int64_t end) {
  const int64_t row = bank.row, head = bank.head, k = queries.k, chunks = row / LANES;
  std::vector<float> best(k), scaled(head), query_suffix(chunks);
  std::vector<int64_t> best_positions(k), kept(bank.max_blocks);
  int64_t visited = 0;
  for (int64_t r = begin; r < end; ++r) {
    const float *query = queries.rows + r * row;
    const float *cell_lower = queries.cell_lower + r * bank.cells;
    const float augmented_norm = queries.augmented_norms[r], tolerance = queries.tolerance[r];
    float rest = 0.0f;  // the query's norms past 1, 2, ... chunks, accumulated from the end
    for (int64_t c = chunks - 1; c >= 1; --c) {
      for (int64_t d = c * LANES; d < (c + 1) * LANES; ++d) rest += query[d] * query[d];
      query_suffix[c - 1] = std::sqrt(rest);
    }
    for (int64_t i = 0; i < head; ++i) scaled[i] = -2.0f * queries.augmented[r * head + i];
    for (int64_t i = 0; i < k; ++i) best[i] = INFINITY, best_positions[i] = -1;
    const int64_t home = queries.home[r];
    for (int64_t step = -1; step < bank.cells; ++step) {  // the home cell first: a tight k-th distance early
      const int64_t cell = step < 0 ? home : step;
      if (step >= 0 && (cell == home || !(cell_lower[cell] <= best[k - 1] + tolerance))) continue;
      const int64_t first = bank.cell_first[cell], stop = first + bank.cell_blocks[cell];
      // blocks whose ball may hold an item within the limit: ||a - c||^2 <= (sqrt(limit) + r)^2
      const float reach = std::sqrt(best[k - 1] + tolerance);
      int64_t count = 0;
      for (int64_t panel = first / LANES; panel * LANES < stop; ++panel) {
        const float *centres = bank.centres + panel * head * LANES;
        vfloat distance = LOAD(bank.centre_norms + panel * LANES) + augmented_norm;
        for (int64_t i = 0; i < head; ++i) distance += scaled[i] * LOAD(centres + i * LANES);
        const vfloat far = LOAD(bank.radii + panel * LANES) + reach;
        unsigned bits = LANE_MASK(distance - tolerance <= far * far);
        const int64_t base = panel * LANES;
        if (base < first) bits &= ~0u << (first - base);
        if (base + LANES > stop) bits &= (1u << (stop - base)) - 1;
        for (; bits; bits &= bits - 1) kept[count++] = base + __builtin_ctz(bits);
      }
      for (int64_t j = 0; j < count; ++j) {
        const int64_t block = kept[j];
        const float *panel = bank.panels + block * row * LANES;
        const float *suffix = bank.suffix_norms + block * (chunks - 1) * LANES;
        const float limit = best[k - 1] + tolerance;
        vfloat sums[4] = {{0}, {0}, {0}, {0}};  // independent chains: one multiply-add latency each
        vfloat sum = {0};
        unsigned alive = (1u << LANES) - 1;
        ++visited;
        for (int64_t chunk = 0; alive && chunk < chunks; ++chunk) {
          for (int64_t d = chunk * LANES; d < (chunk + 1) * LANES; d += 4)
            for (int u = 0; u < 4; ++u) {
              const vfloat difference = query[d + u] - LOAD(panel + (d + u) * LANES);
              sums[u] += difference * difference;
            }
          sum = (sums[0] + sums[1]) + (sums[2] + sums[3]);
          if (chunk + 1 < chunks) {
            const vfloat gap = query_suffix[chunk] - LOAD(suffix + chunk * LANES);
            alive &= LANE_MASK(sum + gap * gap <= limit);
          } else {
            alive &= LANE_MASK(sum < best[k - 1]);  // NaN (padding) never passes
          }
        }
        for (; alive; alive &= alive - 1) {
          const int lane = __builtin_ctz(alive);
          const float distance = sum[lane];
          if (!(distance < best[k - 1])) continue;  // the k-th distance may have tightened
          int64_t slot = k - 1;
          for (; slot > 0 && best[slot - 1] > distance; --slot)
            best[slot] = best[slot - 1], best_positions[slot] = best_positions[slot - 1];
          best[slot] = distance, best_positions[slot] = block * LANES + lane;
        }
      }
    }
    for (int64_t i = 0; i < k; ++i) {
      queries.distances[r * k + i] = best[i];
      queries.positions[r * k + i] = best_positions[i];
    }
  }
  return visited * LANES;
}

template <typename T>
T *pointer(unsigned long long address) {
  return reinterpret_cast<T *>(static_cast<uintptr_t>(address));
}

// scan(bank pointers..., query pointers..., sizes..., threads) -> distances begun (LANES per block visited).
// Pointers are data_ptr() of contiguous tensors of the dtypes above, checked by pruned.py.
PyObject *scan(PyObject *, PyObject *args) {
  unsigned long long b[7], q[8];
  long long row, head, cells, max_blocks, count, k;
  int threads;
  if (!PyArg_ParseTuple(args, "KKKKKKKLLLLKKKKKKKKLLi", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &b[6],
                        &row, &head, &cells, &max_blocks, &q[0], &q[1], &q[2], &q[3], &q[4], &q[5], &q[6],
                        &q[7], &count, &k, &threads))
    return nullptr;
  if (row % LANES || head < 1 || k < 1 || threads < 1) {
    PyErr_SetString(PyExc_ValueError, "scan: row must be a multiple of 16, head, k and threads positive");
    return nullptr;
  }
  const Bank bank{pointer<const float>(b[0]), pointer<const float>(b[1]), pointer<const float>(b[2]),
                  pointer<const float>(b[3]), pointer<const float>(b[4]), pointer<const int64_t>(b[5]),
                  pointer<const int64_t>(b[6]), row, head, cells, max_blocks};
  const Queries queries{pointer<const float>(q[0]), pointer<const float>(q[1]), pointer<const float>(q[2]),
                        pointer<const float>(q[3]), pointer<const float>(q[4]), pointer<const int64_t>(q[5]),
                        count, k, pointer<float>(q[6]), pointer<int64_t>(q[7])};
  int64_t begun = 0;
  Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(dynamic) num_threads(threads) reduction(+ : begun)
  for (int64_t chunk = 0; chunk < (count + QUERY_CHUNK - 1) / QUERY_CHUNK; ++chunk) {
    const int64_t begin = chunk * QUERY_CHUNK;
    begun += scan_range(bank, queries, begin, begin + QUERY_CHUNK < count ? begin + QUERY_CHUNK : count);
  }
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(begun);
}

// isa() -> the instruction set the loaded kernel runs with ("x86-64-v4", "x86-64-v3" or "default"),
// the same test as target_clones' resolver. Only the AVX-512 code beats the torch scan (measured:
// the 16-lane vectors split into AVX2 halves run ~3x slower), so pruned.py prefers it only then.
PyObject *isa(PyObject *, PyObject *) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return PyUnicode_FromString("x86-64-v4");
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return PyUnicode_FromString("x86-64-v3");
#endif
  return PyUnicode_FromString("default");
}

PyMethodDef methods[] = {
    {"isa", isa, METH_NOARGS, "Instruction set of the loaded kernel: x86-64-v4, x86-64-v3 or default."},
    {"scan", scan, METH_VARARGS, "Fused cell/block/item-pruned exact k-NN scan (see _scan.cpp)."},
    {nullptr, nullptr, 0, nullptr}};
PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan", "Compiled scan of vad_patchcore.pruned.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&module); }
