"""Scorers on hand-written predictions: right, wrong and edge cases."""

import pytest

from lshe.metrics import (
    agreement,
    exact_match,
    extract_number,
    normalize_text,
    numeric_match,
    rouge_l,
    string_match_all,
    string_match_part,
)


def test_normalize_text_drops_case_punctuation_articles_and_spaces():
    assert normalize_text("  The Answer:  is, A  cat! ") == "answer is cat"
    assert normalize_text("") == ""


@pytest.mark.parametrize(
    "text, expected",
    [
        ("42", "42"),
        ("42 apples", "42"),
        ("She has 42apples left", "42"),
        ("It costs $1,234 in total", "1234"),
        ("1,234,567.50 dollars", "1234567.5"),
        ("The temperature is -5 degrees", "-5"),
        ("3.50", "3.5"),
        ("70.0", "70"),
        ("-0", "0"),
        (".5 of it", "0.5"),
        ("The answer is 42.", "42"),
        ("First 3, then 4, so 12", "12"),  # no marker: the last number
        ("5-3=2", "2"),  # a hyphen glued to a number is not a minus sign
        ("COVID-19 cases", "19"),
        ("Step 1: 2 + 3 = 5\n#### 5", "5"),
        ("#### 42", "42"),
        ("#### -7.25 and then 9", "-7.25"),  # the number right after the marker wins
        ("The answer is 7. Then 8 more steps.", "7"),
        ("The Answer Is: 1,000", "1000"),
        ("answer is 3. No wait, the answer is 4.", "4"),  # the last marker
        ("the answer is unknown, maybe 12", "12"),  # marker without a number: last number
        ("", None),
        ("no digits here", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_extract_number_equal_numbers_compare_equal():
    assert extract_number("3.50") == extract_number("3.5")
    assert extract_number("1,234") == extract_number("1234.00")


def test_numeric_match():
    assert numeric_match("So the total is 28,080. The answer is 28080.", "28080") == 1.0
    assert numeric_match("The answer is 28081.", "28080") == 0.0
    assert numeric_match("", "5") == 0.0
    assert numeric_match("no number", "no number either") == 0.0  # None never matches None


def test_exact_match_ignores_case_and_punctuation():
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("The Paris", "paris") == 1.0
    assert exact_match("London", "Paris") == 0.0
    assert exact_match("", "") == 1.0
    assert exact_match("", "Paris") == 0.0


def test_rouge_l():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("dogs bark loudly", "the cat sat on the mat") == 0.0
    partial = rouge_l("the cat sat", "the cat sat on the mat")
    assert 0.0 < partial < 1.0
    assert partial == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # precision 3/3, recall 3/6
    assert rouge_l("The CAT sat.", "the cat sat") == 1.0  # case and punctuation are not words
    assert rouge_l("cats running", "cat runs") == 1.0  # Porter stemming
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("", "") == 1.0  # two empty outputs agree


def test_string_match_all_and_part():
    refs = ["ALPHA", "beta", "Gamma", "delta"]
    assert string_match_all("alpha, BETA, gamma and delta", refs) == 1.0
    assert string_match_all("alpha and gamma", refs) == 0.5
    assert string_match_all("nothing", refs) == 0.0
    assert string_match_all("", refs) == 0.0
    assert string_match_all("The pass key is 12345.", "12345") == 1.0  # one string = one reference
    assert string_match_part("only Gamma", refs) == 1.0
    assert string_match_part("none", refs) == 0.0
    with pytest.raises(ValueError, match="refs"):
        string_match_all("x", [])
    with pytest.raises(ValueError, match="refs"):
        string_match_part("x", [])


def test_agreement():
    assert agreement("The key is 42.", "the key is 42") == {"exact_match": 1.0, "rouge_l": 1.0}
    result = agreement("The key is 41", "The key is 42")
    assert result["exact_match"] == 0.0
    assert 0.0 < result["rouge_l"] < 1.0
