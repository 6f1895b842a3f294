"""Man pages and completions come from the argparse parsers and the config schema, so they cannot drift."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from npud import config, manpages
from npud.manpages import roff


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return manpages.pages()


def options_and_commands(parser) -> tuple[set[str], set[str]]:
    """Every option string of the parser and its subcommands, and the subcommands' names."""
    options = {o for a in parser._actions for o in a.option_strings}
    commands = set()
    for name, _, sub in manpages._subcommands(parser):
        commands.add(name)
        options |= {o for a in sub._actions for o in a.option_strings}
    return options, commands


@pytest.mark.parametrize("command", ["npud", "npuctl"])
def test_packaging_man_page_mentions_every_option_and_subcommand(pages, command):
    page = pages[f"man1/{command}.1"]
    options, commands = options_and_commands(manpages.parsers()[command])
    assert options, "the parser has no options: the check would prove nothing"
    assert [o for o in sorted(options) if f"\\fB{roff(o)}\\fR" not in page] == []
    assert [c for c in sorted(commands) if f".SS {roff(c)}\n" not in page] == []
    if command == "npuctl":
        assert {"status", "top", "compile", "kill-client", "reset"} <= commands


def test_packaging_config_page_documents_every_key(pages):
    page = pages["man5/npud.toml.5"]
    keys = manpages.config_schema()
    assert {k for where, k, _ in keys if where == ""} == set(config.CONFIG_KEYS) - {
        "limits", "scheduling", "curve", "devices"}
    assert {k for where, k, _ in keys if where == "limits"} == set(config.Limits.__dataclass_fields__)
    for where, key, _ in keys:
        assert f"\\fB{roff(key)}\\fR = " in page, (where, key)
    for table in ("[limits]", "[scheduling]", "[curve]", "[[devices]]"):
        assert f".SS {table}\n" in page


def test_packaging_config_page_refuses_a_key_the_example_does_not_show(monkeypatch):
    monkeypatch.setattr(config, "__doc__", config.__doc__.replace("    shutdown_grace_s = 5.0", "    #"))
    with pytest.raises(ValueError, match="does not show shutdown_grace_s"):
        manpages.config_page()


@pytest.mark.parametrize("key", config.CONFIG_KEYS)
def test_packaging_each_documented_key_is_one_the_parser_reads(key):
    # A documented key the parser ignored would be a lie in npud.toml(5): each one's value is checked.
    with pytest.raises(config.ConfigError, match=f"^{key}"):
        config.from_dict({key: object()})


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed (apt-get install groff-base)")
@pytest.mark.parametrize("name", ["man1/npud.1", "man1/npuctl.1", "man5/npud.toml.5"])
def test_packaging_man_pages_render_without_warnings(pages, name, tmp_path):
    path = tmp_path / name.split("/")[1]
    path.write_text(pages[name])
    result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    if shutil.which("man"):
        shown = subprocess.run(["man", "-l", str(path)], capture_output=True, text=True, timeout=60,
                               env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "MAN_DISABLE_SECCOMP": "1"})
        assert shown.returncode == 0, shown.stderr
        assert "NAME" in shown.stdout and "\u2010" not in shown.stdout  # options print with ASCII '-'


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_packaging_bash_completion_completes_subcommands_and_options(tmp_path):
    pytest.importorskip("shtab", reason="shtab (the `test` extra) generates the completions")
    script = tmp_path / "npuctl"
    script.write_text(manpages.completions()["bash-completion/npuctl"])
    probe = (f"source {script}; COMP_WORDS=(npuctl d); COMP_CWORD=1; _shtab_npuctl; echo \"${{COMPREPLY[*]}}\"; "
             "COMP_WORDS=(npuctl top --so); COMP_CWORD=2; _shtab_npuctl; echo \"${COMPREPLY[*]}\"")
    result = subprocess.run(["bash", "--norc", "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [sorted(line.split()) for line in result.stdout.splitlines()] == [["devices", "disasm", "dmon"],
                                                                             ["--sort"]]


def test_packaging_generator_writes_every_file(tmp_path):
    pytest.importorskip("shtab", reason="shtab (the `test` extra) generates the completions")
    assert manpages.main([str(tmp_path)]) == 0
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "bash-completion/npuctl", "bash-completion/npud", "man1/npuctl.1", "man1/npud.1", "man5/npud.toml.5",
        "zsh/_npuctl", "zsh/_npud"]
