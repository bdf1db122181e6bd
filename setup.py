"""Build the optional fused CPU kernels (actmon/_fused.c); everything else is in pyproject.toml.

``optional=True``: where no C compiler is available the install still succeeds and actmon uses
its torch-op kernels (the same numbers, several passes instead of one).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "actmon._fused",
            sources=["actmon/_fused.c"],
            depends=["actmon/_fused_scan.h"],
            extra_compile_args=["-O3", "-std=c99", "-fopenmp"],
            extra_link_args=["-fopenmp", "-lm"],
            optional=True,
        )
    ]
)
