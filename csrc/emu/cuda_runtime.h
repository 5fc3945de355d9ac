// Test-only stand-in for <cuda_runtime.h>: lets tests/test_cuda_ext.py compile csrc/decode.cu
// with g++ and run its kernels on the CPU (emu.h runs every CUDA thread of a block as a
// fiber). Never used by the real build (setup.py compiles csrc/*.cu and csrc/*.cpp only).
#pragma once
#include "emu.h"
