#!/usr/bin/env bash
# Install test: `meson install` the build into a temporary DESTDIR, then
# build and run a client that sees only the installed headers and library.
#
#   install-test.sh BUILDDIR CLIENT.c pkg-config|cmake [MPI_CLIENT.c]
#
#   pkg-config  every installed header compiles on its own (C11, C++11), and
#               CLIENT.c is built with `pkg-config --cflags --libs fusedbn`;
#               with MPI (feature mpi), <fusedbn/fusedbn_mpi.h> with the flags
#               of `pkg-config --cflags fusedbn-mpi`, and MPI_CLIENT.c built
#               with `pkg-config --cflags --libs fusedbn-mpi` and run under
#               FBN_MPIRUN with 2 processes
#   cmake       CLIENT.c is built by tests/install/cmake/CMakeLists.txt with
#               find_package(fusedbn X.Y REQUIRED COMPONENTS <the build's
#               features>) and fusedbn::fusedbn; a newer or (for 0.x) older
#               series, an unknown component and a component the build lacks
#               are refused, a version range is accepted; with MPI, the
#               component mpi and MPI_CLIENT.c on fusedbn::fusedbn_mpi, run
#               under FBN_MPIRUN with 2 processes
#
# Environment (set by tests/install/meson.build):
#   FBN_CC          the C compiler command of the build
#   FBN_CXX         a C++ compiler for the header check (optional)
#   FBN_SANITIZE    b_sanitize of the build ("none" or e.g. "address,undefined"):
#                   the client is built the same way so it can load the library
#   FBN_FEATURES    comma-separated: cuda, state_io, mpi (what the build has)
#   FBN_MPIRUN      mpirun of the MPI the build found (empty: the MPI client
#                   is built, not run)
#   FBN_LIBRARY     default_library of the build: shared, static or both
#   FBN_VERSION     the project's version
#   FBN_CUDA_CFLAGS the CUDA toolkit's -I flags: what a client of
#                   <fusedbn/fusedbn_cuda.h> adds itself (that header includes
#                   <cuda_runtime_api.h>; fusedbn.pc does not carry CUDA's paths)
#   FBN_CUDA_ROOT   the CUDA toolkit prefix (CUDAToolkit_ROOT of the CMake client)
#   FBN_CMAKE_CLIENT the directory of the CMake client's CMakeLists.txt
#   FBN_PREFIX, FBN_LIBDIR, FBN_INCLUDEDIR   the build's install directories
#   MESON, CMAKE    the meson and cmake commands (CMAKE empty: not found)
# Exit status 77 (skip) when the client's tool (pkg-config, cmake) is missing.
set -euo pipefail

build=$(cd "$1" && pwd)
client_src=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
kind=$3
mpi_client_src=""
[ -n "${4:-}" ] && mpi_client_src=$(cd "$(dirname "$4")" && pwd)/$(basename "$4")
: "${FBN_CC:?}" "${FBN_PREFIX:?}" "${FBN_LIBDIR:?}" "${FBN_INCLUDEDIR:?}"
meson_cmd=${MESON:-meson}

case $kind in
  pkg-config)
    if ! command -v pkg-config >/dev/null; then
      echo "SKIP: pkg-config not found: the pkg-config client is not built"
      exit 77
    fi ;;
  cmake)
    cmake_cmd=${CMAKE:-}
    if [ -z "$cmake_cmd" ] || ! command -v "$cmake_cmd" >/dev/null; then
      echo "SKIP: cmake not found (Debian package cmake): the CMake client is not built"
      exit 77
    fi
    : "${FBN_CMAKE_CLIENT:?}" "${FBN_VERSION:?}" ;;
  *) echo "install-test: unknown client kind '$kind' (pkg-config or cmake)" >&2; exit 2 ;;
esac

has_feature() { case ",${FBN_FEATURES:-}," in *",$1,"*) return 0 ;; esac; return 1; }
fail() { echo "install-test: FAIL: $*" >&2; exit 1; }
static=false
[ "${FBN_LIBRARY:-shared}" = static ] && static=true

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
cmakedir=$libdir/cmake/fusedbn

echo "== installed files"
(cd "$dest" && find . \( -type f -o -type l \) | LC_ALL=C sort | sed 's/^\./  /')

# What must (and must not) be there.
[ -f "$incdir/fusedbn/fusedbn.h" ] || fail "fusedbn/fusedbn.h not installed in $incdir"
[ -f "$libdir/pkgconfig/fusedbn.pc" ] || fail "fusedbn.pc not installed in $libdir/pkgconfig"
for f in fusedbnConfig.cmake fusedbnConfigVersion.cmake; do
  [ -f "$cmakedir/$f" ] || fail "$f not installed in $cmakedir"
