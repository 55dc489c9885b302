"""Tasks and their data, read from local files (nothing is downloaded).

A task is the dataset's fields, its PromptSource template set, and the mapping of its
labels to indices (index ``i`` is the template's ``answer_choices[i]``). Data for a task
lives under ``DATA_DIR/<task>/`` as one of:
- ``<split>.jsonl``: one example per line with the Hugging Face ``super_glue`` fields
  (``premise``, ``hypothesis``, ``label``, ``idx``, ...). The SuperGLUE site's own files
  are read too: their string or boolean labels and WSC's nested ``target`` are mapped to
  the Hugging Face form, and ``val.jsonl`` stands for the ``validation`` split;
- a directory written by ``datasets``' ``save_to_disk`` (a DatasetDict holding the split,
  or a single Dataset under ``<split>/``), read when the ``datasets`` package is importable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from opt.errors import OptError
from opt.eval.prompts import Template, load_template_file, load_templates


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str  # PromptSource's folder names
    subset: str | None
    fields: tuple[str, ...]  # what every example must hold (beyond the label)
    labels: tuple  # the raw labels SuperGLUE's own files use, in label-index order
    superglue_dir: str  # the folder name in SuperGLUE's zip
    templates_file: Path | None = None  # a task of the user's: its templates.yaml

    def templates(self) -> list[Template]:
        if self.templates_file is not None:
            return load_template_file(self.templates_file)[2]
        return load_templates(self.dataset, self.subset)


def user_task(name: str, templates_file: str | Path) -> Task:
    """A task the user defines: a PromptSource-format ``templates.yaml`` whose templates
    render the examples as they are (``label`` or whatever fields they read; nothing is
    mapped), and data under ``DATA_DIR/<name>/`` as for the known tasks."""
    path = Path(templates_file)
    if not name.isidentifier():
        raise OptError(f"task name {name!r}: use letters, digits and underscores")
    if name in TASKS:
        raise OptError(f"task name {name!r} is a known task's; name yours otherwise")
    if not path.is_file():
        raise OptError(f"task {name!r}: templates file not found: {path}")
    return Task(name, "", None, (), (), name, path)


TASKS = {
    t.name: t
    for t in (
        Task("rte", "super_glue", "rte", ("premise", "hypothesis"),
             ("entailment", "not_entailment"), "RTE"),
        Task("cb", "super_glue", "cb", ("premise", "hypothesis"),
             ("entailment", "contradiction", "neutral"), "CB"),
        Task("copa", "super_glue", "copa", ("premise", "choice1", "choice2", "question"),
             (0, 1), "COPA"),
        Task("wic", "super_glue", "wic", ("word", "sentence1", "sentence2"),
             (False, True), "WiC"),
        Task("wsc", "super_glue", "wsc.fixed",
             ("text", "span1_index", "span2_index", "span1_text", "span2_text"),
             (False, True), "WSC"),
    )
}  # fmt: skip
"""The tasks ``opt eval`` knows, by the name ``--tasks`` takes."""


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise OptError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def parse_tasks(spec: str | list[str]) -> list[Task]:
    """Tasks from ``rte,cb`` (known names) and ``NAME=TEMPLATES.yaml`` (a user's task)."""
    items = spec.split(",") if isinstance(spec, str) else spec
    items = [n.strip() for n in items if n.strip()]
    if not items:
        raise OptError("no tasks given")
    tasks = [user_task(*n.split("=", 1)) if "=" in n else get_task(n) for n in items]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise OptError(f"a task is named twice: {', '.join(names)}")
    return tasks


def load_examples(task: Task, data_dir: str | Path, split: str) -> list[dict]:
    """Every example of ``split``, in file order, with the Hugging Face fields and an
    integer ``label`` (-1 where the split is unlabelled, as Hugging Face marks it)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise OptError(f"data directory not found: {root}")
    candidates = [root / task.name, root / task.superglue_dir]
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise OptError(
            f"no data for task {task.name!r}: neither {candidates[0]} nor {candidates[1]} exists"
        )
    names = [f"{split}.jsonl"] + (["val.jsonl"] if split == "validation" else [])
    jsonl = next((folder / n for n in names if (folder / n).is_file()), None)
    if jsonl is not None:
        rows = read_jsonl(jsonl)
    elif is_saved_dataset(folder, split):
        rows = read_saved_dataset(folder, split)
    else:
        raise OptError(
            f"no {split!r} split for task {task.name!r}: expected {folder / names[0]} or a saved dataset"
        )
    examples = [_normalise(task, row, f"{jsonl or folder}:{i + 1}") for i, row in enumerate(rows)]
    if not examples:
        raise OptError(f"the {split!r} split of task {task.name!r} is empty")
    return examples


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise OptError(f"{path}:{n}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise OptError(f"{path}:{n}: expected one JSON object per line")
        rows.append(row)
    return rows


def is_saved_dataset(folder: Path, split: str) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        folder / split / "dataset_info.json"
    ).is_file()


def read_saved_dataset(folder: Path, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise OptError(
            f"{folder} is a saved Hugging Face dataset, and reading one needs the `datasets` "
            "package (pip install datasets), or convert it to JSONL"
        ) from None
    if (folder / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(folder))
        if split not in saved:
            raise OptError(f"{folder} has no split {split!r} (it has {', '.join(saved)})")
        return [dict(r) for r in saved[split]]
    return [dict(r) for r in datasets.load_from_disk(str(folder / split))]


def _normalise(task: Task, row: dict, where: str) -> dict:
    """The example in Hugging Face's form: SuperGLUE's own files nest WSC's spans under
    ``target`` and spell labels as strings or booleans."""
    row = dict(row)
    if isinstance(row.get("target"), dict) and "span1_index" not in row:
        row.update(row.pop("target"))
    missing = [f for f in task.fields if f not in row]
    if missing:
        raise OptError(f"{where}: a {task.name} example needs field {missing[0]!r}")
    if not task.labels:  # a user's task: its templates read the fields as they are
        return row
    label = row.get("label", -1)
    if isinstance(label, bool) or not isinstance(label, int):
        if label not in task.labels:
            raise OptError(f"{where}: label {label!r} is not one of {list(task.labels)}")
        label = task.labels.index(label)
    elif not -1 <= label < len(task.labels):
        raise OptError(f"{where}: label {label} is out of range for {task.name}")
    row["label"] = label
    return row
