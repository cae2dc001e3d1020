/*
 * safetensors container: header parsing/validation (jansson) and the
 * little-endian element codecs.  Knows nothing about modules; state_io.c
 * maps module buffers onto entries.  Never installed.
 *
 * File layout (https://github.com/huggingface/safetensors, "Format"):
 *   8 bytes     N, unsigned little-endian: size of the JSON header
 *   N bytes     JSON object, UTF-8, starts with '{', may be padded with
 *               trailing spaces
 *   rest        the byte buffer; every entry's data_offsets [begin, end)
 *               are relative to its start
 */
#ifndef FUSEDBN_SRC_STATE_SAFETENSORS_H
#define FUSEDBN_SRC_STATE_SAFETENSORS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "internal.h"

/* Largest header accepted (the limit of the reference implementation). */
#define FBN_ST_MAX_HEADER_BYTES UINT64_C(100000000)
/* Bytes before the JSON header. */
#define FBN_ST_PREFIX_BYTES 8

/* Every dtype of the safetensors specification.  Sub-byte dtypes (F4, F6_*)
 * are known so that files holding them validate; we never convert them. */
typedef enum fbn_st_dtype {
  FBN_ST_BOOL,
  FBN_ST_F4,
  FBN_ST_F6_E2M3,
  FBN_ST_F6_E3M2,
  FBN_ST_U8,
  FBN_ST_I8,
  FBN_ST_F8_E5M2,
  FBN_ST_F8_E4M3,
  FBN_ST_F8_E8M0,
  FBN_ST_F8_E4M3FNUZ,
  FBN_ST_F8_E5M2FNUZ,
  FBN_ST_I16,
  FBN_ST_U16,
  FBN_ST_F16,
  FBN_ST_BF16,
  FBN_ST_I32,
  FBN_ST_U32,
  FBN_ST_F32,
  FBN_ST_C64,
  FBN_ST_F64,
  FBN_ST_I64,
  FBN_ST_U64,
  FBN_ST_DTYPE_COUNT
} fbn_st_dtype;

/* "F32", ... */
FBN_INTERNAL const char *fbn_st_dtype_name(fbn_st_dtype dtype);
/* Bits of one element. */
FBN_INTERNAL unsigned fbn_st_dtype_bits(fbn_st_dtype dtype);

/* One tensor of a validated header. */
typedef struct fbn_st_entry {
  const char *name; /* borrowed from the header's JSON */
  fbn_st_dtype dtype;
  const json_t *shape; /* borrowed: array of non-negative integers */
  size_t rank;
  uint64_t numel;
  uint64_t begin; /* data_offsets, relative to the byte buffer */
  uint64_t end;
} fbn_st_entry;

typedef struct fbn_st_header {
  json_t *root;
  fbn_st_entry *entries; /* sorted by data_offsets */
  size_t count;
  uint64_t data_start; /* 8 + N: file offset of the byte buffer */
  uint64_t data_size;  /* bytes of the byte buffer */
} fbn_st_header;

/*
 * Parse and validate the N header bytes of a file whose byte buffer has
 * data_size bytes.  Checks everything the format requires: a JSON object
 * starting with '{' without duplicate keys; __metadata__ absent, null or a
 * string -> string map; every other key an object with a known "dtype",
 * "shape" (non-negative integers, element count without overflow) and
 * "data_offsets" ([begin, end], begin <= end, end - begin == the shape's
 * bytes); entries contiguous from 0 without overlap or gap, covering the
 * byte buffer exactly.  On failure records fn, source and the rule with
 * fbn_error() and returns INVALID_FILE (or OUT_OF_MEMORY); *out is empty.
 */
FBN_INTERNAL fbn_status fbn_st_parse(const char *fn, const char *source, const char *header,
                                     size_t header_bytes, uint64_t data_size, fbn_st_header *out);
FBN_INTERNAL void fbn_st_header_free(fbn_st_header *header);
/* The entry named name, or NULL. */
FBN_INTERNAL const fbn_st_entry *fbn_st_find(const fbn_st_header *header, const char *name);
/* "[3, 4]" into buf (truncated with "..." if it does not fit). */
FBN_INTERNAL void fbn_st_format_shape(const fbn_st_entry *entry, char *buf, size_t size);

/* ---- little-endian element codecs --------------------------------------- */

static inline uint16_t fbn_st_load_le16(const unsigned char *p) {
  return (uint16_t)(p[0] | (unsigned)p[1] << 8);
}
static inline uint32_t fbn_st_load_le32(const unsigned char *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t fbn_st_load_le64(const unsigned char *p) {
  return (uint64_t)fbn_st_load_le32(p) | (uint64_t)fbn_st_load_le32(p + 4) << 32;
}
static inline void fbn_st_store_le32(unsigned char *p, uint32_t v) {
  p[0] = (unsigned char)v;
  p[1] = (unsigned char)(v >> 8);
  p[2] = (unsigned char)(v >> 16);
  p[3] = (unsigned char)(v >> 24);
}
static inline void fbn_st_store_le64(unsigned char *p, uint64_t v) {
  fbn_st_store_le32(p, (uint32_t)v);
  fbn_st_store_le32(p + 4, (uint32_t)(v >> 32));
}

/* Element i of a F16 / BF16 / F32 / F64 array as a double (exact). */
FBN_INTERNAL double fbn_st_load_float(fbn_st_dtype dtype, const unsigned char *data, size_t i);

#endif /* FUSEDBN_SRC_STATE_SAFETENSORS_H */
