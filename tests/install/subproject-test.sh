#!/usr/bin/env bash
# Subproject test: a Meson project (tests/install/meson-subproject) that has
# fusedbn as its subproject, through
#   dependency('fusedbn', fallback: ['fusedbn', 'fusedbn_dep']),
# builds CLIENT.c and runs it against the subproject's library.
#
#   subproject-test.sh SOURCE_ROOT CLIENT.c
#
# The project is assembled in a temporary directory: its meson.build and
# meson_options.txt, CLIENT.c, and subprojects/fusedbn, a link to
# SOURCE_ROOT. The fallback is forced (an installed fusedbn must not be
# picked up instead); the subproject is built without tests and benchmarks
# (the client's default_options: checked), without CUDA, with state files
# when this build has them, at -O0 (the client is small), with this build's
# compiler and sanitizers.
#
# Environment (set by tests/install/meson.build): FBN_CC, FBN_SANITIZE,
# FBN_FEATURES and MESON, as for install-test.sh.
set -euo pipefail

src_root=$(cd "$1" && pwd)
client_src=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
: "${FBN_CC:?}"
meson_cmd=${MESON:-meson}

has_feature() { case ",${FBN_FEATURES:-}," in *",$1,"*) return 0 ;; esac; return 1; }
fail() { echo "subproject-test: FAIL: $*" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/fusedbn-subproject.XXXXXX")
trap 'rm -rf "$work"' EXIT

proj=$work/client
mkdir -p "$proj/subprojects"
cp "$src_root/tests/install/meson-subproject/meson.build" \
   "$src_root/tests/install/meson-subproject/meson_options.txt" "$proj/"
ln -s "$client_src" "$proj/client.c"
ln -s "$src_root" "$proj/subprojects/fusedbn"

state_io=disabled
client_state_io=false
if has_feature state_io; then
  state_io=enabled
  client_state_io=true
fi
sanitize=none
[ -n "${FBN_SANITIZE:-}" ] && sanitize=$FBN_SANITIZE

echo "== meson setup (fusedbn as a subproject, state_io $state_io, b_sanitize $sanitize)"
# shellcheck disable=SC2086 # MESON may be "python3 /path/meson.py"
if ! CC=$FBN_CC $meson_cmd setup "$work/build" "$proj" \
     --buildtype=debug --force-fallback-for=fusedbn \
     -Db_sanitize="$sanitize" -Dclient_state_io=$client_state_io \
     -Dfusedbn:cuda=disabled \
     -Dfusedbn:state_io=$state_io >"$work/setup.log" 2>&1; then
  cat "$work/setup.log"
  fail "meson setup of the subproject client failed"
fi
grep -E "^(Executing subproject|Dependency fusedbn)" "$work/setup.log" | sed 's/^/  /' || true

echo "== build"
# shellcheck disable=SC2086
if ! $meson_cmd compile -C "$work/build" >"$work/build.log" 2>&1; then
  cat "$work/build.log"
  fail "the subproject client does not build"
fi

for d in tests bench; do
  [ ! -e "$work/build/subprojects/fusedbn/$d" ] ||
    fail "the subproject built its $d/ despite default_options $d=disabled"
done

echo "== run it against the subproject's library"
client=$work/build/client
resolved=$(ldd "$client" | awk '/libfusedbn\.so/ { print $3 }')
echo "  libfusedbn resolves to $resolved"
case $resolved in
  "$work/build/subprojects/fusedbn/"*) ;;
  *) fail "the client does not load the subproject's library (got '$resolved')" ;;
esac
"$client"
echo "subproject-test: OK"
