/*
 * The API layer's internals (api/api.h) under the name the tests that check
 * which backend a module got include. Backends never include it.
 */
#ifndef FUSEDBN_SRC_INTERNAL_H
#define FUSEDBN_SRC_INTERNAL_H

#include "api/api.h"

#endif /* FUSEDBN_SRC_INTERNAL_H */
