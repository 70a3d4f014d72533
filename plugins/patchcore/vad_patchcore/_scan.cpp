// Fused CPU scan of vad_patchcore.pruned.PrunedExactSearch (optional; the torch scan is the fallback).
//
// The torch scan runs each (cell, queries) pair as its own small matrix product, and about 190
// of them per block of queries reach half of the CPU's GEMM speed. This scan walks a few queries
// at a time through the cells their bounds cannot exclude and, inside a cell, through blocks of
// LANES items, so nothing is materialised and every bound is applied as soon as it can be:
//
//   1. cell: skipped when its lower bound is above the k-th distance found so far plus the
//      rounding tolerance (the limit). The bounds (ball, and bisectors of the query's nearest
//      centroids, pruned.py step 1) are computed here too, from the query's distances to the
//      centroids: only the rotation of the queries is left to torch;
//   2. block: skipped when the ball around the block's centre in the augmented space (leading
//      coordinates and the norm of the rest, see pruned.py) lies beyond the limit; items within
//      a cell are ordered so that blocks are tight (pruned.py, _block_order);
//   3. distance: the bank is stored rotated into its principal axes, each block as a panel
//      [coordinate][LANES], so the LANES squared distances of a block accumulate in expanded
//      form (||q||^2 + ||x||^2 - 2 q.x, the items' squared norms stored), one coordinate for all
//      items at a time. The leading coordinates carry most of each distance: after every LANES
//      coordinates, the partial distance plus (|q_rest| - |x_rest|)^2 (a lower bound of the rest)
//      is compared with the limit; a lane that fails stays out, and the block stops when no lane
//      is left (most stop after one or two of the ten chunks).
//
// Consecutive queries go through these steps in groups of four (AVX-512 kernel; the portable one,
// in SSE registers, is faster one by one): a cell or block is visited once for the group where
// any member's bound keeps it, with each member's own bounds and limit, and every coordinate of a
// block is loaded once and multiplied into all four members' sums. Neighbouring patches, which
// callers pass consecutively, keep mostly the same blocks (1.4 times one query's blocks for the
// four, on the benchmark's data), and the group runs four times as many independent
// multiply-adds per load: 0.22 s instead of 0.27 s for the benchmark's 78,400 queries. A
// member's result does not depend on its group (the tests check it).
//
// Each bound is, in exact arithmetic, a partial sum of squared differences plus a lower bound of
// the rest, so never above the distance computed at the end; float32 rounding (expanded form and
// rotation) is covered by the tolerance of pruned._native_tolerance that every comparison
// carries: the neighbours are those of brute force (ties within float32 rounding aside). Written for GCC
// (vector extension, target pragmas); the kernel (_scan_kernel.inc) is compiled for AVX-512 and
// portably, and picked at run time. Queries are shared among OpenMP threads: the same runtime
// (libgomp) as torch's, so its pool is reused and torch's idle threads do not compete with ours.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

constexpr int LANES = 16;  // items per block (one AVX-512 register of float32)
constexpr int64_t QUERY_CHUNK = 64;
// Queries scanned together by each kernel (see above; the benchmark's 78,400 queries, in one
// process: AVX-512 0.27 s alone, 0.25 s in pairs, 0.22 s in fours, 0.31 s in eights; portable
// 0.81 s alone, 1.53 s in fours). Overridable at build time (-DAVX512_GROUP=...) to measure.
#ifndef AVX512_GROUP
#define AVX512_GROUP 4
#endif
#ifndef PORTABLE_GROUP
#define PORTABLE_GROUP 1
#endif

typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef int32_t vint __attribute__((vector_size(LANES * 4)));
typedef float vfloat_unaligned __attribute__((vector_size(LANES * 4), aligned(4)));
#define LOAD(pointer) (*(const vfloat_unaligned *)(pointer))

const vint LANE_BITS = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768};

// The helpers below are inlined into both kernels, so they are compiled for each instruction set.

// The sum of a vector's lanes by a shuffle tree (4 shuffles and adds instead of 15 dependent adds).
template <typename Vector>
__attribute__((always_inline)) inline auto lane_sum(Vector v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}

