"""Man pages and shell completions, generated from the code so that they cannot drift from it.

``python -m npud.manpages OUTDIR`` writes

* ``man1/npud.1`` and ``man1/npuctl.1`` from the two commands' argparse parsers,
* ``man5/npud.toml.5`` from the config schema in npud/config.py (its keys, the dataclasses'
  defaults, and the commented example in its docstring, which must describe every key),
* ``bash-completion/npud``, ``bash-completion/npuctl``, ``zsh/_npud`` and ``zsh/_npuctl`` with
  shtab, a build-time tool only (``make install`` installs it outside the venv); without it,
  ``--no-completions`` writes the man pages alone.

``make install`` puts them under share/man and the bash-completion and zsh search paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from . import __version__, config

SOURCE = f"npud {__version__}"
ENVIRONMENT = (
    ("NPUD_ENDPOINT", "the daemon's endpoint when none is given, e.g. ipc:///run/npud/npud.sock (the system "
                      "service); else ipc://$XDG_RUNTIME_DIR/npud/npud.sock, else ipc:///tmp/npud-$UID/npud.sock"),
)
_FILE_METAVARS = ("FILE", "MODEL", "DIR")


def roff(text: str) -> str:
    """``text`` as roff body text: backslashes escaped, no line read as a request, and ``-`` a minus
    sign (a roff ``-`` renders as a hyphen, which breaks a copied option name)."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines())


def _invocation(action: argparse.Action) -> str:
    """How an option or positional is written, in roff: ``\\-d S, \\-\\-delay S``."""
    if not action.option_strings:
        return "\\fI" + roff(action.metavar or action.dest) + "\\fR"
    if action.nargs == 0:
        return ", ".join("\\fB" + roff(o) + "\\fR" for o in action.option_strings)
    metavar = action.metavar or ("{" + ",".join(map(str, action.choices)) + "}" if action.choices
                                 else action.dest.upper())
    return ", ".join(f"\\fB{roff(o)}\\fR \\fI{roff(metavar)}\\fR" for o in action.option_strings)


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    return roff(text % {**vars(action), "prog": prog} if "%" in text else text)


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand, in the order --help lists them."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return out


def _actions_section(actions: list[argparse.Action], prog: str) -> list[str]:
    lines = []
    for action in actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        lines += [".TP", _invocation(action), _help(action, prog)]
    return lines


def command_page(parser: argparse.ArgumentParser, summary: str, see_also: str,
                 files: tuple[tuple[str, str], ...] = ()) -> str:
    """A section-1 man page listing every option and subcommand of ``parser``."""
    prog = parser.prog
    usage = parser.format_usage().removeprefix("usage: ").strip()
    lines = [f'.TH {prog.upper()} 1 "" "{SOURCE}" "User Commands"', ".nh", ".ad l",
             ".SH NAME", roff(f"{prog} - {summary}"), ".SH SYNOPSIS", ".nf", roff(usage), ".fi",
             ".SH DESCRIPTION", roff(parser.description or "")]
    if parser.epilog:
        lines += [".PP", roff(parser.epilog)]
    lines += [".SH OPTIONS", *_actions_section(parser._actions, prog)]
    subcommands = _subcommands(parser)
    if subcommands:
        top = {o for a in parser._actions for o in a.option_strings}
        lines.append(".SH COMMANDS")
        for name, help_, sub in subcommands:
            own = [a for a in sub._actions if not set(a.option_strings) & top]
            usage = sub.format_usage().removeprefix("usage: ").strip()
            lines += [f".SS {roff(name)}", roff(help_), ".PP", ".nf", roff(usage), ".fi",
                      *_actions_section(own, prog)]
        lines += [".PP", roff(f"Every command also takes the options above ({', '.join(sorted(top))}).")]
    lines.append(".SH ENVIRONMENT")
    for name, text in ENVIRONMENT:
        lines += [".TP", f"\\fB{name}\\fR", roff(text)]
    if files:
        lines.append(".SH FILES")
        for path, text in files:
            lines += [".TP", f"\\fI{path}\\fR", roff(text)]
    lines += [".SH SEE ALSO", roff(see_also)]
    return "\n".join(lines) + "\n"


# --- npud.toml(5) ---------------------------------------------------------------------------

_EXAMPLE_LINE = re.compile(r"^\s*(?P<key>\w+)\s*=\s*(?P<value>.+?)\s*(?:#\s*(?P<text>.*))?$")
_EXAMPLE_TABLE = re.compile(r"^\s*(?P<table>\[\[?[\w.]+\]\]?)\s*(?:#\s*(?P<text>.*))?$")
_EXAMPLE_MORE = re.compile(r"^\s{20,}#\s*(?P<text>.*)$")


def config_examples(doc: str | None = None) -> dict[tuple[str, str], tuple[str, str]]:
    """(table, key) -> (example value, description) from the commented example in npud/config.py.

    A table's own description is under (table, ""); the top level's table is "".
    """
    out: dict[tuple[str, str], tuple[str, str]] = {}
    table, last = "", None
    for line in (doc if doc is not None else config.__doc__ or "").splitlines():
        if (m := _EXAMPLE_MORE.match(line)) and last is not None:
            value, text = out[last]
            out[last] = (value, f"{text} {m['text']}".strip())
        elif m := _EXAMPLE_TABLE.match(line):
            table = m["table"].strip("[]")
            last = (table, "")
            out[last] = ("", m["text"] or "")
        elif m := _EXAMPLE_LINE.match(line):
            last = (table, m["key"])
            out[last] = (m["value"], m["text"] or "")
    return out


