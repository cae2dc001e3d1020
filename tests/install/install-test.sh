#!/usr/bin/env bash
# Install test: `meson install` the build into a temporary DESTDIR, then
# build and run a client that sees only the installed headers and library,
# through `pkg-config --cflags --libs fusedbn`.
#
#   install-test.sh BUILDDIR CLIENT.c
#
# Environment (set by tests/install/meson.build):
#   FBN_CC          the C compiler command of the build
#   FBN_CXX         a C++ compiler for the header check (optional)
#   FBN_SANITIZE    b_sanitize of the build ("none" or e.g. "address,undefined"):
#                   the client is built the same way so it can load the library
#   FBN_FEATURES    comma-separated: cuda, state_io (what the build has)
#   FBN_CUDA_CFLAGS the CUDA toolkit's -I flags: what a client of
#                   <fusedbn/fusedbn_cuda.h> adds itself (that header includes
#                   <cuda_runtime_api.h>; fusedbn.pc does not carry CUDA's paths)
#   FBN_PREFIX, FBN_LIBDIR, FBN_INCLUDEDIR   the build's install directories
#   MESON           the meson command
# Exit status 77 (skip) when pkg-config is missing.
set -euo pipefail

build=$(cd "$1" && pwd)
client_src=$2
: "${FBN_CC:?}" "${FBN_PREFIX:?}" "${FBN_LIBDIR:?}" "${FBN_INCLUDEDIR:?}"
meson_cmd=${MESON:-meson}

if ! command -v pkg-config >/dev/null; then
  echo "SKIP: pkg-config not found"
  exit 77
fi

has_feature() { case ",${FBN_FEATURES:-}," in *",$1,"*) return 0 ;; esac; return 1; }
fail() { echo "install-test: FAIL: $*" >&2; exit 1; }

dest=$(mktemp -d "${TMPDIR:-/tmp}/fusedbn-install.XXXXXX")
trap 'rm -rf "$dest"' EXIT

echo "== meson install --destdir $dest"
# shellcheck disable=SC2086 # MESON may be "python3 /path/meson.py"
$meson_cmd install -C "$build" --no-rebuild --quiet --destdir "$dest"

# Paths inside the DESTDIR (libdir/includedir may be relative to the prefix).
abs() { case $1 in /*) echo "$1" ;; *) echo "$FBN_PREFIX/$1" ;; esac; }
root=$dest$FBN_PREFIX
libdir=$dest$(abs "$FBN_LIBDIR")
incdir=$dest$(abs "$FBN_INCLUDEDIR")

echo "== installed files"
(cd "$dest" && find . \( -type f -o -type l \) | LC_ALL=C sort | sed 's/^\./  /')

# What must (and must not) be there.
[ -f "$incdir/fusedbn/fusedbn.h" ] || fail "fusedbn/fusedbn.h not installed in $incdir"
[ -f "$libdir/pkgconfig/fusedbn.pc" ] || fail "fusedbn.pc not installed in $libdir/pkgconfig"
[ -e "$libdir/libfusedbn.so" ] || fail "libfusedbn.so (development link) not installed in $libdir"
ls "$libdir"/libfusedbn.so.* >/dev/null 2>&1 || fail "no versioned libfusedbn.so.* in $libdir"
if has_feature state_io; then
  [ -f "$incdir/fusedbn/fusedbn_state.h" ] || fail "state_io build without fusedbn_state.h"
else
  [ ! -e "$incdir/fusedbn/fusedbn_state.h" ] || fail "fusedbn_state.h installed without state_io"
fi
if find "$dest" -name 'internal.h' -o -name 'fbn_config.h' -o -name '*.cuh' | grep -q .; then
  fail "an internal header was installed"
fi

echo "== pkg-config"
# The installed .pc first, then the system's (for Requires such as jansson).
system_pc=$(pkg-config --variable pc_path pkg-config)
export PKG_CONFIG_LIBDIR=$libdir/pkgconfig${system_pc:+:$system_pc}
export PKG_CONFIG_PATH=
pc() { pkg-config --define-variable=prefix="$root" "$@" fusedbn; }
pc --exists --print-errors || fail "pkg-config does not find fusedbn in $libdir/pkgconfig"
case $(pc --variable=pcfiledir) in
  "$libdir/pkgconfig") ;;
  *) fail "pkg-config found another fusedbn.pc: $(pc --variable=pcfiledir)" ;;
esac
cflags=$(pc --cflags)
libs=$(pc --libs)
echo "  version: $(pc --modversion)"
echo "  cflags:  $cflags"
echo "  libs:    $libs"
case " $cflags $libs " in
  *"$build"*) fail "pkg-config flags point into the build directory" ;;
esac

san=()
if [ -n "${FBN_SANITIZE:-}" ] && [ "$FBN_SANITIZE" != none ]; then
  san=(-fsanitize="$FBN_SANITIZE")
fi
read -r -a cc <<<"$FBN_CC"
cuda_cflags=""
has_feature cuda && cuda_cflags=${FBN_CUDA_CFLAGS:-}
cxx=()
[ -n "${FBN_CXX:-}" ] && read -r -a cxx <<<"$FBN_CXX"

echo "== every installed header compiles on its own (C11 -pedantic$([ ${#cxx[@]} -gt 0 ] && echo ', C++11'))"
for h in "$incdir"/fusedbn/*.h; do
  name=fusedbn/$(basename "$h")
  extra=""
  [ "$name" = fusedbn/fusedbn_cuda.h ] && extra=$cuda_cflags
  # shellcheck disable=SC2086 # word splitting of pkg-config output is intended
  printf '#include <%s>\n#include <%s>\nint fbn_header_check;\n' "$name" "$name" |
    "${cc[@]}" -std=c11 -pedantic -Wall -Wextra -Werror $cflags $extra -fsyntax-only -x c - ||
    fail "$name does not compile on its own as C11"
  if [ ${#cxx[@]} -gt 0 ]; then
    # shellcheck disable=SC2086
    printf '#include <%s>\nint fbn_header_check;\n' "$name" |
      "${cxx[@]}" -std=c++11 -pedantic -Wall -Wextra -Werror $cflags $extra -fsyntax-only -x c++ - ||
      fail "$name does not compile on its own as C++11"
  fi
  echo "  $name"
done

echo "== build the client"
defs=()
has_feature state_io && defs+=(-DCLIENT_STATE_IO)
has_feature cuda && defs+=(-DCLIENT_CUDA)
# shellcheck disable=SC2086
"${cc[@]}" -std=c11 -pedantic -Wall -Wextra -Werror "${san[@]}" "${defs[@]}" $cflags $cuda_cflags \
  -o "$dest/client" "$client_src" $libs -lm

echo "== run it against the installed library"
export LD_LIBRARY_PATH=$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
resolved=$(ldd "$dest/client" | awk '/libfusedbn\.so/ { print $3 }')
echo "  libfusedbn resolves to $resolved"
case $resolved in
  "$dest"/*) ;;
  *) fail "the client does not load the installed library (got '$resolved')" ;;
esac
"$dest/client"
echo "install-test: OK"
