"""The data files `defend` reads (--train, --dev, --test-clean, --test-poison, --data DIR): an error names the file
and row (and column), and quotes nothing of a file that is not data; non-UTF-8 bytes, linked files, malformed CSV and
JSONL rows, the JSON parser's limits; labels checked against the number of classes before anything is allocated.

The huge-label case runs in a subprocess under an address-space limit (tests/utils.py: run_limited)."""

import pytest

from .utils import cli, files_argv, one_line, rows_csv, run_limited, two_class_rows


# -- non-UTF-8 bytes: the file, row and column named -------------------------------------------------------------------
@pytest.mark.parametrize("suffix, row, column", [(".csv", 3002, 4), (".jsonl", 3001, 14)])
def test_non_utf8_names_file_and_row(capsys, tmp_path, suffix, row, column):
    bad = tmp_path / f"latin1{suffix}"
    if suffix == ".csv":
        body = "text,label\n" + "a fine film,1\n" * 3000 + "caf\xe9 au lait,0\n"  # past the decoder's first chunk
    else:
        body = '{"text": "a fine film", "label": 1}\n' * 3000 + '{"text": "caf\xe9", "label": 0}\n'
    bad.write_bytes(body.encode("latin-1"))
    good = rows_csv(tmp_path / "good.csv", two_class_rows())
    code, err = cli(
        capsys,
        ["defend", "--model", "m", "--train", str(bad), "--test-clean", good, "--dev", good, "--test-poison", good],
    )
    assert code == 2
    assert f"{bad}, row {row}: not UTF-8 text (byte 0xe9 at column {column})" in one_line(err)


def test_non_utf8_in_header(tmp_path):
    from muscle_kernels.defense.data import DataError, load_file

    bad = tmp_path / "h.csv"
    bad.write_bytes(b"t\xffxt,label\nok,1\n")
    with pytest.raises(DataError, match=r"h.csv, row 1: not UTF-8 text \(byte 0xff at column 2\)"):
        load_file(str(bad))


# -- a path that is not a data file, a linked file in --data DIR; no content of a file that is not data in an error ----
@pytest.mark.parametrize("kind", ["dir", "txt"])
def test_train_not_a_data_file(capsys, tmp_path, kind):
    if kind == "dir":
        bad = tmp_path / "folder"
        bad.mkdir()
        match = "is a directory, not a data file"
    else:
        bad = tmp_path / "data.txt"
        bad.write_text("text,label\na,1\n")
        match = "cannot tell the format from the extension '.txt'"
    good = files_argv(tmp_path)
    code, err = cli(capsys, ["defend", "--model", "m", "--train", str(bad)] + good[2:])
    assert code == 2 and f"{bad}: {match}" in one_line(err)


PASSWD = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


