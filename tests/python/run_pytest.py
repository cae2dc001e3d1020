#!/usr/bin/env python3
"""Run the Python package's tests (pytest) with an interpreter that has torch.

    run_pytest.py --lib <build>/src/libfusedbn.so --package <source>/python TESTDIR [pytest args]
    run_pytest.py --lib ... --package ... --script SCRIPT [script args]

Tries /usr/bin/python3 (Debian's python3-torch lives there) and python3 on
PATH, in that order (only $FUSEDBN_TEST_PYTHON when that is set), and runs
pytest with the first that imports torch, torchvision and pytest (with
--script: runs SCRIPT, e.g. a benchmark's --quick check, with the first that
imports torch and torchvision), with FUSEDBN_LIBRARY and PYTHONPATH pointing
at the build's library and the source's package.  Exits 77 (meson's
"skipped") when none does, naming what was tried; otherwise with the exit
status of pytest or SCRIPT.
"""
import argparse
import os
import shutil
import subprocess
import sys

MODULES = ("torch", "torchvision", "pytest")


def candidates():
    if os.environ.get("FUSEDBN_TEST_PYTHON"):
        return [os.environ["FUSEDBN_TEST_PYTHON"]]
    seen = []
    for p in ("/usr/bin/python3", shutil.which("python3")):
        if p and p not in seen:
            seen.append(p)
    return seen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--package", required=True)
    ap.add_argument("--script")
    ap.add_argument("testdir", nargs="?")
    args, rest = ap.parse_known_args()
    if (args.script is None) == (args.testdir is None):
        ap.error("give TESTDIR or --script SCRIPT")
    modules = MODULES[:2] if args.script else MODULES
    probe = "import %s; print(torch.__version__)" % ", ".join(modules)
    tried = []
    for python in candidates():
        try:
            r = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            tried.append("%s: %s" % (python, e))
            continue
        if r.returncode == 0:
            break
        last = (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]
        tried.append("%s: %s" % (python, last))
    else:
        print("SKIP: no interpreter imports %s (Debian: apt-get install %s); tried:\n  "
              % (", ".join(modules), " ".join("python3-" + m for m in modules))
              + "\n  ".join(tried))
        return 77
    print("python: %s (torch %s)" % (python, r.stdout.strip()), flush=True)
    env = dict(os.environ)
    env["FUSEDBN_LIBRARY"] = os.path.abspath(args.lib)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.abspath(args.package)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_WAIT_POLICY", "passive")
    if args.script:
        cmd = [python, args.script] + rest
    else:
        cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", args.testdir] + rest
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
