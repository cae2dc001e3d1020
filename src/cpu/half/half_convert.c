/* The conversion table of the process: chosen once (pthread_once) from the
 * CPU's features and FBN_CPU_HALF_PATH (half_convert.h). */
#include "cpu/half/half_convert.h"

#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

static const char *const path_names[FBN_HALF_PATH_COUNT] = {"portable", "avx2", "avx512"};

const char *fbn_half_path_name(fbn_half_path path) {
  return path >= 0 && path < FBN_HALF_PATH_COUNT ? path_names[path] : "unknown";
}

const fbn_half_convert *fbn_half_convert_of(fbn_half_path path) {
  switch (path) {
  case FBN_HALF_PATH_PORTABLE: return fbn_half_convert_portable();
  case FBN_HALF_PATH_AVX2: return fbn_half_convert_avx2();
  case FBN_HALF_PATH_AVX512: return fbn_half_convert_avx512();
  case FBN_HALF_PATH_COUNT: break;
  }
  return NULL;
}

static const fbn_half_convert *chosen;
static pthread_once_t chosen_once = PTHREAD_ONCE_INIT;

static void choose(void) {
  const char *want = getenv("FBN_CPU_HALF_PATH");
  if (want != NULL)
    for (int p = 0; p < FBN_HALF_PATH_COUNT; p++)
      if (strcmp(want, path_names[p]) == 0 && fbn_half_convert_of((fbn_half_path)p) != NULL) {
        chosen = fbn_half_convert_of((fbn_half_path)p);
        return;
      }
  for (int p = FBN_HALF_PATH_COUNT - 1; p >= 0 && chosen == NULL; p--)
    chosen = fbn_half_convert_of((fbn_half_path)p);
}

const fbn_half_convert *fbn_half_convert_get(void) {
  pthread_once(&chosen_once, choose);
  return chosen;
}
