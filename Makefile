# Two commands do all set-up on a fresh machine:
#   make run   - opens MedCompress on the demo study with the demo models
#   make test  - runs the whole test suite under a virtual display
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medcompress-installed
# Xvfb and the xcb/libGL libraries Qt needs on a bare Debian image; dicom3tools validates DICOM.
APT_PACKAGES := xvfb xauth dicom3tools libxcb-icccm4 libxcb-keysyms1 libxcb-image0 \
	libxcb-render-util0 libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-cursor0 \
	libxcb-shape0 libxcb-randr0 libgl1 libegl1 libfontconfig1 libdbus-1-3 libglib2.0-0

.PHONY: run test setup system-deps bench clean

setup: $(STAMP) system-deps

# torch 2.13.0 first: it is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	touch $@

system-deps:
	@command -v dpkg-query >/dev/null || exit 0; \
	missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "Installing system packages:" $$missing; \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

run: setup
	@if [ -z "$$DISPLAY$$WAYLAND_DISPLAY" ]; then \
		echo "No display: starting a virtual one (xvfb-run)"; \
		xvfb-run -a -s "-screen 0 1600x1000x24" $(PY) main.py --demo; \
	else $(PY) main.py --demo; fi

test: setup
	$(PY) -m pytest

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) test-output .pytest_cache
