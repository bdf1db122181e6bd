"""Build the optional fused CPU kernels (actmon/_fused.c); everything else is in pyproject.toml.

``optional=True``: where no C compiler is available the install still succeeds and actmon uses
its torch-op kernels (the same numbers, several passes instead of one). Where the compiler has
no OpenMP (Apple's clang, for one) the kernels are built again without it: one thread per pass,
still one pass instead of several.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP = "-fopenmp"


class BuildWithoutOpenMPIfNeeded(build_ext):
    """``build_ext`` that retries an extension without the OpenMP runtime when the first build
    fails: with ``-fopenmp-simd`` (the loops' ``omp simd`` hints, no runtime), then bare."""

    def build_extension(self, ext: Extension) -> None:
        compile_args, link_args = list(ext.extra_compile_args), list(ext.extra_link_args)
        for fallback in (None, ["-fopenmp-simd"], []):
            if fallback is not None:
                ext.extra_compile_args = [a for a in compile_args if a != OPENMP] + fallback
                ext.extra_link_args = [a for a in link_args if a != OPENMP]
            try:
                super().build_extension(ext)
                return
            except Exception as exc:  # distutils' CompileError / LinkError, or the compiler's
                if OPENMP not in compile_args or fallback == []:
                    raise
                print(f"actmon: building {ext.name} failed ({exc}); retrying without OpenMP")


setup(
    cmdclass={"build_ext": BuildWithoutOpenMPIfNeeded},
    ext_modules=[
        Extension(
            "actmon._fused",
            sources=["actmon/_fused.c"],
            depends=["actmon/_fused_scan.h"],
            extra_compile_args=["-O3", "-std=c99", OPENMP],
            extra_link_args=[OPENMP, "-lm"],
            optional=True,
        )
    ],
)
