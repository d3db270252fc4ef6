"""The README's two set-up commands are the ones CI and users run; keep them honest."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]


def test_readme_has_exactly_two_setup_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    assert "quickstart" in commands[0] and "pytest" in commands[1]
    assert all(c.startswith("python3.11 -m venv ") for c in commands), "each command makes its own venv"
    assert all("torch==2.13.0" in c for c in commands), "torch pinned so CPU hosts take the CPU build"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


def test_documented_doc_links_exist():
    text = (REPO / "README.md").read_text()
    for link in re.findall(r"\]\((docs/[^)]+)\)", text):
        assert (REPO / link).exists(), f"README links to missing {link}"
