"""`kiln explain` on an embedded home, in-process and without Ray: the attributions of a table
model from --instance and from --row of a CSV, the sorted table, the plot, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiln.actors.registry import RegistryService
from kiln.training.explain import training_mean
from kiln.training.tabular import Encoding
from tests.cluster.test_cli_registry import kiln, kiln_json
from tests.conftest import TINY_SPEC, tiny_model_files
from tests.serving.test_tabular_serving import CHURN, CHURN_WEIGHT, linear_files
from tests.tables import customers, write_csv

CUSTOMER = {"age": 31, "income": 52000, "city": "lima", "plan": "pro"}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("explain-cli") / "home"
    service = RegistryService(str(home / "registry.db"), str(home / "storage"))
    service.register("churn", linear_files(CHURN, CHURN_WEIGHT), CHURN, {}, {})
    service.register("tiny", tiny_model_files(), TINY_SPEC, {}, {})
    service.close()
    return str(home)


def expected_yes(rows: list[dict]) -> np.ndarray:
    """The churn model's "yes" logit attributions per input: wᵢ·(zᵢ − mean), summed per input."""
    encoding = Encoding.from_spec(CHURN)
    z = encoding.expand(encoding.rows_to_inputs(rows))
    per_feature = CHURN_WEIGHT[1] * (z - training_mean(CHURN))
    groups = [0, 0, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3]  # age (+ missing), income, city, plan
    out = np.zeros((len(rows), 4))
    np.add.at(out.T, groups, per_feature.T)
    return out


def test_an_instance_is_explained_from_the_registry(capsys, home):
    result = kiln_json(
        capsys,
        "explain",
        "churn",
        "--instance",
        json.dumps(CUSTOMER),
        "--target",
        "yes",
        "--home",
        home,
    )
    assert result["ref"] == "churn@1" and result["predictions"] == ["yes"]
    assert result["inputs"] == ["age", "income", "city", "plan"]
    assert result["values"] == [[31.0, 52000.0, "lima", "pro"]]
    explanation = result["explanations"][0]
    assert (explanation["target"], explanation["method"]) == ("yes", "integrated_gradients")
    np.testing.assert_allclose(
        explanation["attributions"], expected_yes([CUSTOMER])[0], rtol=1e-4, atol=1e-6
    )


def test_a_row_of_a_csv_equals_the_same_values_given_inline(capsys, home, tmp_path):
    table = customers(50, seed=3)
    path = write_csv(table, tmp_path / "people.csv")
    row = table.slice(7, 1).to_pylist()[0]
    inline = {k: row[k] for k in ("age", "income", "city", "plan")}
    from_row = kiln_json(
        capsys, "explain", "churn", "--row", "7", "--data", str(path), "--home", home
    )
    from_json = kiln_json(
        capsys, "explain", "churn", "--instance", json.dumps(inline), "--home", home
    )
    assert from_row["explanations"] == from_json["explanations"]
    assert from_row["predictions"] == from_json["predictions"]


def test_the_table_lists_the_inputs_by_size_and_the_plot_is_drawn(capsys, home, tmp_path):
    import matplotlib.image

    plot = tmp_path / "why.png"
    code, out, err = kiln(
        capsys,
        "explain",
        "churn",
        "--instance",
        json.dumps(CUSTOMER),
        "--target",
        "yes",
        "--plot",
        str(plot),
        "--home",
        home,
    )
    assert code == 0, err
    expected = expected_yes([CUSTOMER])[0]
    names = ["age", "income", "city", "plan"]
    by_size = [names[j] for j in np.argsort(-np.abs(expected))]
    listed = [line for line in out.splitlines() if any(f" {n} " in line for n in names)]
    first_column = [next(n for n in names if f" {n} " in line) for line in listed]
    assert first_column == by_size
    image = matplotlib.image.imread(plot)
    assert image.shape[0] > 100 and image[..., :3].std() > 0.05  # bars, not a blank page


def test_a_model_without_inputs_takes_a_row_of_numbers(capsys, home):
    result = kiln_json(
        capsys,
        "explain",
        "tiny",
        "--instance",
        "[0.1, 0.2, 0.3, 0.4]",
        "--method",
        "feature_ablation",
        "--home",
        home,
    )
    assert result["inputs"] == ["x0", "x1", "x2", "x3"]
    assert len(result["explanations"][0]["attributions"]) == 4


def test_a_synthetic_row_is_read_as_training_reads_it(capsys, home):
    from kiln.actors.sources import parse_synthetic, synthetic_rows
    from kiln.training.data import batch_features

    uri = "synthetic:classification?rows=20&features=4&classes=3"
    result = kiln_json(capsys, "explain", "tiny", "--row", "5", "--data", uri, "--home", home)
    expected = batch_features(synthetic_rows(parse_synthetic(uri), 5, 6))[0]
    np.testing.assert_allclose(result["values"][0], expected, rtol=1e-6)
    code, _, err = kiln(
        capsys, "explain", "tiny", "--row", "5", "--data", uri.replace("=4", "=5"), "--home", home
    )
    assert code == 2 and "takes 4 values a row; got 5" in err


@pytest.mark.parametrize(
    "args,fragment",
    [
        ([], "Give either --instance JSON or --row N --data URI"),
        (["--row", "1"], "without --data"),
        (["--instance", "[1, 2"], "not JSON"),
        (["--instance", '{"town": "lima"}'], 'unknown input "town"'),
        (["--instance", json.dumps(CUSTOMER), "--target", "maybe"], "Choose one of the classes"),
        (["--instance", json.dumps(CUSTOMER), "--method", "lime"], "integrated_gradients"),
        (["--instance", json.dumps(CUSTOMER), "--steps", "0"], "n_steps"),
        (["--row", "5000", "--data", "sklearn:iris"], "150 rows"),
        (["--row", "0", "--data", "sklearn:iris"], "no column 'age'"),
        (["--instance", json.dumps(CUSTOMER), "--plot", "why.jpg"], ".png"),
    ],
)
def test_bad_input_is_one_line_naming_the_fix(capsys, home, args, fragment):
    code, out, err = kiln(capsys, "explain", "churn", *args, "--home", home)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and fragment in err, err
    assert "Traceback" not in err


def test_an_unknown_version_is_one_line(capsys, home):
    code, _, err = kiln(capsys, "explain", "churn@9", "--instance", "[1]", "--home", home)
    assert code == 2 and "churn" in err and len(err.strip().splitlines()) == 1


def test_the_options_name_what_the_library_takes():
    from kiln.cli import explain as command
    from kiln.training import explain as library

    assert command.METHODS == library.METHODS
    assert (command.INTEGRATED_GRADIENTS, command.DEFAULT_STEPS) == (
        library.INTEGRATED_GRADIENTS,
        library.DEFAULT_STEPS,
    )
