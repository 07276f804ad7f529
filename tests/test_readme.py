"""The README's code blocks run as written, and its first two commands are the documented ones."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        exec(compile(block, f"README block {i}", "exec"), {"__name__": "readme"})


def test_ci_runs_the_readme_test_command():
    bash_blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    test_command = bash_blocks[1].strip()
    ci = (README.parent / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
