/*
 * Module state <-> safetensors (fusedbn_state.h).
 *
 * Built only on the public module API (get_options, has_buffer,
 * read_buffer/write_buffer, get/set_num_batches_tracked), so CPU and CUDA
 * modules behave the same.
 *
 * Load:  read the 8-byte length and the header, validate the whole header
 *        (safetensors.c), read and convert the module's entries into host
 *        arrays of the module's param dtype, and only then write the module
 *        (with copies of the old values to undo a failing backend write).
 * Save:  build the whole file image in memory (the state of a few BN layers
 *        is small), then write it to a temporary file next to the target,
 *        fsync, rename.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fusedbn/fusedbn_state.h"
#include "state/safetensors.h"

/* The module entries, in PyTorch's state_dict order. */
enum {
  FBN_KEY_WEIGHT,
  FBN_KEY_BIAS,
  FBN_KEY_RUNNING_MEAN,
  FBN_KEY_RUNNING_VAR,
  FBN_KEY_NBT,
  FBN_KEY_COUNT
};

static const struct {
  const char *suffix;
  fbn_buffer buffer; /* for the four per-channel entries */
  const char *needs; /* the option that makes the module have it */
} fbn_keys[FBN_KEY_COUNT] = {
    [FBN_KEY_WEIGHT] = {"weight", FBN_BUFFER_WEIGHT, "affine"},
    [FBN_KEY_BIAS] = {"bias", FBN_BUFFER_BIAS, "affine"},
    [FBN_KEY_RUNNING_MEAN] = {"running_mean", FBN_BUFFER_RUNNING_MEAN, "track_running_stats"},
    [FBN_KEY_RUNNING_VAR] = {"running_var", FBN_BUFFER_RUNNING_VAR, "track_running_stats"},
    [FBN_KEY_NBT] = {"num_batches_tracked", FBN_BUFFER_WEIGHT, "track_running_stats"},
};

#define FBN_PATH_QUOTE "%.300s"

/* Does the module (with these options) have entry key? */
static bool fbn_module_has_key(const fbn_module_options *o, int key) {
  return key == FBN_KEY_WEIGHT || key == FBN_KEY_BIAS ? o->affine : o->track_running_stats;
}

/* prefix + suffix in a new string, or NULL. */
static char *fbn_key_name(const char *prefix, const char *suffix) {
  size_t lp = strlen(prefix), ls = strlen(suffix);
  char *s = malloc(lp + ls + 1);
  if (s != NULL) {
    memcpy(s, prefix, lp);
    memcpy(s + lp, suffix, ls + 1);
  }
  return s;
}

static fbn_status fbn_check_param_dtype(const char *fn, const fbn_module_options *o) {
  if (o->param_dtype != FBN_DTYPE_FLOAT32 && o->param_dtype != FBN_DTYPE_FLOAT64)
    return fbn_error(FBN_STATUS_UNSUPPORTED,
                     "%s: param_dtype = %d: state files hold float32 or float64 parameters", fn,
                     (int)o->param_dtype);
  return FBN_STATUS_SUCCESS;
}

/* Wrap the message of a failed nested public call: "fn: what: <message>". */
static fbn_status fbn_wrap_error(fbn_status st, const char *fn, const char *what) {
  char inner[512];
  snprintf(inner, sizeof inner, "%s", fbn_last_error_message());
  return fbn_error(st, "%s: %s: %s", fn, what, inner);
}

/* ======================================================================== */
/* Reading                                                                  */
/* ======================================================================== */

/* The bytes of a file: an open descriptor or memory. */
typedef struct fbn_source {
  const char *name; /* path, or "<memory>" */
  int fd;           /* -1 for memory */
  const unsigned char *mem;
  uint64_t size;
} fbn_source;

