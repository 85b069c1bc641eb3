"""Gin text from Python objects: the config a run or a conversion writes when no gin file made it.

A run started from Python (`training.train.train(...)`) or a converted checkpoint has no gin config, yet
its `config.gin` should say what ran and let the CLI pick it up. `render` writes macros whose values are
literals or dataclass instances; an instance becomes `@module.Class()` with one binding per init field,
recursively for nested dataclasses (e.g. a model and its config):

    from __gin__ import dynamic_registration
    from lmops_jax.models import decoder_only
    from lmops_jax.models import model

    MODEL = @model.DecoderOnlyModel()
    model.DecoderOnlyModel.config = @decoder_only.LlamaConfig()
    decoder_only.LlamaConfig.vocab_size = 512
    ...

Classes and functions are written as references (`@trainer.Trainer`), `Macro("X")` as `%X`. Gin binds
per class, so two different instances of one class cannot both be rendered.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Mapping


class GinRenderError(ValueError):
    """A value that gin text cannot express; the message names the macro and field."""


def _literal(value: Any, where: str) -> str:
    """repr() of a value gin parses back to an equal value."""
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise GinRenderError(f"{where} = {value!r}: gin has no literal for a non-finite float")
        return repr(value)
    if isinstance(value, (list, tuple)):
        items = [_literal(v, where) for v in value]
        if isinstance(value, list):
            return "[" + ", ".join(items) + "]"
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_literal(k, where)}: {_literal(v, where)}" for k, v in value.items()) + "}"
    raise GinRenderError(f"{where} holds a {type(value).__name__}, which gin text cannot express")


@dataclasses.dataclass(frozen=True)
class Macro:
    """A binding value written as a reference to a macro, `%NAME`."""
    name: str


class _Renderer:
    """Collects the import lines and bindings of the objects rendered so far."""

    def __init__(self):
        self.imports: dict[str, str] = {}  # module path -> alias
        self.bindings: list[str] = []
        self.rendered: dict[str, Any] = {}  # "alias.Class" -> instance

    def name(self, obj: Any) -> str:
        """`alias.Qualname` of a class or function, importing its module."""
        module = obj.__module__
        if module not in self.imports:
            alias = module.rsplit(".", 1)[-1]
            if alias in self.imports.values():
                raise GinRenderError(f"two rendered modules are both named {alias!r} ({module})")
            self.imports[module] = alias
        return f"{self.imports[module]}.{obj.__qualname__}"

    def value(self, value: Any, where: str) -> str:
        if isinstance(value, Macro):
            return f"%{value.name}"
        if isinstance(value, type) or inspect.isfunction(value):
            return f"@{self.name(value)}"
        if not dataclasses.is_dataclass(value):
            return _literal(value, where)
        name = self.name(type(value))
        if name in self.rendered:
            if self.rendered[name] != value:
                raise GinRenderError(f"{where}: a second, different {type(value).__qualname__}; gin binds per class")
            return f"@{name}()"
        self.rendered[name] = value
        for field in dataclasses.fields(value):
            if field.init:
                self.bind(name, field.name, getattr(value, field.name))
        return f"@{name}()"

    def bind(self, target: str, param: str, value: Any) -> None:
        """Appends `target.param = value`, or a comment saying why gin text cannot hold the value."""
        try:
            self.bindings.append(f"{target}.{param} = {self.value(value, f'{target}.{param}')}")
        except GinRenderError as e:
            self.bindings.append(f"# not written: {e}")


def render(macros: Mapping[str, Any], calls: Mapping[Callable, Mapping[str, Any]] | None = None,
           header: str = "") -> str:
    """Gin text defining each macro and binding each call's parameters (module docstring).

    `header` becomes leading comment lines. A value gin cannot express (a lambda, a functools.partial, a
    device) is left out with a `# not written: ...` comment, so the text stays a faithful record.
    """
    renderer = _Renderer()
    macro_lines = []
    for name, value in macros.items():
        try:
            macro_lines.append(f"{name} = {renderer.value(value, name)}")
        except GinRenderError as e:
            macro_lines.append(f"# not written: {e}")
    for fn, params in (calls or {}).items():
        target = renderer.name(fn)
        for param, value in params.items():
            renderer.bind(target, param, value)
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += ["from __gin__ import dynamic_registration"]
    lines += [f"from {module.rsplit('.', 1)[0]} import {alias}" for module, alias in renderer.imports.items()]
    return "\n".join(lines + [""] + macro_lines + [""] + renderer.bindings) + "\n"
