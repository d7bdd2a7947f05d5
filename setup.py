"""Build omnifast: the Python package (Triton kernels in ``omnifast.kernels``, benchmark scripts
in ``omnifast.benchmarks``) and the C++ CPU extension ``omnifast._C``, compiled with ninja
through torch's cpp_extension. ``OMNIFAST_NO_EXTENSION=1`` installs the package alone (the GPU
check needs no C++; the CPU backend then falls back to the torch reference with a warning)."""
import os

from setuptools import find_packages, setup

# The extension is built on the machine that runs it, so it may use that machine's vector
# units; OMNIFAST_PORTABLE=1 builds for the baseline ISA instead (e.g. to ship a wheel).
cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
link_flags = ["-fopenmp"]
if not os.environ.get("OMNIFAST_PORTABLE"):
    cxx_flags.append("-march=native")
if os.environ.get("OMNIFAST_DEBUG_BUILD"):
    cxx_flags = ["-O0", "-g", "-fopenmp", "-std=c++17"]
# AddressSanitizer + UndefinedBehaviorSanitizer build for `make test-sanitize`: every finding fatal.
if os.environ.get("OMNIFAST_SANITIZE"):
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    cxx_flags = ["-O1", "-g", "-fopenmp", "-std=c++17"] + sanitize
    link_flags = ["-fopenmp"] + sanitize

extension = {}
if not os.environ.get("OMNIFAST_NO_EXTENSION"):
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
