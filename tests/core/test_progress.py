"""mmgrpo.core.progress: an evaluation's batches show a bar only where the trainer turned bars on."""

from mmgrpo.core import progress


def test_batches_are_a_range_and_draw_a_bar_only_inside_shown(capsys):
    assert list(progress.batches(10, 4)) == [0, 4, 8]
    assert list(progress.batches(0, 4)) == [] and list(progress.batches(3, 0)) == [0, 1, 2]  # size 0 -> 1
    assert capsys.readouterr().err == ""
    with progress.shown("run eval, step 0"):
        assert list(progress.batches(10, 4, unit="scene")) == [0, 4, 8]
        err = capsys.readouterr().err
        assert "run eval, step 0:" in err and "/10 " in err and "scene" in err  # cleared at the end (leave=False)
        assert list(progress.batches(4, 4)) == [0]  # one batch: no bar
        assert capsys.readouterr().err == ""
        with progress.shown(None):  # another rank, trainer.progress false
            assert list(progress.batches(10, 4)) == [0, 4, 8]
        assert capsys.readouterr().err == ""
    assert list(progress.batches(10, 4)) == [0, 4, 8] and capsys.readouterr().err == ""
