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


def test_text_bytes_are_read_in_the_encoding_they_were_written_in():
    from pipeline.text import decode_text

    caption = "Işık ağacın üstünde, şişe çiçekte"
    assert decode_text(caption.encode()) == caption
    assert decode_text(caption.encode("utf-8-sig")) == caption  # Notepad's UTF-8
    assert decode_text(caption.encode("utf-16")) == caption  # Notepad's "Unicode", with its byte-order mark
    assert decode_text(caption.encode("cp1254")) == caption  # Windows Turkish
    # UTF-8 with a letter cut in two keeps its other letters: a bad byte is no reason to read it as cp1254
    assert decode_text("güzel bir kuş".encode()[:-1]) == "güzel bir ku\ufffd"
    assert decode_text(b"a\x81\x8db") == "a\ufffd\ufffdb"  # bytes no encoding here reads

