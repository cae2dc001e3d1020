/* The test helpers' half conversions: src/core/half.h, the library's rule. */
#include "core/half.h"
#include "fbn_testutil.h"

uint16_t fbnt_float_to_half(float f) { return fbn_float_to_half(f); }

float fbnt_half_to_float(uint16_t h) { return fbn_half_to_float(h); }

uint16_t fbnt_float_to_bfloat16(float f) { return fbn_float_to_bfloat16(f); }

float fbnt_bfloat16_to_float(uint16_t b) { return fbn_bfloat16_to_float(b); }
