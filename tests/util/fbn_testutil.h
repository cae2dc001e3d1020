/*
 * fbn_testutil: helpers shared by the fusedbn test suites.
 *
 *   seeded RNG          fbnt_seed(), fbnt_rng_*: PCG32, seed from the
 *                       FBN_TEST_SEED environment variable or a fixed default
 *   host tensors        fbnt_tensor_*: logical (n, c, h, w) access for both
 *                       layouts and every fbn_dtype, NaN poisoning
 *   half conversions    fbnt_float_to_half() and friends (round to nearest
 *                       even), for the GPU suites
 *   float64 reference   fbnt_ref_*: the module semantics written plainly
 *                       (forward train/eval, running statistics, backward)
 *   comparison          fbnt_check_close(): every element, relative +
 *                       absolute tolerance, NaN exactly where expected
 *   module snapshots    fbnt_state_*: capture / compare everything a failing
 *                       call must leave unchanged
 *   fixture             fbnt_spec, fbnt_fixture_*, fbnt_tensors_*: a module
 *                       described with designated initializers, its float64
 *                       twin and poisoned host tensors of fresh random data;
 *                       forward/backward checked element by element
 *
 * Reference arrays are float64 in logical NCHW order, whatever the layout of
 * the tensors handed to the library; fbnt_tensor_to_ref() /
 * fbnt_tensor_from_ref() convert.
 *
 * Only the public header is used: the helpers work for any backend.
 */
#ifndef FBN_TESTUTIL_H
#define FBN_TESTUTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fusedbn/fusedbn.h"

/* ---- seeded random numbers ---------------------------------------------- */

#define FBNT_DEFAULT_SEED UINT64_C(20240601)

/* The suite's seed: FBN_TEST_SEED (decimal or 0x hex) or FBNT_DEFAULT_SEED. */
uint64_t fbnt_seed(void);
/* Print "# FBN_TEST_SEED=<seed>" to stderr (call once from main). */
void fbnt_print_seed(void);

typedef struct fbnt_rng {
  uint64_t state;
  uint64_t inc;
  /* Box-Muller spare value. */
  bool have_spare;
  double spare;
} fbnt_rng;

void fbnt_rng_init(fbnt_rng *rng, uint64_t seed, uint64_t stream);
/* A generator for one test: the suite seed mixed with a hash of name, so a
 * test sees the same numbers whatever filter or order is used. */
void fbnt_rng_for_test(fbnt_rng *rng, const char *name);
uint32_t fbnt_rng_u32(fbnt_rng *rng);
/* Uniform in [0, 1). */
double fbnt_rng_unit(fbnt_rng *rng);
double fbnt_rng_uniform(fbnt_rng *rng, double lo, double hi);
/* Standard normal. */
double fbnt_rng_normal(fbnt_rng *rng);
/* Uniform in [lo, hi] with a random sign. */
double fbnt_rng_signed(fbnt_rng *rng, double lo, double hi);

/* ---- half-precision conversions ----------------------------------------- */

uint16_t fbnt_float_to_half(float f);
float fbnt_half_to_float(uint16_t h);
uint16_t fbnt_float_to_bfloat16(float f);
float fbnt_bfloat16_to_float(uint16_t b);

/* ---- host tensors ------------------------------------------------------- */

/* Number of elements (0 if a dimension is <= 0). */
size_t fbnt_desc_numel(const fbn_tensor_desc *desc);
/* Element offset of logical (n, c, h, w) for desc's layout. */
size_t fbnt_desc_offset(const fbn_tensor_desc *desc, int64_t n, int64_t c, int64_t h, int64_t w);
/* Offset into a logical NCHW reference array. */
size_t fbnt_ref_index(const fbn_tensor_desc *desc, int64_t n, int64_t c, int64_t h, int64_t w);

/* Read / write one element of any dtype (writes round to nearest even). */
double fbnt_load(fbn_dtype dtype, const void *data, size_t index);
void fbnt_store(fbn_dtype dtype, void *data, size_t index, double value);
double fbnt_get(const fbn_tensor_desc *desc, const void *data, int64_t n, int64_t c, int64_t h,
                int64_t w);
