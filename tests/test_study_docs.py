"""The accuracy figures quoted in README.md and docs/results.md agree with the study's CSV (docs/results/cpu_cifar10_subset.csv)."""

import csv
import re
import statistics

from conftest import ROOT

CSV = ROOT / "docs" / "results" / "cpu_cifar10_subset.csv"


def test_readme_accuracy_table_matches_the_study_csv():
    rows = list(csv.DictReader(CSV.open()))
    readme = (ROOT / "README.md").read_text()
    names = {"baseline": "EfficientNet-B0", "v2-16ch": "kEffNet-B0 V2 16ch", "v2-8ch": "kEffNet-B0 V2 8ch",
             "v2-4ch": "kEffNet-B0 V2 4ch", "v2-32ch": "kEffNet-B0 V2 32ch"}
    for variant, label in names.items():
        values = [float(row["test_accuracy"]) for row in rows if row["variant"] == variant]
        line = next(line for line in readme.splitlines() if line.startswith(f"| {label} |"))
        if len(values) > 1:
            expected = f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
        else:
            expected = f"{values[0]:.3f} (1 seed)"
        assert expected in line, (variant, expected, line)


def test_readme_paper_protocol_figures_match_the_study_csv():
    rows = {row["variant"]: float(row["test_accuracy"]) for row in csv.DictReader(CSV.open())}
    readme = (ROOT / "README.md").read_text()
    quoted = (f"baseline {rows['baseline-paper-protocol']:.3f}, 16ch {rows['v2-16ch-paper-protocol']:.3f} "
              "after 30 epochs")
    assert quoted in " ".join(readme.split()), quoted


def _figures_from_csv():
    """Every accuracy docs may quote, to 3 decimals: each run's (with and without TTA), and each variant's
    mean, minimum and maximum over its seeds."""
    rows = list(csv.DictReader(CSV.open()))
    figures = set()
    for column in ("test_accuracy", "test_accuracy_hflip"):
        by_variant = {}
        for row in rows:
            by_variant.setdefault(row["variant"], []).append(float(row[column]))
        for values in by_variant.values():
            figures |= {f"{value:.3f}" for value in values + [statistics.mean(values)]}
    return figures


def test_results_page_quotes_only_accuracies_of_the_study():
    text = (ROOT / "docs" / "results.md").read_text()
    reading = text[text.index("Reading it:"):text.index("### Class activation maps")]
    quoted = set(re.findall(r"(?<![\d.])0\.\d{3}(?!\d)", reading))
    assert quoted, "the reading of the results quotes no accuracy"
    assert quoted <= _figures_from_csv(), sorted(quoted - _figures_from_csv())


def test_training_page_quotes_the_cross_check_table():
    text = (ROOT / "docs" / "training.md").read_text()
    section = text[text.index("## Cross-check against the reference implementation"):text.index("## Datasets")]
    table = (ROOT / "docs" / "results" / "reference_crosscheck.md").read_text()
    quoted = set(re.findall(r"-?\d\.\d{4}", section))
    assert quoted, "the cross-check section quotes no figure"
    assert all(figure in table for figure in quoted), sorted(f for f in quoted if f not in table)


def _all_shrink_figures() -> set:
    figures = set()
    for name in ("shrink_cifar10_subset.csv", "shrink_cifar10_subset_rmsprop.csv"):
        rows = list(csv.DictReader((ROOT / "docs" / "results" / name).open()))
        assert rows, f"{name} is empty"
        figures |= _shrink_figures(rows)
    figures |= _lr_check_figures(list(csv.DictReader((ROOT / "docs" / "results" / "shrink_lr_check.csv").open())))
    return figures | _composed_error_figures(
        list(csv.DictReader((ROOT / "docs" / "results" / "shrink_composed_error.csv").open())))


def test_readme_quotes_the_shrink_study():
    """README's "Does a trained model keep what it knew?" paragraph quotes only the shrink study's figures."""
    text = (ROOT / "README.md").read_text()
    paragraph = text[text.index("Does a trained model keep what it knew?"):]
    paragraph = paragraph[:paragraph.index("Details:")]
    quoted = set(re.findall(r"(?<![\d.])0\.\d{3}(?!\d)", paragraph))
    assert len(quoted) >= 4 and quoted <= _all_shrink_figures(), sorted(quoted - _all_shrink_figures())


def test_shrinking_section_quotes_only_the_shrink_csv():
    """docs/results.md's "Shrinking a trained model": every accuracy it quotes is a run's test accuracy, its
    teacher's, the mean of the gpconv teachers, or a mean (accuracy or fit error) over the runs of one kind of teacher
    (gpconv's or the third-party model), method, channels per group and epochs in the shrink study's CSV, or in
    the CSV of its first fine-tuning protocol (RMSprop with augmentation), which the section compares with, or
    the learning-rate check's (shrink_lr_check.csv), or a block's error in the composed model
    (shrink_composed_error.csv: each value, and its mean per start and block over the teachers)."""
    figures = _all_shrink_figures()
    text = (ROOT / "docs" / "results.md").read_text()
    section = text[text.index("## Shrinking a trained model"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    quoted = set(re.findall(r"(?<![\d.])0\.\d{3}(?!\d)", section))
    assert quoted, "the section quotes no accuracy"
    assert quoted <= figures, sorted(quoted - figures)


def _composed_error_figures(rows) -> set:
    """Each block's relative output error in the composed model, and its mean over the teachers per (start, block)."""
    assert {row["start"] for row in rows} == {"fit", "fit+blocks"} and len({row["teacher"] for row in rows}) == 3
    groups = {}
    for row in rows:
        groups.setdefault((row["start"], row["block"]), []).append(float(row["relative_error"]))
    return {f"{value:.3f}" for values in groups.values() for value in values + [statistics.mean(values)]}


def _lr_check_figures(rows) -> set:
    """The learning-rate check's figures: each run's best validation and test accuracy, and their means per
    (lr, method)."""
    assert {(row["lr"], row["method"]) for row in rows} >= {("0.001", "fit"), ("0.003", "fit"), ("0.003", "random"),
                                                            ("0.003", "budget"), ("0.005", "fit")}, "lr check incomplete"
    figures = set()
    for column in ("best_val_accuracy", "test_accuracy"):
        groups = {}
        for row in rows:
            groups.setdefault((row["lr"], row["method"]), []).append(float(row[column]))
        figures |= {f"{value:.3f}" for values in groups.values() for value in values + [statistics.mean(values)]}
    return figures


def _shrink_figures(rows) -> set:
    """Every 3-decimal figure one shrink CSV stands for (test_shrinking_section_quotes_only_the_shrink_csv)."""
    groups = {}
    figures = set()
    teachers = {}
    for row in rows:
        key = (row["teacher"].endswith(".pt"), row["method"], row["channels_per_group"], row["epochs"])
        groups.setdefault(key, []).append(float(row["test_accuracy"]))
        groups.setdefault(key + ("fit error",), []).extend([float(row["mean_fit_error"])] if row["mean_fit_error"] else [])
        figures |= {f"{float(row[column]):.3f}" for column in ("test_accuracy", "teacher_accuracy", "mean_fit_error",
                                                               "last_block_error_before", "last_block_error_after")
                    if row.get(column)}
        teachers[row["teacher"]] = float(row["teacher_accuracy"])
    gpconv_teachers = [accuracy for teacher, accuracy in teachers.items() if teacher.endswith(".pt")]
    return figures | {f"{statistics.mean(values):.3f}" for values in [*groups.values(), gpconv_teachers] if values}
