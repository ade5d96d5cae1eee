"""Build the native hot path; all metadata lives in pyproject.toml.

OFFSCAN_NO_EXTENSIONS=1 skips the Cython modules and installs pure Python.
"""
import os

from setuptools import Extension, setup

ext_modules = []
if not os.environ.get("OFFSCAN_NO_EXTENSIONS"):
    import numpy
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
            Extension(
                "offscan._match_c",
                ["ext/_match_c.pyx"],
                include_dirs=[numpy.get_include(), "ext"],
                depends=["ext/offscan_filter.h"],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                extra_compile_args=["-O3"],
                language="c++",
            ),
            # the cache-hit path's confined identity lookup (twin: offscan._statwalk_py)
            Extension("offscan._statwalk_c", ["ext/_statwalk_c.pyx"], extra_compile_args=["-O2"]),
        ],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )

setup(ext_modules=ext_modules)
