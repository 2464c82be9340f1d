# Two commands on a fresh machine (see README): `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch comes pinned (on the development machines this installs from local disk); override for your CUDA build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TEST_COMFYUI_VERSIONS ?= 0.3.75,0.3.52
export COMFY_PARALLEL_HOME ?= $(CURDIR)/.cache

.PHONY: serve test provision clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[comfyui,test]'
	touch $@

provision: $(BIN)/.installed
	$(BIN)/comfy-parallel provision --versions $(TEST_COMFYUI_VERSIONS)

serve: $(BIN)/.installed
	$(BIN)/comfy-parallel serve $(ARGS)

test: provision
	bash scripts/system-deps.sh nginx chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache test-artifacts
