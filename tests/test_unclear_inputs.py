"""The last unclear inputs: `tools.table --out` below an existing file is one error line naming the option and
the file (it was a NotADirectoryError traceback); `tools.analysis` names every image it leaves out because it
does not decode, a truncated JPEG included, with why. (Resuming onto other training data naming `data.root`:
tests/test_skip_and_resume.py, for every task.)"""

import io

from PIL import Image

from core import checkpoint as ckpt


def test_table_out_below_a_file_is_one_line_naming_the_option_and_the_file(tmp_path, capsys):
    from tools.table.cli import main

    runs = tmp_path / "runs"
    runs.mkdir()
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder would go")
    assert main(["--runs", str(runs), "--out", str(blocker / "table")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == f"error: --out={blocker / 'table'}: cannot be created, {blocker} is a file", err
    assert main(["--runs", str(runs), "--out", str(blocker)]) == 2  # the file itself
    assert "is a file, expected a folder" in capsys.readouterr().err
    assert blocker.read_text() == "a file where a folder would go"


def test_analysis_names_a_truncated_jpeg_it_skips(tmp_path, capsys):
    import torch

    from core.vit import build_vit
    from tools import analysis

    data = tmp_path / "images"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        pixels = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"ok{k}.jpg", quality=95)
    whole = io.BytesIO()
    Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(whole, "JPEG")
    truncated = data / "cut.jpg"
    truncated.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])  # the header reads, the data ends
    assert Image.open(truncated).size == (64, 64)  # the kind of file an open() alone does not catch
    model = build_vit("tiny")
    model.initialize_weights(torch.Generator().manual_seed(0))
    path = tmp_path / "vit.pth"
    ckpt.save(model.state_dict(), path)
    result = analysis.run([str(path)], data, tmp_path / "out", batch_size=2, device="cpu")
    assert result["models"][0]["images"] == 3 and result["models"][0]["skipped_images"] == [str(truncated)]
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(lines) == 1, lines
    assert str(truncated) in lines[0] and "truncated" in lines[0], lines
