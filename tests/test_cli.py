"""Bad input exits non-zero with a message naming the problem and the fix, and writes nothing."""
import pytest

from clip_poison.cli import main


def test_missing_dataset_file(bad_input, tmp_path):
    bad_input(["poison", "backdoor", "--data", tmp_path / "nope.csv", "--out", tmp_path / "p"],
              what="dataset CSV does not exist", kind="missing input", expect=["not found", "nope.csv"])
    assert not (tmp_path / "p").exists()


def test_label_with_no_matching_captions(bad_input, tiny_world, tmp_path):
    bad_input(["poison", "backdoor", "--data", tiny_world / "train.csv", "--label", "zebra", "--out", tmp_path / "p"],
              what="label in no caption", kind="mismatch", expect=["zebra", "--synonyms"])
    assert not list(tmp_path.iterdir())


def test_patch_larger_than_image(bad_input, tiny_world, tmp_path):
    bad_input(["poison", "backdoor", "--data", tiny_world / "train.csv", "--patch-size", "64", "--out", tmp_path / "p"],
              what="`--patch-size` larger than the input size", kind="invalid value", expect=["does not fit", "--patch-size"])
    assert not list(tmp_path.iterdir())


def test_unknown_model(bad_input, tiny_world, tmp_path):
    bad_input(["train", "--data", tiny_world / "train.csv", "--model", "resnet-9000", "--out", tmp_path / "v"],
              what="unknown `--model`", kind="unsupported", expect=["unknown model", "list models"])
    assert not list(tmp_path.iterdir())


def test_csv_missing_column(bad_input, tmp_path):
    (tmp_path / "d.csv").write_text("path,caption\na.png,hello\n")
    bad_input(["poison", "backdoor", "--data", tmp_path / "d.csv", "--out", tmp_path / "p"],
              what="CSV without the image/caption columns", kind="malformed input", expect=["filepath", "--csv-img-key"])


def test_corrupt_image_in_source(bad_input, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    (tmp_path / "d.csv").write_text("filepath,title\nbad.png,a tent\n")
    bad_input(["poison", "backdoor", "--data", tmp_path / "d.csv", "--n-poisons", "1", "--out", tmp_path / "p"],
              what="corrupt image file in the dataset", kind="malformed input", expect=["bad.png", "could not be decoded"])
    assert not (tmp_path / "p").exists()


def test_existing_output_is_not_overwritten(bad_input, tiny_world, tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "keep.txt").write_text("mine")
    bad_input(["poison", "backdoor", "--data", tiny_world / "train.csv", "--n-poisons", "2", "--out", tmp_path / "p"],
              what="`--out` exists and is not empty", kind="output conflict", expect=["--overwrite"])
    assert (tmp_path / "p" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("cmd", ["demo", "world", "poison", "train", "evaluate", "scan", "repair", "list"])
def test_every_command_has_help_with_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "example:" in capsys.readouterr().out
