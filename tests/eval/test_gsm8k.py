import json

import pytest

from rlkd.eval import gsm8k
from rlkd.paths import default_data_dir

DATA = default_data_dir()
TEST_FILE = DATA / "gsm8k" / "test.jsonl" if DATA else None


@pytest.mark.data
@pytest.mark.skipif(TEST_FILE is None or not TEST_FILE.is_file(), reason="needs ../shared/data")
def test_every_gold_answer_of_the_real_test_file_is_extracted():
    rows = [json.loads(line) for line in TEST_FILE.open()]
    assert len(rows) == 1319
    for row in rows:
        final_line = row["answer"].rsplit("\n", 1)[-1]
        assert final_line.startswith("#### ")
        expected = int(final_line[len("#### "):].replace(",", ""))
        assert gsm8k.gold_answer(row["answer"]) == str(expected)
        # the gold solution itself, read as a model output, is correct
        assert gsm8k.is_correct(row["answer"], str(expected))
        # and so is the bare final line with decorations a model might add
        assert gsm8k.is_correct(f"So the total is ${expected:,}.00.", str(expected))


@pytest.mark.parametrize("output, expected", [
    ("She makes 9 * 2 = $18 a day.\n#### 18", "18"),
    ("#### 1,000", "1000"),
    ("####$1,234.50", "1234.5"),
    ("The answer is $18.00.", "18"),
    ("The answer is 18.", "18"),
    ("The temperature dropped to -7 degrees", "-7"),
    ("It fell to \u22127 overnight", "-7"),
    ("#### +5", "5"),
    ("first 3 then 4 and finally 12", "12"),
    ("#### 72\n\n### Instruction:\nNew question with 3 apples\n#### 3", "72"),
    ("#### no number here, but the total is 40", "40"),
    ("The list 1,2,3 ends in 3", "3"),
    ("That is 25% of the cost", "25"),
    ("half is .5", "0.5"),
    ("3.10 dollars", "3.1"),
    ("room 12b has x2 units: 7", "7"),
    ("no digits at all", None),
    ("", None),
])
def test_messy_outputs(output, expected):
    assert gsm8k.extract_answer(output) == expected


@pytest.mark.parametrize("text, expected", [
    ("$1,000.00", "1000"), ("-0.50", "-0.5"), ("+3", "3"), ("7.", "7"), ("abc", None), ("", None),
])
def test_normalize_number(text, expected):
    assert gsm8k.normalize_number(text) == expected


def test_score_counts_correct_and_missing_answers():
    outputs = ["#### 18", "it is 3.0", "no idea", "#### 5"]
    score = gsm8k.score_gsm8k(outputs, ["18", "3", "4", "6"])
    assert (score.correct, score.total, score.no_answer) == (2, 4, 1)
    assert score.score == pytest.approx(50.0)
    assert gsm8k.GSM8KScore(267, 1319, 0).score == pytest.approx(20.2426, abs=1e-4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="####"):
        gsm8k.gold_answer("the answer is 4")
    with pytest.raises(ValueError, match="no number"):
        gsm8k.gold_answer("#### four")
    with pytest.raises(ValueError, match="2 outputs for 1"):
        gsm8k.score_gsm8k(["1", "2"], ["1"])
