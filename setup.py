"""Build script for structprune.

The package is pure Python plus one optional C++ extension, ``structprune._C`` (CPU kernels
from ``csrc/*.cpp``, parallelised with OpenMP); the GPU kernels are Triton (``kernels/``), compiled
at run time.

The extension is optional by design: when torch's build helpers cannot be imported, when
``STRUCTPRUNE_SKIP_EXT=1`` is set, or when compiling fails (no compiler, missing headers),
the install still succeeds as pure Python and ``structprune.ops`` falls back to the torch
reference implementations. Build against the torch you run with:

    pip install --no-build-isolation -e ".[test]"
"""

from __future__ import annotations

import glob
import os
import sys
import warnings

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

EXTENSION = "structprune._C"


def _openmp_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags enabling OpenMP, which at::parallel_for needs to use threads.

    Apple clang has no ``-fopenmp``; there the kernels build and run single-threaded.
    """
    if sys.platform.startswith("linux"):
        return ["-fopenmp"], ["-fopenmp"]
    if sys.platform == "win32":
        return ["/openmp"], []
    return [], []


def _torch_rpath(torch_dir: str) -> list[str]:
    """Link flags recording torch's library folder in the extension (Linux).

    The extension links against libc10 / libtorch; with their folder recorded,
    ``import structprune._C`` works even before ``import torch``. This is the torch the
    extension was compiled against, which is the only one it is ABI-compatible with.
    """
    if not sys.platform.startswith("linux"):
        return []
    return [f"-Wl,-rpath,{os.path.join(torch_dir, 'lib')}"]


def _optional(builder: type[build_ext]) -> type[build_ext]:
    """``builder`` changed so that a failed compilation warns and installs pure Python."""

    class OptionalBuildExt(builder):  # type: ignore[misc, valid-type]
        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001  (any compiler / linker / toolchain failure)
                warnings.warn(
                    f"building the C++ extension {EXTENSION} failed ({exc}); installing pure "
                    "Python, so structprune.ops will use the slower torch reference ops. Install "
                    "a C++ compiler and reinstall with `pip install --no-build-isolation -e .` "
                    "to get the kernels.",
                    stacklevel=1,
                )
                # Nothing was built: report no outputs, so installers do not look for them.
                self.extensions = []
                self.distribution.ext_modules = []

    return OptionalBuildExt


def _extension_build() -> tuple[list, type[build_ext]]:
    """The extension modules to build and the build_ext command that builds them."""
    if os.environ.get("STRUCTPRUNE_SKIP_EXT") == "1":
        return [], build_ext
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        warnings.warn(
            f"torch.utils.cpp_extension is not importable ({exc}); installing structprune as pure "
            "Python without the C++ kernels. Install torch first and build with "
            "`pip install --no-build-isolation -e .` to get them.",
            stacklevel=1,
        )
        return [], build_ext

    # Paths relative to this file, as setuptools requires.
    root = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "csrc", "*.cpp")))
    openmp_compile, openmp_link = _openmp_flags()
    cxx_flags = ["/O2" if sys.platform == "win32" else "-O3", *openmp_compile]
    link_flags = openmp_link + _torch_rpath(os.path.dirname(torch.__file__))
    extension = CppExtension(EXTENSION, cpp_sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=link_flags)
    return [extension], _optional(BuildExtension)


ext_modules, build_ext_command = _extension_build()

setup(
    name="structprune",
    version="0.1.0",
    description="Structured pruning for transformers: masks, compaction, ONNX export, latency",
    python_requires=">=3.10",
    # structprune/kernels is a link to the Triton folder kernels/, which has no __init__.py: a top-level package
    # named kernels would shadow the PyPI package transformers imports (from this folder, `python -c` finds ours).
    packages=find_packages(include=["structprune*"]) + ["structprune.kernels"],
    install_requires=[
        "torch>=2.4",
        "transformers>=4.57",
        "safetensors>=0.4",
        "numpy>=1.24",
        "onnx>=1.15",
        "onnxruntime>=1.17",
        "tqdm>=4.60",
        "scipy>=1.10",
        "matplotlib>=3.7",
    ],
    extras_require={
        # Triton runs the GPU kernels (CUDA builds of torch bring it); the tests also run them on
        # the CPU under its interpreter.
        "triton": ["triton>=3.0; platform_system == 'Linux'"],
        # Causal LMs from GGUF files (SmolLM2 ships as one) and the gensim text corpora of the LLM demo.
        "llm": ["gguf>=0.10", "accelerate>=0.26", "gensim>=4.3"],
        "test": ["pytest>=7", "hypothesis>=6", "triton>=3.0; platform_system == 'Linux'", "gguf>=0.10",
                 "accelerate>=0.26", "gensim>=4.3", "lm-eval>=0.4"],
    },
    entry_points={"console_scripts": ["structprune=structprune.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext_command},
    zip_safe=False,
)