static fbn_status fbn_source_read(const char *fn, const fbn_source *src, uint64_t offset, void *dst,
                                  size_t len) {
  if (offset > src->size || len > src->size - offset)
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: " FBN_PATH_QUOTE
                     ": read of %zu bytes at offset %llu past the end (%llu bytes)",
                     fn, src->name, len, (unsigned long long)offset, (unsigned long long)src->size);
  if (src->fd < 0) {
    if (len)
      memcpy(dst, src->mem + offset, len);
    return FBN_STATUS_SUCCESS;
  }
  unsigned char *p = dst;
  while (len > 0) {
    size_t chunk = len > (size_t)1 << 30 ? (size_t)1 << 30 : len;
    ssize_t n = pread(src->fd, p, chunk, (off_t)offset);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      return fbn_error(FBN_STATUS_IO_ERROR, "%s: " FBN_PATH_QUOTE ": read at offset %llu: %s", fn,
                       src->name, (unsigned long long)offset, strerror(errno));
    }
    if (n == 0)
      return fbn_error(FBN_STATUS_IO_ERROR,
                       "%s: " FBN_PATH_QUOTE ": unexpected end of file at offset %llu (the file "
                       "shrank while being read?)",
                       fn, src->name, (unsigned long long)offset);
    p += n;
    offset += (uint64_t)n;
    len -= (size_t)n;
  }
  return FBN_STATUS_SUCCESS;
}

/* New values for the module, converted, waiting to be written. */
typedef struct fbn_pending {
  bool present[FBN_KEY_COUNT];
  void *values[FBN_KEY_NBT]; /* num_features elements of param_dtype */
  int64_t num_batches_tracked;
} fbn_pending;

static void fbn_pending_free(fbn_pending *p) {
  for (int k = 0; k < FBN_KEY_NBT; k++)
    free(p->values[k]);
}

/* Check one per-channel entry and convert it to the module's param dtype. */
static fbn_status fbn_read_param(const char *fn, const fbn_source *src, const fbn_st_header *h,
                                 const fbn_st_entry *e, const fbn_module_options *o, void **out) {
  if (e->dtype != FBN_ST_F16 && e->dtype != FBN_ST_BF16 && e->dtype != FBN_ST_F32 &&
      e->dtype != FBN_ST_F64)
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: " FBN_PATH_QUOTE ": tensor '%.200s' has dtype %s: parameters and running "
                     "statistics must be F16, BF16, F32 or F64",
                     fn, src->name, e->name, fbn_st_dtype_name(e->dtype));
  uint64_t c = (uint64_t)o->num_features;
  if (e->rank != 1 || e->numel != c) {
    char shape[96];
    fbn_st_format_shape(e, shape, sizeof shape);
    return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                     "%s: " FBN_PATH_QUOTE ": tensor '%.200s' has shape %s: expected [%llu] "
                     "(num_features)",
                     fn, src->name, e->name, shape, (unsigned long long)c);
  }
  size_t bytes = (size_t)(e->end - e->begin);
  unsigned char *raw = malloc(bytes ? bytes : 1);
  size_t elem = fbn_dtype_size(o->param_dtype);
  void *values = malloc((size_t)c * elem);
  if (raw == NULL || values == NULL) {
    free(raw);
    free(values);
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: no memory for tensor '%.200s'", fn, e->name);
  }
  fbn_status st = fbn_source_read(fn, src, h->data_start + e->begin, raw, bytes);
  if (st != FBN_STATUS_SUCCESS) {
    free(raw);
    free(values);
    return st;
  }
  for (size_t i = 0; i < (size_t)c; i++) {
    double v = fbn_st_load_float(e->dtype, raw, i);
    if (o->param_dtype == FBN_DTYPE_FLOAT32)
      ((float *)values)[i] = (float)v;
    else
      ((double *)values)[i] = v;
  }
  free(raw);
  *out = values;
  return FBN_STATUS_SUCCESS;
}

static fbn_status fbn_read_nbt(const char *fn, const fbn_source *src, const fbn_st_header *h,
                               const fbn_st_entry *e, int64_t *out) {
  if (e->dtype != FBN_ST_I64 && e->dtype != FBN_ST_I32)
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: " FBN_PATH_QUOTE ": tensor '%.200s' has dtype %s: num_batches_tracked "
                     "must be I64 or I32",
                     fn, src->name, e->name, fbn_st_dtype_name(e->dtype));
  if (e->numel != 1 || e->rank > 1) {
    char shape[96];
    fbn_st_format_shape(e, shape, sizeof shape);
    return fbn_error(FBN_STATUS_SHAPE_MISMATCH,
                     "%s: " FBN_PATH_QUOTE ": tensor '%.200s' has shape %s: num_batches_tracked "
                     "is a scalar, shape [] (or [1])",
                     fn, src->name, e->name, shape);
  }
  unsigned char raw[8];
  fbn_status st =
      fbn_source_read(fn, src, h->data_start + e->begin, raw, e->dtype == FBN_ST_I64 ? 8 : 4);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  int64_t v;
  if (e->dtype == FBN_ST_I64) {
    uint64_t u = fbn_st_load_le64(raw);
    memcpy(&v, &u, sizeof v);
  } else {
    uint32_t u = fbn_st_load_le32(raw);
    int32_t s;
    memcpy(&s, &u, sizeof s);
    v = s;
  }
  if (v < 0)
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: " FBN_PATH_QUOTE ": tensor '%.200s' = %lld: num_batches_tracked must "
                     "be >= 0",
                     fn, src->name, e->name, (long long)v);
  *out = v;
  return FBN_STATUS_SUCCESS;
}

