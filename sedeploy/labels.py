"""Ground-truth class indices for an image folder.

Accuracy figures are only as good as the labels behind them, and the commonest silent error is a mapping that is
off: an Imagenette folder read as classes 0–9 for a 1000-class model, or a labels file whose indices come from
another class order. So every rule here is explicit, and everything that does not fit raises
:class:`~sedeploy.errors.SedeployError` naming the files or folders concerned.

Where labels come from (:func:`resolve_labels`), first match wins:

1. A labels file: one ``file<TAB>label`` line per image, ``file`` relative to the image folder,
   ``label`` a class index or a synset ID. Every file it names must exist; every image evaluated must be listed.
2. Class subfolders (ImageFolder layout, ``root/<class>/*.jpg``):

   - numeric names (``0``, ``217``) are class indices, which must be < ``num_classes``;
   - synset names (``n01440764``) map by the first rule that applies:

     a. ``model_classes`` given (the model's own synset list, in output order): index = position in it;
     b. ``num_classes`` == size of the synset table (1000): index = position in the table
        (Imagenette's 10 folders → 0, 217, 482, 491, 497, 566, 569, 571, 574, 701);
     c. ``num_classes`` == the number of class folders: index = rank of the folder name in sorted order, the
        ImageFolder convention of a model trained on exactly these folders (Imagenette → 0…9);
     d. otherwise: an error (the folders cannot be matched to the model's classes).
3. A flat folder whose file names start with a synset ID (``n01440764_tench.JPEG``): as 2, per file.
4. A flat folder of anything else: no labels (accuracy falls back to agreement with the reference).

The class tables (the ImageNet order, synset tables, class-name files) are in :mod:`sedeploy.classes`.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from sedeploy.classes import is_index, is_synset, read_text_file, shown_names, synset_index
from sedeploy.errors import SedeployError

log = logging.getLogger("sedeploy")

__all__ = ["Labels", "read_labels_file", "resolve_labels", "resolve_labels_offset"]

_SYNSET_PREFIX_RE = re.compile(r"^(n[0-9]{8})(?:[_.\-]|$)")


@dataclass(frozen=True)
class Labels:
    """Ground truth for a list of images: ``indices[i]`` is the class of ``paths[i]`` in the model's output order."""

    indices: np.ndarray  # int64, one per image
    source: str  # "labels file" | "index folders" | "synset folders" | "synset file names"
    rule: str  # how names became indices, for the report
    classes: dict[str, int] = field(default_factory=dict)  # class name seen → index

    def as_dict(self) -> dict:
        return {"source": self.source, "rule": self.rule, "n_images": int(self.indices.size),
                "n_classes_present": int(np.unique(self.indices).size), "classes": dict(self.classes)}


def read_labels_file(path: str | os.PathLike) -> list[tuple[int, str, str]]:
    """Parse ``file<TAB>label`` lines → [(line number, file, label text)]. Blank and ``#`` lines are skipped;
    a first line whose label is neither an integer nor a synset is taken as a header."""
    p = Path(path)
    text = read_text_file(p, "labels file", "a text file with one 'file<TAB>class index' line per image")
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split("\t") if "\t" in line else line.rsplit(None, 1)
        if len(fields) < 2 or not fields[0].strip():
            raise SedeployError(f"Line {lineno} of the labels file '{p}' has no label: {line[:80]!r}.",
                                expected="file<TAB>class index (or file<TAB>synset ID)")
        name, label = fields[0].strip(), fields[1].strip()
        if not (is_index(label) or is_synset(label)):
            if not entries and lineno == 1:
                continue  # header
            raise SedeployError(f"Line {lineno} of the labels file '{p}': label {label!r} is neither a class index "
                                "nor a synset ID.", expected="an integer such as 472, or a synset such as n01440764")
        entries.append((lineno, name, label))
    if not entries:
        raise SedeployError(f"The labels file '{p}' contains no labels.",
                            expected="one 'file<TAB>class index' line per image")
    return entries