// Adds (values[d] - columns[d LANES ...])^2 for d < count to four independent accumulators (one
// multiply-add latency each: not a chain of `count` of them), columns being rows of LANES floats.
__attribute__((always_inline)) inline void add_squared_differences(vfloat (&sums)[4], const float *values,
                                                                   const float *columns, int64_t count) {
  int64_t d = 0;
  for (; d + 4 <= count; d += 4)
    for (int u = 0; u < 4; ++u) {
      const vfloat difference = values[d + u] - LOAD(columns + (d + u) * LANES);
      sums[u] += difference * difference;
    }
  for (; d < count; ++d) {
    const vfloat difference = values[d] - LOAD(columns + d * LANES);
    sums[0] += difference * difference;
  }
}

__attribute__((always_inline)) inline vfloat sum_of(const vfloat (&sums)[4]) {
  return (sums[0] + sums[1]) + (sums[2] + sums[3]);
}

// Bit i set where lane i of the comparison holds: the lanes' bits summed by lane_sum; the
// AVX-512 kernel uses mask registers.
#define LANE_MASK(comparison) ((unsigned)lane_sum((comparison) & LANE_BITS))

struct Bank {
  const float *panels;        // [row / LANES, blocks, LANES, LANES] centred, rotated items, zero-padded
                              // to `row` coordinates, NaN in the lanes of padding slots: chunk c of
                              // block b holds coordinates [c LANES, (c + 1) LANES) of its items
  const float *suffix_norms;  // [row / LANES - 1, blocks, LANES] norm of each item past 1, 2, ... chunks
  const float *centres;       // [ceil(blocks / LANES), head_dims + 1, LANES] block centres in the
                              // augmented space, LANES blocks per panel
  const float *centre_norms;  // [ceil(blocks / LANES) * LANES]
  const float *block_radii;   // [ceil(blocks / LANES) * LANES] (augmented space)
  const int64_t *cell_starts; // [cells] first slot of each cell (a multiple of LANES)
  const int64_t *cell_blocks; // [cells] number of blocks of each cell
  const float *cell_radii;    // [cells]
  const float *half_inverse_gaps;  // [cells, cells] 1 / (2 ||c_i - c_j||), inf on the diagonal
  const float *centroid_panels;    // [ceil(cells / LANES), dim, LANES] centroids (centred, not rotated)
  const float *item_squares;       // [blocks, LANES] squared norm of each item, NaN in padding lanes
  int64_t row, head_dims, cells, bisectors, max_blocks, blocks, dim;
};

struct Queries {
  const float *rows;          // [n, row] centred, rotated, zero-padded
  const float *centred;       // [n, dim] centred, not rotated (for the distances to the centroids)
  const float *tolerance;     // [n]
  int64_t count, k;
  float *distances;    // [n, k] out
  int64_t *positions;  // [n, k] out: padded positions, -1 where fewer than k items exist
};

// The kernel, compiled twice: for AVX-512, with comparisons straight into mask registers, and
// portably (masks folded out of vectors); scan() picks one at run time.
#define AS_VECTOR(x) ((x) + (vfloat){})  // a scalar broadcast, a vector unchanged
#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi,bmi2,lzcnt,popcnt")
#define SCAN_NAMESPACE avx512_kernel
#define SCAN_GROUP AVX512_GROUP
#define LANE_LE(a, b) ((unsigned)_mm512_cmp_ps_mask((__m512)AS_VECTOR(a), (__m512)AS_VECTOR(b), _CMP_LE_OQ))
#define LANE_LT(a, b) ((unsigned)_mm512_cmp_ps_mask((__m512)AS_VECTOR(a), (__m512)AS_VECTOR(b), _CMP_LT_OQ))
#include "_scan_kernel.inc"
#undef SCAN_NAMESPACE
#undef SCAN_GROUP
#undef LANE_LE
#undef LANE_LT
#pragma GCC pop_options

bool runs_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
#else
bool runs_avx512() { return false; }
#endif

#define SCAN_NAMESPACE portable_kernel
#define SCAN_GROUP PORTABLE_GROUP
#define LANE_LE(a, b) LANE_MASK(AS_VECTOR(a) <= AS_VECTOR(b))
#define LANE_LT(a, b) LANE_MASK(AS_VECTOR(a) < AS_VECTOR(b))
#include "_scan_kernel.inc"

