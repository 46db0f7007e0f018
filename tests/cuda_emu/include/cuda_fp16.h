// CPU emulation (tests/cuda_emu): __half as the compiler's IEEE binary16 type; conversions round to
// nearest even like __float2half_rn / __half2float. No half arithmetic intrinsics (csrc has none).
#pragma once
#include "emu_core.h"
using __half = _Float16;
inline float __half2float(__half h) { return float(h); }
inline __half __float2half_rn(float f) { return __half(f); }