class _SynsetMapper:
    """Turns synset IDs into model indices by the rules a–d of the module docstring."""

    def __init__(self, present: Sequence[str], *, num_classes: int, synsets, model_classes, where: str):
        self.where = where
        if model_classes is not None:
            table = list(model_classes)
            if len(table) != num_classes:
                raise SedeployError(f"model_classes lists {len(table)} classes but the model has {num_classes}.",
                                    fix="pass the model's synsets in output order, one per class")
            self.map, self.rule = {s: i for i, s in enumerate(table)}, "position in the model's class list"
        else:
            table_map = synset_index(synsets)
            distinct = sorted(set(present))
            if num_classes == len(table_map):
                self.map = table_map
                self.rule = f"position in the {len(table_map)}-class synset table (sorted WordNet IDs)"
            elif num_classes == len(distinct):
                self.map = {s: i for i, s in enumerate(distinct)}
                self.rule = (f"rank in sorted order of the {len(distinct)} synset classes present "
                             f"(a model trained on exactly these classes)")
            else:
                raise SedeployError(
                    f"{where} has {len(distinct)} synset classes ({shown_names(distinct, 5)}), which cannot be "
                    f"matched to a model with {num_classes} classes.",
                    expected=f"a {len(table_map)}-class model (synset-table order), or a model with exactly "
                             f"{len(distinct)} classes (sorted-synset order)",
                    fix="pass the model's class list (model_classes), or a labels file with class indices")
        unknown = sorted({s for s in present if s not in self.map})
        if unknown:
            raise SedeployError(f"{where} has classes the model does not have: {shown_names(unknown)}.",
                                expected=f"synsets among the model's {num_classes} classes ({self.rule})",
                                fix="remove those folders/files, or pass the right class table")

    def __call__(self, synset: str) -> int:
        return self.map[synset]


def resolve_labels(paths: Sequence[str | os.PathLike], root: str | os.PathLike, *, num_classes: int,
                   labels_file: str | os.PathLike | None = None,
                   synsets: Sequence[str] | str | os.PathLike | None = None,
                   model_classes: Sequence[str] | None = None) -> Labels | None:
    """Class indices for ``paths`` (images under ``root``, e.g. the files :func:`sedeploy.preprocess.load_batch`
    actually loaded), for a model with ``num_classes`` outputs; None for a flat folder without labels.

    ``synsets``: the class-order table (default :data:`sedeploy.classes.IMAGENET_SYNSETS`; a path is read with
    :func:`read_synset_table`). ``model_classes``: the model's own synsets in output order, which overrides the
    folder rules. The rules are in the module docstring.
    """
    if num_classes < 1:
        raise SedeployError(f"num_classes = {num_classes}.", expected="the model's number of output classes, ≥ 1")
    root = Path(root)
    files = [Path(p) for p in paths]
    if not files:
        raise SedeployError(f"No images to label under '{root}'.")
    rel = []
    for p in files:
        try:
            rel.append(p.relative_to(root))
        except ValueError:
            raise SedeployError(f"The image '{p}' is not inside the folder '{root}'.") from None
    if labels_file is not None:
        return _from_labels_file(files, rel, root, Path(labels_file), num_classes, synsets, model_classes)
    nested = [r for r in rel if len(r.parts) > 1]
    if nested and len(nested) != len(rel):
        flat = [str(r) for r in rel if len(r.parts) == 1]
        raise SedeployError(f"'{root}' mixes class subfolders with images directly in the folder "
                            f"({shown_names(flat, 5)}); those images have no class.",
                            fix="move them into a class folder, or pass a labels file")
    if nested:
        return _from_folders([r.parts[0] for r in rel], root, num_classes, synsets, model_classes)
    prefixes = [_SYNSET_PREFIX_RE.match(r.name) for r in rel]
    if all(prefixes):
        names = [m.group(1) for m in prefixes]
        mapper = _SynsetMapper(names, num_classes=num_classes, synsets=synsets, model_classes=model_classes,
                               where=f"The file names in '{root}'")
        return Labels(np.array([mapper(s) for s in names], np.int64), "synset file names",
                      f"synset ID at the start of each file name → {mapper.rule}",
                      {s: mapper(s) for s in sorted(set(names))})
    log.info("No labels for '%s' (a flat folder without a labels file): accuracy is measured as agreement with "
             "the reference only.", root)
    return None


