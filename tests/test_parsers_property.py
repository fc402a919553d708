"""Property-based tests (Hypothesis) of the parsers of user input: whatever a user types or points at, the result
is either a correct parse or one SedeployError — never another exception, a hang, or a silently wrong value."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sedeploy.errors import SedeployError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FILES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------ --batch 1,8,32
@FAST
@given(st.lists(st.integers(1, 4096), min_size=1, max_size=8), st.sampled_from([",", ", ", " ,"]))
def test_batch_list_round_trips(sizes, sep):
    from sedeploy.cli import parse_batch_list

    assert parse_batch_list(sep.join(map(str, sizes))) == list(dict.fromkeys(sizes))


@pytest.mark.parametrize("text", ["1,,8", "1,", ",8", ",", "", " "])
def test_batch_list_empty_entries_are_refused(text):
    from sedeploy.cli import parse_batch_list

    with pytest.raises(SedeployError, match=f"--batch '{text}' is not valid"):
        parse_batch_list(text)


@FAST
@given(st.text(max_size=30))
def test_batch_list_any_text_parses_or_is_one_error(text):
    from sedeploy.cli import MAX_BATCH, parse_batch_list

    try:
        sizes = parse_batch_list(text)
    except SedeployError as err:
        assert "--batch" in str(err)
        return
    assert sizes and all(isinstance(b, int) and 1 <= b <= MAX_BATCH for b in sizes)
    assert len(set(sizes)) == len(sizes)


# ------------------------------------------------------------------------------------------ --mean / --std
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@FAST
@given(st.tuples(finite, finite, finite))
def test_mean_round_trips(values):
    from sedeploy.cli import parse_triple

    assert parse_triple(",".join(repr(v) for v in values), "--mean") == values


@FAST
@given(st.text(max_size=40))
def test_triple_any_text_parses_or_is_one_error(text):
    import math

    from sedeploy.cli import parse_triple

    for positive in (False, True):
        try:
            values = parse_triple(text, "--std", positive=positive)
        except SedeployError as err:
            assert "--std" in str(err)
            continue
        assert len(values) == 3 and all(math.isfinite(v) for v in values)
        assert not positive or min(values) > 0


@pytest.mark.parametrize("text", ["nan,1,2", "inf,1,1", "1,2", "1,2,3,4", "58,0,57", "a,b,c", ""])
def test_std_rejects_what_would_divide_wrongly(text):
    from sedeploy.cli import parse_triple

    with pytest.raises(SedeployError):
        parse_triple(text, "--std", positive=True)


# ------------------------------------------------------------------------------------------ labels files
name = st.from_regex(r"[A-Za-z0-9_]{1,8}\.jpg", fullmatch=True)


@FILES
@given(st.binary(max_size=300))
def test_labels_file_any_bytes_parse_or_one_error(tmp_path, data):
    from sedeploy.labels import read_labels_file

    p = tmp_path / "labels.tsv"
    p.write_bytes(data)
    try:
        entries = read_labels_file(p)
    except SedeployError:
        return
    for lineno, fname, lab in entries:
        assert lineno >= 1 and fname and lab.isascii()
        if not lab.startswith("n"):
            int(lab)  # every accepted index converts with int() (no '²')


valid_label = st.one_of(st.integers(0, 2000).map(str), st.from_regex(r"n[0-9]{8}", fullmatch=True))
bad_label = st.one_of(st.sampled_from(["²", "٣", "1.5", "cat", "n123", "0x10", "+-1"]),
                      st.text(st.characters(blacklist_categories=("Nd", "Zs", "Zl", "Zp", "Cc", "Cs")), min_size=1,
                              max_size=5))


@FILES
@given(st.lists(st.tuples(name, valid_label), min_size=1, max_size=10, unique_by=lambda t: t[0]),
       st.sampled_from(["\t", " ", "  "]))
def test_labels_file_valid_lines_round_trip(tmp_path, rows, sep):
    from sedeploy.labels import read_labels_file

    p = tmp_path / "labels.tsv"
    p.write_text("# comment\n" + "".join(f"{n}{sep}{lab}\n" for n, lab in rows), encoding="utf-8")
    assert [(n, lab) for _, n, lab in read_labels_file(p)] == rows


@FILES
@given(st.lists(st.tuples(name, valid_label), min_size=1, max_size=6, unique_by=lambda t: t[0]), bad_label,
       st.data())
def test_labels_file_one_bad_label_is_one_error(tmp_path, rows, bad, data):
    from sedeploy.labels import read_labels_file

    assume(bad.strip() and "\t" not in bad and not bad.strip().startswith("#"))
    at = data.draw(st.integers(1, len(rows)))  # never line 1: a bad first line is a header
    lines = [f"{n}\t{lab}" for n, lab in rows]
    lines.insert(at, f"bad.jpg\t{bad}")
    p = tmp_path / "labels.tsv"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SedeployError, match=f"Line {at + 1} of the labels file"):
        read_labels_file(p)


@FILES
@given(st.text(max_size=200))
def test_synset_table_any_text_parses_or_one_error(tmp_path, text):
    from sedeploy.classes import SYNSET_RE, read_synset_table

    p = tmp_path / "synsets.txt"
    p.write_text(text, encoding="utf-8")
    try:
        table = read_synset_table(p)
    except SedeployError:
        return
    assert table and len(set(table)) == len(table) and all(SYNSET_RE.match(s) for s in table)


# ------------------------------------------------------------------------------------------ image folders
EXTS = [".jpg", ".JPEG", ".png", ".txt", ".md", ".bin", ""]
entry = st.tuples(st.sampled_from(["", "cls_a", "cls_b", ".hidden"]),
                  st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True), st.sampled_from(EXTS),
                  st.sampled_from(["file", "file", "file", "fifo", "dangling", "dir"]))


@FILES
@given(st.lists(entry, max_size=12))
def test_find_images_on_any_tree(entries):
    """The images found are exactly the regular files (or links to them) with an image extension, outside hidden
    names, in sorted order; FIFOs, broken links and folders are never returned (and never opened)."""
    from sedeploy.preprocess import IMAGE_EXTENSIONS, find_images

    root = Path(tempfile.mkdtemp(prefix="sedeploy-prop-"))
    try:
        expected = set()
        for sub, stem, ext, kind in entries:
            folder = root / sub if sub else root
            folder.mkdir(exist_ok=True)
            path = folder / f"{stem}{ext}"
            if path.exists() or path.is_symlink():
                continue
            if kind == "file":
                path.write_bytes(b"not really an image")
            elif kind == "fifo":
                os.mkfifo(path)
            elif kind == "dangling":
                path.symlink_to(folder / "missing-target")
            else:
                path.mkdir()
            hidden = stem.startswith(".") or sub.startswith(".")
            if kind == "file" and path.suffix.lower() in IMAGE_EXTENSIONS and not hidden:
                expected.add(path)
        try:
            found = find_images(root)
        except SedeployError as err:
            assert not expected and "contains no images" in str(err)
            return
        assert set(found.paths) == expected
        rel = [p.relative_to(root).parts for p in found.paths]
        assert len(found.paths) == len(found.classes)
        for parts, cls in zip(rel, found.classes):
            assert cls == (parts[0] if len(parts) > 1 else None)
    finally:
        shutil.rmtree(root)


@FAST
@given(st.integers(-10**6, 10**6))
def test_input_size_is_accepted_exactly_in_range(size):
    from sedeploy.export import MAX_INPUT_SIZE, check_export_options

    try:
        check_export_options(input_size=size)
    except SedeployError as err:
        assert not 32 <= size <= MAX_INPUT_SIZE and "--input-size" in str(err)
        return
    assert 32 <= size <= MAX_INPUT_SIZE


@FAST
@given(st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True))
def test_num_classes_and_atol(num_classes, atol):
    from sedeploy.export import check_export_options

    try:
        check_export_options(num_classes=num_classes, atol=atol)
    except SedeployError:
        assert num_classes < 1 or not (0 <= atol < float("inf"))
        return
    assert num_classes >= 1 and 0 <= atol < float("inf")
