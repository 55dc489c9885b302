"""PromptSource templates, read from their ``templates.yaml`` and rendered as PromptSource
renders them, without the ``promptsource`` package (it does not install on Python 3.11).

A template is a jinja string whose output is split on ``|||`` into the model's input and
the target; ``answer_choices`` is itself a jinja string split on ``|||`` and is visible
to the template as a list. The semantics kept from PromptSource (promptsource/templates.py):
- the jinja environment is jinja2's default (no autoescape, no trimmed blocks);
- every ``{{ ... }}`` value is turned into a string and truncated to 2048 characters
  (jinja's ``truncate``: a 5-character leeway, cut at a word, ``...`` appended);
- ``|||`` inside an example's own strings is protected while rendering and restored after;
- each part, and each answer choice, is stripped of surrounding whitespace.
PromptSource also defines ``choice`` (a random pick), ``most_frequent`` and ``highlight``
filters and a ``zip`` global; none of the templates shipped here uses them, so they are
left out and a template that did use one fails to load with jinja's own message.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from opt.errors import OptError

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
"""The shipped templates (PromptSource's, verbatim; see templates/NOTICE)."""

SEPARATOR = "|||"
TEXT_VAR_LENGTH = 2048  # PromptSource's cap on a substituted value, in characters
_PIPE_GUARD = "\x00opt-pipe\x00"  # stands in for "|||" inside example strings


@dataclass(frozen=True)
class Rendered:
    """One example under one template: the model's input, the gold target, the choices."""

    input: str
    target: str
    choices: tuple[str, ...]

    @property
    def gold(self) -> int:
        """Index of the target among the choices (the label mapping the template encodes)."""
        return self.choices.index(self.target)


@dataclass(frozen=True)
class Template:
    """One PromptSource template (the fields of its ``!Template`` entry that scoring uses)."""

    id: str
    name: str
    jinja: str
    answer_choices: str | None
    original_task: bool | None
    choices_in_prompt: bool | None
    reference: str = ""

    @cached_property
    def _compiled(self):
        return _environment().from_string(self.jinja)

    @cached_property
    def _compiled_choices(self):
        return (
            None if self.answer_choices is None else _environment().from_string(self.answer_choices)
        )

    def choices(self, example: dict) -> tuple[str, ...] | None:
        """The answer choices for ``example`` (None for an open-ended template)."""
        if self._compiled_choices is None:
            return None
        text = self._compiled_choices.render(**_protect(example))
        return tuple(_restore(c).strip() for c in text.split(SEPARATOR))

    def apply(self, example: dict) -> list[str]:
        """The rendered parts, as PromptSource's ``Template.apply`` returns them: usually
        ``[input, target]``; ``[""]`` when the template does not apply to the example (a
        COPA template written only for the "effect" questions, say)."""
        if "answer_choices" in example:
            raise OptError(f"template {self.name!r}: the example has a field 'answer_choices'")
        values = _protect(example)
        values["answer_choices"] = self.choices(example)
        text = self._compiled.render(**values)
        return [_restore(part).strip() for part in text.split(SEPARATOR)]

    def render(self, example: dict) -> Rendered | None:
        """Input, target and choices for rank classification, or None when the template
        does not apply to this example or gives it no target among its choices (an
        unlabelled test example)."""
        choices = self.choices(example)
        if choices is None:
            raise OptError(f"template {self.name!r} has no answer choices to rank")
        parts = self.apply(example)
        if len(parts) != 2 or not parts[0] or parts[1] not in choices:
            return None
        return Rendered(input=parts[0], target=parts[1], choices=choices)


def load_templates(
    dataset: str, subset: str | None = None, root: Path | None = None
) -> list[Template]:
    """The templates of ``dataset``/``subset`` from ``root`` (default: the shipped ones),
    in file order."""
    root = TEMPLATES_DIR if root is None else Path(root)
    path = root / dataset / (subset or "") / "templates.yaml"
    if not path.is_file():
        raise OptError(f"no PromptSource templates for {dataset}/{subset}: {path} not found")
    return load_template_file(path)[2]


def load_template_file(path: Path) -> tuple[str | None, str | None, list[Template]]:
    """(dataset, subset, templates) of one PromptSource ``templates.yaml``: the dataset and
    subset it names at its top (None where absent), its templates in file order."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_loader())
    except OSError as err:
        raise OptError(f"cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise OptError(f"cannot read {path}: {err}") from None
    if not isinstance(doc, dict):
        raise OptError(f"{path} is not a PromptSource templates file (no mapping at its top)")
    templates = []
    for key, entry in (doc.get("templates") or {}).items():
        if not isinstance(entry, dict) or not {"name", "jinja"} <= entry.keys():
            raise OptError(f"{path}: template {key!r} needs a 'name' and a 'jinja'")
        meta = entry.get("metadata") or {}
        templates.append(
            Template(
                id=str(entry.get("id", key)),
                name=str(entry["name"]),
                jinja=entry["jinja"],
                answer_choices=entry.get("answer_choices"),
                original_task=meta.get("original_task"),
                choices_in_prompt=meta.get("choices_in_prompt"),
                reference=entry.get("reference") or "",
            )
        )
    subset = doc.get("subset")
    dataset = doc.get("dataset")
    return (
        None if dataset is None else str(dataset),
        None if subset is None else str(subset),
        templates,
    )


def select_templates(templates: list[Template], names: str | list[str] | None) -> list[Template]:
    """``None`` or ``"all"``: every original-task template (PromptSource's own test of a
    prompt for the task it was made for); otherwise the named ones, in the order given."""
    if names is None or names == "all":
        return [t for t in templates if t.original_task]
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    by_name = {t.name: t for t in templates}
    missing = [n for n in names if n not in by_name]
    if missing:
        known = ", ".join(repr(t.name) for t in templates)
        raise OptError(f"unknown template {missing[0]!r}; this task has {known}")
    return [by_name[n] for n in names]


def _loader():
    """A safe YAML loader that reads PromptSource's ``!Template`` and ``!TemplateMetadata``
    tags as plain mappings."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        return loader.construct_mapping(node, deep=True)

    Loader.add_constructor("!Template", mapping)
    Loader.add_constructor("!TemplateMetadata", mapping)
    return Loader


_ENV = None


def _environment():
    global _ENV
    if _ENV is None:
        import jinja2
        from jinja2.filters import do_truncate

        # PromptSource appends `| string | truncate(2048)` to every `{{ ... }}`; a finalize
        # hook applies the same to every printed value.
        def finalize(value):
            return do_truncate(env, str(value), TEXT_VAR_LENGTH)

        env = jinja2.Environment(finalize=finalize)
        _ENV = env
    return _ENV


def _protect(example: dict) -> dict:
    return {
        k: v.replace(SEPARATOR, _PIPE_GUARD) if isinstance(v, str) else v
        for k, v in example.items()
    }


def _restore(text: str) -> str:
    return text.replace(_PIPE_GUARD, SEPARATOR)
