"""Builds the optional compiled scan of the pruned search (``vad_patchcore._scan``).

Everything else is declared in pyproject.toml. The extension is ``optional``: where no C++
compiler (or no OpenMP) is available the install still succeeds and the search runs its torch
scan, which finds the same neighbours more slowly.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vad_patchcore._scan",
            ["vad_patchcore/_scan.cpp"],
            depends=["vad_patchcore/_scan_kernel.inc"],
            language="c++",
            # -ffp-contract=fast: fused multiply-adds (the error bounds of pruned.py hold for any
            # summation order and for fused products); -fno-math-errno: sqrt in vectorised loops
            # (errno is never read); -Wno-psabi: GCC's note that passing 64-byte vectors changed ABI
            # in GCC 4.6 (they never cross a library boundary); OpenMP shares torch's libgomp pool
            extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