/* Write the pending values; on failure undo what was written. */
static fbn_status fbn_apply(const char *fn, fbn_module *module, const fbn_module_options *o,
                            const fbn_pending *p) {
  size_t c = (size_t)o->num_features;
  size_t elem = fbn_dtype_size(o->param_dtype);
  void *backup[FBN_KEY_NBT] = {NULL};
  fbn_status st = FBN_STATUS_SUCCESS;
  int written = 0; /* keys [0, written) hold new values */

  for (int k = 0; k < FBN_KEY_NBT; k++) {
    if (!p->present[k])
      continue;
    backup[k] = malloc(c * elem);
    if (backup[k] == NULL) {
      st = fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: no memory for a copy of %s", fn,
                     fbn_keys[k].suffix);
      goto done;
    }
    st = fbn_module_read_buffer(module, fbn_keys[k].buffer, o->param_dtype, backup[k], c);
    if (st != FBN_STATUS_SUCCESS) {
      st = fbn_wrap_error(st, fn, "reading the current values");
      goto done;
    }
  }
  for (; written < FBN_KEY_NBT; written++) {
    if (!p->present[written])
      continue;
    st = fbn_module_write_buffer(module, fbn_keys[written].buffer, o->param_dtype,
                                 p->values[written], c);
    if (st != FBN_STATUS_SUCCESS) {
      st = fbn_wrap_error(st, fn, fbn_keys[written].suffix);
      goto undo;
    }
  }
  if (p->present[FBN_KEY_NBT]) {
    st = fbn_module_set_num_batches_tracked(module, p->num_batches_tracked);
    if (st != FBN_STATUS_SUCCESS) {
      st = fbn_wrap_error(st, fn, "num_batches_tracked");
      goto undo;
    }
  }
  goto done;

undo : {
  char message[768];
  snprintf(message, sizeof message, "%s", fbn_last_error_message());
  /* A failed backend write may have changed part of its buffer: restore
   * it as well. */
  int last = written < FBN_KEY_NBT ? written + 1 : FBN_KEY_NBT;
  for (int k = 0; k < last; k++) {
    if (!p->present[k])
      continue;
    fbn_status rs =
        fbn_module_write_buffer(module, fbn_keys[k].buffer, o->param_dtype, backup[k], c);
    if (rs != FBN_STATUS_SUCCESS) {
      char inner[256];
      snprintf(inner, sizeof inner, "%s", fbn_last_error_message());
      st = fbn_error(st,
                     "%.600s; restoring %s failed too (%.200s): the module is partially "
                     "updated",
                     message, fbn_keys[k].suffix, inner);
      goto done;
    }
  }
  fbn_error(st, "%s", message);
}

done:
  for (int k = 0; k < FBN_KEY_NBT; k++)
    free(backup[k]);
  return st;
}

