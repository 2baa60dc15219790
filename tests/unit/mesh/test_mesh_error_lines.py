"""last_line: what a mesh error message quotes of a remote error."""

from __future__ import annotations

from rlmesh.mesh.futures import last_line


def test_the_last_line_says_what_failed_not_where_to_read_more():
    pydantic_style = ValueError(
        "Traceback (most recent call last):\n  File 'x.py'\n1 validation error for ModelConfig\n"
        "  Value error, max_model_len (256) is greater than the derived max_model_len (128) [type=value_error]\n"
        "    For further information visit https://errors.pydantic.dev/2.14/v/value_error\n"
    )
    assert last_line(pydantic_style).startswith("Value error, max_model_len (256)")
    assert last_line(RuntimeError("first\n\nthe cause  \n")) == "the cause"
    assert last_line(RuntimeError("")) == "RuntimeError"
    assert last_line(RuntimeError("For further information visit x")) == "For further information visit x"
