# Two commands on a fresh machine (see README): `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch comes pinned (on the development machines this installs from local disk); override for your CUDA build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# ComfyUI 0.33 imports torchaudio at start (comfy.sd); only the import is needed for image models, and 2.11.1
# imports beside the pinned torch (--no-deps keeps that pin; its compiled ops are not used).
TORCHAUDIO_SPEC ?= torchaudio==2.11.1
# 0.33.0 comes from a local archive (shared/comfyui/ on the development machines); without it, it is skipped.
TEST_COMFYUI_VERSIONS ?= 0.3.75,0.33.0
export COMFY_PARALLEL_HOME ?= $(CURDIR)/.cache

.PHONY: serve test provision clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet --no-deps $(TORCHAUDIO_SPEC)
	$(BIN)/pip install --quiet -e '.[comfyui,test]'
	touch $@

provision: $(BIN)/.installed
	$(BIN)/comfy-parallel provision --skip-missing-archives --versions $(TEST_COMFYUI_VERSIONS)

serve: $(BIN)/.installed
	$(BIN)/comfy-parallel serve $(ARGS)

test: provision
	bash scripts/system-deps.sh nginx chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache test-artifacts
