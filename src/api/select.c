/* Backend selection: which backend runs an op or a module on a device. */
#include <stdlib.h>
#include <string.h>

#include "fbn_config.h"
#include "internal.h"

fbn_status fbn_select_backend(const char *fn, fbn_device_type device, const fbn_backend **out) {
  if (device == FBN_DEVICE_CUDA) {
    const fbn_backend *cuda = NULL;
#if FBN_HAVE_CUDA
    cuda = fbn_backend_cuda();
#endif
    if (cuda == NULL)
      return fbn_error(FBN_STATUS_NO_DEVICE,
                       "%s: device = FBN_DEVICE_CUDA: this build of fusedbn has no CUDA backend "
                       "(configured with -Dcuda=disabled or CUDA/cuDNN not found)",
                       fn);
    *out = cuda;
    return FBN_STATUS_SUCCESS;
  }
  /* CPU: the fast backend, or the reference with FBN_CPU_BACKEND=reference. */
  const char *choice = getenv("FBN_CPU_BACKEND");
  if (choice != NULL && strcmp(choice, "reference") == 0) {
    *out = fbn_backend_cpu_reference();
    return FBN_STATUS_SUCCESS;
  }
  if (choice != NULL && choice[0] != '\0' && strcmp(choice, "fast") != 0)
    return fbn_error(FBN_STATUS_INVALID_VALUE,
                     "%s: FBN_CPU_BACKEND = \"%s\": must be \"fast\" (the default) or "
                     "\"reference\"",
                     fn, choice);
  *out = fbn_backend_cpu_fast();
  return FBN_STATUS_SUCCESS;
}
