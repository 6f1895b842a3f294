"""docs/PROTOCOL.md is generated from the schema and must stay identical to it."""

import re
from pathlib import Path

from npud.ipc_schema import docgen
from npud.ipc_schema.errors import ErrorCode
from npud.ipc_schema.schema import OPS

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def test_protocol_doc_matches_schema():
    assert DOC.read_text() == docgen.render(), (
        "docs/PROTOCOL.md is stale: run `python -m npud.ipc_schema.docgen > docs/PROTOCOL.md`")


def test_every_op_field_and_error_code_is_documented():
    text = DOC.read_text()
    for op in OPS.values():
        assert f"### `{op.name}`" in text
        for field in (*op.args.fields, *op.result.fields):
            assert f"| `{field}` |" in text, (op.name, field)
    for code in ErrorCode:
        assert f"| `{code.value}` |" in text


def test_every_structure_a_table_names_is_defined():
    """A type column naming `map `x`` promises a section `### `x`` a reader can look up."""
    text = DOC.read_text()
    named = set(re.findall(r"map `([a-z_.]+)`", text))
    assert named, "the pattern no longer matches the type column"
    missing = sorted(n for n in named if f"### `{n}`" not in text)
    assert not missing, f"structures named but never defined: {missing}"


def test_every_shared_structure_is_used():
    """A structure no op, event or packet carries would send a reader looking for where it goes."""
    text = DOC.read_text()
    shared = text.split("## Shared structures", 1)[1].split("\n## ", 1)[0]
    defined = re.findall(r"^### `([a-z_.]+)`", shared, re.M)
    assert defined
    assert [n for n in defined if f"map `{n}`" not in text] == []