static fbn_status fbn_load(const char *fn, fbn_module *module, const fbn_source *src,
                           const char *prefix) {
  fbn_module_options o;
  fbn_status st = fbn_module_get_options(module, &o);
  if (st != FBN_STATUS_SUCCESS)
    return fbn_wrap_error(st, fn, "module");
  st = fbn_check_param_dtype(fn, &o);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  if (src->size < FBN_ST_PREFIX_BYTES)
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: " FBN_PATH_QUOTE ": %llu bytes: a safetensors file starts with an 8-byte "
                     "header length",
                     fn, src->name, (unsigned long long)src->size);
  unsigned char len_bytes[FBN_ST_PREFIX_BYTES];
  st = fbn_source_read(fn, src, 0, len_bytes, sizeof len_bytes);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  uint64_t header_len = fbn_st_load_le64(len_bytes);
  if (header_len > FBN_ST_MAX_HEADER_BYTES)
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: " FBN_PATH_QUOTE ": header length %llu exceeds the %llu-byte limit", fn,
                     src->name, (unsigned long long)header_len,
                     (unsigned long long)FBN_ST_MAX_HEADER_BYTES);
  if (header_len > src->size - FBN_ST_PREFIX_BYTES)
    return fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: " FBN_PATH_QUOTE ": header length %llu is larger than the %llu bytes "
                     "after the length field",
                     fn, src->name, (unsigned long long)header_len,
                     (unsigned long long)(src->size - FBN_ST_PREFIX_BYTES));

  char *header_text = malloc(header_len ? (size_t)header_len : 1);
  if (header_text == NULL)
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: no memory for a %llu-byte header", fn,
                     (unsigned long long)header_len);
  st = fbn_source_read(fn, src, FBN_ST_PREFIX_BYTES, header_text, (size_t)header_len);
  fbn_st_header h;
  if (st == FBN_STATUS_SUCCESS)
    st = fbn_st_parse(fn, src->name, header_text, (size_t)header_len,
                      src->size - FBN_ST_PREFIX_BYTES - header_len, &h);
  free(header_text);
  if (st != FBN_STATUS_SUCCESS)
    return st;

  fbn_pending p;
  memset(&p, 0, sizeof p);
  const char *pre = prefix != NULL ? prefix : "";
  for (int k = 0; k < FBN_KEY_COUNT && st == FBN_STATUS_SUCCESS; k++) {
    if (!fbn_module_has_key(&o, k))
      continue;
    char *name = fbn_key_name(pre, fbn_keys[k].suffix);
    if (name == NULL) {
      st = fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: no memory for a key name", fn);
      break;
    }
    const fbn_st_entry *e = fbn_st_find(&h, name);
    if (e == NULL)
      st = fbn_error(FBN_STATUS_INVALID_FILE,
                     "%s: " FBN_PATH_QUOTE ": no tensor '%.200s' (required: the module has %s = "
                     "true)",
                     fn, src->name, name, fbn_keys[k].needs);
    else if (k == FBN_KEY_NBT)
      st = fbn_read_nbt(fn, src, &h, e, &p.num_batches_tracked);
    else
      st = fbn_read_param(fn, src, &h, e, &o, &p.values[k]);
    p.present[k] = st == FBN_STATUS_SUCCESS;
    free(name);
  }
  fbn_st_header_free(&h);

  if (st == FBN_STATUS_SUCCESS) {
    st = fbn_apply(fn, module, &o, &p);
    if (st == FBN_STATUS_SUCCESS)
      fbn_clear_error();
  }
  fbn_pending_free(&p);
  return st;
}

