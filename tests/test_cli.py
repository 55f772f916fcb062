"""Bad input exits non-zero with a message naming the problem and the fix, and writes nothing."""
import pytest

from clip_poison.cli import main


def run(capsys, *argv):
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def test_missing_dataset_file(capsys, tmp_path):
    rc, err = run(capsys, "poison", "backdoor", "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "p"))
    assert rc == 2 and "not found" in err and "nope.csv" in err
    assert not (tmp_path / "p").exists()


def test_label_with_no_matching_captions(capsys, tiny_world, tmp_path):
    rc, err = run(capsys, "poison", "backdoor", "--data", str(tiny_world / "train.csv"), "--label", "zebra",
                  "--out", str(tmp_path / "p"))
    assert rc == 2 and "zebra" in err and "templates" in err
    assert not list(tmp_path.iterdir())


def test_patch_larger_than_image(capsys, tiny_world, tmp_path):
    rc, err = run(capsys, "poison", "backdoor", "--data", str(tiny_world / "train.csv"), "--patch-size", "64",
                  "--out", str(tmp_path / "p"))
    assert rc == 2 and "does not fit" in err and "--patch-size" in err
    assert not list(tmp_path.iterdir())


def test_unknown_model(capsys, tiny_world, tmp_path):
    rc, err = run(capsys, "train", "--data", str(tiny_world / "train.csv"), "--model", "resnet-9000",
                  "--out", str(tmp_path / "v"))
    assert rc == 2 and "unknown model" in err and "list models" in err
    assert not list(tmp_path.iterdir())


def test_csv_missing_column(capsys, tmp_path):
    (tmp_path / "d.csv").write_text("path,caption\na.png,hello\n")
    rc, err = run(capsys, "poison", "backdoor", "--data", str(tmp_path / "d.csv"), "--out", str(tmp_path / "p"))
    assert rc == 2 and "filepath" in err and "--csv-img-key" in err


def test_corrupt_image_in_source(capsys, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    (tmp_path / "d.csv").write_text("filepath,title\nbad.png,a tent\n")
    rc, err = run(capsys, "poison", "backdoor", "--data", str(tmp_path / "d.csv"), "--n-poisons", "1",
                  "--out", str(tmp_path / "p"))
    assert rc == 2 and "bad.png" in err and "could not be decoded" in err
    assert not (tmp_path / "p").exists()


def test_existing_output_is_not_overwritten(capsys, tiny_world, tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "keep.txt").write_text("mine")
    rc, err = run(capsys, "poison", "backdoor", "--data", str(tiny_world / "train.csv"), "--n-poisons", "2",
                  "--out", str(tmp_path / "p"))
    assert rc == 2 and "--overwrite" in err
    assert (tmp_path / "p" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("cmd", ["demo", "world", "poison", "train", "evaluate", "list"])
def test_every_command_has_help_with_an_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "example:" in capsys.readouterr().out
