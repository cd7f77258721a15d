import re
from pathlib import Path

import lightning as L

README = Path(__file__).parents[1] / "README.md"


def test_readme_quickstart_forgets_as_it_says(tmp_path, monkeypatch):
    snippet = re.search(r"## Quickstart\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README quickstart", "exec"), namespace)
    metrics = namespace["trainer"].callback_metrics
    assert isinstance(namespace["trainer"], L.Trainer)
    assert metrics["test/forget_acc"] <= 0.05
    assert metrics["test/retain_acc"] >= 0.95
    assert namespace["callback"].masks, "the callback selected no entries"


def test_ci_runs_the_readme_test_command():
    command = 'pip install -e ".[test]" && ruff check . && python -m pytest'
    assert command in README.read_text()
    assert command in (README.parent / ".ci" / "run").read_text()
