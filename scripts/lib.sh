# shellcheck shell=bash
# Shared helpers of scripts/*: sourced, not run.

# Install the Debian packages named in "$@" that are missing (needs root or
# sudo). Returns 1 when some could not be installed (callers that can go on
# without them say `|| true`).
fbn_install_packages() {
  local missing=()
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" && continue
    # Present some other way (pip's meson/ninja, a toolkit image): fine too.
    fbn_have_package "$p" && continue
    missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "fusedbn: installing ${missing[*]}" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends \
           "${missing[@]}" >/dev/null; }; then
    # Offline machines (no package registry) may still have what the build
    # needs some other way; the caller decides whether to go on.
    echo "fusedbn: apt-get could not install ${missing[*]}" >&2
    return 1
  fi
}

# Whether what package $1 provides is usable without dpkg knowing of it.
fbn_have_package() {
  case "$1" in
  meson) command -v meson >/dev/null 2>&1 ;;
  ninja-build) command -v ninja >/dev/null 2>&1 ;;
  pkg-config) command -v pkg-config >/dev/null 2>&1 ;;
  build-essential) command -v cc >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 ;;
  libcmocka-dev) pkg-config --exists cmocka 2>/dev/null ;;
  libjansson-dev) pkg-config --exists jansson 2>/dev/null ;;
  *) return 1 ;;
  esac
}

# Configure (or reconfigure) build dir $1 with the remaining arguments as options.
fbn_configure() {
  local dir=$1
  shift
  if [ -f "$dir/build.ninja" ]; then
    meson setup --reconfigure "$dir" "$@" >/dev/null
  else
    meson setup "$dir" "$@"
  fi
}