void fbnt_set(const fbn_tensor_desc *desc, void *data, int64_t n, int64_t c, int64_t h, int64_t w,
              double value);

/* 256-byte aligned, zeroed host allocation of numel(desc) elements (at
 * least one byte). Aborts on failure. Free with fbnt_free(). */
void *fbnt_tensor_alloc(const fbn_tensor_desc *desc);
void *fbnt_alloc(size_t bytes);
void fbnt_free(void *p);
/* Every element of data = NaN (quiet NaN in every dtype). */
void fbnt_tensor_poison(const fbn_tensor_desc *desc, void *data);
/* Layout/dtype tensor -> logical NCHW float64 array, and back (rounding). */
void fbnt_tensor_to_ref(const fbn_tensor_desc *desc, const void *data, double *ref);
void fbnt_tensor_from_ref(const fbn_tensor_desc *desc, const double *ref, void *data);

/* Random input: x[n,c,h,w] = offset[c] + scale[c] * normal, with per-channel
 * offset in [-3, 3] and scale in [0.5, 3]. Written to data in desc's
 * dtype/layout; ref (may be NULL) receives the values actually stored
 * (rounded to the dtype). */
void fbnt_fill_channels(fbnt_rng *rng, const fbn_tensor_desc *desc, void *data, double *ref);
/* Random input, elementwise normal * scale. */
void fbnt_fill_normal(fbnt_rng *rng, const fbn_tensor_desc *desc, void *data, double *ref,
                      double scale);
/* Random per-channel vector in [lo, hi]; rounded to float32 when
 * round_to_float is true (so it is exactly what a float32 module stores). */
void fbnt_fill_vector(fbnt_rng *rng, double *v, int64_t count, double lo, double hi, bool signed_,
                      bool round_to_float);

/* ---- comparison --------------------------------------------------------- */

/*
 * true iff for every i: want[i] is NaN and got[i] is NaN, or neither is NaN
 * and |got - want| <= atol + rtol * |want| (infinities must match exactly).
 * On failure prints what, the first mismatching index (as (n,c,h,w) when
 * desc is not NULL), got, want, the number of mismatches and the seed.
 */
bool fbnt_check_close(const char *what, const double *got, const double *want, size_t count,
                      double rtol, double atol, const fbn_tensor_desc *desc);
/* Max |v[i]| over non-NaN elements (0 for none). */
double fbnt_max_abs(const double *v, size_t count);
/* Max |v[i]| over finite elements (0 for none). */
double fbnt_max_finite(const double *v, size_t count);
/* fbnt_check_close labelled "name: what", with the absolute tolerance
 * atol_rel * max finite |want| (atol_rel when want has none). */
bool fbnt_check_values(const char *name, const char *what, const double *got, const double *want,
                       size_t count, double rtol, double atol_rel, const fbn_tensor_desc *desc);
/* Two modules hold the same state: the same buffers present, each element
 * within rtol relative and rtol * max finite |want| of the buffer absolute
 * (exact where want has no finite nonzero value), and the same
 * num_batches_tracked (or both ABSENT). Prints every difference. */
bool fbnt_check_modules_agree(const char *name, const fbn_module *got, const fbn_module *want,
                              double rtol);

/* Tolerances for results of a given dtype relative to a float64 reference
 * whose magnitude is scale. */
typedef struct fbnt_tol {
  double rtol;
  double atol;
} fbnt_tol;
fbnt_tol fbnt_tol_for(fbn_dtype dtype, double scale);

/* ---- float64 reference of the module ------------------------------------ */

typedef struct fbnt_ref_module {
  int64_t c;
  double eps;
  double momentum;
  bool cumulative_average;
  bool affine;
  bool track_running_stats;
  bool training;
  int64_t num_batches_tracked;
  /* c elements each; weight/bias/grads used only when affine, running
   * stats only when track_running_stats. */
  double *weight;
  double *bias;
  double *running_mean;
  double *running_var;
  double *weight_grad;
  double *bias_grad;
} fbnt_ref_module;

