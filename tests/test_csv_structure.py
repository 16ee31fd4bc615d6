"""CSV inputs with a broken shape fail before anything is sent, in one line naming the file and line.

Too many fields on a row, a quote that never closes (or a stray one polars would count as
opening a cell), a semicolon- or tab-separated export read as CSV: each is found by
``open_source`` in its one pass over the file, so a bad row 10,000 lines down costs nothing.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import invoke

from batchgen.errors import UsageError
from batchgen.tables import open_source, read_table


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


def open_error(path: Path, **options: str) -> str:
    with pytest.raises(UsageError) as caught:
        open_source(path, **options)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def cli_error(sim, tmp_path: Path, source: Path, command: str = "run", *extra: str) -> str:
    """Exit 2 with one line and no traceback; nothing sent, no output and no journal written."""
    out = tmp_path / "out.csv"
    result = invoke([command, str(source), "-o", str(out), *extra], sim)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("out.csv", ".out.csv"))]
    assert not list(tmp_path.glob("*.journal*"))
    assert sim.stats.requests == 0
    assert lines[0].startswith("batchgen: error: ")
    return lines[0].removeprefix("batchgen: error: ")


# -- too many fields ---------------------------------------------------------------------------
LONG_ROW = "id,prompt,x\n1,a,b\n2,c,d\n3,e,f\n4,hello, world,z\n5,g,h\n"
LONG_ROW_MESSAGE = (
    'line 5 has 4 fields but the header has 3: quote cells that contain commas ("a, b"), or fix that line'
)


def test_a_row_with_too_many_fields_names_its_line(tmp_path):
    source = write(tmp_path / "data.csv", LONG_ROW)
    assert open_error(source) == f"input {source}: {LONG_ROW_MESSAGE}"


@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_row_with_too_many_fields_through_the_cli(simulator, tmp_path, command):
    source = write(tmp_path / "data.csv", LONG_ROW)
    assert cli_error(simulator(), tmp_path, source, command) == f"input {source}: {LONG_ROW_MESSAGE}"


FILLER = "please answer in one short sentence, politely and without any preamble at all"


def deep_file(path: Path, bad_line: int, rows: int) -> Path:
    """Rows of ~100 bytes, so that line 10,000 is past the first megabyte the check reads at once."""
    with path.open("w") as f:
        f.write("id,prompt\n")
        for n in range(2, rows + 2):
            f.write(f"{n},hello, world\n" if n == bad_line else f'{n},"prompt {n}: {FILLER}, {FILLER}"\n')
    return path


def test_a_too_long_row_deep_in_the_file_is_found_before_anything_is_sent(simulator, tmp_path):
    source = deep_file(tmp_path / "data.csv", 10_000, 10_050)
    assert source.stat().st_size > 1 << 20
    expected = (
        f"input {source}: line 10000 has 3 fields but the header has 2: "
        'quote cells that contain commas ("a, b"), or fix that line'
    )
    assert open_error(source) == expected
    assert open_error(source, limit=10) == expected  # the whole file is checked, as for UTF-8
    # Fast pacing, so that the old behaviour (answer 4,096 rows, then fail) fails quickly.
    line = cli_error(simulator(), tmp_path, source, "run", "--rpm", "1000000", "-c", "64")
    assert line == expected


def big_file(path: Path, bad: str = "", at: int = 0, lines: int = 24_000) -> tuple[Path, int]:
    """~1.9 MB of plain, quoted and two-line quoted cells, and its rows; ``bad`` goes on line ``at``."""
    kinds = [
        "{n},plain {n} {plain}\n",
        '{n},"quoted {n}, with ""quotes"", {filler}"\r\n',
        '{n},"two {n}\nlines, {filler}"\n',
    ]
    with path.open("w", newline="") as f:
        f.write("id,prompt\n")
        line = n = 2
        while line <= lines:
            if line == at:
                f.write(bad)
                line += bad.count("\n")
                continue
            row = kinds[n % 3].format(n=n, filler=FILLER, plain=FILLER.replace(",", ""))
            f.write(row)
            line, n = line + row.count("\n"), n + 1
    return path, n - 2


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        pytest.param('1,"a, b\nc",extra\n', "the row on lines 15000-15001 has 3 fields but", id="too-many"),
        pytest.param(
            '1,"never closed\n', "the quoted cell opened on line 15000 closes on line", id="unclosed"
        ),
        pytest.param('1,a 12" pipe\n', 'line 15000 has a quote (") inside a cell', id="stray-quote"),
        pytest.param('1,"say "hi" now"\n', "line 15000 has text after a closing quote", id="text-after"),
    ],
)
def test_a_problem_deep_in_a_big_file_names_its_line(tmp_path, bad, expected):
    good, rows = big_file(tmp_path / "good.csv")
    assert good.stat().st_size > 1 << 20  # more than one of the blocks the check reads at once
    assert open_source(good).total == rows
    source, _ = big_file(tmp_path / "data.csv", bad, at=15_000)
    assert open_error(source).startswith(f"input {source}: {expected}")


def test_the_line_number_counts_the_lines_inside_quoted_cells(simulator, tmp_path):
    source = write(
        tmp_path / "data.csv",
        'id,prompt\n1,"first line\nsecond, line\nthird"\n2,ok\n3,too,many\n',
    )
    expected = f"input {source}: line 6 has 3 fields but the header has 2"
    assert open_error(source).startswith(expected)
    assert cli_error(simulator(), tmp_path, source).startswith(expected)


def test_a_row_spanning_lines_with_too_many_fields_names_them(tmp_path):
    source = write(tmp_path / "data.csv", 'id,prompt\n1,a\n2,"multi\nline",extra\n')
    assert open_error(source) == (
        f"input {source}: the row on lines 3-4 has 3 fields but the header has 2: "
        'quote cells that contain commas ("a, b"), or fix that row'
    )


def test_read_table_names_the_line_too(tmp_path):
    source = write(tmp_path / "data.csv", LONG_ROW)
    with pytest.raises(UsageError, match=f"^input {source}: line 5 has 4 fields"):
        read_table(source)


# -- quotes ------------------------------------------------------------------------------------
UNCLOSED = 'id,prompt\n1,a\n2,"unclosed\n3,c\n4,d\n'


def unclosed_message(source: Path, line: int) -> str:
    return (
        f'input {source}: the quote (") opened on line {line} is never closed, so the rest of '
        'the file would be one cell: close it, or write a quote inside a cell as two ("")'
    )


def test_an_unclosed_quote_names_the_line_it_opens(tmp_path):
    source = write(tmp_path / "data.csv", UNCLOSED)
    assert open_error(source) == unclosed_message(source, 3)


@pytest.mark.parametrize("command", ["run", "validate"])
def test_an_unclosed_quote_through_the_cli(simulator, tmp_path, command):
    source = write(tmp_path / "data.csv", UNCLOSED)
    assert cli_error(simulator(), tmp_path, source, command) == unclosed_message(source, 3)


def test_an_unclosed_quote_in_the_header(simulator, tmp_path):
    # Today: "has no rows", the header swallowing the whole file.
    source = write(tmp_path / "data.csv", 'id,"prompt\n1,a\n2,b\n')
    assert open_error(source) == unclosed_message(source, 1)
    assert cli_error(simulator(), tmp_path, source) == unclosed_message(source, 1)


def test_an_unclosed_quote_that_meets_a_later_quoted_cell(simulator, tmp_path):
    # The stray opening quote pairs with the next cell's opening one: polars reads a wrong row.
    source = write(tmp_path / "data.csv", 'id,prompt\n1,a\n2,"unclosed\n3,c\n4,"d"\n')
    message = open_error(source)
    assert message.startswith(
        f"input {source}: the quoted cell opened on line 3 closes on line 5 with text after it (d"
    )
    assert "is its closing quote missing?" in message
    assert cli_error(simulator(), tmp_path, source) == message


def test_text_after_a_closing_quote_on_one_line(tmp_path):
    source = write(tmp_path / "data.csv", 'id,prompt\n1,"say "hi" now"\n')
    assert open_error(source) == (
        f'input {source}: line 2 has text after a closing quote ("say "hi...): a quote inside '
        'a quoted cell is written as two ("say ""hi"" now")'
    )


def test_a_stray_quote_in_an_unquoted_cell(simulator, tmp_path):
    # polars counts rows as if that quote opened a cell: "has no rows", or rows go missing.
    source = write(tmp_path / "data.csv", 'id,prompt\n1,a\n2,a 12" pipe\n3,c\n')
    expected = (
        f'input {source}: line 3 has a quote (") inside a cell that does not start with one '
        '(a 12" pipe): quote the whole cell and write each quote in it as two ("a 12"" pipe"), or remove it'
    )
    assert open_error(source) == expected
    assert cli_error(simulator(), tmp_path, source) == expected


ALONE = " (or --separator ',' if it is one column whose name holds it)"


# -- separators --------------------------------------------------------------------------------
def test_a_semicolon_separated_file_says_which_separator_to_pass(simulator, tmp_path):
    source = write(tmp_path / "data.csv", "id;prompt\n1;hello\n2;bonjour, monde\n")
    expected = (
        f'input {source} looks separated by ";" (its header is "id;prompt"): pass --separator \';\'{ALONE}'
    )
    assert open_error(source) == expected
    assert cli_error(simulator(), tmp_path, source) == expected
    assert cli_error(simulator(), tmp_path, source, "validate") == expected


def test_a_quoted_semicolon_export_says_which_separator_to_pass(tmp_path):
    source = write(tmp_path / "data.csv", '"id";"prompt"\r\n"1";"hello"\r\n')
    assert open_error(source) == (
        f'input {source} looks separated by ";" (its header is \'"id";"prompt"\'): pass --separator \';\''
        f"{ALONE}"
    )


def test_a_tab_separated_file_says_how_to_type_a_tab(simulator, tmp_path):
    source = write(tmp_path / "data.csv", "id\tprompt\n1\thello\n")
    expected = (
        f"input {source} looks separated by tabs (its header is \"id\\tprompt\"): pass --separator '\\t'"
        f"{ALONE}"
    )
    assert open_error(source) == expected
    assert cli_error(simulator(), tmp_path, source) == expected


def test_a_comma_file_read_with_another_separator(tmp_path):
    source = write(tmp_path / "data.csv", "id,prompt\n1,hello\n")
    assert open_error(source, separator=";") == (
        f'input {source} looks separated by "," (its header is "id,prompt"): pass --separator \',\''
    )


def test_separator_reads_the_right_columns(tmp_path):
    source = write(tmp_path / "data.csv", 'id;prompt;note\n1;"a; b, c";x\n2;plain, text\n3;"x\ny";\n')
    src = open_source(source, separator=";")
    assert src.columns == ["id", "prompt", "note"]
    assert src.total == 3
    rows = [row for batch, _ in src.batches() for row in batch.rows()]
    # A short row keeps today's behaviour: its missing cells are null, nothing is lost.
    assert rows == [("1", "a; b, c", "x"), ("2", "plain, text", None), ("3", "x\ny", None)]
    assert read_table(source, separator=";").rows() == rows


@pytest.mark.parametrize("separator", ["\t", "\\t"], ids=["tab", "backslash-t"])
def test_a_tab_separator_typed_either_way(tmp_path, separator):
    source = write(tmp_path / "data.tsv.csv", "id\tprompt\n1\ta, b\n")
    src = open_source(source, separator=separator)
    assert src.columns == ["id", "prompt"]
    assert src.head(5).rows() == [("1", "a, b")]


@pytest.mark.parametrize(
    ("separator", "shown"), [("", "''"), (";;", "';;'"), ("é", "'é'"), ('"', "'\"'"), ("\n", "'\\n'")]
)
def test_a_bad_separator_is_a_usage_error(tmp_path, separator, shown):
    source = write(tmp_path / "data.csv", "id,prompt\n1,a\n")
    message = open_error(source, separator=separator)
    assert shown in message and "separator" in message
    with pytest.raises(UsageError):
        read_table(source, separator=separator)


# -- what stays fine ---------------------------------------------------------------------------
@pytest.mark.parametrize("separator", [",", ";"])
def test_quoted_cells_with_separators_quotes_and_newlines_are_not_an_error(tmp_path, separator):
    s = separator
    text = (
        f'\ufeff"id"{s}prompt\r\n'
        f'1{s}"a{s} b{s}\r\nand a second line"\r\n'
        f'2{s}"say ""hi""{s} then go"\r\n'
        f'3{s}He said "hi" to me\r\n'
        f'4{s}""\r\n'
        f"5{s}last\r\n"
    )
    source = write(tmp_path / "data.csv", text)
    src = open_source(source, separator=separator)
    assert src.columns == ["id", "prompt"] and src.total == 5
    assert [row for batch, _ in src.batches(2) for row in batch.rows()] == [
        ("1", f"a{s} b{s}\r\nand a second line"),
        ("2", f'say "hi"{s} then go'),
        ("3", 'He said "hi" to me'),
        ("4", ""),
        ("5", "last"),
    ]


def test_old_mac_line_endings_are_named(tmp_path):
    source = write(tmp_path / "data.csv", "id,prompt\r1,a\r2,b\r")
    assert open_error(source) == (
        f"input {source}: its lines end in a lone carriage return (\\r, old Mac style), which is not "
        f"read as a line break: convert them, e.g. `tr '\\r' '\\n' < {source} > fixed.csv`"
    )


def test_separator_on_the_command_line_and_in_a_job_file(simulator, tmp_path):
    sim = simulator()
    source = tmp_path / "eu.csv"
    source.write_text("id;prompt\n1;Bonjour, le monde\n2;Hallo; Welt\n".replace("; Welt", " Welt"))
    out = tmp_path / "out.csv"
    result = invoke(["run", str(source), "-o", str(out), "--separator", ";", "--id-column", "id"], sim)
    assert result.exit_code == 0, result.stderr
    assert pl.read_csv(out)["prompt"].to_list() == ["Bonjour, le monde", "Hallo Welt"]

    tabbed = tmp_path / "t.csv"
    tabbed.write_text("id\tprompt\n1\ta, b\n")
    job = tmp_path / "tabs.toml"
    job.write_text(f'input = "{tabbed}"\noutput = "{tmp_path / "t-out.csv"}"\nseparator = "\\t"\n')
    assert invoke(["run", "--job", str(job)], sim).exit_code == 0
    assert pl.read_csv(tmp_path / "t-out.csv")["prompt"].to_list() == ["a, b"]

    parquet = tmp_path / "p.parquet"
    pl.DataFrame({"prompt": ["x"]}).write_parquet(parquet)
    refused = invoke(["run", str(parquet), "-o", str(tmp_path / "p-out.csv"), "--separator", ";"], sim)
    assert refused.exit_code == 2 and "--separator is for CSV input" in refused.stderr


def test_a_one_column_file_whose_name_holds_a_semicolon_reads_with_an_explicit_comma(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("prompt (en; short)\nhello\n")
    with pytest.raises(UsageError, match=r"or --separator ',' if it is one column whose name holds it"):
        open_source(path)
    source = open_source(path, separator=",")
    assert source.columns == ["prompt (en; short)"] and source.total == 1