fbn_status fbn_module_load_state(fbn_module *module, const char *path, const char *prefix) {
  static const char fn[] = "fbn_module_load_state";
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: module is NULL", fn);
  if (path == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: path is NULL", fn);

  fbn_source src = {.name = path, .fd = -1};
  src.fd = open(path, O_RDONLY | O_CLOEXEC);
  if (src.fd < 0)
    return fbn_error(FBN_STATUS_IO_ERROR, "%s: " FBN_PATH_QUOTE ": cannot open: %s", fn, path,
                     strerror(errno));
  struct stat sb;
  fbn_status st;
  if (fstat(src.fd, &sb) != 0) {
    st = fbn_error(FBN_STATUS_IO_ERROR, "%s: " FBN_PATH_QUOTE ": cannot stat: %s", fn, path,
                   strerror(errno));
  } else if (!S_ISREG(sb.st_mode)) {
    st = fbn_error(FBN_STATUS_IO_ERROR, "%s: " FBN_PATH_QUOTE ": not a regular file", fn, path);
  } else {
    src.size = (uint64_t)sb.st_size;
    st = fbn_load(fn, module, &src, prefix);
  }
  close(src.fd);
  return st;
}

fbn_status fbn_module_load_state_from_memory(fbn_module *module, const void *data, size_t size,
                                             const char *prefix) {
  static const char fn[] = "fbn_module_load_state_from_memory";
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: module is NULL", fn);
  if (data == NULL && size != 0)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: data is NULL (size = %zu)", fn, size);
  fbn_source src = {.name = "<memory>", .fd = -1, .mem = data, .size = size};
  return fbn_load(fn, module, &src, prefix);
}

/* ======================================================================== */
/* Writing                                                                  */
/* ======================================================================== */

/* One tensor to write. */
typedef struct fbn_out_entry {
  char *name;
  fbn_st_dtype dtype;
  bool scalar; /* shape [] */
  uint64_t numel;
  unsigned char *bytes; /* little-endian data */
  size_t nbytes;
} fbn_out_entry;

static void fbn_out_entries_free(fbn_out_entry *e, size_t n) {
  for (size_t i = 0; i < n; i++) {
    free(e[i].name);
    free(e[i].bytes);
  }
  free(e);
}

/* Read one module's entries into out[*n...]. */
static fbn_status fbn_collect(const char *fn, size_t index, const fbn_module *module,
                              const char *prefix, fbn_out_entry *out, size_t *n) {
  fbn_module_options o;
  fbn_status st = fbn_module_get_options(module, &o);
  if (st != FBN_STATUS_SUCCESS)
    return fbn_wrap_error(st, fn, "module");
  st = fbn_check_param_dtype(fn, &o);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  size_t c = (size_t)o.num_features;
  bool f64 = o.param_dtype == FBN_DTYPE_FLOAT64;

  for (int k = 0; k < FBN_KEY_COUNT; k++) {
    if (!fbn_module_has_key(&o, k))
      continue;
    fbn_out_entry *e = &out[*n];
    memset(e, 0, sizeof *e);
    e->name = fbn_key_name(prefix, fbn_keys[k].suffix);
    if (k == FBN_KEY_NBT) {
      e->dtype = FBN_ST_I64;
      e->scalar = true;
      e->numel = 1;
      e->nbytes = 8;
    } else {
      e->dtype = f64 ? FBN_ST_F64 : FBN_ST_F32;
      e->numel = c;
      e->nbytes = c * (f64 ? 8 : 4);
    }
    e->bytes = malloc(e->nbytes);
    (*n)++; /* freed by the caller from here on */
    if (e->name == NULL || e->bytes == NULL)
      return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: no memory for module %zu's state", fn, index);
    if (k == FBN_KEY_NBT) {
      int64_t v;
      st = fbn_module_get_num_batches_tracked(module, &v);
      if (st != FBN_STATUS_SUCCESS)
        return fbn_wrap_error(st, fn, "num_batches_tracked");
      uint64_t u;
      memcpy(&u, &v, sizeof u);
      fbn_st_store_le64(e->bytes, u);
      continue;
    }
    void *host = malloc(e->nbytes);
    if (host == NULL)
      return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: no memory for module %zu's state", fn, index);
    st = fbn_module_read_buffer(module, fbn_keys[k].buffer, o.param_dtype, host, c);
    if (st != FBN_STATUS_SUCCESS) {
      free(host);
      return fbn_wrap_error(st, fn, fbn_keys[k].suffix);
    }
    for (size_t i = 0; i < c; i++) {
      if (f64) {
        uint64_t u;
        memcpy(&u, (double *)host + i, sizeof u);
        fbn_st_store_le64(e->bytes + 8 * i, u);
      } else {
        uint32_t u;
        memcpy(&u, (float *)host + i, sizeof u);
        fbn_st_store_le32(e->bytes + 4 * i, u);
      }
    }
    free(host);
  }
  return FBN_STATUS_SUCCESS;
}

static int fbn_out_name_cmp(const void *pa, const void *pb) {
  const fbn_out_entry *const *a = pa, *const *b = pb;
  return strcmp((*a)->name, (*b)->name);
}

/* The whole file image of count modules. */
static fbn_status fbn_serialize(const char *fn, size_t count, const fbn_module *const *modules,
                                const char *const *prefixes, unsigned char **data, size_t *size) {
  *data = NULL;
  *size = 0;
  if (count == 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: count = 0: nothing to save", fn);
  if (modules == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: modules is NULL", fn);
  if (count > SIZE_MAX / FBN_KEY_COUNT / sizeof(fbn_out_entry))
    return fbn_error(FBN_STATUS_INVALID_VALUE, "%s: count = %zu: too many modules", fn, count);
  for (size_t i = 0; i < count; i++) {
    if (modules[i] == NULL)
      return fbn_error(FBN_STATUS_NULL_POINTER, "%s: modules[%zu] is NULL", fn, i);
  }

  fbn_status st = FBN_STATUS_SUCCESS;
  size_t n = 0;
  fbn_out_entry *entries = calloc(count * FBN_KEY_COUNT, sizeof *entries);
  fbn_out_entry **sorted = calloc(count * FBN_KEY_COUNT + 1, sizeof *sorted);
  json_t *root = NULL;
  char *json_text = NULL;
  if (entries == NULL || sorted == NULL) {
    st = fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: no memory for %zu modules", fn, count);
    goto done;
  }
  for (size_t i = 0; i < count && st == FBN_STATUS_SUCCESS; i++) {
    const char *prefix = prefixes != NULL && prefixes[i] != NULL ? prefixes[i] : "";
    st = fbn_collect(fn, i, modules[i], prefix, entries, &n);
  }
  if (st != FBN_STATUS_SUCCESS)
    goto done;

  /* Keys must be unique. */
  for (size_t i = 0; i < n; i++)
    sorted[i] = &entries[i];
  qsort(sorted, n, sizeof *sorted, fbn_out_name_cmp);
  for (size_t i = 1; i < n; i++) {
    if (strcmp(sorted[i - 1]->name, sorted[i]->name) == 0) {
      st = fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: two modules write the key '%.200s': give each module its own prefix", fn,
                     sorted[i]->name);
      goto done;
    }
  }

  /* Layout: 8-byte elements first, then 4-byte ones, so that every tensor
   * is aligned to its element size (the header is padded to 8 bytes). */
  size_t m = 0;
  for (int pass = 0; pass < 2; pass++) {
    for (size_t i = 0; i < n; i++) {
      bool wide = fbn_st_dtype_bits(entries[i].dtype) == 64;
      if (wide == (pass == 0))
        sorted[m++] = &entries[i];
    }
  }

  root = json_object();
  json_t *meta = json_object();
  if (root == NULL || meta == NULL || json_object_set_new(root, "__metadata__", meta) != 0 ||
      json_object_set_new(meta, "format", json_string("pt")) != 0) {
    st = fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: no memory for the JSON header", fn);
    goto done;
  }
  uint64_t offset = 0;
  for (size_t i = 0; i < n; i++) {
    fbn_out_entry *e = sorted[i];
    json_t *info = json_pack("{s:s, s:[], s:[I, I]}", "dtype", fbn_st_dtype_name(e->dtype), "shape",
                             "data_offsets", (json_int_t)offset, (json_int_t)(offset + e->nbytes));
    if (info != NULL && !e->scalar &&
        json_array_append_new(json_object_get(info, "shape"), json_integer((json_int_t)e->numel)) !=
            0) {
      json_decref(info);
      info = NULL;
    }
    if (info == NULL) {
      st = fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: no memory for the JSON header", fn);
      goto done;
    }
    if (json_object_set_new(root, e->name, info) != 0) {
      st = fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: key '%.200s' is not valid UTF-8 (check the prefix)", fn, e->name);
      goto done;
    }
    offset += e->nbytes;
  }
  json_text = json_dumps(root, JSON_COMPACT);
  if (json_text == NULL) {
    st = fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: no memory for the JSON header", fn);
    goto done;
  }
  size_t text_len = strlen(json_text);
  size_t header_len = (text_len + 7) / 8 * 8;
  size_t total = FBN_ST_PREFIX_BYTES + header_len + (size_t)offset;
  unsigned char *buf = malloc(total);
  if (buf == NULL) {
    st = fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: no memory for %zu bytes", fn, total);
    goto done;
  }
  fbn_st_store_le64(buf, header_len);
  memcpy(buf + FBN_ST_PREFIX_BYTES, json_text, text_len);
  memset(buf + FBN_ST_PREFIX_BYTES + text_len, ' ', header_len - text_len);
  unsigned char *p = buf + FBN_ST_PREFIX_BYTES + header_len;
  for (size_t i = 0; i < n; i++) {
    memcpy(p, sorted[i]->bytes, sorted[i]->nbytes);
    p += sorted[i]->nbytes;
  }
  *data = buf;
  *size = total;

done:
  free(json_text);
  json_decref(root);
  free(sorted);
  if (entries != NULL)
    fbn_out_entries_free(entries, n);
  return st;
}

static fbn_status fbn_write_all(const char *fn, const char *tmp, int fd, const unsigned char *p,
                                size_t len) {
  while (len > 0) {
    ssize_t n = write(fd, p, len > (size_t)1 << 30 ? (size_t)1 << 30 : len);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      return fbn_error(FBN_STATUS_IO_ERROR, "%s: " FBN_PATH_QUOTE ": write: %s", fn, tmp,
                       strerror(errno));
    }
    p += n;
    len -= (size_t)n;
  }
  return FBN_STATUS_SUCCESS;
}

/* fsync the directory holding path, so that the rename is durable. Best
 * effort: some file systems refuse to sync directories. */
static void fbn_sync_parent(const char *path) {
  const char *slash = strrchr(path, '/');
  char *dir;
  if (slash == NULL) {
    dir = strdup(".");
  } else if (slash == path) {
    dir = strdup("/");
  } else {
    dir = strndup(path, (size_t)(slash - path));
  }
  if (dir == NULL)
    return;
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    (void)fsync(fd);
    close(fd);
  }
  free(dir);
}

