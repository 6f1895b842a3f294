# The two commands of the README: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
TESTING := $(VENV)/.installed-test

.PHONY: demo test bench clean fuzz soak

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The demo needs only the runtime dependencies; tests add the oracles.
$(RUNTIME): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e .
	touch $@

# int8-gemm: oneDNN's exact integer GEMM for the emulator (optional; numpy is the fallback).
$(TESTING): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[test,int8-gemm]'
	touch $(RUNTIME) $@

demo: $(RUNTIME)
	$(PY) -m examples.demo

# pytest exits 5 when it collected no tests: make fails then too, as it should.
test: $(TESTING)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(TESTING)
	$(PY) -m bench

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

# --- install / uninstall: the system service (see docs/DEPLOY.md) -------------------
# `make install` puts npud into its own venv at PREFIX, the units, sysusers.d and
# tmpfiles.d files under the /usr/local search paths of systemd, and a default
# /etc/npud/npud.toml (kept if it exists).  DESTDIR stages the whole tree for a
# package; the venv's scripts are then rewritten to run from PREFIX.
# `make uninstall` removes what install placed; PURGE=1 also removes the config.
PREFIX ?= /opt/npud
SYSCONFDIR ?= /etc
SYSTEMDDIR ?= /usr/local/lib/systemd
SYSUSERSDIR ?= /usr/local/lib/sysusers.d
TMPFILESDIR ?= /usr/local/lib/tmpfiles.d
INSTALL ?= install
NPUD_UNITS := npud.socket npud-fds.socket npud.service

.PHONY: install install-venv install-units uninstall install-user uninstall-user

install: install-venv install-units

install-venv:
	$(PYTHON) -m venv --clear $(DESTDIR)$(PREFIX)
	$(DESTDIR)$(PREFIX)/bin/python -m pip install --quiet --upgrade pip
	$(DESTDIR)$(PREFIX)/bin/python -m pip install --quiet .
	@if [ -n "$(DESTDIR)" ]; then \
	  grep -rlI -- '$(DESTDIR)$(PREFIX)' $(DESTDIR)$(PREFIX)/bin | \
	    xargs -r sed -i 's|$(DESTDIR)$(PREFIX)|$(PREFIX)|g'; fi

install-units:
	$(INSTALL) -d $(DESTDIR)$(SYSTEMDDIR)/system $(DESTDIR)$(SYSTEMDDIR)/user \
	  $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(SYSCONFDIR)/npud
	for unit in $(NPUD_UNITS); do \
	  sed -e 's|/opt/npud/|$(PREFIX)/|g' -e 's|/etc/npud/|$(SYSCONFDIR)/npud/|g' systemd/$$unit \
	    > $(DESTDIR)$(SYSTEMDDIR)/system/$$unit && chmod 0644 $(DESTDIR)$(SYSTEMDDIR)/system/$$unit; \
	  $(INSTALL) -m 0644 systemd/user/$$unit $(DESTDIR)$(SYSTEMDDIR)/user/$$unit; done
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
	  systemctl disable --now npud.socket npud-fds.socket npud.service || true; fi
	for unit in $(NPUD_UNITS); do \
	  rm -f $(DESTDIR)$(SYSTEMDDIR)/system/$$unit $(DESTDIR)$(SYSTEMDDIR)/user/$$unit; done
	rm -f $(DESTDIR)$(SYSUSERSDIR)/npud.conf $(DESTDIR)$(TMPFILESDIR)/npud.conf
	[ ! -e $(DESTDIR)$(PREFIX)/pyvenv.cfg ] || rm -rf $(DESTDIR)$(PREFIX)  # only ever a venv we made
	@if [ "$(PURGE)" = 1 ]; then rm -rf $(DESTDIR)$(SYSCONFDIR)/npud; fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

# For a developer: the user units, running this checkout's venv (systemctl --user).
USERUNITDIR ?= $(HOME)/.config/systemd/user

install-user: $(STAMP)
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
