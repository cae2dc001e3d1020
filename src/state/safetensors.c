/* safetensors header validation and element codecs (see safetensors.h). */
#include "state/safetensors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/half.h"

static const struct {
  const char *name;
  unsigned bits;
} fbn_st_dtypes[FBN_ST_DTYPE_COUNT] = {
    [FBN_ST_BOOL] = {"BOOL", 8},
    [FBN_ST_F4] = {"F4", 4},
    [FBN_ST_F6_E2M3] = {"F6_E2M3", 6},
    [FBN_ST_F6_E3M2] = {"F6_E3M2", 6},
    [FBN_ST_U8] = {"U8", 8},
    [FBN_ST_I8] = {"I8", 8},
    [FBN_ST_F8_E5M2] = {"F8_E5M2", 8},
    [FBN_ST_F8_E4M3] = {"F8_E4M3", 8},
    [FBN_ST_F8_E8M0] = {"F8_E8M0", 8},
    [FBN_ST_F8_E4M3FNUZ] = {"F8_E4M3FNUZ", 8},
    [FBN_ST_F8_E5M2FNUZ] = {"F8_E5M2FNUZ", 8},
    [FBN_ST_I16] = {"I16", 16},
    [FBN_ST_U16] = {"U16", 16},
    [FBN_ST_F16] = {"F16", 16},
    [FBN_ST_BF16] = {"BF16", 16},
    [FBN_ST_I32] = {"I32", 32},
    [FBN_ST_U32] = {"U32", 32},
    [FBN_ST_F32] = {"F32", 32},
    [FBN_ST_C64] = {"C64", 64},
    [FBN_ST_F64] = {"F64", 64},
    [FBN_ST_I64] = {"I64", 64},
    [FBN_ST_U64] = {"U64", 64},
};

const char *fbn_st_dtype_name(fbn_st_dtype dtype) {
  return (unsigned)dtype < FBN_ST_DTYPE_COUNT ? fbn_st_dtypes[dtype].name : "?";
}

unsigned fbn_st_dtype_bits(fbn_st_dtype dtype) {
  return (unsigned)dtype < FBN_ST_DTYPE_COUNT ? fbn_st_dtypes[dtype].bits : 0;
}

static bool fbn_st_dtype_lookup(const char *name, fbn_st_dtype *out) {
  for (int i = 0; i < FBN_ST_DTYPE_COUNT; i++) {
    if (strcmp(name, fbn_st_dtypes[i].name) == 0) {
      *out = (fbn_st_dtype)i;
      return true;
    }
  }
  return false;
}

/* Names and strings from the file are quoted in messages up to this many
 * bytes, so one message never exceeds the thread-local buffer. */
#define FBN_ST_QUOTE "%.120s"

/* ---- header ------------------------------------------------------------- */

void fbn_st_header_free(fbn_st_header *header) {
  if (header == NULL)
    return;
  json_decref(header->root);
  free(header->entries);
  memset(header, 0, sizeof *header);
}

const fbn_st_entry *fbn_st_find(const fbn_st_header *header, const char *name) {
  for (size_t i = 0; i < header->count; i++) {
    if (strcmp(header->entries[i].name, name) == 0)
      return &header->entries[i];
  }
  return NULL;
}

void fbn_st_format_shape(const fbn_st_entry *entry, char *buf, size_t size) {
  size_t used = 0;
  int n = snprintf(buf, size, "[");
  used = n > 0 ? (size_t)n : 0;
  for (size_t i = 0; i < entry->rank && used < size; i++) {
    json_int_t d = json_integer_value(json_array_get(entry->shape, i));
    if (used + 24 >= size) {
      snprintf(buf + used, size - used, "...");
      return;
    }
    n = snprintf(buf + used, size - used, "%s%lld", i ? ", " : "", (long long)d);
    used += n > 0 ? (size_t)n : 0;
  }
  if (used < size)
    snprintf(buf + used, size - used, "]");
}

/* A non-negative JSON integer. */
static bool fbn_st_get_u64(const json_t *value, uint64_t *out) {
  if (!json_is_integer(value))
    return false;
  json_int_t v = json_integer_value(value);
  if (v < 0)
    return false;
  *out = (uint64_t)v;
  return true;
}

static fbn_status fbn_st_parse_metadata(const char *fn, const char *source, const json_t *meta) {
  if (json_is_null(meta))
    return FBN_STATUS_SUCCESS;
  if (!json_is_object(meta))
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: %s: __metadata__ must be an object mapping strings to strings", fn,
                     source);
  const char *key;
  const json_t *value;
  json_object_foreach((json_t *)meta, key, value) {
    if (!json_is_string(value))
      return fbn_error(FBN_STATUS_INVALID_FILE,
                       "%s: %s: __metadata__[\"" FBN_ST_QUOTE
                       "\"] is not a string (the safetensors metadata is a string -> string "
                       "map)",
                       fn, source, key);
  }
  return FBN_STATUS_SUCCESS;
}

