"""The automatic quality checks on realistic answers: each check fails and passes."""

from __future__ import annotations

from evals.quality import (
    MIN_REPETITION_WORDS,
    REPETITION_THRESHOLD,
    auto_checks,
    duplicate_point_indices,
    normalize,
    repetition_ratio,
    words,
)
from evals.records import PointRecord, RunRecord

HEALTHY = (
    "Getting enough sleep matters for both body and mind. Adults need about seven to "
    "nine hours a night; going to bed and waking up at the same time every day helps "
    "the body keep a steady rhythm. Keep the bedroom dark, quiet and cool, avoid "
    "caffeine in the afternoon, and put screens away an hour before bed, because their "
    "light delays melatonin. Regular exercise also improves sleep, as long as it is "
    "not too close to bedtime."
)

# What SmolLM2-135M really does when it loses the thread: a numbered loop.
SMOLLM2_LOOP = (
    "Here are some tips to improve your health: 1. Eat a balanced diet; 2. Exercise "
    "regularly; 3. Drink water; 4. Good sleep; 5. Good sleep; 6. Good sleep; 7. Good "
    "sleep; 8. Good sleep; 9. Good sleep; 10. Good sleep; 11. Good sleep; 12. Good "
    "sleep; 13. Good sleep; 14. Good sleep; 15. Good sleep; 16. Good sleep; 17. Good "
    "sleep; 18. Good sleep; 19. Good sleep; 20. Good sleep; 21. Good sleep"
)


def sequential(answer: str, finish_reason: str | None = "stop") -> RunRecord:
    return RunRecord(
        question_id=1,
        category="generic",
        mode="sequential",
        answer=answer,
        finish_reason=finish_reason,
    )


def skeleton(points: list[tuple[str, str]], finish: list[str] | None = None) -> RunRecord:
    finish = finish or ["stop"] * len(points)
    recs = [
        PointRecord(index=i, title=title, text=text, finish_reason=fr)
        for i, ((title, text), fr) in enumerate(zip(points, finish, strict=True), start=1)
    ]
    answer = "\n".join(f"{p.index}. **{p.title}** {p.text}" for p in recs)
    return RunRecord(
        question_id=1,
        category="generic",
        mode="sot",
        answer=answer,
        finish_reason="stop",
        num_points=len(recs),
        points=recs,
    )


GOOD_POINTS = [
    ("Sleep schedule", "Go to bed and wake up at the same time every day, even on weekends."),
    ("Bedroom", "Keep the room dark, quiet and cool; a fan or earplugs can help."),
    ("Screens", "Put phones away an hour before bed: blue light delays melatonin."),
]


def test_helpers():
    assert normalize("  Keep the Room DARK,   quiet & cool!! ") == "keep the room dark quiet cool"
    assert words("5. Good sleep; 6. good Sleep") == [
        "<num>",
        "good",
        "sleep",
        "<num>",
        "good",
        "sleep",
    ]
    assert repetition_ratio([]) == (0.0, 0)
    assert repetition_ratio(["a b c d a b c d"]) == (1 / 5, 8)  # only "a b c d" again
    # n-grams never span two points, but repeats count across points
    assert repetition_ratio(["a b c", "d e f"]) == (0.0, 6)
    assert repetition_ratio(["a b c d", "a b c d"]) == (0.5, 8)


def test_healthy_sequential_answer_passes_everything():
    checks = auto_checks(sequential(HEALTHY))
    assert checks == {
        "empty_answer": False,
        "empty_points": False,
        "num_empty_points": 0,
        "duplicate_points": False,
        "num_duplicate_points": 0,
        "mid_sentence_points": False,
        "num_mid_sentence_points": 0,
        "title_only_points": False,
        "num_title_only_points": 0,
        "list_points": False,
        "num_list_points": 0,
        "truncated": False,
        "repetitive": False,
        "repetition": 0.0,
    }


def test_healthy_skeleton_answer_passes_everything():
    checks = auto_checks(skeleton(GOOD_POINTS))
    failed = [k for k, v in checks.items() if isinstance(v, bool) and v]
    assert failed == []
    assert checks["repetition"] < 0.05