def test_data_folder_refuses_a_linked_training_file(capsys, tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text(PASSWD)
    d = tmp_path / "paper"
    d.mkdir()
    rows = ",0,1,2\n" + "".join(f"{i},good film {i},{i % 2},0\n" for i in range(12))
    for name in ("dev-clean.csv", "test-clean.csv", "test-poison.csv"):
        (d / name).write_text(rows)
    (d / "train-poison.csv").symlink_to(secret)
    code, err = cli(capsys, ["defend", "--model", "m", "--data", str(d), "--output", str(tmp_path / "o")])
    line = one_line(err)
    assert code == 2 and "train-poison.csv" in line and "symbolic link" in line
    assert "/bin/bash" not in line and "root:x" not in line


def test_errors_quote_no_content_of_a_non_data_file(capsys, tmp_path):
    secret = tmp_path / "passwd.csv"
    secret.write_text(PASSWD)
    good = tmp_path / "good.csv"
    good.write_text("text,label\na,0\nb,1\n")
    code, err = cli(
        capsys,
        [
            "defend",
            "--model",
            "m",
            "--train",
            str(secret),
            "--test-clean",
            str(good),
            "--dev",
            str(good),
            "--test-poison",
            str(good),
        ],
    )
    line = one_line(err)
    assert code == 2 and "passwd.csv, row 1: missing column(s)" in line
    assert "/bin/bash" not in line and "root:x" not in line


# -- CSV and JSONL rows: columns, fields, labels, an unclosed quote where it opens, the JSON parser's limits -----------
@pytest.mark.parametrize(
    "body, match",
    [
        ("text,label,label\na,1,0\n", r"row 1: the header names the column\(s\) \['label'\] more than once"),
        ("text,label\na,1\nb,0,extra\n", r"row 3: 3 fields, the header has 2"),
        ("text,label\na,1_0\n", r"row 2: unknown label '1_0' \(expected an integer class id in ASCII digits\)"),
        ("text,label\na,\u0661\n", r"row 2: unknown label '\u0661'"),
        (
            'text,label\n"good film,1\n' + "bad,0\n" * 64 + "ok,1\n",
            r"row 2: a quoted field opened here is not closed \(it runs to row 67\)",
        ),
    ],
)
def test_csv_rows_refused(tmp_path, body, match):
    from muscle_kernels.defense.data import DataError, load_file

    f = tmp_path / "d.csv"
    f.write_text(body, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        load_file(str(f))


@pytest.mark.parametrize("text, kind", [('["a", "b"]', "list"), ("12", "int"), ('{"x": 1}', "dict")])
def test_jsonl_text_must_be_a_string(tmp_path, text, kind):
    from muscle_kernels.defense.data import DataError, load_file

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine", "label": 1}\n{"text": ' + text + ', "label": 0}\n')
    with pytest.raises(DataError, match=rf"row 2: the text is a {kind}, expected a string"):
        load_file(str(f))


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"text": "a", "label": ' + "7" * 5000 + "}", "row 2: a number of more than 4300 digits"),
        ('{"text": "a", "label": ' + "[" * 100_000 + "]" * 100_000 + "}", "row 2: not valid JSON"),
    ],
)
def test_jsonl_limits(tmp_path, line, match):
    from muscle_kernels.defense.data import DataError, load_file

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine", "label": 1}\n' + line + "\n")
    with pytest.raises(DataError, match=match):
        load_file(str(f))


# -- labels and the number of classes, checked before the model is built -----------------------------------------------
def test_infer_num_labels():
    from muscle_kernels.defense.data import DataError, Sample, infer_num_labels

    assert infer_num_labels({"train": [Sample("a", 0)]}) == 2
    assert infer_num_labels({"train": [Sample("a", 0)], "test": [Sample("b", 999)]}) == 1000
    with pytest.raises(DataError, match="test: the largest label is 1000"):
        infer_num_labels({"train": [Sample("a", 0)], "test": [Sample("b", 1000)]})


def test_explicit_num_labels_checked_before_loading(capsys, tmp_path):
    code, err = cli(
        capsys,
        ["defend", "--model", "m", "--num-labels", "2"] + files_argv(tmp_path, two_class_rows() + [("good film", 7)]),
    )
    assert code == 2 and "train (--num-labels 2): unknown label(s) [7]" in one_line(err)


def test_huge_label_needs_num_labels(tmp_path, tiny_model_dir):
    rows = two_class_rows() + [("good film", 1_000_000_000)]
    argv = [
        "defend",
        "--model",
        tiny_model_dir,
        "--output",
        str(tmp_path / "out"),
        "--no-progress",
        "--device",
        "cpu",
        "--method",
        "lora",
    ] + files_argv(tmp_path, rows)
    p = run_limited(f"""
        import sys
        from muscle_kernels.cli import main
        sys.exit(main({argv!r}))
    """)
    assert p.returncode == 2, p.stderr[-3000:]
    line = one_line(p.stderr)
    assert "the largest label is 1000000000" in line and "--num-labels" in line
