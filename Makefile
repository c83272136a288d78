# SOS: the everyday commands.  `make run` needs only python3; `make test`
# makes .venv (pyenv's or any python3) with the test tools; `make dist` and
# `make smoke` need root on Debian (they apt-get what they miss).
#
#   make run                    blob-servers on 4001/4002 + sos-server, Ctrl-C stops
#   make test PYTEST_ARGS='-k blob -x'   or   make test TESTS=tests/test_blob.py
#   make test PYTHON=python3.13 VENV=.venv-3.13   the suite on another Python
#                               (.ci/run: python3, 3.11, then the newest one)
#   make dist                   dist/sos, static, and dist/{blob-server,sos-server,replicate}
#                               as links to it
#   make smoke                  those programs, each in an empty chroot
#   make deb                    dist/sos_<version>_amd64.deb
#   make systemd-test           that .deb installed in a Debian 12 container booted
#                               with systemd, its units checked (root, debootstrap)

PYTHON      ?= python3
VENV        ?= .venv
PYTEST_ARGS ?=
TESTS       ?= tests
# Read only by the recipes that need it (recursive =).
VERSION      = $(shell $(PYTHON) -c 'import blob; print(blob.VERSION)')

.PHONY: run test dist smoke deb systemd-test bench soak clean

run:
	PYTHON=$(PYTHON) packaging/run-local.sh

$(VENV)/.installed: requirements-test.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS) $(TESTS)

dist: dist/.built

# Rebuilt when a module or the build script changes: every *.py at the top
# (the programs and whatever modules they share), so a new module needs no
# edit here.
dist/.built: $(wildcard *.py) packaging/multicall.py packaging/build.sh
	packaging/build.sh
	touch $@

smoke: dist
	packaging/smoke.sh

deb: dist
	packaging/deb.sh $(VERSION)

# Builds the .deb itself (make deb), then boots it; see the script's header.
systemd-test:
	PYTHON=$(PYTHON) packaging/systemd-test.sh

bench:
	PYTHON=$(PYTHON) bash bench/run.sh

soak: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q tests/faults -m soak $(PYTEST_ARGS)

clean:
	rm -rf build dist .pytest_cache .hypothesis
	find . -path './.venv*' -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
