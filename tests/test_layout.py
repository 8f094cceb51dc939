"""Where code lives (docs/ARCHITECTURE.md, "Where code lives"): process packages import the shared library, never
the reverse; product packages carry no test code; definitions that several places read exist once."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.live_server import PROJECT_ROOT

PROCESS_PACKAGES = ("gateway", "gpu_worker", "cpu_attn", "cli")
PRODUCT_PACKAGES = ("neoserve", *PROCESS_PACKAGES)


def _sources(package: str) -> list[Path]:
    return sorted((PROJECT_ROOT / package).rglob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement in the file names, at any depth (imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def test_shared_library_imports_no_process_package():
    """neoserve/cli.py once imported gateway.launcher and gpu_worker.config."""
    wrong = {f"{path.relative_to(PROJECT_ROOT)}: {module}"
             for path in _sources("neoserve") for module in _imported_modules(path)
             if _top(module) in PROCESS_PACKAGES or _top(module) == "tests"}
    assert not wrong, sorted(wrong)


def test_product_packages_carry_no_test_code():
    """The pytest plugin gateway/testing.py once shipped inside the gateway package."""
    wrong = {f"{path.relative_to(PROJECT_ROOT)}: {module}"
             for package in PRODUCT_PACKAGES for path in _sources(package) for module in _imported_modules(path)
             if _top(module) in ("pytest", "hypothesis", "tests")}
    assert not wrong, sorted(wrong)


def test_modes_are_defined_once():
    """The NEO modes were spelled out in gpu_worker/config.py, gpu_worker/scheduler.py and bench/serve.py."""
    definitions = []
    for folder in (*PRODUCT_PACKAGES, "bench", "scripts"):
        for path in _sources(folder):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "MODES"
                                                        for t in node.targets):
                    definitions.append(f"{path.relative_to(PROJECT_ROOT)}:{node.lineno}")
    assert len(definitions) == 1 and definitions[0].startswith("gpu_worker/config.py:"), definitions


def test_readme_starts_with_the_two_commands_and_quotes_only_measured_figures():
    """README's headline once claimed "serves more concurrent requests on the same GPU", which no measurement backed
    (BENCHMARKS.md shows auto below gpu-only on the H200). Its first lines stay the set-up+run and test commands; a
    speed ratio it quotes must be one BENCHMARKS.md measured."""
    import re

    readme = (PROJECT_ROOT / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert readme.startswith("# neoserve\n\n```bash\n")
    assert first_block.splitlines() == [
        'bash scripts/setup.sh && .venv/bin/neoserve serve --once "Why is the sky blue?" --chat --max-tokens 64',
        "bash scripts/test.sh"]
    assert "more concurrent requests" not in readme
    benchmarks = (PROJECT_ROOT / "BENCHMARKS.md").read_text()
    for ratio in re.findall(r"\b\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?x\b", readme):
        assert ratio in benchmarks, f"README quotes {ratio}, which BENCHMARKS.md does not show"