/* What the reference's forward keeps for its backward. */
typedef struct fbnt_ref_saved {
  int64_t n, c, h, w;
  bool batch_stats;
  bool has_addend;
  /* c elements each: the mean and variance used to normalize (biased batch
   * variance, or running_var). */
  double *mean;
  double *var;
} fbnt_ref_saved;

/* Reference module with the defaults of fbn_module_options_init() and
 * num_features = c (weight 1, bias 0, mean 0, var 1, grads 0, training). */
void fbnt_ref_module_init(fbnt_ref_module *ref, int64_t c);
void fbnt_ref_module_free(fbnt_ref_module *ref);
/* Copy options, mode, num_batches_tracked and every buffer (as float64)
 * from a module. Returns the first failing status. */
fbn_status fbnt_ref_module_from(fbnt_ref_module *ref, const fbn_module *module);
/* Write weight, bias, running stats, grads and num_batches_tracked of ref
 * into the module (those it has). */
fbn_status fbnt_ref_module_to(const fbnt_ref_module *ref, fbn_module *module);

void fbnt_ref_saved_init(fbnt_ref_saved *saved);
void fbnt_ref_saved_free(fbnt_ref_saved *saved);

/*
 * y = ReLU(BN(x) + addend) with x, addend, y logical NCHW float64 arrays of
 * shape (n, ref->c, h, w); addend may be NULL; saved may be NULL. Updates
 * the running statistics and num_batches_tracked like the module. Returns
 * false (and does nothing) for training with n*h*w == 1.
 */
bool fbnt_ref_forward(fbnt_ref_module *ref, int64_t n, int64_t h, int64_t w, const double *x,
                      const double *addend, double *y, fbnt_ref_saved *saved);
/* Pre-activation BN(x) + addend of the last forward semantics, without
 * changing ref (no running-stat update), for choosing data away from the
 * ReLU kink. */
void fbnt_ref_preactivation(const fbnt_ref_module *ref, int64_t n, int64_t h, int64_t w,
                            const double *x, const double *addend, double *pre);
/*
 * Backward of the forward recorded in saved: the ReLU mask is y > 0 (y the
 * forward's output). dx, daddend may be NULL. Accumulates weight_grad and
 * bias_grad when affine.
 */
void fbnt_ref_backward(fbnt_ref_module *ref, const fbnt_ref_saved *saved, const double *x,
                       const double *y, const double *dy, double *dx, double *daddend);

/* ---- module state snapshots --------------------------------------------- */

typedef struct fbnt_state {
  fbn_module_options options;
  bool training;
  fbn_status nbt_status;
  int64_t num_batches_tracked;
  int64_t c;
  /* per fbn_buffer: status of read_buffer (SUCCESS or ABSENT) and values */
  fbn_status status[6];
  double *values[6];
} fbnt_state;

/* Capture everything observable through the public API. */
void fbnt_state_capture(const fbn_module *module, fbnt_state *state);
/* true iff the two snapshots are bitwise equal; prints the first
 * difference otherwise. */
bool fbnt_state_equal(const fbnt_state *a, const fbnt_state *b);
void fbnt_state_free(fbnt_state *state);

/* Create a module from options and give it random, non-default state
 * (weight in +-[0.5, 1.5], bias in [-0.5, 0.5], running_mean in [-1, 1],
 * running_var in [0.5, 2], gradients in [-1, 1], num_batches_tracked 3),
 * values rounded to float32 for a float32 module. ref (may be NULL; must
 * be initialized or zeroed) receives the same state. */
fbn_status fbnt_module_create_random(fbnt_rng *rng, const fbn_module_options *options,
                                     fbn_module **out, fbnt_ref_module *ref);
