/*
 * libFuzzer target for the safetensors state loader.
 *
 * Each input is a whole file.  It is loaded (from memory) into three
 * modules with different options and prefixes, which together accept every
 * seed in tests/state/fixtures:
 *   A  float32, affine, tracking    prefix ""
 *   B  float64, affine, tracking    prefix "1."
 *   C  float32, no affine, tracking prefix "4."
 * and the loader's contract is checked, aborting on any breach:
 *   - the status is SUCCESS, INVALID_FILE or SHAPE_MISMATCH;
 *   - on failure the message is non-empty and the module is bitwise
 *     unchanged (every buffer, gradients included, and the counter);
 *   - on success the message is empty, and saving the module and loading
 *     the result into a twin module reproduces the state bitwise;
 *   - for some inputs (chosen from the bytes, deterministically) loading
 *     the same bytes from a file gives the same status.
 * ASan and UBSan catch memory and arithmetic errors on the way.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fusedbn/fusedbn.h"
#include "fusedbn/fusedbn_state.h"

#define FUZZ_C 5
#define NMOD 3

typedef struct snapshot {
  double values[6][FUZZ_C];
  bool present[6];
  int64_t nbt;
} snapshot;

static fbn_module *modules[NMOD];
static fbn_module *twins[NMOD];
static const char *const prefixes[NMOD] = {"", "1.", "4."};
static char file_path[64];

static void die(const char *what, int m, fbn_status st, const char *message) {
  fprintf(stderr, "load_state_fuzzer: module %d: %s (status %s, message \"%s\")\n", m, what,
          fbn_status_string(st), message);
  abort();
}

static fbn_module *make(fbn_dtype dtype, bool affine, bool track) {
  fbn_module_options o;
  fbn_module_options_init(&o);
  o.num_features = FUZZ_C;
  o.param_dtype = dtype;
  o.affine = affine;
  o.track_running_stats = track;
  fbn_module *m = NULL;
  if (fbn_module_create(&o, &m) != FBN_STATUS_SUCCESS)
    abort();
  /* Distinct, non-initial values everywhere, gradients included. */
  for (int b = 0; b < 6; b++) {
    if (!fbn_module_has_buffer(m, (fbn_buffer)b))
      continue;
    double v[FUZZ_C];
    for (int i = 0; i < FUZZ_C; i++)
      v[i] = 0.125 * (b + 1) + 0.5 * i + 0.03125;
    if (fbn_module_write_buffer(m, (fbn_buffer)b, FBN_DTYPE_FLOAT64, v, FUZZ_C) !=
        FBN_STATUS_SUCCESS)
      abort();
  }
  if (track && fbn_module_set_num_batches_tracked(m, 42) != FBN_STATUS_SUCCESS)
    abort();
  return m;
}

static void take(const fbn_module *m, snapshot *s) {
  memset(s, 0, sizeof *s);
  for (int b = 0; b < 6; b++) {
    s->present[b] = fbn_module_has_buffer(m, (fbn_buffer)b);
    if (s->present[b] && fbn_module_read_buffer(m, (fbn_buffer)b, FBN_DTYPE_FLOAT64, s->values[b],
                                                FUZZ_C) != FBN_STATUS_SUCCESS)
      abort();
  }
  if (fbn_module_get_num_batches_tracked(m, &s->nbt) != FBN_STATUS_SUCCESS)
    s->nbt = -1;
}

/* Bitwise, except the gradients which loading never touches (compared
 * too, which is the point) and NaN payloads which compare by bits. */
static bool same(const snapshot *a, const snapshot *b, bool with_grads) {
  int nb = with_grads ? 6 : 4;
  for (int k = 0; k < nb; k++) {
    if (a->present[k] != b->present[k])
      return false;
    if (a->present[k] && memcmp(a->values[k], b->values[k], sizeof a->values[k]) != 0)
      return false;
  }
  return a->nbt == b->nbt;
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  modules[0] = make(FBN_DTYPE_FLOAT32, true, true);
  modules[1] = make(FBN_DTYPE_FLOAT64, true, true);
  modules[2] = make(FBN_DTYPE_FLOAT32, false, true);
  twins[0] = make(FBN_DTYPE_FLOAT32, true, true);
  twins[1] = make(FBN_DTYPE_FLOAT64, true, true);
  twins[2] = make(FBN_DTYPE_FLOAT32, false, true);
  const char *dir = getenv("TMPDIR");
  snprintf(file_path, sizeof file_path, "%.40s/fbn-fuzz-%ld.safetensors",
           dir && *dir ? dir : "/tmp", (long)getpid());
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  /* Deterministic per input: also go through a file for about 1 in 16. */
  bool via_file = size > 0 && ((data[size - 1] ^ size) & 15) == 0;
  for (int m = 0; m < NMOD; m++) {
    snapshot before, after;
    take(modules[m], &before);
    fbn_status st = fbn_module_load_state_from_memory(modules[m], data, size, prefixes[m]);
    const fbn_status load_st = st;
    /* Copy the message before take() (its calls clear it). */
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", fbn_last_error_message());
    take(modules[m], &after);
    if (st != FBN_STATUS_SUCCESS) {
      if (st != FBN_STATUS_INVALID_FILE && st != FBN_STATUS_SHAPE_MISMATCH)
        die("unexpected status", m, st, msg);
      if (msg[0] == '\0')
        die("failure without a message", m, st, msg);
      if (!same(&before, &after, true))
        die("a failed load changed the module", m, st, msg);
    } else {
      if (msg[0] != '\0')
        die("success with a message", m, st, msg);
      if (memcmp(before.values[4], after.values[4], 2 * sizeof before.values[4]) != 0)
        die("a load changed the gradients", m, st, fbn_last_error_message());
      /* Save and reload into the twin: the same state. */
      void *out = NULL;
      size_t out_size = 0;
      const fbn_module *list[1] = {modules[m]};
      const char *pre[1] = {prefixes[m]};
      st = fbn_modules_save_state_to_memory(1, list, pre, &out, &out_size);
      if (st != FBN_STATUS_SUCCESS)
        die("saving a loaded module failed", m, st, fbn_last_error_message());
      st = fbn_module_load_state_from_memory(twins[m], out, out_size, prefixes[m]);
      if (st != FBN_STATUS_SUCCESS)
        die("reloading a saved module failed", m, st, fbn_last_error_message());
      snapshot twin;
      take(twins[m], &twin);
      if (!same(&after, &twin, false))
        die("save + load did not reproduce the state", m, st, fbn_last_error_message());
      fbn_state_free(out);
    }
    if (via_file) {
      FILE *f = fopen(file_path, "wb");
      if (f == NULL || (size && fwrite(data, 1, size, f) != size) || fclose(f) != 0)
        abort();
      snapshot again;
      fbn_status fst = fbn_module_load_state(modules[m], file_path, prefixes[m]);
      take(modules[m], &again);
      if (fst != load_st)
        die("file and memory loads disagree", m, fst, fbn_last_error_message());
      if (!same(&after, &again, true))
        die("file load gave another state than memory load", m, fst, fbn_last_error_message());
      unlink(file_path);
    }
  }
  return 0;
}
