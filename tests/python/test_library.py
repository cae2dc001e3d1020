"""Finding libfusedbn: FUSEDBN_LIBRARY, a missing library and a too old one
give LibraryError (an ImportError) naming the path tried and the version
needed; without FUSEDBN_LIBRARY a libfusedbn.so* next to the package comes
before the system loader's; the op cache holds one op per configuration."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fusedbn
from fusedbn.torch import FusedBatchNorm2d, _ops

from helpers import rand_x


def import_with_library(path, tmp_path):
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fusedbn.__file__)))
    env = dict(os.environ, FUSEDBN_LIBRARY=str(path), PYTHONPATH=package_root)
    code = ("import fusedbn\n"
            "try:\n"
            "    import fusedbn.torch\n"
            "except fusedbn.LibraryError as e:\n"
            "    assert isinstance(e, ImportError)\n"
            "    print(e)\n"
            "else:\n"
            "    print('loaded', fusedbn.library_version())\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_missing_library_names_the_path(tmp_path):
    out = import_with_library(tmp_path / "nowhere" / "libfusedbn.so", tmp_path)
    assert "nowhere/libfusedbn.so (FUSEDBN_LIBRARY)" in out
    assert "0.1.0 or newer" in out


def test_library_without_fusedbn_symbols(tmp_path):
    libm = "/lib/x86_64-linux-gnu/libm.so.6"
    if not os.path.exists(libm):
        pytest.skip("no %s to stand in for a foreign library" % libm)
    out = import_with_library(libm, tmp_path)
    assert "libm.so.6 (FUSEDBN_LIBRARY): no fbn_version" in out


def test_too_old_library_names_version_needed(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a library reporting an old version")
    src = tmp_path / "old.c"
    src.write_text("int fbn_version(void) { return 99; }\n")
    lib = tmp_path / "libold.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    out = import_with_library(lib, tmp_path)
    assert "version 0.0.99, lacks " in out and "fbn_op_create" in out
    assert "needs 0.1.0 or newer" in out


def test_library_from_environment_is_loaded(tmp_path):
    out = import_with_library(os.path.abspath(os.environ["FUSEDBN_LIBRARY"]), tmp_path)
    assert out.strip() == "loaded " + fusedbn.library_version()


def import_bundled(tmp_path, bundled_bytes, extra_env=None):
    """Import a copy of the package whose fusedbn/ holds libfusedbn.so.0 made of
    bundled_bytes, FUSEDBN_LIBRARY unset; the output of the import."""
    source = os.path.dirname(os.path.abspath(fusedbn.__file__))
    root = tmp_path / "site"
    shutil.copytree(source, str(root / "fusedbn"),
                    ignore=shutil.ignore_patterns("__pycache__", "libfusedbn.so*"))
    (root / "fusedbn" / "libfusedbn.so.0").write_bytes(bundled_bytes)
    env = {k: v for k, v in os.environ.items() if k not in ("FUSEDBN_LIBRARY", "LD_LIBRARY_PATH")}
    env.update(PYTHONPATH=str(root), **(extra_env or {}))
    code = ("import fusedbn\n"
            "try:\n"
            "    import fusedbn.torch\n"
            "except fusedbn.LibraryError as e:\n"
            "    print(e)\n"
            "else:\n"
            "    print('loaded', fusedbn.library_path(), fusedbn.library_version())\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout, root / "fusedbn" / "libfusedbn.so.0"


def test_library_next_to_the_package_is_loaded(tmp_path):
    """FUSEDBN_LIBRARY unset: the copy in fusedbn/ wins over the loader's
    path, which here finds the build's library too."""
    build_lib = os.path.realpath(os.environ["FUSEDBN_LIBRARY"])
    with open(build_lib, "rb") as f:
        data = f.read()
    out, bundled = import_bundled(tmp_path, data,
                                  {"LD_LIBRARY_PATH": os.path.dirname(build_lib)})
    assert out.strip() == "loaded %s %s" % (bundled, fusedbn.library_version())


def test_broken_library_next_to_the_package_is_named(tmp_path):
    out, bundled = import_bundled(tmp_path, b"not a shared object\n")
    if out.startswith("loaded "):
        # An installed libfusedbn (the loader's) was next in line.
        assert str(bundled) not in out, out
    else:
        assert "%s (next to the package): " % bundled in out, out
        assert "libfusedbn.so.0 (system loader)" in out, out


def test_one_op_per_configuration(gen):
    eps = 1.2345e-3  # a configuration no other test creates
    count = _ops.cached_op_count()
    m = FusedBatchNorm2d(3, eps=eps).double()
    x = rand_x(gen, (2, 3, 4, 5))
    m(x)
    assert _ops.cached_op_count() == count + 1
    for _ in range(3):
        m(x)
        FusedBatchNorm2d(3, eps=eps).double()(rand_x(gen, (4, 3, 2, 2)))  # same op, other shape
    assert _ops.cached_op_count() == count + 1
    m(x.contiguous(memory_format=torch.channels_last))
    m.eval()
    m(x)
    assert _ops.cached_op_count() == count + 3
