"""setup.py's build of the fused kernels where the compiler has no OpenMP (Apple's clang, for
one): it retries without ``-fopenmp`` and the kernels still give the torch-op kernels' numbers."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actmon import stats
from actmon.kinds import Kind, KindInfo
from tests.test_stats import _run_activation, _special

ROOT = Path(__file__).resolve().parents[1]

NO_OPENMP_CC = """#!/bin/sh
for a in "$@"; do
  [ "$a" = "-fopenmp" ] && { echo "cc: error: unsupported option '-fopenmp'" >&2; exit 1; }
done
exec gcc "$@"
"""


@pytest.fixture(scope="module")
def fused_without_openmp(tmp_path_factory):
    """actmon._fused built by setup.py with a compiler that refuses ``-fopenmp``."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build actmon._fused (CI and make test have it)")
    tmp = tmp_path_factory.mktemp("build")
    cc = tmp / "cc"
    cc.write_text(NO_OPENMP_CC)
    cc.chmod(0o755)
    build = ["build_ext", "--build-lib", tmp / "lib", "--build-temp", tmp / "tmp"]
    out = subprocess.run(
        [sys.executable, "setup.py", "-q", *build],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "CC": str(cc), "HOME": str(tmp)},
        capture_output=True,
        text=True,
        check=False,
    )
    built = list((tmp / "lib" / "actmon").glob("_fused*.so"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert built, out.stdout + out.stderr
    assert "unsupported option '-fopenmp'" in out.stderr  # the first try did fail
    assert "retrying without OpenMP" in out.stdout
    spec = importlib.util.spec_from_file_location("actmon._fused", built[0])
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_compiler_without_openmp_still_builds_single_threaded_kernels(
    fused_without_openmp, monkeypatch
):
    assert fused_without_openmp.openmp() is None
    x = _special((3, 7, 111, 131), torch.float32)  # above the threading threshold
    info = KindInfo(Kind.RELU)
    monkeypatch.setattr(stats, "FUSED_THREADS", 2)  # asks for two: the build can run one
    calls = []

    class Counted:  # the kernels of this build, each call noted
        def __getattr__(self, name):
            calls.append(name)
            return getattr(fused_without_openmp, name)

    monkeypatch.setattr(stats, "FUSED", Counted())
    fused = _run_activation(x, info, 1)
    assert "activation" in calls
    monkeypatch.setattr(stats, "FUSED", None)
    plain = _run_activation(x, info, 1)
    _, f_max, f_counts, f_hist, f_units, _ = fused
    _, p_max, p_counts, p_hist, p_units, _ = plain
    assert torch.equal(f_hist, p_hist)
    assert f_counts[0] == p_counts[0]
    assert torch.allclose(f_max, p_max, equal_nan=True, rtol=0, atol=0)  # max and min
    assert torch.allclose(f_units, p_units, equal_nan=True, rtol=0, atol=0)
