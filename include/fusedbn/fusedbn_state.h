/*
 * fusedbn_state: a module's state to and from safetensors files.
 *
 * The tensors are named like the entries of PyTorch's
 * torch.nn.BatchNorm2d.state_dict(), under an optional key prefix:
 *
 *   <prefix>weight               [C]  param dtype   affine
 *   <prefix>bias                 [C]  param dtype   affine
 *   <prefix>running_mean         [C]  param dtype   track_running_stats
 *   <prefix>running_var          [C]  param dtype   track_running_stats
 *   <prefix>num_batches_tracked  []   I64           track_running_stats
 *
 * so a file written by safetensors.torch.save_file(model.state_dict(), ...)
 * loads module by module with prefixes such as "layer1.0.bn1.", and a file
 * written here loads in PyTorch with load_state_dict().  Only the entries
 * the module has are written, and only those are required when loading.
 *
 * Loading accepts F16, BF16, F32 and F64 parameters (converted to the
 * module's param_dtype: exactly, except F64 -> float32 which rounds to
 * nearest even) and I64 or I32 num_batches_tracked (shape [] or [1]).
 * Saving writes the module's own dtypes (F32 or F64, and I64).
 * docs/state-files.md describes the format rules that are checked.
 *
 * These functions exist only when the library was built with the state_io
 * feature (jansson found); this header is installed only then.  They use
 * only the public module API, so they work the same for CPU and CUDA
 * modules.
 *
 * Errors, as everywhere in fusedbn: a status, and a thread-local message
 * (fbn_last_error_message()) naming the call, the file (or "<memory>"), the
 * tensor and the rule broken.  Statuses used here:
 *   FBN_STATUS_NULL_POINTER    a required pointer is NULL
 *   FBN_STATUS_INVALID_VALUE   bad count / duplicate keys when saving
 *   FBN_STATUS_IO_ERROR        the file can't be opened, read, written,
 *                              synced or renamed (the message has strerror)
 *   FBN_STATUS_INVALID_FILE    the bytes are not a valid safetensors file,
 *                              or a required entry is missing or has a
 *                              dtype/value we can't take
 *   FBN_STATUS_SHAPE_MISMATCH  an entry's shape doesn't match num_features
 *   FBN_STATUS_OUT_OF_MEMORY   an allocation failed
 * plus whatever fbn_module_read_buffer / write_buffer return (for example
 * FBN_STATUS_DEVICE_ERROR for a CUDA module).
 *
 * Thread safety: as for the rest of the API, one module must not be used
 * by two threads at once; distinct modules and distinct files may be
 * loaded and saved concurrently.
 */
#ifndef FUSEDBN_FUSEDBN_STATE_H
#define FUSEDBN_FUSEDBN_STATE_H

#include <stddef.h>

#include "fusedbn/fusedbn.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * Load the module's entries from the safetensors file at path.
 *
 * All or nothing: the header is parsed and fully validated (every entry,
 * not only the module's), the module's entries are read and converted into
 * temporary host arrays, and only then are the module's buffers and
 * num_batches_tracked written.  On failure the module is unchanged; should a
 * backend write fail midway, the buffers already written are restored from
 * copies read before (if even the restore fails, DEVICE_ERROR's message
 * says so).  Gradients and the training/eval mode are never touched.
 *
 * Entries the module does not have (a weight in the file for an
 * affine=false module, other modules' entries, conv weights, ...) are
 * validated as safetensors entries and otherwise ignored.
 *
 * Only the header and the module's own tensors are read from the file, so
 * loading each BN module of a large network file is cheap.
 *
 * @param module  the module to fill (CPU or CUDA).
 * @param path    file to read; not kept after the call.
 * @param prefix  key prefix such as "layer1.0.bn1." (the '.' included), or
 *                NULL / "" for none.
 * NULL module or path: FBN_STATUS_NULL_POINTER (module unchanged).
 */
FBN_API fbn_status fbn_module_load_state(fbn_module *module, const char *path, const char *prefix);

/**
 * fbn_module_load_state() from the bytes of a whole safetensors file in
 * memory (for example a memory-mapped or downloaded file).  data is only
 * read, during the call.  data may be NULL only when size is 0 (which is
 * then an invalid file).  NULL module, or NULL data with size > 0:
 * FBN_STATUS_NULL_POINTER.
 */
FBN_API fbn_status fbn_module_load_state_from_memory(fbn_module *module, const void *data,
                                                     size_t size, const char *prefix);

/**
 * Save the module's entries to a new safetensors file at path, replacing
 * any file there.
 *
 * Atomic: the bytes go to a temporary file in the same directory (named
 * "<path>.tmp-<pid>-<n>", created with mode 0666 & ~umask), which is
 * flushed, fsync()ed and then rename()d over path; the directory is then
 * fsync()ed (best effort).  On any error the temporary file is removed and
 * whatever was at path before is left as it was.
 *
 * The header carries __metadata__ {"format": "pt"} like files written by
 * safetensors.torch, and the tensors are laid out 8-byte aligned.
 *
 * @param prefix  key prefix, or NULL / "" for none.
 * NULL module or path: FBN_STATUS_NULL_POINTER (nothing written).
 */
FBN_API fbn_status fbn_module_save_state(const fbn_module *module, const char *path,
                                         const char *prefix);

/**
 * Save several modules into one file (a whole network), module i under
 * prefixes[i].  Same atomicity as fbn_module_save_state().
 *
 * @param count     number of modules, >= 1.
 * @param modules   count module pointers, none NULL.
 * @param prefixes  count prefixes (a NULL entry means ""), or NULL for no
 *                  prefixes at all (only sensible with count == 1).  Two
 *                  modules producing the same key is FBN_STATUS_INVALID_VALUE.
 * count == 0: FBN_STATUS_INVALID_VALUE; NULL modules, a NULL modules[i] or
 * NULL path: FBN_STATUS_NULL_POINTER.  The modules are only read.
 */
FBN_API fbn_status fbn_modules_save_state(size_t count, const fbn_module *const *modules,
                                          const char *const *prefixes, const char *path);

/**
 * The bytes fbn_modules_save_state() would write, in a buffer allocated by
 * the library.  On success *data (free it with fbn_state_free()) and *size
 * are set; on failure *data is NULL and *size 0.  NULL data or size:
 * FBN_STATUS_NULL_POINTER; count, modules and prefixes as for
 * fbn_modules_save_state().
 */
FBN_API fbn_status fbn_modules_save_state_to_memory(size_t count, const fbn_module *const *modules,
                                                    const char *const *prefixes, void **data,
                                                    size_t *size);

/** Free a buffer returned by fbn_modules_save_state_to_memory().  NULL is a
 *  no-op. */
FBN_API void fbn_state_free(void *data);

#ifdef __cplusplus
}
#endif

#endif /* FUSEDBN_FUSEDBN_STATE_H */
