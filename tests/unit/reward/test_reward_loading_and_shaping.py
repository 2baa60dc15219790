"""Loading users' reward functions by path or module, the format reward wrapper, and DAPO's overlong penalty."""

import pickle
import textwrap
from pathlib import Path

import pytest

from rlmesh.reward import FormatReward, LoadedComputeScore, default_compute_score, load_compute_score, overlong_penalty

TEST_REWARD_FILE = Path(__file__).with_name("reward_fns_for_tests.py")

VERL_STYLE_FILE = textwrap.dedent(
    """
    import re

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        match = re.search(r"answer: (\\d+)", solution_str)
        return 1.0 if match and match.group(1) == ground_truth else 0.0

    def helper():
        return None
    """
)


def test_a_verl_reward_file_works_unchanged(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(VERL_STYLE_FILE)
    compute_score = load_compute_score(str(path))
    assert compute_score("anything", "so the answer: 12", "12", None) == 1.0
    assert compute_score("anything", "so the answer: 13", "12") == 0.0


def test_load_by_path_object_and_function_name_with_bound_kwargs():
    compute_score = load_compute_score(TEST_REWARD_FILE, "scaled_score", factor=2.5)
    assert compute_score("x", "7", "7") == 2.5
    assert compute_score("x", "8", "7") == 0.0


def test_load_by_module_name_with_options():
    flexible = load_compute_score("rlmesh.reward.gsm8k", method="flexible")
    assert flexible("openai/gsm8k", "it is 72", "72")["score"] == 1.0
    strict = load_compute_score("rlmesh.reward.gsm8k")
    assert strict("openai/gsm8k", "it is 72", "72")["score"] == 0.0


def test_no_path_means_the_builtin_default():
    assert load_compute_score() is default_compute_score
    with pytest.raises(ValueError, match="need a reward file path"):
        load_compute_score(None, method="flexible")


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "reward.py"
    with pytest.raises(FileNotFoundError, match="does not exist") as raised:
        load_compute_score(str(missing))
    assert "nowhere" in str(raised.value)


def test_missing_function_lists_the_ones_defined(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(VERL_STYLE_FILE)
    with pytest.raises(AttributeError, match="no function 'reward_fn'") as raised:
        load_compute_score(str(path), "reward_fn")
    assert "compute_score" in str(raised.value)
    assert "helper" in str(raised.value)


def test_a_name_that_is_not_a_function_is_rejected(tmp_path):
    path = tmp_path / "constants.py"
    path.write_text("compute_score = 3\n")
    with pytest.raises(TypeError, match=r"is not callable \(it is int 3\)"):
        load_compute_score(str(path))


def test_loaded_function_pickles_as_path_and_name():
    compute_score = load_compute_score(TEST_REWARD_FILE, "scaled_score", factor=3.0)
    assert isinstance(compute_score, LoadedComputeScore)
    restored = pickle.loads(pickle.dumps(compute_score))
    assert restored == compute_score
    assert restored("x", "1", "1") == 3.0


def test_two_files_with_the_same_name_do_not_clash(tmp_path):
    for folder, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "reward.py").write_text(f"def compute_score(*args, **kwargs):\n    return {value}\n")
    first = load_compute_score(str(tmp_path / "a" / "reward.py"))
    second = load_compute_score(str(tmp_path / "b" / "reward.py"))
    assert (first("x", "", ""), second("x", "", "")) == (1.0, 2.0)


# --- format reward -----------------------------------------------------------------------------------------------


def test_format_reward_adds_bonus_or_penalty_and_reports_format():
    shaped = FormatReward(default_compute_score, r"^<think>.*</think>", bonus=0.1, penalty=-0.5)
    with_format = shaped("arithmetic", "<think>23+45</think> #### 68", "68")
    assert with_format == {"score": pytest.approx(1.1), "acc": True, "pred": "68", "format": True}
    without_format = shaped("arithmetic", "#### 68", "68")
    assert without_format["score"] == pytest.approx(0.5)
    assert without_format["format"] is False


def test_format_reward_wraps_float_scorers_and_pickles():
    shaped = FormatReward(load_compute_score(TEST_REWARD_FILE, "scaled_score"), r"\d", bonus=1.0)
    assert pickle.loads(pickle.dumps(shaped))("x", "7", "7") == {"score": 2.0, "format": True}


def test_format_reward_rejects_a_bad_regex():
    with pytest.raises(ValueError, match="not a valid regex"):
        FormatReward(default_compute_score, "(<think>")


# --- overlong penalty --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (3000, 0.0), (3072, 0.0), (3584, -0.5), (4096, -1.0), (5000, -1.0)],
)
def test_overlong_penalty_is_linear_inside_the_buffer(length, expected):
    # DAPO's setting: 4096 maximum, the last 1024 tokens a soft buffer.
    assert overlong_penalty(length, 4096, 1024, penalty_factor=1.0) == pytest.approx(expected)


def test_overlong_penalty_scales_with_the_factor_and_checks_the_buffer():
    assert overlong_penalty(3584, 4096, 1024, penalty_factor=0.2) == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        overlong_penalty(10, 4096, 0)
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        overlong_penalty(10, 100, 200)