/* A module of options a with random state (fbnt_module_create_random) and
 * its twin of options b (same num_features and flags, another device or
 * backend) holding the same state. On failure both are NULL and the
 * status is that of the failing call. */
fbn_status fbnt_module_create_pair(fbnt_rng *rng, const fbn_module_options *a,
                                   const fbn_module_options *b, fbn_module **out_a,
                                   fbn_module **out_b);

/* ---- one checked forward (+ backward) on host memory -------------------- */

/* The cases of one test: the test's generator (fbnt_rng_for_test) and how
 * many of its cases ran and failed. */
typedef struct fbnt_tally {
  fbnt_rng rng;
  int failed;
  int total;
} fbnt_tally;

void fbnt_tally_begin(fbnt_tally *t, const char *test);
/* Count one case, failed unless ok. */
void fbnt_tally_add(fbnt_tally *t, bool ok);
/* Fail the cmocka test if a case failed: "<failed> of <total> <what> failed". */
void fbnt_tally_end(const fbnt_tally *t, const char *what);

typedef struct fbnt_case {
  int64_t n, c, h, w;
  fbn_dtype dtype; /* FLOAT32 (float32 params) or FLOAT64 (float64 params) */
  fbn_layout layout;
  bool addend;
  bool affine;
  bool track;
  bool training;
  bool backward; /* also run backward and check dx, daddend and the grads */
} fbnt_case;

void fbnt_case_name(const fbnt_case *cs, char *buf, size_t size);
/*
 * Create a module with random state (fbnt_module_create_random), set the
 * mode, run forward on fresh random x/addend into a NaN-poisoned y, check y,
 * the running statistics, num_batches_tracked and the unchanged parameters
 * against the reference; with cs->backward, also backward into poisoned
 * dx/daddend and check them and the accumulated gradients. Prints every
 * failure; returns true iff everything matched.
 */
bool fbnt_case_run(const fbnt_case *cs, fbnt_rng *rng);
/*
 * fbnt_case_run on every combination of addend, affine, track and mode for
 * each shape of the matrix (C = 1; H = W = 1 with N > 1; odd sizes;
 * OneFlow's example shape (4, 2, 8, 3); two larger ones) in one layout and
 * dtype, forward only or with backward, with test's generator; fails the
 * cmocka test, saying how many cases failed.
 */
void fbnt_case_matrix(const char *test, fbn_layout layout, fbn_dtype dtype, bool backward);
/* Check every buffer, num_batches_tracked and the mode of m against ref
 * (weight/bias bitwise when exact_params). */
bool fbnt_check_module(const char *name, const fbn_module *m, const fbnt_ref_module *ref,
                       double rtol, bool exact_params);
/* Check a tensor (any layout/dtype) against a logical NCHW reference with
 * fbnt_tol_for(d->dtype, max |want|). */
bool fbnt_check_tensor(const char *name, const char *what, const fbn_tensor_desc *d,
                       const void *data, const double *want);

/* ---- fixture: a module, its reference twin, host tensors ---------------- */

/*
 * A module (and its tensors' shape) described with designated initializers:
 * what is left out takes PyTorch's defaults, as fbn_module_options_init()
 * gives them. The switches PyTorch has on are named for turning them off;
 * eps and momentum 0 stand for the defaults (1e-5, 0.1), zero_eps and
 * zero_momentum ask for a true 0. Parameters are float64 for float64 data,
 * float32 otherwise.
 */
typedef struct fbnt_spec {
  int64_t n, c, h, w; /* c is num_features; n = 0: no tensors */
  fbn_dtype dtype;    /* of the data */
  fbn_layout layout;
  bool addend;        /* forward with an addend, backward with daddend */
  bool eval;          /* set to eval mode after creation */
  bool no_affine;
  bool no_track;      /* track_running_stats = false */
  bool cumulative;    /* cumulative_average (Python's momentum=None) */
  double eps;
  double momentum;
  bool zero_eps;
  bool zero_momentum;
  fbn_bn_mode bn_mode;
  fbn_device_type device;
} fbnt_spec;

