import pytest

from lightning_compress.errors import (
    CompressionConfigError,
    check_choice,
    check_number,
    check_str_list,
    check_verbose,
)


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


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_check_number_refuses_non_finite_numbers_even_where_unbounded(value):
    with pytest.raises(
        CompressionConfigError,
        match=r"`strength` to be a number in \[0, inf\), but got -?(inf|nan)\. Infinity and NaN are not allowed\.",
    ):
        check_number("strength", value, low=0.0)
    with pytest.raises(CompressionConfigError, match=r"`w` to be a number in \(-inf, inf\).*not allowed"):
        check_number("w", value)


def test_check_number_accepts_the_bounds_it_includes():
    check_number("lr", 0.0, low=0.0)
    check_number("lr", 0, low=0.0)
    check_number("p", 1.0, low=0.0, high=1.0)
    with pytest.raises(CompressionConfigError, match=r"`lr` to be a number in \(0, inf\), but got 0\.0\.$"):
        check_number("lr", 0.0, low=0.0, low_inclusive=False)


@pytest.mark.parametrize("value", [True, False])
def test_check_number_refuses_bools_where_an_int_is_meant(value):
    with pytest.raises(CompressionConfigError, match=rf"`epochs` to be an integer, but got {value}"):
        check_number("epochs", value, low=0, integer=True)


def test_check_verbose():
    assert [check_verbose(v) for v in (0, 1, 2)] == [0, 1, 2]
    assert check_verbose(1, highest=1) == 1
    for bad in (True, False, 1.0, 5, -1, "1", None):
        with pytest.raises(
            CompressionConfigError, match=r"Expected argument `verbose` to be an integer in \[0, 2\], but got"
        ):
            check_verbose(bad)
    with pytest.raises(CompressionConfigError, match=r"`verbose` to be an integer in \[0, 1\], but got 2\."):
        check_verbose(2, highest=1)
