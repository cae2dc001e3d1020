/* Status names and the thread-local last-error message. */
#include <stdio.h>
#include <string.h>

#include "core/core.h"

#define FBN_MESSAGE_CAPACITY 1024

static _Thread_local char fbn_message[FBN_MESSAGE_CAPACITY];

const char *fbn_status_string(fbn_status status) {
  switch (status) {
  case FBN_STATUS_SUCCESS: return "FBN_STATUS_SUCCESS";
  case FBN_STATUS_NULL_POINTER: return "FBN_STATUS_NULL_POINTER";
  case FBN_STATUS_INVALID_VALUE: return "FBN_STATUS_INVALID_VALUE";
  case FBN_STATUS_INVALID_SHAPE: return "FBN_STATUS_INVALID_SHAPE";
  case FBN_STATUS_SHAPE_MISMATCH: return "FBN_STATUS_SHAPE_MISMATCH";
  case FBN_STATUS_UNSUPPORTED: return "FBN_STATUS_UNSUPPORTED";
  case FBN_STATUS_INVALID_STATE: return "FBN_STATUS_INVALID_STATE";
  case FBN_STATUS_ABSENT: return "FBN_STATUS_ABSENT";
  case FBN_STATUS_ALIASING: return "FBN_STATUS_ALIASING";
  case FBN_STATUS_INSUFFICIENT_WORKSPACE: return "FBN_STATUS_INSUFFICIENT_WORKSPACE";
  case FBN_STATUS_OUT_OF_MEMORY: return "FBN_STATUS_OUT_OF_MEMORY";
  case FBN_STATUS_NO_DEVICE: return "FBN_STATUS_NO_DEVICE";
  case FBN_STATUS_DEVICE_ERROR: return "FBN_STATUS_DEVICE_ERROR";
  case FBN_STATUS_IO_ERROR: return "FBN_STATUS_IO_ERROR";
  case FBN_STATUS_INVALID_FILE: return "FBN_STATUS_INVALID_FILE";
  }
  return "FBN_STATUS_UNKNOWN";
}

const char *fbn_last_error_message(void) { return fbn_message; }

void fbn_clear_error(void) { fbn_message[0] = '\0'; }

fbn_status fbn_error(fbn_status status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(fbn_message, sizeof fbn_message, fmt, ap);
  va_end(ap);
  return status;
}

void fbn_error_append(const char *fmt, ...) {
  size_t used = strlen(fbn_message);
  if (used + 1 >= sizeof fbn_message)
    return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(fbn_message + used, sizeof fbn_message - used, fmt, ap);
  va_end(ap);
}

fbn_status fbn_error_prefix(fbn_status status, const char *fn) {
  char detail[FBN_MESSAGE_CAPACITY];
  snprintf(detail, sizeof detail, "%s", fbn_message);
  return fbn_error(status, "%s: %s", fn, detail);
}
