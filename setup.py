"""Builds the optional C kernels (litmodel._kernels.c: matrix-vector products for batch-1 decoding on CPU).

Everything else is in pyproject.toml. Plain C without torch headers: any C compiler builds it; where none
is found, `pip install` still succeeds (optional=True) and litmodel uses oneDNN's kernels instead.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("litmodel._kernels", ["litmodel/_kernels.c"], extra_compile_args=["-O3", "-fopenmp"],
                            extra_link_args=["-fopenmp"], optional=True)])
