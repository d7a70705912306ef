import dataclasses
import re
from pathlib import Path
from typing import get_type_hints

from config import Config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
OPTIONS = (ROOT / "docs" / "options.md").read_text()


def config_keys(cls=Config, prefix=""):
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_ci_runs_the_readme_test_command_verbatim():
    command = re.search(r"```bash\n(python3 -m venv .*python -m pytest)\n```", README).group(1)
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_every_config_key_is_documented():
    table = OPTIONS[OPTIONS.index("## Keys"):]
    assert [key for key in config_keys() if f"`{key}`" not in table] == []