done
if $static; then
  [ -f "$libdir/libfusedbn.a" ] || fail "libfusedbn.a not installed in $libdir"
else
  [ -e "$libdir/libfusedbn.so" ] || fail "libfusedbn.so (development link) not installed in $libdir"
  ls "$libdir"/libfusedbn.so.* >/dev/null 2>&1 || fail "no versioned libfusedbn.so.* in $libdir"
fi
if has_feature state_io; then
  [ -f "$incdir/fusedbn/fusedbn_state.h" ] || fail "state_io build without fusedbn_state.h"
else
  [ ! -e "$incdir/fusedbn/fusedbn_state.h" ] || fail "fusedbn_state.h installed without state_io"
fi
if has_feature mpi; then
  [ -f "$incdir/fusedbn/fusedbn_mpi.h" ] || fail "MPI build without fusedbn_mpi.h"
  [ -f "$libdir/pkgconfig/fusedbn-mpi.pc" ] || fail "fusedbn-mpi.pc not installed in $libdir/pkgconfig"
  if $static; then
    [ -f "$libdir/libfusedbn_mpi.a" ] || fail "libfusedbn_mpi.a not installed in $libdir"
  else
    [ -e "$libdir/libfusedbn_mpi.so" ] || fail "libfusedbn_mpi.so not installed in $libdir"
  fi
else
  for f in "$incdir/fusedbn/fusedbn_mpi.h" "$libdir/pkgconfig/fusedbn-mpi.pc"; do
    [ ! -e "$f" ] || fail "$f installed without MPI"
  done
fi
if find "$dest" -name 'internal.h' -o -name 'fbn_config.h' -o -name '*.cuh' | grep -q .; then
  fail "an internal header was installed"
fi

san=()
if [ -n "${FBN_SANITIZE:-}" ] && [ "$FBN_SANITIZE" != none ]; then
  san=(-fsanitize="$FBN_SANITIZE")
fi
read -r -a cc <<<"$FBN_CC"
defs=()
has_feature state_io && defs+=(-DCLIENT_STATE_IO)
has_feature cuda && defs+=(-DCLIENT_CUDA)