/* The module options a spec describes. */
fbn_module_options fbnt_options(const fbnt_spec *spec);
/* "(n,c,h,w) NCHW f32 addend affine track eps=1e-05 momentum=0.1 eval" and
 * the like. */
void fbnt_spec_name(const fbnt_spec *spec, char *buf, size_t size);

/*
 * Host tensors of one shape in its dtype and layout, with their logical
 * NCHW float64 copies: x (per-channel offset and scale), addend and dy
 * (normal) fresh random data, as stored; y, dx, daddend poisoned (NaN), and
 * yr, dxr, dar the reference's answers once a check has run. saved is a
 * fresh fbn_saved for the forward on these tensors; rs is what the
 * reference's forward kept.
 */
typedef struct fbnt_tensors {
  fbn_tensor_desc d;
  size_t count;
  bool addend;
  void *x, *a, *y, *dy, *dx, *da;
  double *xr, *ar, *yr, *dyr, *dxr, *dar;
  fbn_saved *saved;
  fbnt_ref_saved rs;
  bool forward_done; /* a forward on these tensors succeeded */
} fbnt_tensors;

/* Aborts when out of memory. */
void fbnt_tensors_init(fbnt_tensors *t, fbnt_rng *rng, fbn_tensor_desc d, bool addend);
/* The inputs of src (x, addend, dy) in d's dtype and layout (d has src's
 * shape), rounded to d's dtype; outputs poisoned, a fresh saved object. */
void fbnt_tensors_init_as(fbnt_tensors *t, const fbnt_tensors *src, fbn_tensor_desc d);
void fbnt_tensors_free(fbnt_tensors *t);

typedef struct fbnt_fixture {
  fbnt_spec spec;
  char name[192];
  fbn_module *m;
  fbnt_ref_module ref;
  fbnt_tensors t; /* of spec's shape (none when spec.n == 0) */
} fbnt_fixture;

/*
 * Create the module of spec with random state (fbnt_module_create_random),
 * its reference twin, the mode spec asks for, and tensors of spec's shape.
 * Prints and returns the failing status (f is then destroyed already).
 */
fbn_status fbnt_fixture_create(fbnt_fixture *f, fbnt_rng *rng, const fbnt_spec *spec);
void fbnt_fixture_destroy(fbnt_fixture *f);
/* Mode of the module and of the reference. */
fbn_status fbnt_fixture_set_training(fbnt_fixture *f, bool training);
/*
 * Forward of the module on t (NULL: f->t) into its freshly poisoned y, with
 * saved (may be NULL, or another saved object than t->saved), and of the
 * reference; checks every element of y, the module's state (parameters
 * bitwise) and that x and addend are unchanged. Prints every failure
 * (labelled what, or f->name); returns true iff everything matched.
 */
bool fbnt_fixture_forward(fbnt_fixture *f, fbnt_tensors *t, fbn_saved *saved, const char *what);
/*
 * Backward of the last forward on t (NULL: f->t) with saved, into freshly
 * poisoned dx and daddend (passed only when wanted), and of the reference
 * with the module's y as the ReLU gate; checks every element of dx and
 * daddend (an output not asked for must stay NaN), the accumulated
 * gradients and the rest of the state, and that x is unchanged.
 */
bool fbnt_fixture_backward(fbnt_fixture *f, fbnt_tensors *t, const fbn_saved *saved,
                           bool want_dx, bool want_daddend, const char *what);

/* ---- misc --------------------------------------------------------------- */

/* Call first in a test program's main(): prints the seed, and argv[1], if
 * given, becomes the test-name filter (cmocka_set_test_filter pattern, '*'
 * and '?' wildcards). */
void fbnt_parse_args(int argc, char **argv);

/* Short "NCHW"/"NHWC" and "f32"/"f64"/... names for messages. */
const char *fbnt_layout_str(fbn_layout layout);
const char *fbnt_dtype_str(fbn_dtype dtype);

#endif /* FBN_TESTUTIL_H */