def _class_folders(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _from_folders(classes: list[str], root: Path, num_classes: int, synsets, model_classes) -> Labels:
    # The class set is every class folder of root (ImageFolder convention), not only those the images
    # evaluated come from: evaluating the first 100 images must not change the mapping.
    folders = _class_folders(root)
    if all(is_index(f) and not f.startswith("-") for f in folders):
        bad = sorted((f for f in folders if int(f) >= num_classes), key=int)
        if bad:
            raise SedeployError(f"'{root}' has class folders the model does not have: {shown_names(bad)}.",
                                expected=f"folder names 0…{num_classes - 1} for a model with {num_classes} classes",
                                fix="check the model's number of classes, or remove those folders")
        return Labels(np.array([int(c) for c in classes], np.int64), "index folders",
                      "folder name is the class index", {f: int(f) for f in folders})
    if all(is_synset(f) for f in folders):
        mapper = _SynsetMapper(folders, num_classes=num_classes, synsets=synsets, model_classes=model_classes,
                               where=f"The folder '{root}'")
        return Labels(np.array([mapper(c) for c in classes], np.int64), "synset folders",
                      f"folder synset → {mapper.rule}", {f: mapper(f) for f in folders})
    odd = [f for f in folders if not ((is_index(f) and not f.startswith("-")) or is_synset(f))]
    raise SedeployError(f"The class folders of '{root}' are neither all class indices nor all synset IDs: "
                        f"{shown_names(odd or folders)}.",
                        expected="ImageFolder subfolders named n01440764 … (WordNet IDs) or 0 … (class indices)",
                        fix="rename the folders, or pass a labels file (file<TAB>class index)")


def _from_labels_file(files: list[Path], rel: list[Path], root: Path, labels_file: Path, num_classes: int,
                      synsets, model_classes) -> Labels:
    entries = read_labels_file(labels_file)
    missing = [name for _, name, _ in entries if not (root / name).is_file()]
    if missing:
        raise SedeployError(f"The labels file '{labels_file}' names {len(missing)} file(s) that are not in "
                            f"'{root}': {shown_names(missing, 5)}.",
                            fix="pass the folder the labels file was written for, or fix the file names")
    synset_labels = [label for _, _, label in entries if is_synset(label)]
    mapper = None
    if synset_labels:
        mapper = _SynsetMapper(synset_labels, num_classes=num_classes, synsets=synsets,
                               model_classes=model_classes, where=f"The labels file '{labels_file}'")
    by_name: dict[str, tuple[int, int]] = {}
    out_of_range = []
    for lineno, name, label in entries:
        idx = mapper(label) if is_synset(label) else int(label)
        if not 0 <= idx < num_classes:
            out_of_range.append(f"line {lineno}: {name} → {idx}")
        key = Path(name).as_posix()
        if key in by_name and by_name[key][0] != idx:
            raise SedeployError(f"The labels file '{labels_file}' gives '{name}' two labels "
                                f"(lines {by_name[key][1]} and {lineno}).")
        by_name[key] = (idx, lineno)
    if out_of_range:
        raise SedeployError(f"The labels file '{labels_file}' has class indices outside 0…{num_classes - 1}: "
                            f"{shown_names(out_of_range, 5)}.",
                            expected=f"indices the {num_classes}-class model can output",
                            fix="check the model's number of classes and the labels file's class order")
    indices, unlabelled = [], []
    for r in rel:
        hit = by_name.get(r.as_posix())
        if hit is None:
            unlabelled.append(r.as_posix())
        else:
            indices.append(hit[0])
    if unlabelled:
        raise SedeployError(f"{len(unlabelled)} image(s) in '{root}' have no line in the labels file "
                            f"'{labels_file}': {shown_names(unlabelled, 5)}.",
                            fix="add them to the labels file, or evaluate only the labelled images")
    rule = "file<TAB>class index" + (f"; synset labels → {mapper.rule}" if mapper else "")
    present = sorted({i for i in indices})
    return Labels(np.array(indices, np.int64), "labels file", rule, {str(i): i for i in present})


def resolve_labels_offset(paths: Sequence[str | os.PathLike], root: str | os.PathLike, *, num_classes: int,
                          label_offset: int = 0, **kwargs) -> Labels | None:
    """:func:`resolve_labels` for a model whose output ``k + label_offset`` is dataset class ``k`` — e.g. a
    1001-class ImageNet model with a background class at index 0 (``label_offset=1``). The folder/file rules run
    against the ``num_classes - label_offset`` dataset classes; the indices are then shifted."""
    if isinstance(label_offset, bool) or not isinstance(label_offset, int) or not 0 <= label_offset < num_classes:
        raise SedeployError(f"--label-offset {label_offset!r} is not valid for a model with {num_classes} outputs.",
                            expected=f"a whole number in [0, {num_classes - 1}]; 1 for 1001-class ImageNet models "
                                     "with a background class")
    lab = resolve_labels(paths, root, num_classes=num_classes - label_offset, **kwargs)
    if lab is None or not label_offset:
        return lab
    return Labels(indices=lab.indices + label_offset, source=lab.source,
                  rule=f"{lab.rule}; then + {label_offset} (--label-offset: model output k + {label_offset} is "
                       "dataset class k)", classes={k: v + label_offset for k, v in lab.classes.items()})
