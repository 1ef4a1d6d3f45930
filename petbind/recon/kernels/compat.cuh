// Portability header: the same kernel source compiles with NVRTC for the GPU
// and with a host C++ compiler (OpenMP) for the CPU.
//
// On the host a "launch" is an OpenMP loop over blocks; inside a block the
// threads run one after the other.  blockIdx/threadIdx/blockDim are emulated
// as thread-local variables so kernel bodies read exactly as on the GPU.
#pragma once

#if defined(__CUDACC__)

#define PB_DEVICE __device__ __forceinline__
#define PB_METHOD __device__ __forceinline__
#define PB_KERNEL extern "C" __global__

PB_DEVICE void pb_atomic_add(float* address, float value) { atomicAdd(address, value); }
PB_DEVICE float pb_erf(float x) { return erff(x); }

#else  // host build

#include <cmath>
#include <cstddef>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

// always_inline: once the ray walker is inlined into each kernel, the
// per-LOR accumulators of the sample operations live in registers (a
// non-inlined walker keeps them in memory and serialises every sample on a
// store-to-load round trip).
#define PB_DEVICE static inline __attribute__((always_inline))
#define PB_METHOD inline __attribute__((always_inline))
#define PB_KERNEL static inline

struct pb_dim3 {
    unsigned int x, y, z;
};
// initial-exec: a thread-local read is then one %fs-relative load instead of
// a __tls_get_addr call, which matters because every LOR reads these.
#define PB_TLS static thread_local __attribute__((tls_model("initial-exec")))
PB_TLS pb_dim3 blockIdx = {0, 0, 0};
PB_TLS pb_dim3 threadIdx = {0, 0, 0};
PB_TLS pb_dim3 blockDim = {1, 1, 1};

// <math.h> declares the single-precision functions (floorf, erff, ...)
// that NVRTC provides as built-ins, so kernel bodies need no #ifdefs.
#include <math.h>

// erf for the TOF kernel.  The C library's erff dominates the CPU cost of
// TOF projection, so the host uses Abramowitz & Stegun 7.1.26 (absolute
// error below 1.5e-7 over the real line; Handbook of Mathematical
// Functions, 1964): one division, one expf and five multiply-adds.
PB_DEVICE float pb_erf(float x) {
    const float ax = x < 0.0f ? -x : x;
    const float t = 1.0f / (1.0f + 0.3275911f * ax);
    const float poly =
        t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    const float y = 1.0f - poly * expf(-ax * ax);
    return x < 0.0f ? -y : y;
}

// Set while a thread accumulates into its own private copy of the output
// (see pb_launch_accumulate): then no atomic is needed.
PB_TLS bool pb_private_output = false;

PB_DEVICE void pb_atomic_add(float* address, float value) {
    if (pb_private_output) {
        *address += value;
        return;
    }
#pragma omp atomic
    *address += value;
}

static const unsigned int pb_host_block = 64;

// Run `kernel(args...)` for every thread index in [0, count): the host
// equivalent of kernel<<<ceil(count / block), block>>>(args...).
template <typename Kernel, typename... Args>
static void pb_launch(Kernel kernel, long long count, Args... args) {
    const long long num_blocks = (count + pb_host_block - 1) / pb_host_block;
#pragma omp parallel for schedule(dynamic, 8)
    for (long long b = 0; b < num_blocks; ++b) {
        blockIdx.x = (unsigned int)b;
        blockDim.x = pb_host_block;
        for (unsigned int t = 0; t < pb_host_block; ++t) {
            threadIdx.x = t;
            kernel(args...);
        }
    }
}

template <typename T>
static inline T pb_redirect(T arg, float*, float*) {
    return arg;
}
static inline float* pb_redirect(float* arg, float* from, float* to) { return arg == from ? to : arg; }

// Like pb_launch for kernels that scatter-add into `output` (output_size
// floats).  A float atomic on a CPU is a compare-and-swap loop, so the blocks
// are split into a fixed number of contiguous chunks, each accumulated in
// block order into its own zeroed copy of the output by whichever thread
// takes it, and the copies are summed in chunk order at the end.  The number
// of chunks depends only on the output size, never on the number of threads,
// so the result is bit for bit the same with 1 thread or 64 (a study spread
// over Dask workers equals a serial run).  Beyond the memory budget the
// kernel runs with OpenMP atomics (then the order, and the last bits, vary).
template <typename Kernel, typename... Args>
static void pb_launch_accumulate(Kernel kernel, long long count, float* output, long long output_size,
                                 Args... args) {
    const long long budget_floats = 1LL << 27;  // 512 MiB of copies at most
    long long num_chunks = 16;
    while (num_chunks > 1 && num_chunks * output_size > budget_floats) num_chunks /= 2;
    if (num_chunks * output_size > budget_floats) {
        pb_launch(kernel, count, args...);
        return;
    }
    const long long num_blocks = (count + pb_host_block - 1) / pb_host_block;
    const long long per_chunk = (num_blocks + num_chunks - 1) / num_chunks;
    std::vector<float> copies((size_t)num_chunks * (size_t)output_size, 0.0f);
#pragma omp parallel
    {
        pb_private_output = true;
#pragma omp for schedule(dynamic, 1)
        for (long long c = 0; c < num_chunks; ++c) {
            float* mine = copies.data() + (size_t)c * (size_t)output_size;
            const long long stop = (c + 1) * per_chunk < num_blocks ? (c + 1) * per_chunk : num_blocks;
            for (long long b = c * per_chunk; b < stop; ++b) {
                blockIdx.x = (unsigned int)b;
                blockDim.x = pb_host_block;
                for (unsigned int t = 0; t < pb_host_block; ++t) {
                    threadIdx.x = t;
                    kernel(pb_redirect(args, output, mine)...);
                }
            }
        }
        pb_private_output = false;
#pragma omp for schedule(static)
        for (long long v = 0; v < output_size; ++v) {
            float sum = 0.0f;
            for (long long k = 0; k < num_chunks; ++k) sum += copies[(size_t)k * (size_t)output_size + v];
            output[v] += sum;
        }
    }
}

#endif

PB_DEVICE long long pb_thread_index() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
