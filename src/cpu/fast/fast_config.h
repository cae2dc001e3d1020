/*
 * Fast CPU backend: compiler plumbing (OpenMP pragmas, the x86-64-v3 clones,
 * which AVX2 loops a build has) and the tuning constants, with what each
 * was measured against.
 */
#ifndef FUSEDBN_SRC_CPU_FAST_FAST_CONFIG_H
#define FUSEDBN_SRC_CPU_FAST_FAST_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

/* ---- compiler plumbing -------------------------------------------------- */

#define FBN_STR(...) #__VA_ARGS__
#ifdef _OPENMP
#define FBN_OMP(...) _Pragma(FBN_STR(__VA_ARGS__))
#define FBN_SIMD _Pragma("omp simd")
#define FBN_SIMD_REDUCTION(a, b) _Pragma(FBN_STR(omp simd reduction(+ : a, b)))
#else
#define FBN_OMP(...)
#define FBN_SIMD
#define FBN_SIMD_REDUCTION(a, b)
#endif

/* x86-64 with GCC or clang (>= 14) and ifunc support: build each inner
 * loop for AVX2+FMA and for the baseline, dispatched once at load time. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__) && defined(__linux__) && \
    !defined(FBN_FAST_NO_CLONES)
#define FBN_FAST_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FBN_FAST_CLONES
#endif

/* The AVX2 + FMA intrinsics loops (fast_avx2.h): x86-64 with GCC or clang
 * (target("avx2,fma") functions). The build sets FBN_FAST_AVX2_LOOPS from
 * the same test (meson.build: the summary says which loops a build takes). */
#ifndef FBN_FAST_AVX2_LOOPS
#if defined(__x86_64__) && defined(__GNUC__)
#define FBN_FAST_AVX2_LOOPS 1
#else
#define FBN_FAST_AVX2_LOOPS 0
#endif
#endif
#define FBN_FAST_INLINE inline __attribute__((always_inline))

/* Without it GCC keeps `y <= 0 ? 0 : dy` as a branch inside the float->double
 * reductions of backward (an ordered compare may raise FE_INVALID) and does
 * not vectorize them. It changes no result, only whether floating-point
 * exception flags are exact; the library never reads them. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

/* ---- tuning ------------------------------------------------------------- */

/* Most channels in one NCHW group (stack arrays of this length). */
#define FBN_FAST_MAX_GROUP 64
/* Bytes of x (or of x, y and dy in backward) one NCHW group aims for. A
 * group's data is read twice, so it should come back from the caches the
 * second time; but each group is N strided runs, and short runs cost more
 * than the reuse gains (measured on a 2-core AMD EPYC: runs of 3 KB ran
 * at 60% of the speed of runs of 100 KB), so groups are sized for the
 * L2 + L3 share of a core rather than L2 alone. */
#define FBN_FAST_GROUP_BYTES ((int64_t)1 << 20)
#define FBN_FAST_GROUP_BYTES_SHORT_ROWS ((int64_t)4 << 20)
/* Bytes of x in one group of the pipelined NCHW training forward
 * (fbn_fast_forward_nchw_pipe): two groups are in the caches at once. And
 * groups per unit of work there. */
#define FBN_FAST_PIPE_GROUP_BYTES ((int64_t)512 << 10)
#define FBN_FAST_PIPE_STAGES 8
/* Elements of one unit of the NCHW eval forward (forward_nchw_eval). */
#define FBN_FAST_EVAL_CHUNK ((int64_t)64 << 10)
/* Elements of one NHWC block (P rows, P*C >= this) per vector loop. */
#define FBN_FAST_NHWC_BLOCK 4096
/* Bytes of x in one NHWC unit of work (threads take units dynamically). */
#define FBN_FAST_NHWC_CHUNK_BYTES ((int64_t)256 << 10)
/* NCHW with H*W below this runs channel groups as channels-last blocks of
 * about FBN_FAST_NCHW_VEC_LEN elements (fbn_fast_nchw_plan). */
#define FBN_FAST_NCHW_VEC_HW 256
#define FBN_FAST_NCHW_VEC_LEN 32768
/* Partial sums per row reduction (stats_rows): four AVX2 vectors of
 * doubles per sum, so that four adds are in flight. */
#define FBN_FAST_LANES 16
/* Elements of each of two sets of streams taken in turn by the paired loops
 * (fbn_fast_pair_run): 64 where the outputs of both sets start on 64-byte
 * lines, else 256 (outputs 16 bytes past a line, as glibc's malloc returns
 * large blocks: every switch then leaves two lines half written, and runs of
 * 64 made the loops 35-50% slower than one set at a time; runs of 256
 * measured 4-7% faster than one set). */
#define FBN_FAST_PAIR_RUN_LINES 64
#define FBN_FAST_PAIR_RUN_OTHER 256
/* Tensors with fewer elements run on one thread. */
#define FBN_FAST_MIN_PARALLEL (64 * 1024)
/* Outputs of at least this many bytes are written with non-temporal stores
 * (they would not stay in the caches anyway). */
#define FBN_FAST_STREAM_BYTES ((int64_t)8 << 20)
/* Bytes of one chunk of the chunked loops (fast_loops_impl.h): the on-stack
 * buffers for the expanded ReLU mask and for streamed outputs. */
#define FBN_FAST_CHUNK_BYTES 4096
/* Padding between scratch arrays, so that no two of them are a multiple of
 * 4 KiB apart (loads that alias a recent store modulo 4 KiB stall). */
#define FBN_FAST_SCRATCH_PAD 448

#endif /* FUSEDBN_SRC_CPU_FAST_FAST_CONFIG_H */
