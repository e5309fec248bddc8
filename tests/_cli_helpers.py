"""Running `pathfm` in-process for the fault tests (not a test module)."""

from __future__ import annotations

from typer.testing import CliRunner

from napari_pathfm.cli import app

runner = CliRunner()


def cli_refuses(args: list, *expected: str, code: int = 2) -> str:
    """Run ``pathfm args``; assert a clean refusal (exit ``code``, no traceback) whose text holds ``expected``."""
    result = runner.invoke(app, [str(a) for a in args])
    text = result.output
    assert result.exit_code == code, text
    assert "Traceback" not in text
    for piece in expected:
        assert piece in text, text
    return text
