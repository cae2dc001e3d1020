#!/usr/bin/env python3
"""Exported-symbols check of libfusedbn (in the spirit of libdrm's).

Compares the dynamic symbols a built library defines (nm -D --defined-only)
with the committed list tests/abi/fusedbn.symbols, restricted to the
sections of the features this build has:

    [core]       always exported
    [cuda]       only when built with the cuDNN backend (have_cuda)
    [state_io]   only when built with safetensors state files (jansson)

Fails (exit 1) if the library exports a symbol that is not listed for this
configuration, or lacks one that is.  A symbol listed under a feature the
build does not have must not be exported either.  The list is regenerated
by scripts/update-symbols; a change to it is an ABI change and belongs in
review.

Usage: check-symbols.py --lib LIB --list FILE [--features f1,f2] [--nm NM]
Exit status 77 (meson's "skip") when nm is missing.
"""
import argparse
import os
import shutil
import subprocess
import sys

SECTIONS = ("core", "cuda", "state_io")

# Symbols the linker itself defines in some toolchains' dynamic symbol
# tables (not ours, never part of the API). binutils 2.40 on Debian 12
# emits none of them for libfusedbn; listed so other linkers don't fail the
# check for symbols we don't control.
LINKER_SYMBOLS = {"_init", "_fini", "_edata", "_end", "__bss_start"}


def parse_list(path):
    sections = {name: set() for name in SECTIONS}
    current = None
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1].strip()
                if current not in sections:
                    sys.exit("%s:%d: unknown section [%s] (known: %s)"
                             % (path, lineno, current, ", ".join(SECTIONS)))
                continue
            if current is None:
                sys.exit("%s:%d: symbol %r before any [section]" % (path, lineno, line))
            if any(c.isspace() for c in line):
                sys.exit("%s:%d: one symbol per line: %r" % (path, lineno, line))
            for name, syms in sections.items():
                if line in syms:
                    sys.exit("%s:%d: %s listed twice (also in [%s])" % (path, lineno, line, name))
            sections[current].add(line)
    return sections


def exported_symbols(nm, lib):
    out = subprocess.run([nm, "-D", "--defined-only", "--format=posix", lib],
                         check=True, stdout=subprocess.PIPE, universal_newlines=True).stdout
    syms = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        name = fields[0].split("@", 1)[0]  # drop a symbol version, if any
        if name in LINKER_SYMBOLS:
            continue
        syms.add(name)
    return syms


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", required=True)
    ap.add_argument("--list", required=True)
    ap.add_argument("--features", default="")
    ap.add_argument("--nm", default=os.environ.get("NM", "nm"))
    args = ap.parse_args()

    nm = shutil.which(args.nm) or (args.nm if os.path.isfile(args.nm) else None)
    if nm is None:
        print("SKIP: %s not found" % args.nm)
        return 77

    features = [f for f in args.features.split(",") if f]
    for f in features:
        if f not in SECTIONS or f == "core":
            sys.exit("unknown feature %r (known: cuda, state_io)" % f)

    sections = parse_list(args.list)
    expected = set(sections["core"])
    for f in features:
        expected |= sections[f]
    exported = exported_symbols(nm, args.lib)

    missing = sorted(expected - exported)
    extra = sorted(exported - expected)
    print("library:  %s" % args.lib)
    print("features: core%s" % "".join(" + " + f for f in features))
    print("exported: %d symbols, expected %d" % (len(exported), len(expected)))
    if missing:
        print("\nlisted in %s but not exported:" % os.path.basename(args.list))
        for s in missing:
            print("  - " + s)
    if extra:
        print("\nexported but not listed for this configuration:")
        for s in extra:
            owner = [name for name, syms in sections.items() if s in syms]
            note = " (listed under [%s], a feature this build lacks)" % owner[0] if owner else ""
            print("  + " + s + note)
    if missing or extra:
        print("\nIf the change is intended (a new or removed public function), run "
              "scripts/update-symbols and commit tests/abi/fusedbn.symbols; "
              "otherwise hide the symbol (FBN_INTERNAL / static) or export it (FBN_API).")
        return 1
    print("OK: exported symbols match the list")
    return 0


if __name__ == "__main__":
    sys.exit(main())
