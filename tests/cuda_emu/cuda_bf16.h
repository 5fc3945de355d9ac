// Test-only stand-in, see cuda_runtime.h.
#pragma once
#include "emu.h"
