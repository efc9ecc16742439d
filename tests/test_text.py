import pyarrow as pa

from pipeline.text import describe_error, one_line


def test_one_line_collapses_cuts_and_makes_any_surrogate_storable():
    assert one_line("a\n  b\tc") == "a b c"
    assert one_line("x" * 10, limit=8) == "xxxxx..."
    # a tar member name that is not UTF-8 (b"a\xfe.jpg" as tarfile decodes it) and a JSON "\ud800"
    escaped, lone = b"a\xfe.jpg".decode("utf-8", "surrogateescape"), "caption \ud800 end"
    assert one_line(escaped) == "a\\xfe.jpg"
    assert one_line(lone) == "caption \ufffd end"
    pa.array([one_line(escaped), one_line(lone)])  # Arrow stores both (it refuses the originals)


def test_describe_error_names_the_type_on_one_line():
    assert describe_error(ValueError("bad\nvalue")) == "ValueError: bad value"
    assert describe_error(KeyError()) == "KeyError"
