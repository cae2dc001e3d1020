#!/usr/bin/env python3
"""Run the Python package's tests (pytest) with an interpreter that has torch.

    run_pytest.py --lib <build>/src/libfusedbn.so --package <source>/python TESTDIR [pytest args]

Tries /usr/bin/python3 (Debian's python3-torch lives there) and python3 on
PATH, in that order (only $FUSEDBN_TEST_PYTHON when that is set), and runs
pytest with the first that imports torch, torchvision and pytest, with
FUSEDBN_LIBRARY and PYTHONPATH pointing at the build's library and the
source's package.  Exits 77 (meson's "skipped") when none does, naming what
was tried.
"""
import argparse
import os
import shutil
import subprocess
import sys

PROBE = "import torch, torchvision, pytest; print(torch.__version__)"


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
    ap.add_argument("testdir")
    args, rest = ap.parse_known_args()
    tried = []
    for python in candidates():
        try:
            r = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            tried.append("%s: %s" % (python, e))
            continue
        if r.returncode == 0:
            break
        last = (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1]
        tried.append("%s: %s" % (python, last))
    else:
        print("SKIP: no interpreter imports torch, torchvision and pytest (Debian: apt-get install "
              "python3-torch python3-torchvision python3-pytest); tried:\n  " + "\n  ".join(tried))
        return 77
    print("python: %s (torch %s)" % (python, r.stdout.strip()), flush=True)
    env = dict(os.environ)
    env["FUSEDBN_LIBRARY"] = os.path.abspath(args.lib)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.abspath(args.package)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_WAIT_POLICY", "passive")
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", args.testdir] + rest
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
