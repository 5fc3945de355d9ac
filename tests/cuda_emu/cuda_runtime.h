// Test-only stand-in for <cuda_runtime.h>: lets the tests compile csrc/decode.cu with g++ and run
// its kernels on the CPU (emu.h). Never part of the build (setup.py compiles csrc/ only).
#pragma once
#include "emu.h"