static fbn_status fbn_st_parse_entry(const char *fn, const char *source, const char *name,
                                     const json_t *info, uint64_t data_size, fbn_st_entry *entry) {
  entry->name = name;
  if (!json_is_object(info))
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: %s: tensor '" FBN_ST_QUOTE
                     "': its header entry must be an object with dtype, shape and data_offsets",
                     fn, source, name);

  const json_t *dtype = json_object_get(info, "dtype");
  if (dtype == NULL)
    return fbn_error(FBN_STATUS_INVALID_FILE, "%s: %s: tensor '" FBN_ST_QUOTE "' has no dtype", fn,
                     source, name);
  if (!json_is_string(dtype))
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: %s: tensor '" FBN_ST_QUOTE "': dtype must be a string", fn, source, name);
  if (!fbn_st_dtype_lookup(json_string_value(dtype), &entry->dtype))
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: %s: tensor '" FBN_ST_QUOTE "': unknown dtype \"" FBN_ST_QUOTE "\"", fn,
                     source, name, json_string_value(dtype));

  const json_t *shape = json_object_get(info, "shape");
  if (shape == NULL)
    return fbn_error(FBN_STATUS_INVALID_FILE, "%s: %s: tensor '" FBN_ST_QUOTE "' has no shape", fn,
                     source, name);
  if (!json_is_array(shape))
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: %s: tensor '" FBN_ST_QUOTE "': shape must be an array", fn, source, name);
  entry->shape = shape;
  entry->rank = json_array_size(shape);
  uint64_t numel = 1;
  bool overflow = false;
  for (size_t i = 0; i < entry->rank; i++) {
    uint64_t d;
    if (!fbn_st_get_u64(json_array_get(shape, i), &d))
      return fbn_error(FBN_STATUS_INVALID_FILE,
                       "%s: %s: tensor '" FBN_ST_QUOTE
                       "': shape[%zu] is not a non-negative integer",
                       fn, source, name, i);
    /* Keep checking the remaining dimensions after an overflow: a zero
     * dimension makes the count 0, whatever came before. */
    if (d == 0) {
      numel = 0;
      overflow = false;
    } else if (numel != 0 && __builtin_mul_overflow(numel, d, &numel)) {
      overflow = true;
    }
  }
  entry->numel = numel;

  const json_t *offsets = json_object_get(info, "data_offsets");
  if (offsets == NULL)
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: %s: tensor '" FBN_ST_QUOTE "' has no data_offsets", fn, source, name);
  if (!json_is_array(offsets) || json_array_size(offsets) != 2 ||
      !fbn_st_get_u64(json_array_get(offsets, 0), &entry->begin) ||
      !fbn_st_get_u64(json_array_get(offsets, 1), &entry->end))
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: %s: tensor '" FBN_ST_QUOTE
                     "': data_offsets must be [begin, end], two non-negative integers",
                     fn, source, name);
  if (entry->begin > entry->end)
    return fbn_error(
        FBN_STATUS_INVALID_FILE,
        "%s: %s: tensor '" FBN_ST_QUOTE "': data_offsets [%llu, %llu]: begin must not exceed end",
        fn, source, name, (unsigned long long)entry->begin, (unsigned long long)entry->end);
  if (entry->end > data_size)
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: %s: tensor '" FBN_ST_QUOTE
                     "': data_offsets [%llu, %llu] out of range: the byte buffer after the "
                     "header has %llu bytes",
                     fn, source, name, (unsigned long long)entry->begin,
                     (unsigned long long)entry->end, (unsigned long long)data_size);

  uint64_t bits;
  if (overflow || __builtin_mul_overflow(numel, (uint64_t)fbn_st_dtypes[entry->dtype].bits, &bits))
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: %s: tensor '" FBN_ST_QUOTE
                     "': the byte size of its shape overflows 64 bits",
                     fn, source, name);
  if (bits % 8 != 0)
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: %s: tensor '" FBN_ST_QUOTE
                     "': %llu elements of %s do not fill whole bytes",
                     fn, source, name, (unsigned long long)numel, fbn_st_dtypes[entry->dtype].name);
  if (entry->end - entry->begin != bits / 8) {
    char shape_text[96];
    fbn_st_format_shape(entry, shape_text, sizeof shape_text);
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: %s: tensor '" FBN_ST_QUOTE
                     "': data_offsets [%llu, %llu] hold %llu bytes but shape %s of %s needs "
                     "%llu",
                     fn, source, name, (unsigned long long)entry->begin,
                     (unsigned long long)entry->end,
                     (unsigned long long)(entry->end - entry->begin), shape_text,
                     fbn_st_dtypes[entry->dtype].name, (unsigned long long)(bits / 8));
  }
  return FBN_STATUS_SUCCESS;
}

