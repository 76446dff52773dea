"""The README names only files that the repository has, and its two commands are the ones CI runs."""

import re

from conftest import ROOT

README = (ROOT / "README.md").read_text()

# What a run writes or a user brings (run folders, caches, downloaded vocabularies) is not part of the repository.
OUTSIDE = ("runs/", "bench/out/", "data_cache/", "glue_data/", "squad/")
# Files of a model / run folder named by their role (`vocab.txt`, `tokenizer.json`, ...): only paths are checked
# here, plus every script, Markdown file and requirements file, which the repository must hold by name.
PATH = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)+[\w.*<>-]*|[\w-]+\.(?:py|md)|requirements[\w-]*\.txt)(?![\w/])")


def named_files(text):
    out = set()
    for name in PATH.findall(text):
        if name.startswith(OUTSIDE) or "<" in name or "*" in name:
            continue
        first = name.split("/")[0]
        if "/" in name and not (ROOT / first).exists() and not name.endswith((".py", ".md")) \
                and first not in ("tests", "bench", ".ci", "shared"):
            continue  # a hub name (google/electra-base-discriminator) or a user's own folder, not a repo path
        out.add(name)
    return out


def test_every_file_the_readme_names_exists():
    names = named_files(README)
    assert {"demo.py", "bench/pairwise.py", "tests/test_model.py", "requirements-test.txt"} <= names
    missing = sorted(n for n in names if not (ROOT / n).exists())
    assert missing == [], f"the README names files the repository does not have: {missing}"


def test_the_check_catches_what_it_should():
    """The pattern finds scripts, Markdown files and repository folders, and passes over outputs and hub names."""
    text = ("see `shared/SPEC.md`, ANCHORS.md, bench/nope.py and tests/test_gone.py; runs/demo/search/top.json, "
            "bench/out/pairwise/results.json, google/electra-base-discriminator, wikimedia/wikipedia:20231101.en, "
            "`runs/finetune/<task>`, bert-base-uncased/vocab.txt")
    assert named_files(text) == {"shared/SPEC.md", "ANCHORS.md", "bench/nope.py", "tests/test_gone.py"}


def test_ci_runs_the_readme_test_command_in_a_fresh_environment():
    """.ci/run picks the README's test command (the code block under "The tests") and runs it in a new venv."""
    ci = (ROOT / ".ci" / "run").read_text()
    pattern = re.search(r"grep -m1 '([^']+)' README\.md", ci).group(1)  # a basic regex that Python reads alike
    picked = next(line for line in README.splitlines() if re.search(pattern, line))
    block = README.split("The tests", 1)[1].split("```")[1].strip()
    assert picked == block and "python -m pytest" in picked
    assert " -m venv " in ci and 'source "$venv/bin/activate"' in ci and 'bash -c "set -e; $command"' in ci
