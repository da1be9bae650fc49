"""The README's main job: `clip-lens check`."""

from clip_lens.cli import main


def test_check_command_reports_parity(capsys):
    assert main(["check", "--model", "ViT-B-32", "--images", "1"]) == 0
    out = capsys.readouterr().out
    assert "parity OK" in out and "logits" in out and "hook points cached: 423" in out


def test_check_command_fails_when_tolerance_cannot_hold(capsys):
    assert main(["check", "--images", "1", "--tolerance", "0"]) == 1
    assert "parity FAILED" in capsys.readouterr().out
