"""Build script: package metadata is in pyproject.toml; this file adds the optional CUDA extension.

egn_fast._C (csrc/) is built when a CUDA toolkit (nvcc) and a CUDA build of torch are present; it
finds the toolkit and the cuSOLVER headers/libraries of the nvidia pip wheels by itself.
TORCH_CUDA_ARCH_LIST overrides the default architectures "8.0;9.0" (A100, H100/H200).
EGN_FAST_BUILD_CUDA=0 skips the extension (a pure-Python build in seconds instead of minutes).
Without a toolkit, or when compiling fails, the pure-Python package is installed. One line is
printed either way.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

DEFAULT_ARCH_LIST = "8.0;9.0"
SOURCES = ["csrc/binding.cpp", "csrc/gram.cu", "csrc/backproject.cu", "csrc/solver.cpp"]


def say(message: str) -> None:
    print(f"egn_fast setup: {message}", file=sys.stderr)


def find_cuda_home() -> str | None:
    """CUDA_HOME if set, else /usr/local/cuda, else the toolkit around the nvcc on PATH.

    torch's own guess follows a wrapper script at /usr/local/bin/nvcc to /usr/local, where the
    link then fails; so we decide here and pass CUDA_HOME on.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
            os.path.join(home, "include", "cuda_runtime_api.h")
        ):
            return home
    return None


def find_cusolver(cuda_home: str) -> tuple[str, str, str] | None:
    """(include dir, library dir, library file name) of cuSOLVER: the nvidia wheels' (the one torch
    itself loads), else the toolkit's.

    The wheels ship the library only under a versioned name (libcusolver.so.12), so the linker is
    given that exact file (-l:libcusolver.so.12).
    """
    roots = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels that torch depends on

        for base in nvidia.__path__:
            roots += sorted(glob.glob(os.path.join(base, "*")))
    except ImportError:
        pass
    roots.append(cuda_home)
    for root in roots:
        include = os.path.join(root, "include")
        for lib_dir in (os.path.join(root, "lib"), os.path.join(root, "lib64")):
            libs = sorted(glob.glob(os.path.join(lib_dir, "libcusolver.so*")))
            if os.path.isfile(os.path.join(include, "cusolverDn.h")) and libs:
                return include, lib_dir, os.path.basename(min(libs, key=len))  # the plainest name
    return None


def cuda_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(): the extension when it can be built, else nothing."""
    if os.environ.get("EGN_FAST_BUILD_CUDA") == "0":
        say("EGN_FAST_BUILD_CUDA=0; installing pure Python (no egn_fast._C)")
        return [], {}
    try:
        import torch
    except ImportError:
        say("torch is not installed; installing pure Python (no egn_fast._C)")
        return [], {}
    cuda_home = find_cuda_home()
    if torch.version.cuda is None or cuda_home is None:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit (nvcc) found"
        say(f"{why}; installing pure Python (no egn_fast._C)")
        return [], {}
    os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it
    # with no GPU to inspect, torch's architecture detection fails: give it the list
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cusolver = find_cusolver(cuda_home)
    if cusolver is None:
        say("cuSOLVER headers/library not found (toolkit or nvidia wheels); installing pure Python (no egn_fast._C)")
        return [], {}
    include, lib_dir, lib_file = cusolver

    class OptionalBuildExtension(BuildExtension):
        """Builds egn_fast._C; a failed compile leaves the pure-Python package installed."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as error:  # compiler/linker/ninja failures all surface here
                say(f"building egn_fast._C failed ({type(error).__name__}: {error}); installing pure Python")
                self.extensions = []
                return
            say(f"built egn_fast._C (CUDA {torch.version.cuda}, arch {os.environ['TORCH_CUDA_ARCH_LIST']})")

        def get_outputs(self) -> list[str]:
            return super().get_outputs() if self.extensions else []

    extension = CUDAExtension(
        name="egn_fast._C",
        sources=SOURCES,
        include_dirs=[os.path.abspath("csrc"), include],
        library_dirs=[lib_dir],
        extra_compile_args={"cxx": ["-O2", "-g0"], "nvcc": ["-O3", "-std=c++17"]},  # -g0: no debug info for torch headers
        extra_link_args=[f"-l:{lib_file}", f"-Wl,-rpath,{lib_dir}"],
    )
    return [extension], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