static int fbn_st_entry_cmp(const void *pa, const void *pb) {
  const fbn_st_entry *a = pa, *b = pb;
  if (a->begin != b->begin)
    return a->begin < b->begin ? -1 : 1;
  if (a->end != b->end)
    return a->end < b->end ? -1 : 1;
  return strcmp(a->name, b->name);
}

fbn_status fbn_st_parse(const char *fn, const char *source, const char *header, size_t header_bytes,
                        uint64_t data_size, fbn_st_header *out) {
  memset(out, 0, sizeof *out);
  if (header_bytes == 0 || header[0] != '{')
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: %s: the %zu-byte JSON header must start with '{'", fn, source,
                     header_bytes);

  json_error_t jerr;
  json_t *root = json_loadb(header, header_bytes, JSON_REJECT_DUPLICATES, &jerr);
  if (root == NULL)
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: %s: the header is not valid JSON: %s (line %d, column %d)", fn, source,
                     jerr.text, jerr.line, jerr.column);
  if (!json_is_object(root)) {
    json_decref(root);
    return fbn_error(FBN_STATUS_INVALID_FILE, "%s: %s: the JSON header must be an object", fn,
                     source);
  }

  fbn_status st = FBN_STATUS_SUCCESS;
  size_t capacity = json_object_size(root);
  fbn_st_entry *entries = calloc(capacity ? capacity : 1, sizeof *entries);
  if (entries == NULL) {
    json_decref(root);
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: %s: no memory for %zu header entries", fn,
                     source, capacity);
  }
  size_t count = 0;
  const char *key;
  json_t *value;
  json_object_foreach(root, key, value) {
    if (strcmp(key, "__metadata__") == 0) {
      st = fbn_st_parse_metadata(fn, source, value);
    } else {
      st = fbn_st_parse_entry(fn, source, key, value, data_size, &entries[count]);
      count++;
    }
    if (st != FBN_STATUS_SUCCESS)
      goto error;
  }

  /* The tensors must tile the byte buffer: sorted by offsets, each starts
   * where the previous one ended, and the last one ends at its end. */
  qsort(entries, count, sizeof *entries, fbn_st_entry_cmp);
  uint64_t expected = 0;
  for (size_t i = 0; i < count; i++) {
    const fbn_st_entry *e = &entries[i];
    if (e->begin < expected) {
      st = fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: %s: tensor '" FBN_ST_QUOTE "' at data_offsets [%llu, %llu] overlaps "
                     "tensor '" FBN_ST_QUOTE "' at [%llu, %llu]",
                     fn, source, e->name, (unsigned long long)e->begin, (unsigned long long)e->end,
                     entries[i - 1].name, (unsigned long long)entries[i - 1].begin,
                     (unsigned long long)entries[i - 1].end);
      goto error;
    }
    if (e->begin > expected) {
      st = fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: %s: tensor '" FBN_ST_QUOTE "' starts at byte %llu but the previous "
                     "tensor ends at %llu: tensors must be contiguous, without gaps",
                     fn, source, e->name, (unsigned long long)e->begin,
                     (unsigned long long)expected);
      goto error;
    }
    expected = e->end;
  }
  if (expected != data_size) {
    st = fbn_error(FBN_STATUS_INVALID_FILE,
                   "%s: %s: the tensors cover %llu bytes but %llu bytes follow the header: the "
                   "data_offsets must cover the byte buffer exactly",
                   fn, source, (unsigned long long)expected, (unsigned long long)data_size);
    goto error;
  }

  out->root = root;
  out->entries = entries;
  out->count = count;
  out->data_size = data_size;
  out->data_start = FBN_ST_PREFIX_BYTES + (uint64_t)header_bytes;
  return FBN_STATUS_SUCCESS;

error:
  free(entries);
  json_decref(root);
  return st;
}

/* ---- element codecs ----------------------------------------------------- */

double fbn_st_load_float(fbn_st_dtype dtype, const unsigned char *data, size_t i) {
  switch (dtype) {
  /* widened exactly with the library's half rule (src/core/half.h) */
  case FBN_ST_F16: return fbn_half_to_double(fbn_st_load_le16(data + 2 * i));
  case FBN_ST_BF16: return fbn_bfloat16_to_double(fbn_st_load_le16(data + 2 * i));
  case FBN_ST_F32: {
    uint32_t bits = fbn_st_load_le32(data + 4 * i);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
  }
  case FBN_ST_F64: {
    uint64_t bits = fbn_st_load_le64(data + 8 * i);
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
  }
  default: return NAN;
  }
}
