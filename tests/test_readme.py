"""The README's code blocks run as written and print what it shows; its first two commands are the documented ones."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run_and_print_what_the_readme_shows():
    from doc_snippets import blocks, check_block

    found = blocks(README.read_text())
    assert len(found) >= 3
    for i, (code, printed) in enumerate(found):
        check_block(code, printed, {"__name__": "readme"}, f"README block {i}")


def test_ci_runs_the_readme_test_command():
    bash_blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    test_command = bash_blocks[1].strip()
    ci = (README.parent / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
