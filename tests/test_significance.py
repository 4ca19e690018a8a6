"""`compare --significance` with more than two results (Holm), the paired bootstrap over seeds
and test images, the Bayesian correlated t-test (`--rope`), and the paper's table
(`--format markdown|latex`), on members and predictions given here; each statistic checked
against scipy, statsmodels or baycomp. The same from real runs: `tests/test_groups.py`."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from experiments.comparison import paper, significance
from experiments.comparison.significance import Member
from experiments.tracking.queries import Predictions

SEEDS = (42, 43, 44)
VALUES = {  # a group's members' test accuracies, by seed
    "aaaaaaaa-group": (0.90, 0.93, 0.91),
    "bbbbbbbb-group": (0.80, 0.84, 0.83),
    "cccccccc-group": (0.89, 0.925, 0.915),
}


def group_members(group: str, values) -> list[Member]:
    digests = {split: f"digest-{split}" for split in ("train", "val", "test")}
    return [
        Member(f"{group}-{seed}", value, ("None", seed), digests, 300.0, 100.0)
        for seed, value in zip(SEEDS, values, strict=True)
    ]


def right_answers(value: float, seed: int, n: int = 200) -> np.ndarray:
    """Right or wrong on each of n images, `value` of them right, drawn by `seed`."""
    right = np.zeros(n, dtype=bool)
    right[np.random.default_rng(seed).permutation(n)[: round(value * n)]] = True
    return right


@pytest.fixture
def groups(monkeypatch):
    """Three groups of the same seeds on the same data, with stored predictions per member."""
    from experiments import tracking

    found = {g: group_members(g, v) for g, v in VALUES.items()}
    monkeypatch.setattr(significance, "members", lambda run, metric: (True, found[run]))
    answers = {
        m.run_id: right_answers(m.value, seed)
        for g in found
        for m, seed in zip(found[g], SEEDS, strict=True)
    }

    def predictions(run_id, split="test"):
        right = answers[run_id]
        return Predictions("digest-test", ["1"] * len(right), ["1" if r else "0" for r in right])

    monkeypatch.setattr(tracking, "predictions", predictions)
    params = {  # what tells them apart, as the paper's table labels them
        "aaaaaaaa-group": {"head.units": "[256]", "paths.output_dir": "/a"},
        "bbbbbbbb-group": {"head.units": "[32]", "paths.output_dir": "/b"},
        "cccccccc-group": {"head.units": "[256]", "head.pooling": "avg"},
    }
    monkeypatch.setattr(
        tracking,
        "find_run",
        lambda run_id: SimpleNamespace(run_id=run_id, name="same name", params=params[run_id]),
    )
    return found, answers


def test_three_groups_are_tested_in_pairs_with_holms_adjustment(groups):
    from statsmodels.stats.multitest import multipletests

    outcomes = significance.compare_all(list(VALUES), "test_accuracy")
    assert [(o.first[:1], o.second[:1]) for o in outcomes] == [("a", "b"), ("a", "c"), ("b", "c")]
    adjusted = multipletests([o.p_value for o in outcomes], method="holm")[1]
    for outcome, expected in zip(outcomes, adjusted, strict=True):
        assert outcome.adjusted == pytest.approx(expected)
        assert f"Holm-adjusted p = {expected:.4g} over 3 comparisons" in significance.report(
            outcome
        )
    against = significance.compare_all(["bbbbbbbb-group", "cccccccc-group"], "test_accuracy",
                                       baseline="aaaaaaaa-group")  # fmt: skip
    assert [(o.first[:1], o.second[:1]) for o in against] == [("a", "b"), ("a", "c")]
    with pytest.raises(Exception, match="two or more different"):
        significance.compare_all(["aaaaaaaa-group"], "test_accuracy")


def test_paired_groups_add_the_bootstrap_over_seeds_and_images(groups):
    """Test accuracy of two paired groups: the paired t-test over seeds (scipy's), then the
    two-level bootstrap from the members' predictions, whose p-value the comparison rests on."""
    found, answers = groups
    outcome = significance.significance("aaaaaaaa-group", "bbbbbbbb-group", "test_accuracy")
    expected = stats.ttest_rel(VALUES["aaaaaaaa-group"], VALUES["bbbbbbbb-group"])
    assert f"paired t-test over seeds 42, 43, 44: t = {expected.statistic:.3f}" in outcome.line
    text = significance.report(outcome)
    assert "paired bootstrap over the 3 seeds and 200 test images: 95% CI" in text
    assert outcome.test == "paired bootstrap over seeds and test images"
    a, b = (np.stack([answers[f"{g}-{s}"] for s in SEEDS]) for g in list(VALUES)[:2])
    d = a.astype(float) - b
    from experiments.evaluation.statistics import paired_bootstrap

    assert outcome.p_value == paired_bootstrap(d).p_value
    low, _ = paired_bootstrap(d).ci95
    assert low > 0  # 8 points on 200 images and 3 seeds: A is better


def test_rope_adds_the_bayesian_correlated_t_test(groups):
    """Seeds on one split share their training images, so no fold correction: the posterior is
    Student's t over the seeds, checked here in closed form (the folds' case against baycomp in
    test_statistics)."""
    a, b = np.array(VALUES["aaaaaaaa-group"]), np.array(VALUES["cccccccc-group"])
    outcome = significance.significance("aaaaaaaa-group", "cccccccc-group", "test_accuracy", 0.01)
    posterior = stats.t(2, loc=(a - b).mean(), scale=np.sqrt((a - b).var(ddof=1) / 3))
    better, worse = posterior.sf(0.01), posterior.cdf(-0.01)
    note = next(n for n in outcome.notes if n.startswith("Bayesian correlated t-test"))
    assert f"P(aaaaaaaa better) = {better:.3f}" in note
    assert f"P(equivalent) = {1 - better - worse:.3f}" in note
    assert f"P(cccccccc better) = {worse:.3f}" in note


def test_the_paper_table_marks_what_differs_from_the_baseline(groups):
    found, _ = groups
    rows, headers, notes = paper.significance_rows(list(VALUES), ["test_accuracy"], None)
    table = paper.render(rows, headers, ["test_accuracy"], "markdown", notes)
    lines = table.splitlines()
    assert lines[0] == "| result | run | test_accuracy |"
    a, b, c = (np.array(v) for v in VALUES.values())
    assert f"| **{a.mean():.4f} ± {a.std(ddof=1):.4f}** (3) |" in lines[2]  # the best, bold
    outcomes = significance.compare_all(list(VALUES), "test_accuracy", "aaaaaaaa-group")
    marks = [o.adjusted < 0.05 for o in outcomes]
    assert marks == [True, False]  # B differs from A; C does not
    assert lines[3].endswith(f"{b.mean():.4f} ± {b.std(ddof=1):.4f} (3) † |")
    assert lines[4].endswith(f"{c.mean():.4f} ± {c.std(ddof=1):.4f} (3) |")
    assert [line.split(" | ")[0] for line in lines[2:5]] == [
        "| head.pooling=-, head.units=[256]",
        "| head.pooling=-, head.units=[32]",
        "| head.pooling=avg, head.units=[256]",
    ]  # the config values that differ; where they were recorded is not one
    assert "† differs from head.pooling=-, head.units=[256] (aaaaaaaa) at p < 0.05, Holm" in table
    assert "Tests: test_accuracy: paired bootstrap over seeds and test images." in table
    latex = paper.render(rows, headers, ["test_accuracy"], "latex", notes)
    assert latex.startswith("\\begin{tabular}{llr}\n\\toprule\nresult & run & test\\_accuracy")
    assert f"$\\mathbf{{{a.mean():.4f} \\pm {a.std(ddof=1):.4f}}}$ (3)" in latex
    assert f"${b.mean():.4f} \\pm {b.std(ddof=1):.4f}$ (3)$^\\dagger$ \\\\" in latex
    assert "\\bottomrule\n\\end{tabular}\n\\par\\footnotesize $^\\dagger$ differs" in latex


def test_lower_is_better_is_bold_at_the_lowest():
    rows = [
        paper.Row(["a"], {"test_ece": paper.Cell(0.05), "train_time_s": paper.Cell(12.0)}),
        paper.Row(["b"], {"test_ece": paper.Cell(0.03), "train_time_s": paper.Cell(30.0)}),
    ]
    table = paper.render(rows, ["config"], ["test_ece", "train_time_s"], "markdown", [])
    assert "| a | 0.0500 | **12.0** |" in table and "| b | **0.0300** | 30.0 |" in table
