"""Build script: the pure-Python package always; the CUDA extension ``kldwrm_fast._C`` when it can be built.

Environment variables: ``KLDWRM_SKIP_CUDA_BUILD=1`` skips the extension; ``CUDA_HOME`` names the toolkit;
``TORCH_CUDA_ARCH_LIST`` (default ``9.0+PTX``) and ``MAX_JOBS`` are honoured by torch's build helpers;
``KLDWRM_PTXAS_VERBOSE=1`` passes ``-Xptxas -v`` to nvcc (registers and spills per kernel in the build log,
which ``tools/cuda_build_gate.py`` reads in CI).
cuSOLVER's header and library are taken from the toolkit when it has them, else from the ``nvidia`` wheels
that the CUDA build of torch installs (``site-packages/nvidia/cu13/{include,lib}`` and the like).
The extension needs torch at build time, so build it with ``pip install --no-build-isolation -e .``;
under pip's default isolated build torch is absent and the extension is skipped with a printed reason.
"""

import glob
import os
import shutil
import subprocess

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def toolkit_root():
    """The real CUDA toolkit root: ``CUDA_HOME``, else the ``TOP=`` line of ``nvcc --dryrun``.

    (nvcc on PATH may be a wrapper script, so its own location says nothing about the toolkit.)
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    for line in (dry.stdout + dry.stderr).splitlines():
        if "TOP=" in line:
            return line.split("TOP=", 1)[1].strip().strip('"')
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _nvidia_wheel_roots():
    """Folders of the ``nvidia`` namespace package (the CUDA libraries shipped as wheels), if installed."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    return list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []


def cusolver_paths(root):
    """``(include_dir, library_file)`` of cuSOLVER: the toolkit's own, else the nvidia wheels'; None when absent.

    The wheels ship only versioned files (``libcusolver.so.12``), which ``-lcusolver`` cannot find, so the
    library is linked by its full path.
    """
    candidates = [(os.path.join(root, "include"), [os.path.join(root, sub) for sub in ("lib64", "lib")])]
    for wheel_root in _nvidia_wheel_roots():
        for include in sorted(glob.glob(os.path.join(wheel_root, "*", "include"))):
            candidates.append((include, [os.path.join(os.path.dirname(include), "lib")]))
    for include, library_dirs in candidates:
        if not os.path.exists(os.path.join(include, "cusolverDn.h")):
            continue
        for library_dir in library_dirs:
            libraries = sorted(glob.glob(os.path.join(library_dir, "libcusolver.so*")), key=len)
            if libraries:
                return include, libraries[0]
    return None


def cuda_extension_or_reason():
    """``(extensions, cmdclass)`` to build, or a reason string why the CUDA extension is skipped."""
    if os.environ.get("KLDWRM_SKIP_CUDA_BUILD") == "1":
        return "KLDWRM_SKIP_CUDA_BUILD=1 is set"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        return "csrc/ holds no CUDA sources in this version"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return "torch is not importable in the build environment (use pip install --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    root = toolkit_root()
    if root is None or not os.path.exists(os.path.join(root, "bin", "nvcc")):
        return "no CUDA toolkit found (set CUDA_HOME)"
    cusolver = cusolver_paths(root)
    if cusolver is None:
        return "cuSOLVER (cusolverDn.h and libcusolver.so) was found neither in the toolkit nor in the nvidia wheels"
    include, library = cusolver
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
    verbose_ptxas = ["-Xptxas", "-v"] if os.environ.get("KLDWRM_PTXAS_VERBOSE") == "1" else []
    extension = cpp_extension.CUDAExtension(
        "kldwrm_fast._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # After the toolkit's include folder, so only what it lacks (cuSOLVER, used by eigh.cpp) comes from here.
        extra_compile_args={"cxx": ["-O3", "-isystem", include], "nvcc": ["-O3", "-isystem", include, *verbose_ptxas]},
        extra_link_args=[library, f"-Wl,-rpath,{os.path.dirname(library)}"],
    )
    return [extension], {
        "build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    }


if __name__ == "__main__":
    result = cuda_extension_or_reason()
    if isinstance(result, str):
        print(f"kldwrm_fast: skipping the CUDA extension: {result}")
        setup()
    else:
        setup(ext_modules=result[0], cmdclass=result[1])
