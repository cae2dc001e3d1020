/* The portable conversion path: src/core/half.h's scalar conversions. */
#include "cpu/half/half_convert.h"

#include "core/half.h"

void fbn_half_f16_to_f32_portable(const uint16_t *src, float *dst, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    dst[i] = fbn_half_to_float(src[i]);
}

void fbn_half_bf16_to_f32_portable(const uint16_t *src, float *dst, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    dst[i] = fbn_bfloat16_to_float(src[i]);
}

void fbn_half_f32_to_f16_portable(const float *src, uint16_t *dst, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    dst[i] = fbn_float_to_half(src[i]);
}

void fbn_half_f32_to_bf16_portable(const float *src, uint16_t *dst, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    dst[i] = fbn_float_to_bfloat16(src[i]);
}

static const fbn_half_convert portable = {
    .path = FBN_HALF_PATH_PORTABLE,
    .name = "portable",
    .f16_to_f32 = fbn_half_f16_to_f32_portable,
    .bf16_to_f32 = fbn_half_bf16_to_f32_portable,
    .f32_to_f16 = fbn_half_f32_to_f16_portable,
    .f32_to_bf16 = fbn_half_f32_to_bf16_portable,
};

const fbn_half_convert *fbn_half_convert_portable(void) { return &portable; }
