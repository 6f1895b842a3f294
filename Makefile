# The two commands of the README: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
TESTING := $(VENV)/.installed-test

.PHONY: demo test bench clean fuzz soak zoo bigmodel libnpu libnpu-deps libnpu-tests install-libnpu

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The demo needs the runtime dependencies and the cpu driver (npud[cpu]: onnxruntime), which runs the
# node of its model the NPU declines; tests add the oracles.
$(RUNTIME): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[cpu]'
	touch $@

# ray: npu.ray's tests run a simulated two-node Ray cluster (tests/clients/test_ray_fleet.py).
# The driver template too: `npuctl cts --driver tmpl-int8` runs in the tests (examples/driver-template).
$(TESTING): pyproject.toml examples/driver-template/pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[test,cpu,ray]'
	$(PY) -m pip install --quiet --no-deps -e examples/driver-template
	touch $(RUNTIME) $@

demo: $(RUNTIME)
	$(PY) -m examples.demo

# pytest exits 5 when it collected no tests: make fails then too, as it should.
# libnpu's C tests (tests/clients/test_libnpu.py) need the library and its test programs built.
# The Ray fleet tests run in a pytest process of their own: Ray leaves threads running in its
# driver process after ray.shutdown(), and they allocated under other tests' tracemalloc
# measurements and raced CPython 3.11's ast module ("AST constructor recursion depth mismatch").
RAY_FLEET := tests/clients/test_ray_fleet.py
test: $(TESTING) libnpu-tests
	$(PY) -m pytest -q -p no:cacheprovider --ignore=$(RAY_FLEET)
	$(PY) -m pytest -q -p no:cacheprovider $(RAY_FLEET)

bench: $(TESTING)
	$(PY) -m bench

# The model zoo (docs/CONFORMANCE.md, "The zoo"): every model of tests/zoo/zoo_models.py built from
# code (torchvision, onnxruntime.quantization, onnx.helper), compiled and run against onnxruntime;
# prints the table (match, compile time, npud vs onnxruntime time, MACs on the NPU), records it in
# tests/zoo/zoo_table.md and docs/CONFORMANCE.md, and fails on a mismatch.  `make test` runs its
# fast subset.
zoo: $(TESTING)
	PYTHONPATH=. $(PY) tests/zoo/zoo_models.py --write; status=$$?; \
	  $(PY) tests/compiler_worker/conformance.py && exit $$status

# An ONNX model past 2 GiB (external data) through a private daemon (tests/bigmodel): writes 2.2 GB
# to the temporary directory and needs ~14 GiB of RAM for about two minutes; prints the load time
# and peak memory recorded in docs/PERFORMANCE.md.  `make test` covers the same path at 20 MiB.
bigmodel: $(TESTING)
	NPUD_BIGMODEL=1 $(PY) -m pytest -q -s -p no:cacheprovider tests/bigmodel

# Long fuzzing (docs/RELIABILITY.md): FUZZ_SECONDS per target of mutation fuzzing, then the same
# of coverage-guided fuzzing with atheris if it installs (an optional extra).  Findings land in
# fuzz/findings/; the summary table is printed at the end.
FUZZ_SECONDS ?= 60
fuzz: $(TESTING)
	-$(PY) -m pip install --quiet -e '.[fuzz]'
	$(PY) -m fuzz.run --seconds $(FUZZ_SECONDS) --atheris

# The load soak (docs/RELIABILITY.md, "Load (soak)"): SOAK_CLIENTS sessions mixing compiles, jobs and
# buffer traffic against a private daemon for SOAK_SECONDS; fails on a lost, duplicated or wrong completion.
SOAK_SECONDS ?= 300
SOAK_CLIENTS ?= 64
soak: $(TESTING)
	$(PY) -m bench soak --seconds $(SOAK_SECONDS) --clients $(SOAK_CLIENTS)

clean:
	rm -rf $(VENV) build *.egg-info

