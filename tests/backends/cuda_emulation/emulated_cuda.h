// A CPU stand-in for the CUDA features the attrspace kernels use, so their index math, fragment
// layouts, masks and synchronisation can be checked without a GPU (tests/backends/test_cuda_backend.py).
//
// A block runs as kThreads fibers (ucontext) on one OS thread, switched only at synchronisation
// points: __syncthreads is a barrier of the block, and each warp-collective instruction (ldmatrix,
// mma.sync) a barrier of its 32 lanes, after which every lane computes its result from all lanes'
// operands by the fragment layouts of the PTX ISA (written here independently of the kernels).
// Blocks run one after another, in launch order; a barrier no thread can pass aborts (a deadlock
// or a barrier under divergent control flow). cp.async copies at once, so this checks arithmetic,
// data flow and barrier placement, not timing. This text replaces csrc/subspace_linear_ptx.cuh; the
// kernel headers follow it unchanged.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

// The CUDA headers define these for host compilers; here they take their single-threaded meaning.
#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // blocks run one at a time, so one copy serves every block
#define __align__(n) __attribute__((aligned(n)))

namespace emu {

struct Index3 {
  unsigned x = 0, y = 0, z = 0;
};
inline Index3 thread_index;  // of the fiber running now
inline Index3 grid_dim;      // of the launch running now

constexpr int kWarpSize = 32;
constexpr std::size_t kStackBytes = 128 * 1024;

// Runs `threads` fibers of a body to completion, switching at barriers; reusable for many blocks.
class Block {
 public:
  explicit Block(int threads) : fibers_(threads), sync_(threads), warps_(threads / kWarpSize) {
    for (Fiber& f : fibers_) f.stack.reset(new char[kStackBytes]);  // left uninitialised
  }

  void run(std::function<void()> body) {
    body_ = std::move(body);
    for (Fiber& f : fibers_) {
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.get();
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &scheduler_;
      makecontext(&f.context, &Block::entry, 0);
      f.waiting = f.done = false;
    }
    current_block = this;
    for (int finished = 0; finished < static_cast<int>(fibers_.size());) {
      bool progressed = false;
      for (int t = 0; t < static_cast<int>(fibers_.size()); ++t) {
        Fiber& f = fibers_[t];
        if (f.done || f.waiting) continue;
        current_ = t;
        thread_index.x = static_cast<unsigned>(t);
        swapcontext(&scheduler_, &f.context);
        progressed = true;
        if (f.done) ++finished;
      }
      if (!progressed) {
        std::fprintf(stderr, "emulated block: every unfinished thread waits at a barrier\n");
        std::abort();
      }
    }
    current_block = nullptr;
  }

  struct Barrier {
    explicit Barrier(int count) : expected(count) {}
    int expected, arrived = 0;
    std::vector<int> waiting;
  };

  // Blocks the running fiber until `barrier.expected` fibers have arrived.
  void arrive_and_wait(Barrier& barrier) {
    if (++barrier.arrived == barrier.expected) {
      for (int t : barrier.waiting) fibers_[t].waiting = false;
      barrier.waiting.clear();
      barrier.arrived = 0;
      return;
    }
    barrier.waiting.push_back(current_);
    fibers_[current_].waiting = true;
    yield();
  }
  void yield() { swapcontext(&fibers_[current_].context, &scheduler_); }

  struct Warp {
    Barrier meet{kWarpSize};
    const void* address[kWarpSize];
    unsigned a[kWarpSize][4];
    unsigned b[kWarpSize][2];
  };
  Barrier& sync() { return sync_; }
  Warp& warp() { return warps_[current_ / kWarpSize]; }

  static inline Block* current_block = nullptr;

 private:
  struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    bool waiting = false, done = false;
  };
  static void entry() {
    Block* block = current_block;
    block->body_();
    block->fibers_[block->current_].done = true;  // returns to uc_link: the scheduler
  }

  std::vector<Fiber> fibers_;
  std::function<void()> body_;
  ucontext_t scheduler_;
  int current_ = 0;
  Barrier sync_;
  std::vector<Warp> warps_;
};
using Warp = Block::Warp;

inline Warp& my_warp() { return Block::current_block->warp(); }
inline int my_lane() { return static_cast<int>(thread_index.x % kWarpSize); }
inline void warp_meet(Warp& w) { Block::current_block->arrive_and_wait(w.meet); }

inline float half_bits_to_float(unsigned bits, const __half*) {
  __half_raw raw;
  raw.x = static_cast<unsigned short>(bits);
  return __half2float(__half(raw));
}
inline float half_bits_to_float(unsigned bits, const __nv_bfloat16*) {
  __nv_bfloat16_raw raw;
  raw.x = static_cast<unsigned short>(bits);
  return __bfloat162float(__nv_bfloat16(raw));
}
inline float bits_to_float(unsigned bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace emu

#define threadIdx (emu::thread_index)
#define gridDim (emu::grid_dim)
#define __syncthreads() \
  (emu::Block::current_block->arrive_and_wait(emu::Block::current_block->sync()))

inline int min(int a, int b) { return std::min(a, b); }
inline float __ldcg(const float* p) { return *p; }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) { emu::Block::current_block->yield(); }

