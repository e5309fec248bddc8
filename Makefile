# Two commands matter (see README "Quick start"): `make demo` and `make test`.
# Both create .venv on first use and install what is missing; later runs reuse it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARCH   := $(shell uname -m)
# timm needs torchvision, and PyPI's torchvision only imports beside PyPI's torch: install them together.
ifeq ($(ARCH),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif
# Debian packages that headless napari (Xvfb + OpenGL + Qt xcb) needs.
APT_PKGS := xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
            libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 \
            libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1
PYTEST_ARGS ?=

.PHONY: demo test lint-imports lint install system-deps bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e '.[all,test]'
	touch $@

system-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for headless napari:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# With a display, napari opens; without one, the canvas PNGs are rendered on a virtual X server.
demo: install system-deps
	$(BIN)/pathfm demo

# The import contracts of pyproject.toml [tool.importlinter] (layers, GUI only in front ends, no cycles):
# checked in about a second, before the tests, so a broken layer fails CI before anything slow runs.
lint-imports: install
	$(BIN)/lint-imports

# Style (pyproject.toml [tool.ruff]): the lint rules, then the formatter's layout (`ruff format` fixes it locally).
# Also seconds, also before the tests.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint-imports lint system-deps
	xvfb-run -a -s "-screen 0 1280x1024x24" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_slide_read.py

clean:
	rm -rf $(VENV) pathfm-demo .pytest_cache