def test_smollm2_loop_is_repetitive_and_truncated():
    checks = auto_checks(sequential(SMOLLM2_LOOP, finish_reason="length"))
    assert checks["repetitive"] is True
    assert checks["repetition"] > 0.6
    assert checks["truncated"] is True
    assert checks["empty_answer"] is False


def test_repetition_in_one_point_is_caught_and_headers_are_ignored():
    loop = "Drink water. " * 12
    checks = auto_checks(skeleton([*GOOD_POINTS, ("Hydration", loop)]))
    assert checks["repetitive"] is True
    # The merged headers ("1. **Sleep schedule**") are not measured: a skeleton whose
    # titles all say the same does not make its (distinct) texts repetitive.
    same_titles = [("Tip", t) for _, t in GOOD_POINTS]
    assert auto_checks(skeleton(same_titles))["repetitive"] is False


def test_short_answers_are_never_repetitive():
    short = "Yes. Yes. Yes. Yes. Yes. Yes."
    assert len(words(short)) < MIN_REPETITION_WORDS
    assert repetition_ratio([short])[0] > REPETITION_THRESHOLD
    assert auto_checks(sequential(short))["repetitive"] is False


def test_empty_points():
    rec = skeleton([GOOD_POINTS[0], ("Bedroom", "   "), ("Caffeine", " ... \n"), GOOD_POINTS[2]])
    checks = auto_checks(rec)
    assert checks["empty_points"] is True
    assert checks["num_empty_points"] == 2
    assert checks["empty_answer"] is False  # the other points still answer
    # blank points are not duplicates of each other
    assert checks["duplicate_points"] is False


def test_duplicate_points_differ_in_case_and_punctuation():
    rec = skeleton(
        [
            ("Sleep schedule", "Go to bed at the same time every day."),
            ("Exercise", "Walk for thirty minutes, five days a week."),
            ("Regular bedtime", "go to bed at the same time, every day!!"),
            ("SLEEP SCHEDULE:", "Waking at a fixed hour anchors the body clock."),
        ]
    )
    assert duplicate_point_indices(rec.points) == [3, 4]  # text dup, title dup
    checks = auto_checks(rec)
    assert checks["duplicate_points"] is True
    assert checks["num_duplicate_points"] == 2


def test_truncated_point():
    rec = skeleton(GOOD_POINTS, finish=["stop", "length", "stop"])
    assert auto_checks(rec)["truncated"] is True
    assert auto_checks(skeleton(GOOD_POINTS))["truncated"] is False


def test_empty_answer():
    assert auto_checks(sequential(""))["empty_answer"] is True
    assert auto_checks(sequential(" \n\t"))["empty_answer"] is True
    failed_run = RunRecord(question_id=2, category="math", mode="sot", ok=False, error="HTTP 500")
    checks = auto_checks(failed_run)
    assert checks["empty_answer"] is True
    assert checks["repetitive"] is False and checks["repetition"] == 0.0


def test_points_cut_mid_sentence_title_only_or_running_a_list():
    rec = skeleton(
        [
            GOOD_POINTS[0],
            ("Bedroom", "Keep the room dark, quiet and"),  # cut off
            ("Get enough sleep", "Get enough sleep:"),  # only its title
            ("Diet", "Eat well: 1. Vegetables; 2. Fruit; 3. Fish."),  # a list of its own
            ("Screens", "Put phones away.\n- Read a book instead."),  # a bulleted one
            ("Quotes", 'He said "sleep is key."'),  # ends at a sentence end
        ]
    )
    checks = auto_checks(rec)
    assert checks["num_mid_sentence_points"] == 1 and checks["mid_sentence_points"] is True
    assert checks["num_title_only_points"] == 1
    assert checks["num_list_points"] == 2
    clean = auto_checks(skeleton(GOOD_POINTS))
    assert not (clean["mid_sentence_points"] or clean["title_only_points"] or clean["list_points"])
