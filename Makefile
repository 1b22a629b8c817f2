# The two set-up commands of README.md. Each creates .venv on first use and installs the
# pinned dependencies (torch/torchvision from the local wheel cache or PyPI).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
export TORCH_HOME ?= $(HOME)/.cache/torch

.PHONY: demo test lint dry-run clean venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

## make demo: the whole study on the embedded synthetic demo, then the HTML report
demo: venv
	$(BIN)/snakemake --profile profiles/default --cores $(CORES)
	$(BIN)/snakemake --profile profiles/default --cores $(CORES) --report results/report.html
	@echo "tables: results/tables/  figures: results/figures/  report: results/report.html"

## make test: the test suite (unit + end-to-end workflow runs, offline)
test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow/rules

dry-run: venv
	$(BIN)/snakemake -n --configfile configs/paper.yaml

clean:
	rm -rf results .snakemake
