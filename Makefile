# `make demo` and `make test` work on a fresh machine: they create .venv, install the CPU build
# of torch that pip finds on local disk, and build omnifast without build isolation (an isolated
# build would download a multi-GB CUDA torch).
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.omnifast-installed
SOURCES := $(wildcard setup.py pyproject.toml csrc/*.cpp csrc/*.h)

.PHONY: setup demo test test-sanitize lint bench gpu-check compat-check clean

setup: $(STAMP)

.venv/bin/python:
	python3 -m venv .venv

$(STAMP): .venv/bin/python $(SOURCES)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet triton numpy pybind11 ninja "transformers>=5,<5.40" "huggingface_hub>=1" safetensors tqdm jiwer pyyaml pillow librosa soundfile soxr espeakng-loader pytest pytest-benchmark pytest-xdist hypothesis matplotlib tensorboard peft ruff gradio selenium
	@# the web page's browser tests and streamed audio: Debian's Chromium, its driver and ffmpeg (skipped where apt cannot)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v ffmpeg >/dev/null || \
		(apt-get install -y -qq chromium chromium-driver ffmpeg >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver ffmpeg >/dev/null 2>&1) || \
		 echo "no Chromium: the browser tests of omnifast serve will skip")
	$(PY) setup.py build_ext --inplace  # the C++ extension, its compile steps shown as they go
	@# setuptools' notice that a folder named like the package may shadow it: here that folder is the package
	PYTHONWARNINGS="ignore:Editable installation" $(PIP) install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "import omnifast; omnifast.ops.require_cpu_extension()"
	touch $(STAMP)

demo: setup
	$(PY) -m omnifast.cli demo

test: setup
	$(PY) -m pytest -q tests

# ruff's lint and format check (pyproject.toml), as pre-commit runs them
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

bench: setup
	$(PY) -m omnifast.cli bench all

# On a GPU machine whose image has torch, triton, transformers, pytest, pytest-xdist and hypothesis:
# check every GPU claim in about 7 minutes, from this source tree (the install it tries first builds
# no C++, and its failure is recorded, not fatal); results in $OUT, or gpu_check/.
GPU_CHECK_OUT ?= $(or $(OUT),gpu_check)
gpu-check:
	python3 -m benchmarks.gpu_check --install --out $(GPU_CHECK_OUT)

# The GPU image's versions on this machine's CPU (no GPU needed): a venv with them, gpu-check's dry
# run and the op, module and kernel tests there (the C++ backend's tests left out: the extension
# in the tree is built against this checkout's torch). numpy 2.5.2, the image's, is not on every
# index: the newest 2.x below 2.6 stands in.
COMPAT_VENV ?= .venv-compat
IMAGE_VERSIONS := torch==2.11.0 triton==3.6.0 transformers==5.17.0 tokenizers==0.23.2 safetensors==0.8.0 \
                  "numpy<2.6" accelerate==1.15.0
compat-check:
	test -x $(COMPAT_VENV)/bin/python || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q $(IMAGE_VERSIONS) pytest pytest-xdist hypothesis ninja pybind11
	PYTHONPATH=$(CURDIR) $(COMPAT_VENV)/bin/python -m benchmarks.gpu_check --dry-run --out compat_check
	PYTHONPATH=$(CURDIR) $(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider -n 2 -k "not cpu" \
		tests/ops tests/nn tests/kernels

clean:
	rm -rf build *.egg-info omnifast/_C*.so .venv

# The C++ kernels under AddressSanitizer and UndefinedBehaviorSanitizer (every finding fatal),
# built beside the normal extension and loaded through OMNIFAST_EXTENSION, on the op tests of the
# cpu backend with hypothesis' thorough profile.
SANITIZED := $(CURDIR)/build/sanitize/omnifast/_C$(shell $(PY) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))" 2>/dev/null)
test-sanitize: setup
	OMNIFAST_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib build/sanitize --build-temp build/sanitize-tmp
	LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1 OMNIFAST_EXTENSION=$(SANITIZED) HYPOTHESIS_PROFILE=thorough \
	$(PY) -m pytest -q -p no:cacheprovider tests/ops -k "not triton and not interpreter" -x