static atomic_ulong fbn_tmp_counter;

static fbn_status fbn_write_atomic(const char *fn, const char *path, const unsigned char *data,
                                   size_t size) {
  size_t len = strlen(path);
  char *tmp = malloc(len + 64);
  if (tmp == NULL)
    return fbn_error(FBN_STATUS_OUT_OF_MEMORY, "%s: no memory for a file name", fn);
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; attempt++) {
    unsigned long n = atomic_fetch_add(&fbn_tmp_counter, 1);
    snprintf(tmp, len + 64, "%s.tmp-%ld-%lu", path, (long)getpid(), n);
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST)
      break;
  }
  if (fd < 0) {
    fbn_status st =
        fbn_error(FBN_STATUS_IO_ERROR,
                  "%s: " FBN_PATH_QUOTE ": cannot create the temporary file " FBN_PATH_QUOTE ": %s",
                  fn, path, tmp, strerror(errno));
    free(tmp);
    return st;
  }

  fbn_status st = fbn_write_all(fn, tmp, fd, data, size);
  if (st == FBN_STATUS_SUCCESS && fsync(fd) != 0)
    st = fbn_error(FBN_STATUS_IO_ERROR, "%s: " FBN_PATH_QUOTE ": fsync: %s", fn, tmp,
                   strerror(errno));
  if (close(fd) != 0 && st == FBN_STATUS_SUCCESS)
    st = fbn_error(FBN_STATUS_IO_ERROR, "%s: " FBN_PATH_QUOTE ": close: %s", fn, tmp,
                   strerror(errno));
  if (st == FBN_STATUS_SUCCESS && rename(tmp, path) != 0)
    st = fbn_error(FBN_STATUS_IO_ERROR,
                   "%s: " FBN_PATH_QUOTE ": cannot rename the temporary file over it: %s", fn, path,
                   strerror(errno));
  if (st != FBN_STATUS_SUCCESS)
    (void)unlink(tmp);
  else
    fbn_sync_parent(path);
  free(tmp);
  return st;
}

