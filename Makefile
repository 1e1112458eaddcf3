# make test         CPU tests (what CI runs; no GPU needed)
# make test-gpu     on a GPU machine: every gpu/multigpu test, then every benchmarks/<name>.py script
# make precompile   build the default deployment's kernels into the cache (EPKERN_CACHE_DIR)
# make gpu-cache    precompile into .gpu_cache/ for the offline-load test (scripts/prepare_gpu_cache.sh)
# make bench-cpu    CPU-side costs of the pipeline (pytest-benchmark)
# make sanitize     on a GPU machine: compute-sanitizer memcheck/racecheck/synccheck over every kernel family (OUT=dir)
PYTHON ?= python3
BENCHMARKS := $(filter-out __init__ harness test_%,$(basename $(notdir $(wildcard benchmarks/*.py))))

# NVLink multicast stays off on the shared GPU machines
export NCCL_NVLS_ENABLE = 0
export TORCH_SYMM_MEM_DISABLE_MULTICAST = 1
export NVSHMEM_DISABLE_NVLS = 1

.PHONY: test test-gpu precompile gpu-cache bench-cpu sanitize

test:
	$(PYTHON) -m pytest -q

# every step runs; the target fails if any did
test-gpu: gpu-cache
	@status=0; \
	$(PYTHON) -m pytest -m "gpu or multigpu" tests || status=1; \
	for name in $(BENCHMARKS); do \
		echo "== python3 -m benchmarks.$$name"; \
		$(PYTHON) -m benchmarks.$$name || status=1; \
	done; \
	exit $$status

precompile:
	$(PYTHON) -m epkern.cli precompile

gpu-cache:
	bash scripts/prepare_gpu_cache.sh

bench-cpu:
	$(PYTHON) -m pytest benchmarks/test_cpu_costs.py

sanitize:
	bash scripts/sanitize.sh $(or $(OUT),.sanitize_out)
