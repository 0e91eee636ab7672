"""Shared by the tests of user-facing errors: a command failed with one line on stderr."""


def one_line(capsys, *words):
    """The stderr of the command just run: one line, no traceback, holding each of ``words``."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    return err