def config_schema() -> list[tuple[str, str, object]]:
    """(table, key, default) of every key npud.toml may have; default is MISSING when it has none."""
    missing = dataclasses.MISSING

    def defaults(cls, table):
        return [(table, f.name, f.default) for f in dataclasses.fields(cls)]
    top = {f.name: f.default for f in dataclasses.fields(config.Config)}
    tables = {"limits": defaults(config.Limits, "limits"), "scheduling": defaults(config.Scheduling, "scheduling"),
              "curve": [("curve", k, config.Config.curve_secret_key_file) for k in config.CURVE_KEYS],
              "devices": [("devices", k, missing) for k in config.DEVICE_KEYS]}
    scalars = [("", k, top[k]) for k in config.CONFIG_KEYS if k not in tables]
    return scalars + [entry for k in config.CONFIG_KEYS if k in tables for entry in tables[k]]


def _default(value: object, example: str) -> str:
    if value is dataclasses.MISSING or value == "":
        return ""
    if type(value) is int and example.startswith('"') and value:
        for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
            if value % (1 << shift) == 0:
                return f' Default: "{value >> shift}{unit}".'
    return f" Default: {value}."


def config_page() -> str:
    """npud.toml(5): every key of the config schema with its example, description and default.

    Raises ValueError naming a key the example in npud/config.py's docstring does not show, so a
    new key cannot ship undocumented.
    """
    examples = config_examples()
    lines = ['.TH NPUD.TOML 5 "" "' + SOURCE + '" "File Formats"', ".nh", ".ad l", ".SH NAME",
             roff("npud.toml - configuration of npud, the NPU daemon"), ".SH SYNOPSIS", "/etc/npud/npud.toml",
             ".SH DESCRIPTION",
             roff("npud reads this TOML file when started with --config FILE (the system service: "
                  "/etc/npud/npud.toml). Every key is optional. Command-line options override it."),
             ".PP", roff(config.__doc__.rstrip().rsplit("\n\n", 1)[-1].strip()), ".SH KEYS"]
    table = None
    for where, key, default in config_schema():
        if where != table:
            table = where
            header = "[[devices]]" if where == "devices" else f"[{where}]" if where else "Top level"
            lines += [f".SS {header}", roff(examples.get((where, ""), ("", ""))[1])]
        if (where, key) not in examples and not (where == "devices" and key == "params"):
            raise ValueError(f"npud/config.py: the example in the docstring does not show "
                             f"{where + '.' if where else ''}{key}")
        if where == "devices" and key == "params":
            value, text = "{ ... }", examples.get(("devices.params", ""), ("", ""))[1]
        else:
            value, text = examples[(where, key)]
        lines += [".TP", f"\\fB{key}\\fR = {roff(value)}", roff(text.rstrip(".") + "." if text else "")
                  + _default(default, value)]
    lines += [".SH EXAMPLE", ".nf", roff(config.__doc__.split("::", 1)[1].rsplit("\n\n", 1)[0].strip("\n")),
              ".fi", ".SH FILES", ".TP", "\\fI/etc/npud/npud.toml\\fR", "the system service's configuration",
              ".SH SEE ALSO", "npud(1), npuctl(1)"]
    return "\n".join(line for line in lines if line != "") + "\n"


# --- all of them ----------------------------------------------------------------------------

def parsers() -> dict[str, argparse.ArgumentParser]:
    """The installed commands' parsers, with file arguments marked for completion."""
    from npuctl.main import _parser as npuctl_parser

    from .main import build_parser

    out = {"npud": build_parser(), "npuctl": npuctl_parser()}
    for parser in out.values():
        for p in [parser, *(sub for _, _, sub in _subcommands(parser))]:
            for action in p._actions:
                if action.metavar in _FILE_METAVARS or (action.metavar or "").endswith(".npy"):
                    # shtab reads this attribute: complete file names (directories for DIR).
                    action.complete = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/"} \
                        if action.metavar == "DIR" else {"bash": "_shtab_compgen_files", "zsh": "_files"}
    return out


def pages() -> dict[str, str]:
    """Relative path -> text of each man page."""
    p = parsers()
    return {
        "man1/npud.1": command_page(p["npud"], "the NPU daemon", "npuctl(1), npud.toml(5), systemd.socket(5)",
                                    files=(("/etc/npud/npud.toml", "the system service's configuration "
                                                                   "(npud.toml(5))"),)),
        "man1/npuctl.1": command_page(p["npuctl"], "inspect and administer npud", "npud(1), npud.toml(5)"),
        "man5/npud.toml.5": config_page(),
    }


def completions() -> dict[str, str]:
    """Relative path -> text of each bash and zsh completion script (needs shtab)."""
    import shtab

    out = {}
    for name, parser in parsers().items():
        out[f"bash-completion/{name}"] = shtab.complete(parser, "bash")
        out[f"zsh/_{name}"] = shtab.complete(parser, "zsh")
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the man pages (and completions) under OUTDIR."""
    parser = argparse.ArgumentParser(prog="python -m npud.manpages", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", metavar="OUTDIR")
    parser.add_argument("--no-completions", action="store_true", help="only the man pages (no shtab needed)")
    args = parser.parse_args(argv)
    files = pages()
    if not args.no_completions:
        try:
            files |= completions()
        except ImportError:
            print("npud.manpages: shtab is not installed (pip install shtab), or pass --no-completions",
                  file=sys.stderr)
            return 2
    for rel, text in files.items():
        path = Path(args.outdir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