# --- libnpu: the C client library (clients/c, docs/CLIENT-C.md) ----------------------
# `make libnpu` builds build/libnpu/libnpu.so.$(LIBNPU_VERSION) (soname libnpu.so.$(LIBNPU_MAJOR)), an
# in-tree libnpu.pc, and examples/c/classify linked through that pkg-config file.  `make libnpu-tests`
# adds the C test program and its AddressSanitizer+UBSan build.  libnpu-deps installs libzmq and
# msgpack-c's development packages when root with apt, else stops with the command to run.
CC ?= cc
LIBNPU_MAJOR := 0
LIBNPU_VERSION := $(LIBNPU_MAJOR).1.0
LIBNPU_OUT := build/libnpu
LIBNPU_SRC := $(wildcard clients/c/src/*.c)
LIBNPU_HDR := clients/c/include/npu.h $(wildcard clients/c/src/*.h)
LIBNPU_SO := $(LIBNPU_OUT)/libnpu.so.$(LIBNPU_VERSION)
LIBNPU_CFLAGS := -std=gnu11 -O2 -g -Wall -Wextra -Werror=implicit-function-declaration -pthread
# msgpack-c's pkg-config name: msgpack up to 4.x (bookworm), msgpack-c from 6.x (trixie)
LIBNPU_MSGPACK = $(shell pkg-config --exists msgpack-c 2>/dev/null && echo msgpack-c || echo msgpack)
LIBNPU_DEPS = $(shell pkg-config --cflags --libs libzmq $(LIBNPU_MSGPACK))
LIBNPU_PC := PKG_CONFIG_PATH=$(abspath $(LIBNPU_OUT))$${PKG_CONFIG_PATH:+:$$PKG_CONFIG_PATH} pkg-config
LIBNPU_SANITIZE := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer

libnpu: $(LIBNPU_SO) $(LIBNPU_OUT)/libnpu.pc $(LIBNPU_OUT)/classify

libnpu-deps:
	@clients/c/deps.sh

$(LIBNPU_SO): $(LIBNPU_SRC) $(LIBNPU_HDR) | libnpu-deps
	@mkdir -p $(LIBNPU_OUT)
	$(CC) $(LIBNPU_CFLAGS) -fPIC -fvisibility=hidden -shared -Iclients/c/include \
	  -Wl,-soname,libnpu.so.$(LIBNPU_MAJOR) -Wl,--no-undefined -o $@ $(LIBNPU_SRC) $(LIBNPU_DEPS)
	ln -sfn libnpu.so.$(LIBNPU_VERSION) $(LIBNPU_OUT)/libnpu.so.$(LIBNPU_MAJOR)
	ln -sfn libnpu.so.$(LIBNPU_MAJOR) $(LIBNPU_OUT)/libnpu.so

# The in-tree libnpu.pc names this checkout's header and library (install-libnpu writes the installed one).
$(LIBNPU_OUT)/libnpu.pc: clients/c/libnpu.pc.in | libnpu-deps
	@mkdir -p $(LIBNPU_OUT)
	sed -e 's|@PREFIX@|$(abspath .)|' -e 's|@LIBDIR@|$(abspath $(LIBNPU_OUT))|' \
	  -e 's|@INCLUDEDIR@|$(abspath clients/c/include)|' -e 's|@VERSION@|$(LIBNPU_VERSION)|' \
	  -e 's|@MSGPACK@|$(LIBNPU_MSGPACK)|' $< > $@

# Programs built as a user of the library would: flags from pkg-config, nothing else.
$(LIBNPU_OUT)/classify: examples/c/classify.c $(LIBNPU_SO) $(LIBNPU_OUT)/libnpu.pc
	$(CC) -std=c11 -O2 -Wall -Wextra -o $@ $< $$($(LIBNPU_PC) --cflags --libs libnpu) -lm \
	  -Wl,-rpath,$(abspath $(LIBNPU_OUT))

$(LIBNPU_OUT)/test_libnpu: clients/c/tests/test_libnpu.c $(LIBNPU_SO) $(LIBNPU_OUT)/libnpu.pc
	$(CC) $(LIBNPU_CFLAGS) -o $@ $< $$($(LIBNPU_PC) --cflags --libs libnpu) -Wl,-rpath,$(abspath $(LIBNPU_OUT))

# The sanitized build compiles the library's sources into the test program, so they are checked too.
$(LIBNPU_OUT)/test_libnpu-asan: clients/c/tests/test_libnpu.c $(LIBNPU_SRC) $(LIBNPU_HDR) | libnpu-deps
	@mkdir -p $(LIBNPU_OUT)
	$(CC) $(LIBNPU_CFLAGS) -O1 $(LIBNPU_SANITIZE) -Iclients/c/include -o $@ $< $(LIBNPU_SRC) $(LIBNPU_DEPS)

libnpu-tests: libnpu $(LIBNPU_OUT)/test_libnpu $(LIBNPU_OUT)/test_libnpu-asan

LIBNPU_PREFIX ?= /usr/local
LIBNPU_LIBDIR ?= $(LIBNPU_PREFIX)/lib

install-libnpu: libnpu
	$(INSTALL) -d $(DESTDIR)$(LIBNPU_LIBDIR)/pkgconfig $(DESTDIR)$(LIBNPU_PREFIX)/include
	$(INSTALL) -m 0755 $(LIBNPU_SO) $(DESTDIR)$(LIBNPU_LIBDIR)/
	ln -sfn libnpu.so.$(LIBNPU_VERSION) $(DESTDIR)$(LIBNPU_LIBDIR)/libnpu.so.$(LIBNPU_MAJOR)
	ln -sfn libnpu.so.$(LIBNPU_MAJOR) $(DESTDIR)$(LIBNPU_LIBDIR)/libnpu.so
	$(INSTALL) -m 0644 clients/c/include/npu.h $(DESTDIR)$(LIBNPU_PREFIX)/include/
	sed -e 's|@PREFIX@|$(LIBNPU_PREFIX)|' -e 's|@LIBDIR@|$(LIBNPU_LIBDIR)|' \
	  -e 's|@INCLUDEDIR@|$(LIBNPU_PREFIX)/include|' -e 's|@VERSION@|$(LIBNPU_VERSION)|' \
	  -e 's|@MSGPACK@|$(LIBNPU_MSGPACK)|' clients/c/libnpu.pc.in > $(DESTDIR)$(LIBNPU_LIBDIR)/pkgconfig/libnpu.pc

# --- install / uninstall: the system service (see docs/DEPLOY.md) -------------------
# `make install` puts npud into its own venv at PREFIX, links its commands into BINDIR,
# installs the man pages and bash/zsh completions, the units under the /usr/local search
# paths of systemd, the sysusers.d and tmpfiles.d files, and a default /etc/npud/npud.toml
# (kept if it exists).  The venv is made by INSTALL_PYTHON, the system's interpreter, so
# that its pyvenv.cfg `home` is the target's /usr/bin and not a development Python of the
# machine that builds (for a package: build in a chroot of the target distribution, as
# dh-virtualenv does).  DESTDIR stages the whole tree for a package: nothing written in it
# (#! lines, activate, pyvenv.cfg, the source paths in .pyc files) names DESTDIR.
# `make uninstall` removes what install placed; PURGE=1 also removes the config.
PREFIX ?= /opt/npud
INSTALL_PYTHON ?= /usr/bin/python3
BINDIR ?= /usr/local/bin
MANDIR ?= /usr/local/share/man
BASHCOMPDIR ?= /usr/local/share/bash-completion/completions
ZSHCOMPDIR ?= /usr/local/share/zsh/site-functions
SYSCONFDIR ?= /etc
SYSTEMDDIR ?= /usr/local/lib/systemd
SYSUSERSDIR ?= /usr/local/lib/sysusers.d
TMPFILESDIR ?= /usr/local/lib/tmpfiles.d
INSTALL ?= install
NPUD_UNITS := npud.socket npud-fds.socket npud.service
# System-only units (no user variant): installed, never enabled by install.
EXTRA_UNITS := npud-exporter.service
NPUD_COMMANDS := npud npuctl
DOCGEN := build/docgen
VENV_PY := $(DESTDIR)$(PREFIX)/bin/python

.PHONY: install install-venv install-bin install-docs install-units uninstall install-user uninstall-user

install: install-venv install-bin install-docs install-units

install-venv:
	@$(INSTALL_PYTHON) -c 'import sys; sys.exit( \
	  "INSTALL_PYTHON=$(INSTALL_PYTHON) is Python %d.%d; npud needs 3.11 or newer" % sys.version_info[:2] \
	  if sys.version_info < (3, 11) else "INSTALL_PYTHON=$(INSTALL_PYTHON) runs in a venv: give the " \
	  "system interpreter (the new venv would depend on this one)" if sys.prefix != sys.base_prefix else 0)'
	$(INSTALL_PYTHON) -m venv --clear $(DESTDIR)$(PREFIX)
	$(VENV_PY) -m pip install --quiet --no-compile --upgrade pip
	$(VENV_PY) -m pip install --quiet --no-compile .
	@# pip records the source tree as where npud came from: a path of the build machine, not the target's.
	cd $(DESTDIR)$(PREFIX)/lib/python3*/site-packages/npud-*.dist-info && \
	  rm -f direct_url.json && sed -i '/^npud-[^/]*\.dist-info\/direct_url\.json,/d' RECORD
	@# Byte-compile with the installed paths (pip would record DESTDIR's); checked-hash .pyc
	@# stay valid whatever mtimes a package manager gives the files (the service cannot rewrite them).
	$(VENV_PY) -m compileall -q -f -j0 --invalidation-mode checked-hash \
	  $(if $(DESTDIR),-s '$(DESTDIR)' -p /) $(DESTDIR)$(PREFIX)/lib
	@if [ -n "$(DESTDIR)" ]; then \
	  grep -rlI -- '$(DESTDIR)$(PREFIX)' $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/pyvenv.cfg | \
	    xargs -r sed -i 's|$(DESTDIR)$(PREFIX)|$(PREFIX)|g'; fi

install-bin: install-venv
	$(INSTALL) -d $(DESTDIR)$(BINDIR)
	for cmd in $(NPUD_COMMANDS); do ln -sfn $(PREFIX)/bin/$$cmd $(DESTDIR)$(BINDIR)/$$cmd; done

# Generated by the installed code itself (npud/manpages.py); shtab, for the completions, is a
# build-time tool kept out of the venv.
install-docs: install-venv
	rm -rf $(DOCGEN)
	$(VENV_PY) -m pip install --quiet --no-compile --target $(DOCGEN)/lib 'shtab>=1.7'
	PYTHONPATH=$(DOCGEN)/lib PYTHONDONTWRITEBYTECODE=1 $(VENV_PY) -m npud.manpages $(DOCGEN)/out
	$(INSTALL) -d $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR)
	$(INSTALL) -m 0644 $(DOCGEN)/out/man1/* $(DESTDIR)$(MANDIR)/man1/
	$(INSTALL) -m 0644 $(DOCGEN)/out/man5/* $(DESTDIR)$(MANDIR)/man5/
	$(INSTALL) -m 0644 $(DOCGEN)/out/bash-completion/* $(DESTDIR)$(BASHCOMPDIR)/
	$(INSTALL) -m 0644 $(DOCGEN)/out/zsh/* $(DESTDIR)$(ZSHCOMPDIR)/

install-units:
	$(INSTALL) -d $(DESTDIR)$(SYSTEMDDIR)/system $(DESTDIR)$(SYSTEMDDIR)/user \
	  $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(SYSCONFDIR)/npud
	for unit in $(NPUD_UNITS); do \
	  sed -e 's|/opt/npud/|$(PREFIX)/|g' -e 's|/etc/npud/|$(SYSCONFDIR)/npud/|g' systemd/$$unit \
	    > $(DESTDIR)$(SYSTEMDDIR)/system/$$unit && chmod 0644 $(DESTDIR)$(SYSTEMDDIR)/system/$$unit; \
	  $(INSTALL) -m 0644 systemd/user/$$unit $(DESTDIR)$(SYSTEMDDIR)/user/$$unit; done
	for unit in $(EXTRA_UNITS); do \
	  sed -e 's|/opt/npud/|$(PREFIX)/|g' systemd/$$unit > $(DESTDIR)$(SYSTEMDDIR)/system/$$unit && \
	  chmod 0644 $(DESTDIR)$(SYSTEMDDIR)/system/$$unit; done
	$(INSTALL) -m 0644 systemd/npud.sysusers $(DESTDIR)$(SYSUSERSDIR)/npud.conf
	$(INSTALL) -m 0644 systemd/npud.tmpfiles $(DESTDIR)$(TMPFILESDIR)/npud.conf
	[ -e $(DESTDIR)$(SYSCONFDIR)/npud/npud.toml ] || \
	  $(INSTALL) -m 0644 systemd/npud.toml $(DESTDIR)$(SYSCONFDIR)/npud/npud.toml
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  systemd-sysusers $(SYSUSERSDIR)/npud.conf && \
	  systemd-tmpfiles --create $(TMPFILESDIR)/npud.conf && \
	  systemctl daemon-reload && \
	  echo "npud installed: systemctl enable --now npud.socket (see docs/DEPLOY.md)"; fi

uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  systemctl disable --now npud-exporter.service npud.socket npud-fds.socket npud.service || true; fi
	for unit in $(NPUD_UNITS); do \
	  rm -f $(DESTDIR)$(SYSTEMDDIR)/system/$$unit $(DESTDIR)$(SYSTEMDDIR)/user/$$unit; done
	for unit in $(EXTRA_UNITS); do rm -f $(DESTDIR)$(SYSTEMDDIR)/system/$$unit; done
	rm -f $(DESTDIR)$(SYSUSERSDIR)/npud.conf $(DESTDIR)$(TMPFILESDIR)/npud.conf
	for cmd in $(NPUD_COMMANDS); do \
	  [ ! -L $(DESTDIR)$(BINDIR)/$$cmd ] || rm -f $(DESTDIR)$(BINDIR)/$$cmd; \
	  rm -f $(DESTDIR)$(MANDIR)/man1/$$cmd.1 $(DESTDIR)$(BASHCOMPDIR)/$$cmd $(DESTDIR)$(ZSHCOMPDIR)/_$$cmd; done
	rm -f $(DESTDIR)$(MANDIR)/man5/npud.toml.5
	[ ! -e $(DESTDIR)$(PREFIX)/pyvenv.cfg ] || rm -rf $(DESTDIR)$(PREFIX)  # only ever a venv we made
	@if [ "$(PURGE)" = 1 ]; then rm -rf $(DESTDIR)$(SYSCONFDIR)/npud; fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

# For a developer: the user units, running this checkout's venv (systemctl --user).
USERUNITDIR ?= $(HOME)/.config/systemd/user

# The venv must exist (and have npud installed) before units point at it.
install-user: $(RUNTIME)
	$(INSTALL) -d $(USERUNITDIR)
	for unit in $(NPUD_UNITS); do \
	  sed -e 's|^ExecStart=.*|ExecStart=$(abspath $(VENV))/bin/npud|' systemd/user/$$unit \
	    > $(USERUNITDIR)/$$unit; done
	systemctl --user daemon-reload
	systemctl --user enable --now npud.socket

uninstall-user:
	-systemctl --user disable --now npud.socket npud-fds.socket npud.service
	for unit in $(NPUD_UNITS); do rm -f $(USERUNITDIR)/$$unit; done
	-systemctl --user daemon-reload
