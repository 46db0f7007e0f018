// CPU emulation (tests/cuda_emu): __nv_bfloat16 as the top 16 bits of a float; __float2bfloat16_rn
// rounds to nearest even (NaN stays a quiet NaN), __bfloat162float is exact.
#pragma once
#include "emu_core.h"
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(unsigned(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u = __float_as_uint(f);
  if (std::isnan(f)) return {uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {uint16_t(u >> 16)};
}
