# One command to open the course, one to test it. Both set up .venv first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
OFFLINE := GPT2_COURSE_OFFLINE=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: setup lab test test-unit test-notebooks test-browser lint clean

setup: $(VENV)/.installed

# torch is pinned and installed first: an open range would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Need $(PYTHON) (or run: make PYTHON=python3 ...)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

lab: setup
	$(BIN)/jupyter lab notebooks/00_start_here.ipynb

test: setup test-unit test-notebooks

test-unit:
	$(OFFLINE) $(BIN)/python -m pytest tests

# The notebooks run top to bottom on the reference solutions, offline.
test-notebooks:
	$(OFFLINE) GPT2_COURSE_SOLUTIONS=1 GPT2_COURSE_QUICK=1 MPLBACKEND=Agg $(BIN)/python -m pytest --nbval-lax -p no:cacheprovider notebooks

# Every notebook in JupyterLab in headless Chromium (the OS's; installed from apt as root),
# driven by Playwright: Run All Cells, then checks, figures, pictures, no network. See README.
# One notebook: make test-browser BROWSER_ARGS="-k 03_attention"
test-browser: setup $(VENV)/.installed-browser
	bash tests/browser/install_chromium.sh
	$(OFFLINE) GPT2_COURSE_BROWSER_TEST=1 $(BIN)/python -m pytest tests/browser -p no:cacheprovider -v -s $(BROWSER_ARGS)

$(VENV)/.installed-browser: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[dev,browser]"
	touch $@

lint: setup
	$(BIN)/ruff check gpt2_course solutions tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