fbn_status fbn_modules_save_state(size_t count, const fbn_module *const *modules,
                                  const char *const *prefixes, const char *path) {
  static const char fn[] = "fbn_modules_save_state";
  fbn_clear_error();
  if (path == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: path is NULL", fn);
  unsigned char *data;
  size_t size;
  fbn_status st = fbn_serialize(fn, count, modules, prefixes, &data, &size);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  st = fbn_write_atomic(fn, path, data, size);
  free(data);
  return st;
}

fbn_status fbn_module_save_state(const fbn_module *module, const char *path, const char *prefix) {
  static const char fn[] = "fbn_module_save_state";
  fbn_clear_error();
  if (module == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: module is NULL", fn);
  if (path == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: path is NULL", fn);
  unsigned char *data;
  size_t size;
  fbn_status st = fbn_serialize(fn, 1, &module, &prefix, &data, &size);
  if (st != FBN_STATUS_SUCCESS)
    return st;
  st = fbn_write_atomic(fn, path, data, size);
  free(data);
  return st;
}

fbn_status fbn_modules_save_state_to_memory(size_t count, const fbn_module *const *modules,
                                            const char *const *prefixes, void **data,
                                            size_t *size) {
  static const char fn[] = "fbn_modules_save_state_to_memory";
  fbn_clear_error();
  if (data == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: data is NULL", fn);
  *data = NULL;
  if (size == NULL)
    return fbn_error(FBN_STATUS_NULL_POINTER, "%s: size is NULL", fn);
  *size = 0;
  unsigned char *buf;
  fbn_status st = fbn_serialize(fn, count, modules, prefixes, &buf, size);
  if (st == FBN_STATUS_SUCCESS)
    *data = buf;
  return st;
}

void fbn_state_free(void *data) { free(data); }
