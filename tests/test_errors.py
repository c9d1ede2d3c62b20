import pytest

from lightning_compress.errors import CompressionConfigError, check_choice, check_number, check_str_list


def test_error_is_value_error():
    assert issubclass(CompressionConfigError, ValueError)


def test_check_choice_names_argument_choices_and_value():
    check_choice("mode", "a", ["a", "b"])
    with pytest.raises(
        CompressionConfigError, match=r"Expected argument `mode` to be one of 'a' or 'b', but got 'c'\."
    ):
        check_choice("mode", "c", ["a", "b"])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.0, r"`x` to be a number in \[0, 1\), but got 1\.0"),
        (-0.1, r"`x` to be a number in \[0, 1\), but got -0\.1"),
        ("0.5", r"`x` to be a number, but got '0\.5'"),
        (True, r"`x` to be a number, but got True"),
        (float("nan"), r"`x` to be a number in \[0, 1\), but got nan"),
    ],
)
def test_check_number_rejects(value, message):
    with pytest.raises(CompressionConfigError, match=message):
        check_number("x", value, low=0.0, high=1.0, high_inclusive=False)


def test_check_number_integer_and_open_low():
    check_number("n", 3, low=1, integer=True)
    with pytest.raises(CompressionConfigError, match=r"`n` to be an integer, but got 2\.5"):
        check_number("n", 2.5, low=1, integer=True)
    with pytest.raises(CompressionConfigError, match=r"`t` to be a number in \(0, inf\), but got 0"):
        check_number("t", 0, low=0.0, low_inclusive=False)


def test_check_str_list():
    assert check_str_list("include", ("Linear",)) == ["Linear"]
    with pytest.raises(CompressionConfigError, match=r"`include` to be a list of strings, but got 'Linear'"):
        check_str_list("include", "Linear")
