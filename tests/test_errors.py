import pytest

from mnist_lab.errors import described, first_line, is_number, is_whole


@pytest.mark.parametrize(
    ("error", "line", "description"),
    [
        (OSError("disk full\nmore detail"), "disk full", "OSError: disk full"),
        (MemoryError(), "MemoryError", "MemoryError"),  # no message: the type, never an IndexError
        (ValueError("  \n "), "ValueError", "ValueError"),
        (KeyError("lr"), "'lr'", "KeyError: 'lr'"),
    ],
)
def test_an_errors_first_line_and_description_never_fail(error, line, description):
    assert first_line(error) == line
    assert described(error) == description


@pytest.mark.parametrize(
    ("value", "whole", "number"),
    [
        (3, True, True),
        (0.5, False, True),
        (True, False, False),
        (False, False, False),
        ("3", False, False),
        (None, False, False),
    ],
)
def test_a_bool_is_neither_a_count_nor_a_number(value, whole, number):
    assert (is_whole(value), is_number(value)) == (whole, number)
