#!/bin/sh
# libnpu's build dependencies: libzmq and msgpack-c with their headers, and pkg-config.
# Present: say nothing.  Missing: install them when we are root with apt, else stop with the exact
# command to run.  Never skip silently (make test depends on this).
set -eu
have() { command -v pkg-config >/dev/null 2>&1 && pkg-config --exists libzmq && \
         { pkg-config --exists msgpack-c || pkg-config --exists msgpack; }; }
have && exit 0
# msgpack-c's package is libmsgpack-dev up to bookworm, libmsgpack-c-dev from trixie on.
msgpack=libmsgpack-dev
if command -v apt-cache >/dev/null 2>&1 && apt-cache show libmsgpack-c-dev >/dev/null 2>&1; then
  msgpack=libmsgpack-c-dev
fi
command="apt-get install -y libzmq3-dev $msgpack pkg-config"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "libnpu: installing its build dependencies: $command" >&2
  DEBIAN_FRONTEND=noninteractive $command >&2 || {
    echo "libnpu: '$command' failed; run it (after apt-get update) and make again" >&2; exit 1; }
  have && exit 0
  echo "libnpu: pkg-config still finds no libzmq/msgpack after '$command'" >&2
  exit 1
fi
echo "libnpu: libzmq and msgpack-c development files are missing; run: sudo $command" >&2
exit 1
