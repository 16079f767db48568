// Runs fuselm's CUDA kernels on the CPU, so CI without a GPU checks their logic.
//
// Force-included (g++ -include) before a copy of the .cuh headers in which the
// test rewrote each `kernel<<<grid, block, smem, stream>>>(args)` into
// `::emu::launch(grid, block, smem, stream, [&] { kernel(args); })`.
// Blocks run one after another; the threads of a block are fibers (ucontext)
// that switch only at __syncthreads and warp collectives, where they wait for
// the whole block / warp. __shared__ becomes `static`: one copy per kernel
// instantiation, shared by the block that runs. A barrier that not every live
// thread reaches aborts with "deadlock". Not modelled: data races (a fiber runs
// until it blocks, so a missing barrier may go unseen), the memory model,
// timing. Used only by tests/test_native.py.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

// Device-code qualifiers become plain C++ (the CUDA headers above are already parsed).
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __shared__
#define __shared__ static
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace emu {

enum State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };
constexpr int kWarp = 32;
constexpr size_t kStack = 1 << 16;

struct Fiber {
  ucontext_t ctx;
  State state;
};

inline uint3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::vector<Fiber> fibers;
inline std::vector<std::vector<char>> stacks;
inline std::vector<uint64_t> lanes;  // one exchange slot per thread for warp collectives
inline int current;
inline ucontext_t scheduler;
inline std::function<void()> kernel;

// Park the running thread at a barrier and return to the scheduler.
inline void wait(State at) {
  const int me = current;
  fibers[me].state = at;
  swapcontext(&fibers[me].ctx, &scheduler);
}

inline void fiber_main() {
  kernel();
  fibers[current].state = kDone;  // uc_link returns to the scheduler
}

// Release the block barrier when every live thread waits there, and each warp's
// barrier when every live lane of that warp waits there. False: no progress.
inline bool release(int n) {
  int live = 0, at_block = 0;
  for (const Fiber& f : fibers) live += f.state != kDone, at_block += f.state == kAtBlockBarrier;
  bool released = false;
  if (live > 0 && at_block == live) {
    for (Fiber& f : fibers) f.state = f.state == kAtBlockBarrier ? kRunnable : f.state;
    released = true;
  }
  for (int w = 0; w < n; w += kWarp) {
    int warp_live = 0, warp_waiting = 0;
    for (int l = w; l < w + kWarp && l < n; ++l)
      warp_live += fibers[l].state != kDone, warp_waiting += fibers[l].state == kAtWarpBarrier;
    if (warp_live > 0 && warp_waiting == warp_live) {
      for (int l = w; l < w + kWarp && l < n; ++l)
        if (fibers[l].state == kAtWarpBarrier) fibers[l].state = kRunnable;
      released = true;
    }
  }
  return released;
}

inline void run_block(int n) {
  fibers.assign(n, Fiber{});
  lanes.assign(n, 0);
  if (static_cast<int>(stacks.size()) < n) stacks.resize(n, std::vector<char>(kStack));
  for (int i = 0; i < n; ++i) {
    getcontext(&fibers[i].ctx);
    fibers[i].ctx.uc_stack.ss_sp = stacks[i].data();
    fibers[i].ctx.uc_stack.ss_size = kStack;
    fibers[i].ctx.uc_link = &scheduler;
    makecontext(&fibers[i].ctx, fiber_main, 0);
    fibers[i].state = kRunnable;
  }
  for (;;) {
    for (int i = 0; i < n; ++i) {
      if (fibers[i].state != kRunnable) continue;
      current = i;
      thread_idx = uint3{static_cast<unsigned>(i), 0, 0};
      swapcontext(&scheduler, &fibers[i].ctx);
    }
    bool all_done = true;
    for (const Fiber& f : fibers) all_done &= f.state == kDone;
    if (all_done) return;
    if (!release(n)) {
      std::fprintf(stderr, "cuda_emulator: deadlock in block %u: a barrier not reached by every thread\n",
                   block_idx.x);
      std::abort();
    }
  }
}

template <typename Fn>
void launch(dim3 grid, dim3 block, size_t, cudaStream_t, Fn&& fn) {
  block_dim = block;
  grid_dim = grid;
  kernel = fn;
  for (unsigned b = 0; b < grid.x; ++b) {
    block_idx = uint3{b, 0, 0};
    run_block(static_cast<int>(block.x));
  }
}

// Each lane posts v; after the whole warp has posted, returns the value of lane src.
template <typename T>
T exchange(T v, int src) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "warp exchange of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  lanes[current] = bits;
  wait(kAtWarpBarrier);
  bits = lanes[current / kWarp * kWarp + src];
  wait(kAtWarpBarrier);  // nobody overwrites a slot before every lane has read
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline int lane() { return current % kWarp; }

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

inline void __syncthreads() { emu::wait(emu::kAtBlockBarrier); }
template <typename T>
T __shfl_sync(unsigned, T v, int src) { return emu::exchange(v, src); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) { return emu::exchange(v, emu::lane() ^ mask); }
template <typename T>
T __shfl_up_sync(unsigned, T v, int delta) {
  return emu::exchange(v, emu::lane() >= delta ? emu::lane() - delta : emu::lane());
}
inline unsigned __ballot_sync(unsigned, int predicate) {
  const int base = emu::current / emu::kWarp * emu::kWarp;
  emu::lanes[emu::current] = predicate != 0;
  emu::wait(emu::kAtWarpBarrier);
  unsigned bits = 0;
  for (int l = 0; l < emu::kWarp && base + l < static_cast<int>(emu::lanes.size()); ++l)
    bits |= static_cast<unsigned>(emu::lanes[base + l]) << l;
  emu::wait(emu::kAtWarpBarrier);
  return bits;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p += v;
  return old;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline unsigned long long __float2ull_rn(float f) { return static_cast<unsigned long long>(std::nearbyint(f)); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <typename T>
T min(T a, T b) { return a < b ? a : b; }
using std::isfinite;
