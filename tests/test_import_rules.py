"""The layout's import rules (docs/architecture.md), checked on the source with `ast`.

Every `import` / `from ... import` in `lmops_jax/`, at module level or inside a function, must name only
subsystems its own subsystem may use: nothing imports upward, and `inference/` (later `serving/`) never
reaches training, distillation or data code.
"""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lmops_jax"

# subsystem -> the other subsystems it may import (its own is always allowed)
ALLOWED = {
    "cli": set(),
    "partitioning": set(),
    "checkpoints": {"cli"},  # only its `inspect` command, through the runner (cli imports no lmops_jax)
    "losses": {"partitioning"},
    "models": {"losses", "partitioning", "checkpoints"},
    "data": {"partitioning"},
    "inference": {"models", "losses", "partitioning", "checkpoints", "cli"},
    "training": {"models", "data", "losses", "partitioning", "checkpoints", "cli"},
    "peft": {"models", "training", "losses", "partitioning", "checkpoints", "cli"},
    "convert": {"models", "partitioning", "checkpoints", "cli"},
    "distillation": {"models", "data", "inference", "training", "losses", "partitioning", "checkpoints", "cli"},
    "serving": {"models", "inference", "losses", "partitioning", "checkpoints", "cli"},
    "compression": {"models", "data", "inference", "training", "distillation", "losses", "partitioning",
                    "checkpoints", "cli"},
    "gin_configs": set(),
    # the `python -m lmops_jax.<job>` entry points
    "train": {"training", "cli"},
    # The job may register the built-in seqio tasks that `inference/` itself must not import.
    "infer": {"inference", "data", "cli"},
    "serve": {"serving", "cli"},
    "compress": {"compression", "data", "cli"},
}
NEVER_FROM_INFERENCE = {"training", "distillation", "data", "peft"}


def subsystem_of(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imported_subsystems(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, subsystem) for every lmops_jax import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "lmops_jax":
                names = [f"lmops_jax.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "lmops_jax" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def test_every_subsystem_has_a_rule():
    subsystems = {subsystem_of(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE}
    assert subsystems <= set(ALLOWED), f"add rules for {sorted(subsystems - set(ALLOWED))}"


def test_no_forbidden_imports():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue
        own = subsystem_of(path)
        for line, target in imported_subsystems(path):
            if target != own and target not in ALLOWED[own]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {target}")
    assert not violations, "imports against docs/architecture.md:\n" + "\n".join(violations)


def test_inference_rules_are_strict():
    assert not ALLOWED["inference"] & NEVER_FROM_INFERENCE
    assert not ALLOWED["serving"] & NEVER_FROM_INFERENCE


def test_the_checker_sees_lazy_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from lmops_jax.training import trainer\n    import lmops_jax.data.tasks\n")
    assert imported_subsystems(source) == [(2, "training"), (3, "data")]
