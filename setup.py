"""Build omnifast: the Python package (its Triton kernels in ``omnifast.kernels``) and the C++
CPU extension ``omnifast._C``, compiled with ninja through torch's cpp_extension. The benchmark
scripts (``benchmarks/``) run from a checkout and stay out of the package.
``OMNIFAST_NO_EXTENSION=1`` installs the package alone (the GPU check needs no C++; the CPU
backend then falls back to the torch reference with a warning)."""

import os

from setuptools import find_packages, setup

# The extension is built on the machine that runs it, so it may use that machine's vector
# units; OMNIFAST_PORTABLE=1 builds for the baseline ISA instead (e.g. to ship a wheel).
cxx_flags = ["-O3", "-fopenmp"]  # torch's own -std flag stands
link_flags = ["-fopenmp"]
if not os.environ.get("OMNIFAST_PORTABLE"):
    cxx_flags.append("-march=native")
if os.environ.get("OMNIFAST_DEBUG_BUILD"):
    cxx_flags = ["-O0", "-g", "-fopenmp"]
# AddressSanitizer + UndefinedBehaviorSanitizer build for `make test-sanitize`: every finding fatal.
if os.environ.get("OMNIFAST_SANITIZE"):
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    cxx_flags = ["-O1", "-g", "-fopenmp"] + sanitize
    link_flags = ["-fopenmp"] + sanitize


def compile_jobs() -> int:
    """Parallel compilers that fit this machine: one per CPU, at most one per 2 GB of available
    memory (the bindings' compiler peaks near 1.5 GB, each kernel's near 0.65 GB); MAX_JOBS overrides."""
    if os.environ.get("MAX_JOBS"):
        return int(os.environ["MAX_JOBS"])
    available = 0
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, min(os.cpu_count() or 1, available // (2 * 2**30)))


extension = {}
if not os.environ.get("OMNIFAST_NO_EXTENSION"):
    os.environ["MAX_JOBS"] = str(compile_jobs())  # read by torch's ninja build
    print(
        f"omnifast: compiling the C++ extension with {os.environ['MAX_JOBS']} parallel jobs (MAX_JOBS to change it)",
        flush=True,
    )
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    extension = dict(
        ext_modules=[
            CppExtension(
                "omnifast._C",
                sources=["csrc/bindings.cpp", "csrc/ctc.cpp", "csrc/moe.cpp", "csrc/fsq.cpp"],
                depends=["csrc/ctc.h", "csrc/fastmath.h", "csrc/moe.h", "csrc/fsq.h"],
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
            )
        ],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )

setup(packages=find_packages(include=["omnifast", "omnifast.*"]), **extension)