namespace attrspace_kernels {

// cp.async and ldmatrix fault on addresses that are not 16-byte aligned; so does the emulation.
inline void require_16_byte_aligned(const void* p) {
  if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) __builtin_trap();
}

inline void cp_async_16(void* dst, const void* src) {
  require_16_byte_aligned(dst);
  require_16_byte_aligned(src);
  std::memcpy(dst, src, 16);
}
inline void cp_async_commit() {}
template <int kPending>
inline void cp_async_wait() {}

inline int ld_acquire_gpu(const int* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

// ldmatrix .x4: lanes 8i..8i+7 give the row addresses of matrix i; lane l receives, from each
// matrix, row l/4 and columns 2(l%4), 2(l%4)+1 (transposed: rows 2(l%4), 2(l%4)+1 of column l/4).
inline void ldmatrix_any(unsigned (&r)[4], const void* p, bool trans) {
  emu::Warp& w = emu::my_warp();
  const int lane = emu::my_lane();
  require_16_byte_aligned(p);
  w.address[lane] = p;
  emu::warp_meet(w);
  for (int i = 0; i < 4; ++i) {
    unsigned lo, hi;
    if (!trans) {
      const auto* row = static_cast<const unsigned short*>(w.address[8 * i + lane / 4]);
      lo = row[2 * (lane % 4)];
      hi = row[2 * (lane % 4) + 1];
    } else {
      lo = static_cast<const unsigned short*>(w.address[8 * i + 2 * (lane % 4)])[lane / 4];
      hi = static_cast<const unsigned short*>(w.address[8 * i + 2 * (lane % 4) + 1])[lane / 4];
    }
    r[i] = lo | (hi << 16);
  }
  emu::warp_meet(w);
}
inline void ldmatrix_x4(unsigned (&r)[4], const void* p) { ldmatrix_any(r, p, false); }
inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) { ldmatrix_any(r, p, true); }

// D = A B + C for one warp. Fragment layouts (g = lane / 4, t = lane % 4), PTX ISA:
//  m16n8k16 (16-bit): a{0,1} (g, 2t+{0,1}), a{2,3} (g+8, ...), a{4,5} (g, 2t+8+{0,1}), a{6,7} (g+8,
//  ...)
//                     in registers a[0..3] as pairs; b{0,1} (k 2t+{0,1}, n g), b{2,3} (k 2t+8+.., n
//                     g)
//  m16n8k8 (tf32):    a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); b0 (k t, n g), b1 (k t+4,
//  n g) c/d:               c{0,1} (g, 2t+{0,1}), c{2,3} (g+8, 2t+{0,1})
template <typename Elem>
inline float mma_a(const emu::Warp& w, int row, int k, const Elem* tag) {
  const int lane = (row % 8) * 4 + (k % 8) / 2, reg = row / 8 + 2 * (k / 8);
  return emu::half_bits_to_float(k % 2 ? w.a[lane][reg] >> 16 : w.a[lane][reg] & 0xffff, tag);
}
template <typename Elem>
inline float mma_b(const emu::Warp& w, int k, int col, const Elem* tag) {
  const int lane = col * 4 + (k % 8) / 2, reg = k / 8;
  return emu::half_bits_to_float(k % 2 ? w.b[lane][reg] >> 16 : w.b[lane][reg] & 0xffff, tag);
}
// Tensor cores read only the 19 high bits of a tf32 operand.
inline float tf32_a(const emu::Warp& w, int row, int k) {
  return emu::bits_to_float(w.a[(row % 8) * 4 + k % 4][row / 8 + 2 * (k / 4)] & ~0x1fffu);
}
inline float tf32_b(const emu::Warp& w, int k, int col) {
  return emu::bits_to_float(w.b[col * 4 + k % 4][k / 4] & ~0x1fffu);
}

template <typename Operand>
inline void warp_mma(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2], int depth,
                     Operand operand) {
  emu::Warp& w = emu::my_warp();
  const int lane = emu::my_lane();
  std::memcpy(w.a[lane], a, sizeof(w.a[lane]));
  std::memcpy(w.b[lane], b, sizeof(w.b[lane]));
  emu::warp_meet(w);
  for (int i = 0; i < 4; ++i) {
    const int row = lane / 4 + 8 * (i / 2), col = 2 * (lane % 4) + i % 2;
    float sum = c[i];
    for (int k = 0; k < depth; ++k) sum += operand(w, row, k, col);
    c[i] = sum;
  }
  emu::warp_meet(w);
}

template <typename Elem>
inline void mma_16816(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                      const Elem* tag) {
  warp_mma(c, a, b, 16, [tag](const emu::Warp& w, int row, int k, int col) {
    return mma_a(w, row, k, tag) * mma_b(w, k, col, tag);
  });
}
inline void mma_1688_tf32(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  warp_mma(c, a, b, 8, [](const emu::Warp& w, int row, int k, int col) {
    return tf32_a(w, row, k) * tf32_b(w, k, col);
  });
}

// cvt.rna.tf32.f32: round the low 13 mantissa bits to nearest, ties away from zero.
inline unsigned to_tf32(float v) {
  unsigned bits;
  std::memcpy(&bits, &v, 4);
  return (bits + 0x1000u) & ~0x1fffu;
}

}  // namespace attrspace_kernels