template <typename T>
T *pointer(unsigned long long address) {
  return reinterpret_cast<T *>(static_cast<uintptr_t>(address));
}

// scan(bank pointers..., bank sizes..., query pointers..., count, k, threads, kernel) -> distances
// begun (LANES per block visited). Pointers are data_ptr() of the contiguous tensors pruned.py
// makes, of the dtypes above, in the order of the structs' fields; kernel is "avx512" (where
// isa() says so) or "portable".
PyObject *scan(PyObject *, PyObject *args) {
  unsigned long long b[11], q[5];
  long long row, head_dims, cells, bisectors, max_blocks, blocks, dim, count, k;
  int threads;
  const char *kernel_name;
  if (!PyArg_ParseTuple(args, "KKKKKKKKKKKLLLLLLLKKKKKLLis", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &b[6],
                        &b[7], &b[8], &b[9], &b[10], &row, &head_dims, &cells, &bisectors, &max_blocks, &blocks, &dim,
                        &q[0], &q[1], &q[2], &q[3], &q[4], &count, &k, &threads, &kernel_name))
    return nullptr;
  const std::string requested(kernel_name);
  if (requested != "portable" && !(requested == "avx512" && runs_avx512())) {
    PyErr_SetString(PyExc_ValueError, ("scan: kernel must be \"portable\" or, where isa() says so, \"avx512\"; got \"" +
                                       requested + "\"").c_str());
    return nullptr;
  }
  if (row % LANES || head_dims < 0 || head_dims >= row || dim < 1 || dim > row || cells < 1 || bisectors < 1 ||
      bisectors > cells || k < 1 || threads < 1) {
    PyErr_SetString(PyExc_ValueError,
                    "scan: row must be a multiple of 16 above head_dims >= 0 and at least dim >= 1; cells, "
                    "bisectors (at most cells), k and threads positive");
    return nullptr;
  }
  const Bank bank{pointer<const float>(b[0]),   pointer<const float>(b[1]),   pointer<const float>(b[2]),
                  pointer<const float>(b[3]),   pointer<const float>(b[4]),   pointer<const int64_t>(b[5]),
                  pointer<const int64_t>(b[6]), pointer<const float>(b[7]),   pointer<const float>(b[8]),
                  pointer<const float>(b[9]),   pointer<const float>(b[10]), row, head_dims, cells, bisectors, max_blocks, blocks, dim};
  const Queries queries{pointer<const float>(q[0]), pointer<const float>(q[1]), pointer<const float>(q[2]),
                        count, k, pointer<float>(q[3]), pointer<int64_t>(q[4])};
  const auto kernel = requested == "avx512" ? avx512_kernel::scan_range : portable_kernel::scan_range;
  int64_t begun = 0;
  Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(dynamic) num_threads(threads) reduction(+ : begun)
  for (int64_t chunk = 0; chunk < (count + QUERY_CHUNK - 1) / QUERY_CHUNK; ++chunk) {
    const int64_t begin = chunk * QUERY_CHUNK;
    begun += kernel(bank, queries, begin, begin + QUERY_CHUNK < count ? begin + QUERY_CHUNK : count);
  }
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(begun);
}

// isa() -> "avx512" or "portable": the fastest kernel scan() can run on this CPU. pruned.py
// prefers the compiled scan only with AVX-512: the portable kernel (16-lane vectors split into
// SSE registers) took 0.81 s for the benchmark's 78,400 queries against 0.22 s, and the torch
// scan 0.84 s, on an AVX-512 machine; on a CPU without AVX-512 it was not measured.
PyObject *isa(PyObject *, PyObject *) { return PyUnicode_FromString(runs_avx512() ? "avx512" : "portable"); }

PyMethodDef methods[] = {
    {"isa", isa, METH_NOARGS, "The kernel scan() runs on this CPU: avx512 or portable."},
    {"scan", scan, METH_VARARGS, "Fused cell/block/item-pruned exact k-NN scan (see _scan.cpp)."},
    {nullptr, nullptr, 0, nullptr}};
PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan", "Compiled scan of vad_patchcore.pruned.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&module); }