# Run the client at $1 against the installed library.
run_client() {
  export LD_LIBRARY_PATH=$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  resolved=$(ldd "$1" | awk '/libfusedbn\.so/ { print $3 }')
  if $static; then
    [ -z "$resolved" ] || fail "a client of the static library loads $resolved"
    echo "  linked statically"
  else
    echo "  libfusedbn resolves to $resolved"
    case $resolved in
      "$dest"/*) ;;
      *) fail "the client does not load the installed library (got '$resolved')" ;;
    esac
  fi
  "$1"
}

pkg_config_client() {
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
  if $static; then libs=$(pc --libs --static); else libs=$(pc --libs); fi
  echo "  version: $(pc --modversion)"
  echo "  cflags:  $cflags"
  echo "  libs:    $libs"
  case " $cflags $libs " in
    *"$build"*) fail "pkg-config flags point into the build directory" ;;
  esac

  cuda_cflags=""
  has_feature cuda && cuda_cflags=${FBN_CUDA_CFLAGS:-}
  mpi_cflags=""
  if has_feature mpi; then
    # fusedbn-mpi Requires the MPI's own module (ompi-c, mpich), whose prefix
    # is the system's: the DESTDIR prefix goes into copies of the two fusedbn
    # files instead of --define-variable, which would move the MPI's too.
    mpi_pc=$dest/pkgconfig-mpi
    mkdir -p "$mpi_pc"
    for f in fusedbn fusedbn-mpi; do
      sed "s|^prefix=.*|prefix=$root|" "$libdir/pkgconfig/$f.pc" >"$mpi_pc/$f.pc"
    done
    pcm() { PKG_CONFIG_LIBDIR=$mpi_pc${system_pc:+:$system_pc} pkg-config "$@" fusedbn-mpi; }
    pcm --exists --print-errors || fail "pkg-config cannot resolve fusedbn-mpi (its Requires)"
    mpi_cflags=$(pcm --cflags)
    echo "  fusedbn-mpi cflags: $mpi_cflags"
  fi
  cxx=()
  [ -n "${FBN_CXX:-}" ] && read -r -a cxx <<<"$FBN_CXX"

  echo "== every installed header compiles on its own (C11 -pedantic$([ ${#cxx[@]} -gt 0 ] && echo ', C++11'))"
  for h in "$incdir"/fusedbn/*.h; do
    name=fusedbn/$(basename "$h")
    extra=""
    cxx_extra=""
    case $name in
      fusedbn/fusedbn_cuda.h | fusedbn/fusedbn_cuda_sync.h | fusedbn/fusedbn_nccl.h)
        extra=$cuda_cflags ;;
    esac
    # Open MPI's and MPICH's <mpi.h> pull in their deprecated C++ bindings
    # (which warn under -Wextra) unless a C++ client of the C API skips them.
    if [ "$name" = fusedbn/fusedbn_mpi.h ]; then
      extra=$mpi_cflags
      cxx_extra="-DOMPI_SKIP_MPICXX=1 -DMPICH_SKIP_MPICXX=1"
    fi
    # shellcheck disable=SC2086 # word splitting of pkg-config output is intended
    printf '#include <%s>\n#include <%s>\nint fbn_header_check;\n' "$name" "$name" |
      "${cc[@]}" -std=c11 -pedantic -Wall -Wextra -Werror $cflags $extra -fsyntax-only -x c - ||
      fail "$name does not compile on its own as C11"
    if [ ${#cxx[@]} -gt 0 ]; then
      # shellcheck disable=SC2086
      printf '#include <%s>\nint fbn_header_check;\n' "$name" |
        "${cxx[@]}" -std=c++11 -pedantic -Wall -Wextra -Werror $cflags $extra $cxx_extra -fsyntax-only -x c++ - ||
        fail "$name does not compile on its own as C++11"
    fi
    echo "  $name"
  done

  echo "== build the client"
  # shellcheck disable=SC2086
  "${cc[@]}" -std=c11 -pedantic -Wall -Wextra -Werror "${san[@]}" "${defs[@]}" $cflags $cuda_cflags \
    -o "$dest/client" "$client_src" $libs -lm

  echo "== run it against the installed library"
  run_client "$dest/client"

  if has_feature mpi && [ -n "$mpi_client_src" ]; then
    mpi_client
  fi
}

# The MPI adapter's client: built with fusedbn-mpi.pc alone, run by mpirun.
mpi_client() {
  echo "== build the MPI client (pkg-config fusedbn-mpi)"
  local mpi_libs
  if $static; then mpi_libs=$(pcm --libs --static); else mpi_libs=$(pcm --libs); fi
  echo "  libs:    $mpi_libs"
  # shellcheck disable=SC2086
  "${cc[@]}" -std=c11 -pedantic -Wall -Wextra -Werror "${san[@]}" $mpi_cflags \
    -o "$dest/mpi_client" "$mpi_client_src" $mpi_libs -lm
  run_mpi_client "$dest/mpi_client"
}

# Run the MPI client at $1 (it must load the installed libfusedbn_mpi) under
# FBN_MPIRUN with 2 processes.
run_mpi_client() {
  if ! $static; then
    local resolved
    resolved=$(LD_LIBRARY_PATH=$libdir ldd "$1" | awk '/libfusedbn_mpi\.so/ { print $3 }')
    echo "  libfusedbn_mpi resolves to $resolved"
    case $resolved in
      "$dest"/*) ;;
      *) fail "the MPI client does not load the installed libfusedbn_mpi (got '$resolved')" ;;
    esac
  fi
  if [ -z "${FBN_MPIRUN:-}" ]; then
    echo "  not run: no mpirun found"
    return 0
  fi
  echo "== run it under $FBN_MPIRUN -np 2"
  # Open MPI: root in CI containers, 2 ranks on any core count, one host
  # (no rsh agent), shared memory, waiting ranks yielding their core; its
  # own allocations kept until exit are no leaks of ours (the sync suite's
  # mpirun tests do the same).
  LD_LIBRARY_PATH=$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} OMPI_MCA_plm_rsh_agent='' \
    OMPI_MCA_btl=self,vader OMPI_MCA_mpi_yield_when_idle=1 OMP_NUM_THREADS=1 \
    ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0 \
    "$FBN_MPIRUN" --allow-run-as-root --oversubscribe -np 2 "$1" ||
    fail "the MPI client failed under mpirun"
}

cmake_client() {
  echo "== the CMake package"
  # Relocatable: no installed CMake file names the install prefix's
  # directories, the build or the source tree; the DESTDIR install works only
  # because the config finds everything from its own location.
  for p in "$(abs "$FBN_LIBDIR")" "$(abs "$FBN_INCLUDEDIR")" "$build" "$(dirname "$FBN_CMAKE_CLIENT")"; do
    # (A static build's HINTS name where its dependencies were found.)
    if grep -F -n -- "$p" "$cmakedir"/*.cmake | grep -v ' HINTS '; then
      fail "an installed CMake file names $p"
    fi
  done

  series=$(echo "$FBN_VERSION" | cut -d. -f1,2)
  major=${series%%.*}
  minor=${series#*.}
  components=()
  has_feature state_io && components+=(state_io)
  has_feature cuda && components+=(cuda)
  has_feature mpi && components+=(mpi)
  missing=""
  has_feature state_io || missing=state_io
  has_feature cuda || missing=${missing:-cuda}
  has_feature mpi || missing=${missing:-mpi}

  gen=()
  command -v ninja >/dev/null && gen=(-G Ninja)
  launcher=("${cc[@]:0:${#cc[@]}-1}")
  args=(-DCMAKE_C_COMPILER="${cc[-1]}"
        -DCMAKE_PREFIX_PATH="$root"
        -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
        -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF
        -DCMAKE_BUILD_TYPE=Debug
        -DCLIENT_SOURCE="$client_src")
  [ -n "$mpi_client_src" ] && args+=(-DMPI_CLIENT_SOURCE="$mpi_client_src")
  [ ${#launcher[@]} -gt 0 ] && args+=(-DCMAKE_C_COMPILER_LAUNCHER="$(IFS=';'; echo "${launcher[*]}")")
  if [ ${#san[@]} -gt 0 ]; then
    args+=(-DCMAKE_C_FLAGS="${san[*]}" -DCMAKE_EXE_LINKER_FLAGS="${san[*]}")
  fi
  has_feature cuda && [ -n "${FBN_CUDA_ROOT:-}" ] && args+=(-DCUDAToolkit_ROOT="$FBN_CUDA_ROOT")
  bdir=$dest/cmake-client
  log=$dest/cmake.log

  # configure EXPECT VERSION COMPONENTS [MESSAGE]: cmake configures (ok) or
  # stops with MESSAGE in its output (refused).
  configure() {
    local expect=$1 version=$2 comps=$3 message=${4:-}
    echo "  find_package(fusedbn $version REQUIRED${comps:+ COMPONENTS ${comps//;/ }}): $expect"
    if "$cmake_cmd" -S "$FBN_CMAKE_CLIENT" -B "$bdir" "${gen[@]}" "${args[@]}" \
         -DFUSEDBN_VERSION="$version" -DFUSEDBN_COMPONENTS="$comps" >"$log" 2>&1; then
      [ "$expect" = ok ] || { cat "$log"; fail "find_package(fusedbn $version) $comps was accepted"; }
    else
      [ "$expect" = refused ] || { cat "$log"; fail "cmake could not configure the client"; }
      grep -q -F -- "$message" "$log" ||
        { cat "$log"; fail "cmake refused, but without \"$message\""; }
    fi
  }

  comps=$(IFS=';'; echo "${components[*]}")
  echo "== configure the CMake client (fusedbn $FBN_VERSION, components: ${comps:-none})"
  configure refused "$major.$((minor + 1))" "" "compatible with requested version"
  if [ "$major" = 0 ] && [ "$minor" -gt 0 ]; then
    configure refused "0.$((minor - 1))" "" "compatible with requested version"
  fi
  configure refused "$series" "no_such_part" "component no_such_part: unknown component"
  if [ -n "$missing" ]; then
    configure refused "$series" "$missing" "component $missing: this fusedbn was built without it"
  fi
  configure ok "$series...<$major.$((minor + 1))" "$comps"
  configure ok "$series" "$comps"
  found=$(sed -n 's/^fusedbn_DIR:[A-Z]*=//p' "$bdir/CMakeCache.txt")
  [ "$found" = "$cmakedir" ] || fail "find_package used $found, not the installed $cmakedir"
  grep -F "fusedbn $FBN_VERSION from" "$log" | sed 's/^-- /  /'

  echo "== build the client with cmake --build"
  "$cmake_cmd" --build "$bdir" >"$log" 2>&1 || { cat "$log"; fail "the CMake client does not build"; }

  echo "== run it against the installed library"
  run_client "$bdir/client"

  if has_feature mpi && [ -n "$mpi_client_src" ]; then
    echo "== the MPI client (fusedbn::fusedbn_mpi)"
    run_mpi_client "$bdir/mpi_client"
  fi
}

case $kind in
  pkg-config) pkg_config_client ;;
  cmake) cmake_client ;;
esac
echo "install-test: OK ($kind client)"
