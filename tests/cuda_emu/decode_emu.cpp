// Test-only: csrc/decode.cu compiled for the CPU emulator (emu.h; built by tests/test_cuda_ext.py
// with -I tests/cuda_emu -I csrc, so <cuda_runtime.h> is the emulator's), plus hooks for the
// tests: emulator settings, what the last launch asked for, and self-tests of the emulator.
#include "emu.h"

#include "decode.cu"

namespace {

// Block 0 waits for a flag that block 1 sets: runs when both are resident, deadlocks when blocks
// run one at a time.
__global__ void selftest_wait_kernel(unsigned* flags) {
  if (threadIdx.x == 0) {
    if (blockIdx.x == 0) {
      while (*reinterpret_cast<volatile unsigned*>(&flags[1]) == 0) __nanosleep(32);
      flags[0] = 1;
    } else {
      flags[1] = 1;
    }
  }
  __syncthreads();
}

// Lane 0 waits at a shuffle that the rest of its warp never reaches: they wait at
// __syncthreads, which lane 0 never reaches.
__global__ void selftest_divergent_kernel(unsigned* flags) {
  if (threadIdx.x == 0) {
    flags[0] = __shfl_xor_sync(0xffffffffu, 1u, 1);
  } else {
    __syncthreads();
  }
}

// Reads flags[0] through __ldcg (initcheck counts it when it holds the poison).
__global__ void selftest_ldcg_kernel(unsigned* flags) {
  if (threadIdx.x == 0) flags[1] = __ldcg(&flags[0]) == emu::poison32;
}

}  // namespace

extern "C" {

void sfnn_emu_set_sm_count(int n) { emu::sm_count_value = n; }

// Resident blocks (1: one after another), dry run (validate launches only), initcheck.
void sfnn_emu_configure(int resident_blocks, int dry_run, int initcheck) {
  emu::resident_blocks = resident_blocks;
  emu::dry_run = dry_run != 0;
  emu::initcheck = initcheck != 0;
}

// initcheck violations since the last call.
long sfnn_emu_take_initcheck_violations(void) {
  const long n = emu::initcheck_violations;
  emu::initcheck_violations = 0;
  return n;
}

// The last valid launch: thread blocks, threads per block, bytes of dynamic shared memory.
void sfnn_emu_last_launch(unsigned long long* out) {
  for (int i = 0; i < 3; ++i) out[i] = emu::last_launch[i];
}

// cudaGetLastError() after self-test kernel `which` (0: wait, 1: divergent barrier, 2: __ldcg);
// flags (2 words) show what ran.
int sfnn_emu_selftest(int which, unsigned* flags) {
  if (which == 0) {
    SFNN_LAUNCH(selftest_wait_kernel, dim3(2), dim3(64), 0, nullptr)(flags);
  } else if (which == 1) {
    SFNN_LAUNCH(selftest_divergent_kernel, dim3(1), dim3(64), 0, nullptr)(flags);
  } else {
    SFNN_LAUNCH(selftest_ldcg_kernel, dim3(1), dim3(32), 0, nullptr)(flags);
  }
  return cudaGetLastError();
}

// Why the last failed emulated launch failed.
const char* sfnn_emu_error_text(void) { return emu::error_text.c_str(); }

}  // extern "C"
