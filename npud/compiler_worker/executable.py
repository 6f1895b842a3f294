"""Moved to npud/executable (the container both the daemon and the compiler import); this
re-export keeps the compiler's and the tools' imports working."""

from npud.executable import (DIGEST, ENTRY, FORMAT_VERSION, HEADER, MAGIC, MAX_META_BYTES,  # noqa: F401
                             MAX_SECTIONS, SECTIONS, Executable, ExecutableFormatError, PackedExecutable,
                             Report, read_meta)
